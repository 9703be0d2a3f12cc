"""corral against its peers on the agent's step path, in one run, round by round.

The same workloads through corral and through each peer installed here: bare bubblewrap (the floor),
firejail, podman (Debian's, runc), Anthropic's sandbox-runtime (`srt`, npm) and SWE-ReX's local
runtime. A peer that is missing is named and skipped. Rows (ms; ratios to corral's row in the same
run):
- one command's round trip in a sandbox that is already running (`echo hi`): corral's session command
  and `sb.exec`; bash reading commands over pipes inside one bwrap (the floor); `firejail --join`;
  `podman exec`; a SWE-ReX bash session;
- 300 x `/bin/true` in a shell loop inside a running sandbox (every exec judged, in corral's case);
- create -> first output: corral cold and from its warm pool; `bwrap ... echo`; `firejail echo`;
  `srt -c echo`; `podman run --rm`.
Every workload alternates between the tools sample by sample, except SWE-ReX's, which runs in its own
interpreter (its own venv) in one block between corral's samples.

Run (make bench does; make bench installs the peers: firejail and podman by apt, srt by npm and SWE-ReX
by pip, both under benchmarks/.peers/):
    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_peers.py [--quick]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_runtime import Metric, Report, Target, ms_since, p50_ratio, preflight, render, wait_pool, write_results

from corral import Runtime, RuntimeConfig, SandboxConfig

PEERS = Path(__file__).parent / ".peers"
LOOP = "for i in $(seq 300); do /bin/true; done"
BWRAP = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
         "--unshare-all", "--die-with-parent", "--new-session"]
SWEREX = """
import asyncio, json, sys, time
from swerex.runtime.local import LocalRuntime
from swerex.runtime.abstract import BashAction, CreateBashSessionRequest
async def main(n):
    rt = LocalRuntime()
    await rt.create_session(CreateBashSessionRequest())
    out = {"rt": [], "loop": []}
    for key, cmd in (("rt", "echo hi"), ("loop", sys.argv[2])):
        for _ in range(n):
            t = time.perf_counter()
            await rt.run_in_session(BashAction(command=cmd, timeout=60))
            out[key].append((time.perf_counter() - t) * 1000)
    print(json.dumps(out))
asyncio.run(main(int(sys.argv[1])))
"""


def which(*names: str) -> str | None:
    for n in names:
        found = shutil.which(n) or (str(PEERS / n) if (PEERS / n).exists() else None)
        if found:
            return found
    return None


class PipeShell:
    """bash inside one bwrap, fed commands over a pipe: the floor of a command in a running sandbox."""

    def __init__(self) -> None:
        self.p = subprocess.Popen([*BWRAP, "bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)

    def run(self, cmd: str) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(f"{cmd}; echo __M__\n".encode())
        buf = b""
        while not buf.endswith(b"__M__\n"):
            chunk = self.p.stdout.read(65536)  # unbuffered: what the pipe holds now
            if not chunk:
                raise RuntimeError("the bwrap shell ended")
            buf += chunk

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def timed(argv: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120, **kw)
    return ms_since(t0)


class Podman:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="corral-bench-peers-podman-"))
        self.pod = ["podman", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                    "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none",
                    *(["--runtime", "runc"] if shutil.which("runc") else [])]
        self.limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=none"]
        tree = self.root / "tree"
        for d in ("bin", "tmp"):
            (tree / d).mkdir(parents=True)
        shutil.copy2(which("busybox") or "/bin/busybox", tree / "bin/busybox")
        for applet in ("sh", "true", "echo", "seq", "sleep"):
            (tree / "bin" / applet).symlink_to("busybox")
        layout = self.root / "layout"
        for argv in (["umoci", "init", "--layout", str(layout)], ["umoci", "new", "--image", f"{layout}:1"],
                     ["umoci", "insert", "--image", f"{layout}:1", str(tree), "/"],
                     ["umoci", "config", "--image", f"{layout}:1", "--config.env", "PATH=/bin"]):
            subprocess.run(argv, check=True, capture_output=True)
        self.run("pull", "-q", f"oci:{layout}:1")
        self.image = self.run("images", "-q").split()[0]
        self.cid = self.run("run", "-d", *self.limits, self.image, "sleep", "100000").strip()

    def run(self, *args: str) -> str:
        return subprocess.run([*self.pod, *args], check=True, capture_output=True, text=True).stdout

    def close(self) -> None:
        subprocess.run([*self.pod, "system", "reset", "-f"], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


async def run_bench(rep: Report, n: int) -> None:
    firejail, srt = which("firejail"), which("node/node_modules/.bin/srt", "srt")
    swerex = PEERS / "venv/bin/python"
    podman: Podman | None = None
    if shutil.which("podman") and shutil.which("umoci"):
        try:
            podman = Podman()
        except (subprocess.CalledProcessError, OSError) as e:
            rep.errors["podman"] = f"podman did not start a container here: {str(e)[-200:]}"
    else:
        rep.errors["podman"] = "not installed (apt-get install podman runc umoci)"
    fj_name = f"corral-bench-{os.getpid()}"
    fj = None
    if firejail:
        fj = subprocess.Popen([firejail, "--quiet", "--noprofile", f"--name={fj_name}", "sleep", "100000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)
    else:
        rep.errors["firejail"] = "not installed (apt-get install firejail)"
    if not srt:
        rep.errors["srt"] = "not installed (npm install --prefix benchmarks/.peers/node @anthropic-ai/sandbox-runtime)"
    if not swerex.exists():
        rep.errors["swe-rex"] = "not installed (python -m venv benchmarks/.peers/venv && its pip install swe-rex)"
    shell = PipeShell()
    state = Path(tempfile.mkdtemp(prefix="corral-bench-peers-"))
    rt = Runtime(RuntimeConfig(state_dir=state, system_dns=False))
    try:
        await rt.start()
        sb = await rt.create(SandboxConfig())
        await sb.create_session("s")
        for _ in range(20):  # warm every path once
            await sb.run_in_session("s", "echo hi")
            await sb.exec("echo hi")
            shell.run("echo hi")

        rep.group("one command in a running sandbox: echo hi")
        sess = rep.add(Metric("rt_corral_session", "corral: session command (run_in_session)", "ms"))
        rows: dict[str, tuple[Metric, Any]] = {
            "floor": (rep.add(Metric("rt_bwrap_pipe", "bwrap: bash over pipes (the floor)", "ms",
                                     baseline="rt_corral_session")), lambda: shell.run("echo hi")),
            "exec": (rep.add(Metric("rt_corral_exec", "corral: sb.exec", "ms", baseline="rt_corral_session")), None),
        }
        if fj is not None:
            join = Metric("rt_firejail_join", "firejail --join", "ms", baseline="rt_corral_session")
            rows["firejail"] = (rep.add(join), lambda: timed([firejail, "--quiet", f"--join={fj_name}", "echo", "hi"]))
        if podman is not None:
            rows["podman"] = (rep.add(Metric("rt_podman_exec", "podman exec", "ms", baseline="rt_corral_session")),
                              lambda: timed([*podman.pod, "exec", podman.cid, "echo", "hi"]))
        for _ in range(n):
            t0 = time.perf_counter()
            await sb.run_in_session("s", "echo hi")
            sess.samples.append(ms_since(t0))
            for key, (m, fn) in rows.items():
                t0 = time.perf_counter()
                if key == "exec":
                    await sb.exec("echo hi")
                else:
                    await asyncio.to_thread(fn)
                m.samples.append(ms_since(t0))
        if swerex.exists():
            out = subprocess.run([str(swerex), "-c", SWEREX, str(max(n // 2, 3)), LOOP], capture_output=True,
                                 text=True, timeout=600)
            if out.returncode == 0:
                res = json.loads(out.stdout.strip().splitlines()[-1])
                m = rep.add(Metric("rt_swerex_session", "SWE-ReX local runtime: bash session", "ms",
                                   baseline="rt_corral_session"))
                m.samples = res["rt"]
            else:
                rep.errors["swe-rex"] = out.stderr.strip()[-300:]
                res = None
        else:
            res = None

        rep.group(f"a loop in a running sandbox: {LOOP}")
        loop = rep.add(Metric("loop_corral", "corral: session command (each exec judged)", "ms"))
        floor = rep.add(Metric("loop_bwrap", "bwrap: bash over pipes (the floor)", "ms", baseline="loop_corral"))
        pod_loop = rep.add(Metric("loop_podman", "podman exec sh -c LOOP (includes podman exec)", "ms",
                                  baseline="loop_corral")) if podman is not None else None
        for _ in range(max(n // 3, 3)):
            t0 = time.perf_counter()
            await sb.run_in_session("s", LOOP)
            loop.samples.append(ms_since(t0))
            t0 = time.perf_counter()
            await asyncio.to_thread(shell.run, LOOP)
            floor.samples.append(ms_since(t0))
            if pod_loop is not None and podman is not None:
                pod_loop.samples.append(await asyncio.to_thread(timed, [*podman.pod, "exec", podman.cid, "sh", "-c",
                                                                        LOOP]))
        if res is not None:
            m = rep.add(Metric("loop_swerex", "SWE-ReX local runtime: bash session", "ms", baseline="loop_corral"))
            m.samples = res["loop"]

        rep.group("create -> first output")
        cold = rep.add(Metric("create_corral_cold", "corral: create + exec, cold", "ms"))
        warm = rep.add(Metric("create_corral_warm", "corral: create + exec, warm pool K=4", "ms",
                              baseline="create_corral_cold"))
        spawners: dict[str, tuple[Metric, list[str]]] = {
            "bwrap": (rep.add(Metric("create_bwrap", "bwrap ... echo hi", "ms", baseline="create_corral_cold")),
                      [*BWRAP, "echo", "hi"])}
        if firejail:
            spawners["firejail"] = (rep.add(Metric("create_firejail", "firejail --noprofile echo hi", "ms",
                                                   baseline="create_corral_cold")),
                                    [firejail, "--quiet", "--noprofile", "echo", "hi"])
        if srt:
            spawners["srt"] = (rep.add(Metric("create_srt", "srt -c 'echo hi'", "ms", baseline="create_corral_cold")),
                               [srt, "-c", "echo hi"])
        if podman is not None:
            spawners["podman"] = (rep.add(Metric("create_podman", "podman run --rm IMAGE echo hi", "ms",
                                                 baseline="create_corral_cold")),
                                  [*podman.pod, "run", "--rm", *podman.limits, podman.image, "echo", "hi"])
        cfg = SandboxConfig(hostname="peers-warm")
        await rt.prewarm(cfg, size=4)
        for _ in range(max(n // 3, 3)):
            t0 = time.perf_counter()
            s2 = await rt.create(SandboxConfig())
            await s2.exec("echo hi")
            cold.samples.append(ms_since(t0))
            await s2.close()
            await wait_pool(rt, cfg, 4)
            t0 = time.perf_counter()
            s2 = await rt.create(cfg)
            await s2.exec("echo hi")
            warm.samples.append(ms_since(t0))
            await s2.close()
            for key, (m, argv) in list(spawners.items()):
                try:
                    m.samples.append(await asyncio.to_thread(timed, argv))
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                    rep.errors[key] = f"{' '.join(argv[:3])}: {e}"
                    del spawners[key]
    finally:
        await rt.close()
        shell.close()
        if fj is not None:
            fj.kill()
            fj.wait()
        if podman is not None:
            podman.close()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small n")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/peers.json)")
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    console, machine = pre
    rep = Report()
    asyncio.run(run_bench(rep, 10 if args.quick else 60))

    tgts = [Target("session round trip <= 1.5 ms", lambda r: r.metrics["rt_corral_session"].p50,
                   lambda v: v <= 1.5, lambda v: f"{v:.2f} ms"),
            Target("... <= 10x the bash-over-pipes floor", p50_ratio("rt_corral_session", "rt_bwrap_pipe"),
                   lambda v: v <= 10, lambda v: f"{v:.1f}x"),
            Target("300 x /bin/true <= 1.3x the floor", p50_ratio("loop_corral", "loop_bwrap"),
                   lambda v: v <= 1.3, lambda v: f"{v:.2f}x"),
            Target("warm create -> first output <= 2x bare bwrap", p50_ratio("create_corral_warm", "create_bwrap"),
                   lambda v: v <= 2, lambda v: f"{v:.1f}x"),
            Target("cold create -> first output <= 30 ms", lambda r: r.metrics["create_corral_cold"].p50,
                   lambda v: v <= 30, lambda v: f"{v:.0f} ms")]
    render(console, rep, tgts, title="corral and its peers", notes=[f"{k}: {v}" for k, v in rep.errors.items()])
    write_results(console, "peers", rep, tgts, machine, args.quick, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
