"""corral images benchmark: a sandbox on an OCI image, against podman on the same image in the same run.

Rows: create -> first exec from an image already in the store (user namespace with a uid range,
idmapped image, writable layer, agent), reset of a dirty writable layer, and the same create -> first
exec on the host's root; `podman run --rm IMAGE true` and `podman exec` into a running container of
the same image (podman's own storage, no network). Medians and ratios; nothing asserted.

Run (make bench does):  unshare --net --mount --propagation private -- sh -c
    'ip link set lo up && .venv/bin/python benchmarks/bench_images.py [--quick]'
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_runtime import (
    Metric,
    Report,
    Target,
    ms_since,
    p50_ratio,
    preflight,
    render,
    wait_pool,
    wait_spare,
    write_results,
)

from corral import Runtime, RuntimeConfig, SandboxConfig

IMAGE_DIR = Path("/var/cache/corral/bench-images")


def build_image(base: Path) -> Path:
    """A busybox image (static, no libc needed), built offline with umoci."""
    tree = base / "tree"
    for d in ("bin", "etc", "usr/local/bin", "app"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", tree / "bin/busybox")
    for applet in ("sh", "true", "dd", "ls", "cat", "sleep"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    layout = base / "layout"
    for argv in (["umoci", "init", "--layout", str(layout)], ["umoci", "new", "--image", f"{layout}:1"],
                 ["umoci", "insert", "--image", f"{layout}:1", str(tree), "/"],
                 ["umoci", "config", "--image", f"{layout}:1", "--config.env", "PATH=/bin"]):
        subprocess.run(argv, check=True, capture_output=True)
    return layout


async def corral_rows(rep: Report, n: int, layout: Path) -> None:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-images-"))
    rt = Runtime(RuntimeConfig(state_dir=state, system_dns=False, image_dir=IMAGE_DIR))
    image = SandboxConfig(image=f"oci:{layout}:1")
    try:
        await rt.start()
        sb = await rt.create(image)  # pulls and unpacks once: the rows below start from the store
        await sb.close()
        host = rep.add(Metric("create_host", "create -> first exec, host root (cold)", "ms"))
        img = rep.add(Metric("create_image", "create -> first exec, cached image (cold)", "ms", baseline="create_host"))
        for _ in range(n):
            for cfg, m in ((SandboxConfig(), host), (image, img)):
                t0 = time.perf_counter()
                sb = await rt.create(cfg)
                r = await sb.exec("true")
                m.samples.append(ms_since(t0))
                assert r.ok, r
                await sb.close()
        warm = rep.add(Metric("create_image_warm", "create -> first exec, cached image, warm pool K=4", "ms",
                              baseline="create_image"))
        await rt.prewarm(image, size=4)
        key = await rt._with_image(image)  # the pool's key: the config with its image resolved
        for _ in range(n):
            await wait_pool(rt, key, 4)  # refilled between samples, as in steady use
            t0 = time.perf_counter()
            sb = await rt.create(image)
            r = await sb.exec("true")
            warm.samples.append(ms_since(t0))
            assert r.ok and sb.uid >= 1 << 31, r  # an image sandbox, from the pool
            await sb.close()
        relaunch = rep.add(Metric("reset_image_relaunch", "reset() of a dirty writable layer, first reset "
                                  "(a relaunch: no spare yet)", "ms"))
        reset = rep.add(Metric("reset_image", "reset() of a dirty writable layer (8 MiB in /usr), spare ready",
                               "ms", baseline="reset_image_relaunch"))
        nxt = rep.add(Metric("reset_image_next", "  the command after it (reset -> its output)", "ms"))
        dirty = "dd if=/dev/zero of=/usr/local/bin/blob bs=1M count=8 2>/dev/null"
        for _ in range(n):
            sb = await rt.create(image)
            try:
                await sb.exec(dirty)
                t0 = time.perf_counter()
                await sb.reset()
                relaunch.samples.append(ms_since(t0))
            finally:
                await sb.close()
        sb = await rt.create(image)
        try:
            await sb.reset()
            for _ in range(n):
                await sb.exec(dirty)
                await wait_spare(sb)  # in use an episode's steps run meanwhile: the spare is ready by then
                t0 = time.perf_counter()
                await sb.reset()
                reset.samples.append(ms_since(t0))
                t1 = time.perf_counter()
                r = await sb.exec("ls /usr/local/bin/blob")
                nxt.samples.append(ms_since(t1))
                assert not r.ok
        finally:
            await sb.close()
    finally:
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)


def podman_rows(rep: Report, n: int, layout: Path) -> None:
    if shutil.which("podman") is None:
        rep.errors["podman"] = "podman is not installed (apt-get install podman): no peer rows"
        return
    root = Path(tempfile.mkdtemp(prefix="corral-bench-podman-"))
    # runc: crun refuses a machine whose cgroups are mounted both v1 and v2 ("hybrid"), as this one's are
    pod = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs",
           "--cgroup-manager", "cgroupfs", "--events-backend", "none",
           *(["--runtime", "runc"] if shutil.which("runc") else [])]
    # podman's default ulimits exceed this process's hard limits: the container gets ordinary ones
    limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

    def run(*args: str) -> str:
        return subprocess.run([*pod, *args], check=True, capture_output=True, text=True).stdout

    try:
        run("pull", "-q", f"oci:{layout}:1")
        images = run("images", "-q").split()
        image = images[0]
        prun = rep.add(Metric("podman_run", "podman run --rm --network=none IMAGE true", "ms"))
        for _ in range(n):
            t0 = time.perf_counter()
            run("run", "--rm", "--network=none", *limits, image, "true")
            prun.samples.append(ms_since(t0))
        cid = run("run", "-d", "--network=none", *limits, image, "sleep", "1000").strip()
        pexec = rep.add(Metric("podman_exec", "podman exec CONTAINER true", "ms"))
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                run("exec", cid, "true")
                pexec.samples.append(ms_since(t0))
        finally:
            run("rm", "-f", "-t", "0", cid)
        rep.metrics["create_image"].extra["vs_podman_run"] = "podman_run"
    except subprocess.CalledProcessError as e:
        rep.errors["podman"] = f"{' '.join(e.cmd[-4:])}: {(e.stderr or '').strip()[-300:]}"
    finally:
        subprocess.run([*pod, "system", "reset", "-f"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small n")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/images.json)")
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    console, machine = pre
    n = 5 if args.quick else 20
    base = Path(tempfile.mkdtemp(prefix="corral-bench-image-src-"))
    rep = Report()
    try:
        layout = build_image(base)
        rep.group("corral")
        asyncio.run(corral_rows(rep, n, layout))
        rep.group("podman, same image, same run")
        podman_rows(rep, n, layout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(IMAGE_DIR, ignore_errors=True)

    tgts = [Target("create -> first exec from a cached image >= 10x faster than podman run (cold)",
                   p50_ratio("podman_run", "create_image"), lambda v: v >= 10, lambda v: f"{v:.1f}x faster"),
            Target("... from the warm pool",
                   p50_ratio("podman_run", "create_image_warm"), lambda v: v >= 10, lambda v: f"{v:.1f}x faster"),
            Target("reset of a dirty writable layer <= 20 ms (spare ready)",
                   lambda r: r.metrics["reset_image"].p50 if r.metrics.get("reset_image") else None,
                   lambda v: v <= 20, lambda v: f"{v:.1f} ms")]
    extra: dict[str, Any] = {}
    render(console, rep, tgts, title="corral images benchmark", notes=[f"{k}: {v}" for k, v in rep.errors.items()])
    write_results(console, "images", rep, tgts, machine, args.quick, args.out, **extra)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
