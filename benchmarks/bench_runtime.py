#!/usr/bin/env python3
"""corral runtime benchmarks: sandbox create, exec, reset, memory per sandbox, and the egress gateway.

Every figure is printed next to a baseline measured in the same run (host processes, plain bwrap,
loopback sockets), because the machines this runs on are shared and noisy: a ratio against a baseline
taken seconds apart says more than an absolute number. Where it is cheap, sandbox and baseline samples
are interleaved, so a burst of load from a neighbour hits both.

Run it with `make bench`, i.e. as root inside a private network namespace:

    unshare --net --mount --propagation private -- \
        sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_runtime.py'

It refuses to run anywhere else: the benchmark builds a fake internet (corral.testworld) and must never
reach the machine's real network. `--quick` shrinks every n for a smoke run (results go to a separate
file so they never overwrite a full run's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from corral import EgressPolicy, Runtime, RuntimeConfig, Sandbox, SandboxConfig
from corral import testworld as tw
from corral.sandbox.cgroups import discover
from corral.testworld import World

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB = 1 << 20

# The fake internet the gateway benchmark talks to (documentation addresses, routed only to the World).
BULK_ADDR = ("198.51.100.40", 9000, "bulk.example.com")
ECHO_ADDR = ("198.51.100.41", 7, "echo.example.com")
EGRESS_CIDR = "198.51.100.0/24"
# The PATH a sandbox's commands get (corral's agent sets it): resolving python3 with it on the host gives
# the very interpreter the sandbox runs, so host baselines and sandbox runs use the same binary.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The client programs: the exact same source runs inside a sandbox (through the gateway) and on the host
# (against loopback), so the only difference between the two figures is the path the bytes take.
CONNECT_PROG = """\
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"ping")
    data = s.recv(64)
    s.close()
    out.append(time.perf_counter() - t0)
    if data != b"ping":
        raise SystemExit("bad echo: %r" % data)
print(json.dumps(out))
"""

BULK_PROG = """\
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
buf = bytearray(1 << 20)
t0 = time.perf_counter()
s = socket.create_connection((host, port), timeout=30)
s.sendall(b"go\\n")
total = 0
while True:
    n = s.recv_into(buf)
    if not n:
        break
    total += n
dt = time.perf_counter() - t0
s.close()
print(json.dumps({"bytes": total, "seconds": dt}))
"""


# -- statistics ------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); with n=30, p99 is close to the max."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None  # key of the metric this one is compared with (measured in this run)
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan

    def summary(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "n": self.n, "p50": _r(self.p50), "p99": _r(self.p99),
                "mean": _r(self.mean), "min": _r(min(self.samples, default=math.nan)),
                "max": _r(max(self.samples, default=math.nan))}


def _r(x: float) -> float | None:
    """JSON has no NaN: a missing figure is null."""
    return None if math.isnan(x) else round(x, 4)


@dataclass
class Target:
    """An informational goal, printed beside the figures and never asserted (the machine is shared)."""

    label: str
    value: Callable[[Report], float | None]
    ok: Callable[[float], bool]
    fmt: Callable[[float], str]


class Report:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.groups: list[tuple[str, list[str]]] = []
        self.errors: dict[str, str] = {}

    def group(self, title: str) -> None:
        self.groups.append((title, []))

    def add(self, m: Metric, after: str | None = None) -> Metric:
        """Add a row at the end of the current group, or right after the row `after`."""
        self.metrics[m.key] = m
        keys = self.groups[-1][1]
        keys.insert(keys.index(after) + 1 if after in keys else len(keys), m.key)
        return m

    def ratio(self, key: str) -> float | None:
        """p50 of a metric over p50 of its baseline (for latencies > 1 is slower; throughputs < 1 is slower)."""
        m = self.metrics.get(key)
        if m is None or m.baseline is None or m.baseline not in self.metrics or not m.samples:
            return None
        b = self.metrics[m.baseline]
        if not b.samples or b.p50 == 0:
            return None
        return m.p50 / b.p50


# -- machine and environment -------------------------------------------------------------------------------
def in_private_netns() -> bool:
    """A namespace made for this run starts with loopback only (the machine's has a NIC).
    Same check as tests/conftest.py."""
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return names == ["lo"]


def preflight(quick: bool) -> tuple[Console, dict[str, Any]] | None:
    """A console that does not wrap tables when piped, the checks every benchmark makes (a private
    network namespace, since it builds a fake internet, and root), and the machine's particulars,
    read once, before the run. None (after saying why) when a check fails."""
    how_to_run = ("make bench   (runs: unshare --net --mount --propagation private -- sh -c "
                  f"'ip link set lo up && .venv/bin/python benchmarks/{Path(sys.argv[0]).name}')")
    console = Console()
    if not console.is_terminal:  # piped to a file: rich would wrap the table at 80 columns
        console = Console(width=150)
    if not in_private_netns():
        console.print("[red]refusing to run:[/red] this benchmark builds a fake internet and must run in a private "
                      f"network namespace (this one has interfaces besides lo). Run it with:\n  {how_to_run}")
        return None
    if os.geteuid() != 0:
        console.print(f"[red]refusing to run:[/red] corral's runtime needs root. Run it with:\n  {how_to_run}")
        return None
    machine = machine_info()
    console.log(f"{machine['nproc']} cpus, kernel {machine['kernel']}, python {machine['python']}, "
                f"{machine['bwrap']}, load {machine['loadavg_start']}{' [quick]' if quick else ''}")
    return console, machine


def _cmd_out(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip() or None
    return None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    repo = Path(__file__).resolve().parent.parent
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bwrap": _cmd_out(["bwrap", "--version"]),
        "cgroup": discover("probe").version,  # 1 or 2: the hierarchy corral's sandboxes use here
        "loadavg_start": list(os.getloadavg()),
        "git_commit": _cmd_out(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        # the results files are rewritten by the benchmarks themselves: they do not make the code dirty
        "git_dirty": bool(_cmd_out(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                                    "--", ".", ":!benchmarks/results"])),
    }


def self_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_of(pid: int) -> int:
    """Proportional set size: shared pages (python3, libc, page cache) are split among their users, so
    summing it over processes does not count the shared interpreter once per sandbox."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # exited between listing and reading
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


# -- loopback servers for host-side baselines ----------------------------------------------------------------
class LoopbackServer:
    """A threaded TCP server on 127.0.0.1 running a corral.testworld handler, so the host baseline talks
    to the same handler code (and the same GIL) as the World's server behind the gateway."""

    def __init__(self, handler: tw.Handler, name: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        self.srv = tw.Server("127.0.0.1", self.port, name, handler, sock)
        threading.Thread(target=self._accept, daemon=True, name=f"bench-{name}").start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(10)  # as World._run does
        with contextlib.suppress(OSError), conn:
            self.srv.handler(conn, self.srv)

    def close(self) -> None:
        self.srv.sock.close()


# -- helpers -------------------------------------------------------------------------------------------------
def p50_ratio(num: str, den: str) -> Callable[[Report], float | None]:
    """A Target's value: p50 of metric `num` over p50 of metric `den` (None when either is missing)."""
    def value(r: Report) -> float | None:
        a, b = r.metrics.get(num), r.metrics.get(den)
        return a.p50 / b.p50 if a and b and a.samples and b.samples else None
    return value


async def wait_spare(sb, timeout: float = 10.0) -> None:
    """Until the sandbox's next reset is a swap (Sandbox.spare_ready), as it is after an episode's steps."""
    deadline = time.monotonic() + timeout
    while not sb.spare_ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox {sb.id}: no spare deployment within {timeout} s")
        await asyncio.sleep(0.01)


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


async def must_exec(sb: Sandbox, cmd: str, timeout: float = 60) -> str:
    r = await sb.exec(cmd, timeout=timeout)
    if not r.ok:
        raise RuntimeError(f"{cmd[:60]!r} in {sb.id} failed: exit {r.exit_code}, {r.error or ''} {r.stderr[-500:]}")
    return r.stdout


async def host_run(argv: list[str], timeout: float = 300) -> str:
    """Run a host process without blocking the event loop: the gateway and the runtime live on it."""
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: exit {p.returncode}: {err.decode(errors='replace')[-500:]}")
    return out.decode()


async def wait_pool(rt: Runtime, cfg: SandboxConfig, size: int, timeout: float = 60) -> None:
    """Until the warm pool is back to `size` (this wait is not part of any sample)."""
    deadline = time.monotonic() + timeout
    while len(rt._pool.get(cfg, [])) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm pool did not refill to {size} within {timeout:.0f}s "
                               f"(has {len(rt._pool.get(cfg, []))})")
        await asyncio.sleep(0.01)


def bulk_size(quick: bool) -> int:
    return (32 if quick else 256) * MiB


# -- benchmarks ------------------------------------------------------------------------------------------------
def run_script(doc: str | None, quick_help: str,
               main: Callable[[argparse.Namespace, Console, dict[str, Any]], Awaitable[int]]) -> int:
    """A benchmark script's command line: --quick, the shared preflight, then its async main (given
    the console and the machine's particulars)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    return asyncio.run(main(args, *pre))


class BenchBase:
    """What every benchmark script shares: its arguments, console, state dir, report and sections."""

    def __init__(self, args: argparse.Namespace, console: Console, state: Path) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.console = console
        self.state = state
        self.report = Report()
        self.python3 = shutil.which("python3", path=SANDBOX_PATH) or "/usr/bin/python3"

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def log(self, text: str) -> None:
        self.console.log(text)

    async def section(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        """A failing section is reported (in the table and the JSON) and the next one still runs."""
        self.log(f"[bold]{name}[/bold] ...")
        t0 = time.perf_counter()
        try:
            await fn()
        except Exception as e:
            traceback.print_exc()
            self.report.errors[name] = f"{type(e).__name__}: {e}"
            self.log(f"[red]{name} failed: {e}[/red]")
        self.log(f"{name} done in {time.perf_counter() - t0:.1f}s")


class Bench(BenchBase):
    def __init__(self, args: argparse.Namespace, console: Console, state: Path) -> None:
        super().__init__(args, console, state)
        self.bulk_size = bulk_size(self.quick)

    # 1. create -> first exec ------------------------------------------------------------------------------
    async def create_cold(self, rt: Runtime) -> None:
        n = self.n(30, 5)
        cfg = SandboxConfig(hostname="bench-cold")
        rep = self.report
        bwrap = rep.add(Metric("bwrap_spawn", "baseline: bwrap --ro-bind / / true (subprocess.run)", "ms"))
        cold = rep.add(Metric("create_cold", "cold: create → first exec", "ms", baseline="bwrap_spawn"))
        create_only = rep.add(Metric("create_cold_create_only", "  cold: create() alone", "ms"))
        for _ in range(n):
            # interleaved with the baseline, so load from neighbours lands on both
            t0 = time.perf_counter()
            subprocess.run(["bwrap", "--ro-bind", "/", "/", "true"], check=True)
            bwrap.samples.append(ms_since(t0))
            t0 = time.perf_counter()
            sb = await rt.create(cfg)
            create_only.samples.append(ms_since(t0))
            await must_exec(sb, "true")
            cold.samples.append(ms_since(t0))
            await sb.close()

    async def create_warm(self, rt_config: RuntimeConfig) -> None:
        n, k = self.n(30, 5), self.args.pool
        # A runtime of its own: closing it takes the pool down with public API only, and the idle pooled
        # sandboxes cannot distort the memory figures measured later.
        rt = Runtime(rt_config.model_copy(update={"state_dir": self.state / "pool"}))
        await rt.start()
        try:
            cfg = SandboxConfig(hostname="bench-warm")
            rep = self.report
            warm = rep.add(Metric("create_warm", f"warm pool K={k}: create → first exec (refilling)", "ms",
                                  baseline="bwrap_spawn"))
            pop = rep.add(Metric("create_warm_create_only", "  warm: create() alone (pool pop)", "ms"))
            t0 = time.perf_counter()
            await rt.prewarm(cfg, size=k)
            warm.extra["prewarm_ms"] = round(ms_since(t0), 2)
            refill: list[float] = []
            for _ in range(n):
                t0 = time.perf_counter()
                await wait_pool(rt, cfg, k)
                refill.append(ms_since(t0))
                t0 = time.perf_counter()
                sb = await rt.create(cfg)
                pop.samples.append(ms_since(t0))
                # the refill task started by create() now competes with this first exec, as in real use
                await must_exec(sb, "true")
                warm.samples.append(ms_since(t0))
                await sb.close()
            # Diagnostic: the same first exec once the refill has finished, to show how much of the figure
            # above is the background refill competing for the event loop and the CPUs.
            quiet = rep.add(Metric("create_warm_exec_quiet", "  warm: first exec, refill finished", "ms"))
            for _ in range(n):
                await wait_pool(rt, cfg, k)
                sb = await rt.create(cfg)
                await wait_pool(rt, cfg, k)
                t0 = time.perf_counter()
                await must_exec(sb, "true")
                quiet.samples.append(ms_since(t0))
                await sb.close()
            # never close the runtime mid-refill: a build cancelled half-way is not what we measure
            await wait_pool(rt, cfg, k)
            warm.extra["refill_wait_ms_p50"] = round(percentile(refill, 50), 2)
            warm.extra["pool_size_at_end"] = len(rt._pool.get(cfg, []))
        finally:
            await rt.close()

    # 2. exec round trip -----------------------------------------------------------------------------------
    async def exec_round_trip(self, rt: Runtime) -> None:
        n = self.n(200, 20)
        rep = self.report
        ex = rep.add(Metric("exec", 'sb.exec("true")', "ms", baseline="host_async_true"))
        run = rep.add(Metric("host_subprocess_run", 'baseline: host subprocess.run(["true"])', "ms"))
        asy = rep.add(Metric("host_async_true", 'baseline: host asyncio exec "true"', "ms"))
        # corral runs every command as `bash -c CMD`; this row shows how much of exec is bash itself
        bash = rep.add(Metric("host_async_bash", 'reference: host asyncio "bash -c true"', "ms"))
        sb = await rt.create(SandboxConfig(hostname="bench-exec"))
        try:
            await must_exec(sb, "true")  # warm up the agent's first fork
            for _ in range(n):
                t0 = time.perf_counter()
                r = await sb.exec("true")
                ex.samples.append(ms_since(t0))
                if r.exit_code != 0:
                    raise RuntimeError(f"exec true: exit {r.exit_code} {r.error}")
                t0 = time.perf_counter()
                # capture_output: sb.exec captures both streams too
                subprocess.run(["true"], check=True, capture_output=True)
                run.samples.append(ms_since(t0))
                t0 = time.perf_counter()
                await host_run(["true"])
                asy.samples.append(ms_since(t0))
                t0 = time.perf_counter()
                await host_run(["bash", "-c", "true"])
                bash.samples.append(ms_since(t0))
        finally:
            await sb.close()
        # Every exec is a new step with a step cgroup of its own that stays until close; these two rows show
        # whether exec cost grows with the number of steps a sandbox has run (step 1 is the warm-up).
        q = max(1, n // 4)
        first = Metric("exec_first", f"  exec, steps 2-{q + 1}", "ms", ex.samples[:q])
        last = Metric("exec_last", f"  exec, steps {n - q + 2}-{n + 1}", "ms", ex.samples[-q:],
                      baseline="exec_first")
        rep.add(first, after="exec")
        rep.add(last, after="exec_first")
        ex.extra["ratio_vs_subprocess_run"] = _r(ex.p50 / run.p50) if run.samples else None

    # 3. reset ---------------------------------------------------------------------------------------------
    async def reset(self, rt: Runtime) -> None:
        n = self.n(20, 3)
        first = self.report.add(Metric("reset_relaunch", "sb.reset(), the first (a relaunch: no spare yet)", "ms",
                                       baseline="create_cold_create_only"))
        m = self.report.add(Metric("reset", "sb.reset(), spare ready", "ms", baseline="reset_relaunch"))
        for _ in range(n):
            sb = await rt.create(SandboxConfig(hostname="bench-reset"))
            try:
                await must_exec(sb, "echo x > /workspace/f")
                t0 = time.perf_counter()
                await sb.reset()
                first.samples.append(ms_since(t0))
            finally:
                await sb.close()
        sb = await rt.create(SandboxConfig(hostname="bench-reset"))
        try:
            await sb.reset()
            await must_exec(sb, "echo x > /workspace/f")
            for _ in range(n):
                await wait_spare(sb)  # in use an episode's steps run meanwhile: the spare is ready by then
                t0 = time.perf_counter()
                await sb.reset()
                m.samples.append(ms_since(t0))
                # not timed: proves the reset sandbox works and the workspace is fresh
                out = await must_exec(sb, "test ! -e /workspace/f && echo fresh; echo x > /workspace/f")
                if out.strip() != "fresh":
                    raise RuntimeError(f"workspace survived reset: {out!r}")
        finally:
            await sb.close()

    # 4. memory and concurrency ----------------------------------------------------------------------------
    async def memory(self, rt: Runtime) -> None:
        counts = [int(c) for c in self.args.counts.split(",")] if self.args.counts else self.n_counts()
        batch = 10
        cfg = SandboxConfig(hostname="bench-mem")
        rep = self.report
        gc.collect()
        rss0, fds0 = self_rss(), len(os.listdir("/proc/self/fd"))
        sbs: list[Sandbox] = []
        batch_ms: list[float] = []
        try:
            for count in counts:
                while len(sbs) < count:
                    t0 = time.perf_counter()
                    sbs += await asyncio.gather(*(rt.create(cfg) for _ in range(min(batch, count - len(sbs)))))
                    batch_ms.append(ms_since(t0))
                await asyncio.sleep(1)  # idle: let the agents settle and start-up pages get reclaimed
                gc.collect()
                pss: list[float] = []
                nprocs: list[int] = []
                for sb in sbs:
                    pids = sb.pids()
                    nprocs.append(len(pids))
                    pss.append(sum(pss_of(p) for p in pids) / MiB)
                rep.add(Metric(f"mem_pss_{count}", f"N={count}: Pss per idle sandbox", "MiB",
                               pss, extra={"sum_mib": _r(sum(pss)), "procs_per_sandbox_p50": percentile(nprocs, 50)}))
                cg = [sb.cgroup.stats().get("memory_bytes", 0) / MiB for sb in sbs if sb.cgroup is not None]
                cgm = rep.add(Metric(f"mem_cgroup_{count}", f"N={count}: cgroup memory per sandbox", "MiB",
                                     cg, extra={"sum_mib": _r(sum(cg))}))
                if not cg:
                    cgm.extra["note"] = "no cgroups in this environment"
                gc.collect()
                grow = (self_rss() - rss0) / MiB / count
                rep.add(Metric(f"mem_host_{count}", f"N={count}: host RSS growth per sandbox",
                               "MiB", [grow], extra={"fds_per_sandbox": _r((len(os.listdir("/proc/self/fd")) - fds0)
                                                                          / count)}))
            total = len(sbs)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(sb.exec("echo ok", timeout=120) for sb in sbs), return_exceptions=True)
            wall = ms_since(t0)
            ok = sum(1 for r in results if not isinstance(r, BaseException) and r.ok and r.stdout == "ok\n")
            failures = [repr(r) if isinstance(r, BaseException) else f"exit {r.exit_code} {r.error}"
                        for r in results if isinstance(r, BaseException) or not (r.ok and r.stdout == "ok\n")]
            rep.add(Metric("concurrent_exec", f'N={total}: gather(sb.exec("echo ok")) wall', "ms", [wall],
                           extra={"sandboxes": total, "ok": ok, "failures": failures[:5],
                                  "create_batch_size": batch, "create_batch_ms": [round(b, 1) for b in batch_ms]}))
            rep.add(Metric("create_batch", f"create {batch} at once (gather), per batch", "ms", batch_ms))
        finally:
            t0 = time.perf_counter()
            closed = await asyncio.gather(*(sb.close() for sb in sbs), return_exceptions=True)
            bad = [c for c in closed if isinstance(c, BaseException)]
            close_m = rep.metrics.get("concurrent_exec")
            if close_m is not None:
                close_m.extra["close_all_ms"] = round(ms_since(t0), 1)
                close_m.extra["close_errors"] = [repr(b) for b in bad[:5]]

    def n_counts(self) -> list[int]:
        return [10, 20] if self.quick else [50, 100]

    # 5. gateway ---------------------------------------------------------------------------------------------
    async def gateway(self, rt: Runtime) -> None:
        n, reps = self.n(200, 20), self.n(3, 1)
        rep = self.report
        echo_lo = LoopbackServer(tw.echo, "echo")
        bulk_lo = LoopbackServer(tw.bulk(self.bulk_size), "bulk")
        cfg = SandboxConfig(hostname="bench-gw", egress=EgressPolicy.allowing(EGRESS_CIDR))
        sb = await rt.create(cfg)
        try:
            py = shlex.quote(self.python3)
            gw = rep.add(Metric("gw_connect", "sandbox → gateway: connect+ping+close", "ms",
                                baseline="direct_connect"))
            direct = rep.add(Metric("direct_connect", "baseline: same program, host → loopback", "ms"))
            veth = rep.add(Metric("veth_connect", "reference: host → World, no gateway",
                                  "ms"))
            ip, port, _ = ECHO_ADDR
            out = await must_exec(sb, f"{py} -c {shlex.quote(CONNECT_PROG)} {ip} {port} {n}", timeout=300)
            gw.samples = [s * 1000 for s in json.loads(out)]
            out = await host_run([self.python3, "-c", CONNECT_PROG, "127.0.0.1", str(echo_lo.port), str(n)])
            direct.samples = [s * 1000 for s in json.loads(out)]
            out = await host_run([self.python3, "-c", CONNECT_PROG, ip, str(port), str(n)])
            veth.samples = [s * 1000 for s in json.loads(out)]

            size_mib = self.bulk_size // MiB
            gwt = rep.add(Metric("gw_throughput", f"sandbox → gateway: bulk {size_mib} MiB", "MB/s",
                                 baseline="direct_throughput", higher_is_better=True))
            dt = rep.add(Metric("direct_throughput", "baseline: same client, host → loopback", "MB/s",
                                higher_is_better=True))
            vt = rep.add(Metric("veth_throughput", "reference: host → World, no gateway",
                                "MB/s", higher_is_better=True))
            bip, bport, _ = BULK_ADDR
            for _ in range(reps):
                # alternating, so a burst of outside load hits each path alike
                for metric, run in (
                    (gwt, lambda: must_exec(sb, f"{py} -c {shlex.quote(BULK_PROG)} {bip} {bport}", timeout=300)),
                    (dt, lambda: host_run([self.python3, "-c", BULK_PROG, "127.0.0.1", str(bulk_lo.port)])),
                    (vt, lambda: host_run([self.python3, "-c", BULK_PROG, bip, str(bport)])),
                ):
                    res = json.loads(await run())
                    if res["bytes"] != self.bulk_size:
                        raise RuntimeError(f"{metric.key}: got {res['bytes']} of {self.bulk_size} bytes")
                    metric.samples.append(res["bytes"] / res["seconds"] / 1e6)
        finally:
            await sb.close()
            echo_lo.close()
            bulk_lo.close()


# -- output ----------------------------------------------------------------------------------------------------
def targets(quick: bool) -> list[Target]:
    def stat(key: str, which: str) -> Callable[[Report], float | None]:
        def get(r: Report) -> float | None:
            m = r.metrics.get(key)
            if m is None or not m.samples:
                return None
            return float(getattr(m, which))

        return get

    def concurrent(r: Report) -> float | None:
        m = r.metrics.get("concurrent_exec")
        return float(m.extra["ok"]) if m is not None else None

    return [
        Target("warm create → first exec p50 ≤ 50 ms", stat("create_warm", "p50"), lambda v: v <= 50,
               lambda v: f"{v:.1f} ms"),
        Target("warm create → first exec p99 ≤ 200 ms", stat("create_warm", "p99"), lambda v: v <= 200,
               lambda v: f"{v:.1f} ms"),
        Target("exec round trip p50 ≤ 5 ms", stat("exec", "p50"), lambda v: v <= 5, lambda v: f"{v:.2f} ms"),
        Target("gateway throughput ≥ 50% of direct", lambda r: r.ratio("gw_throughput"), lambda v: v >= 0.5,
               lambda v: f"{v:.0%} of direct"),
        Target("100 concurrent sandboxes all exec ok" + (" (--quick runs fewer)" if quick else ""), concurrent,
               lambda v: v >= 100, lambda v: f"{v:.0f} ok"),
    ]


def fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def render(console: Console, rep: Report, tgts: list[Target], title: str = "corral runtime benchmark",
           notes: list[str] | None = None) -> None:
    """Every benchmark's output: the metrics table (ratios against baselines of the same run), the
    script's own notes, then its targets."""
    table = Table(title=f"{title} (ratios: p50 / baseline p50, same run)", show_lines=False)
    for col, just in (("metric", "left"), ("n", "right"), ("p50", "right"), ("p99", "right"), ("mean", "right"),
                      ("unit", "left"), ("baseline p50", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for group, keys in rep.groups:
        table.add_section()
        table.add_row(f"[bold cyan]{group}[/bold cyan]")
        for key in keys:
            m = rep.metrics[key]
            base = rep.metrics.get(m.baseline) if m.baseline else None
            ratio = rep.ratio(key)
            table.add_row(m.label, str(m.n), fmt(m.p50), fmt(m.p99), fmt(m.mean), m.unit,
                          fmt(base.p50) if base else "", f"{ratio:.2f}x" if ratio is not None else "")
    console.print(table)
    for note in notes or []:
        console.print(f"  • {note}")
    print_targets(console, rep, tgts)


def runtime_notes(rep: Report) -> list[str]:
    notes = []
    for m in rep.metrics.values():
        if m.key == "exec" and m.extra:
            notes.append(f"exec p50 vs host subprocess.run: {m.extra.get('ratio_vs_subprocess_run')}x")
        if m.key == "concurrent_exec":
            notes.append(f"{m.extra['ok']}/{m.extra['sandboxes']} sandboxes ran echo ok concurrently in {m.p50:.0f} ms"
                         f"; closing all took {m.extra.get('close_all_ms')} ms")
        if m.key == "create_warm" and m.extra:
            notes.append(f"prewarm took {m.extra.get('prewarm_ms')} ms; refill wait between samples p50 "
                         f"{m.extra.get('refill_wait_ms_p50')} ms (not counted)")
    return notes


def print_targets(console: Console, rep: Report, tgts: list[Target]) -> None:
    console.print("\n[bold]Targets[/bold] (informational, never asserted; the machine is shared and noisy):")
    for t in tgts:
        v = t.value(rep)
        if v is None:
            console.print(f"  [dim]-[/dim] {t.label}: not measured")
        else:
            mark = "[green]met[/green]" if t.ok(v) else "[yellow]missed[/yellow]"
            console.print(f"  {mark}  {t.label}: {t.fmt(v)}")
    for name, err in rep.errors.items():
        console.print(f"[red]section {name!r} failed:[/red] {err}")


def metrics_json(rep: Report) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for key, m in rep.metrics.items():
        d = m.summary()
        if m.baseline and m.baseline in rep.metrics:
            d["baseline"] = {"key": m.baseline, **rep.metrics[m.baseline].summary()}
            ratio = rep.ratio(key)
            d["ratio"] = _r(ratio) if ratio is not None else None
            d["ratio_meaning"] = ("p50 / baseline p50 (lower is worse)" if m.higher_is_better
                                  else "p50 / baseline p50 (higher is worse)")
        if m.extra:
            d["extra"] = m.extra
        d["samples"] = [round(s, 4) for s in m.samples]
        metrics[key] = d
    return metrics


def targets_json(rep: Report, tgts: list[Target]) -> list[dict[str, Any]]:
    out = []
    for t in tgts:
        v = t.value(rep)
        out.append({"target": t.label, "value": v if v is None or not math.isnan(v) else None,
                    "met": t.ok(v) if v is not None else None})
    return out


def write_results(console: Console, name: str, rep: Report, tgts: list[Target], machine: dict[str, Any],
                  quick: bool, out: str | Path = "", **extra: Any) -> Path:
    """benchmarks/results/NAME.json (NAME.quick.json for a smoke run), or `out`: the machine, every
    metric with its samples and baseline, the targets and the sections that failed."""
    path = Path(out) if out else RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": {**machine, "loadavg_end": list(os.getloadavg())}, "quick": quick, **extra,
            "metrics": metrics_json(rep), "targets": targets_json(rep, tgts), "errors": rep.errors}
    path.write_text(json.dumps(data, indent=2) + "\n")
    console.print(f"\nresults written to {path}")
    return path


# -- main ------------------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, console: Console, world: World, machine: dict[str, Any]) -> int:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    bench = Bench(args, console, state)
    rep = bench.report
    rt: Runtime | None = None
    try:
        rt_config = RuntimeConfig(state_dir=state / "main", hosts=world.hosts, system_dns=False)
        rt = Runtime(rt_config)
        await rt.start()
        machine["cgroups"] = rt.cgroups.h.version if rt.cgroups else None
        machine["cgroup_limits_enforced"] = rt.cgroups.limits_enforced if rt.cgroups else False
        main_rt = rt

        rep.group("1. create → first exec")
        await bench.section("create (cold)", lambda: bench.create_cold(main_rt))
        await bench.section("create (warm pool)", lambda: bench.create_warm(rt_config))
        rep.group("2. exec round trip")
        await bench.section("exec", lambda: bench.exec_round_trip(main_rt))
        rep.group("3. reset")
        await bench.section("reset", lambda: bench.reset(main_rt))
        rep.group("4. memory per idle sandbox / concurrency")
        await bench.section("memory", lambda: bench.memory(main_rt))
        rep.group("5. egress gateway")
        await bench.section("gateway", lambda: bench.gateway(main_rt))
    finally:
        if rt is not None:
            await rt.close()
        shutil.rmtree(state, ignore_errors=True)

    tgts = targets(args.quick)
    render(console, rep, tgts, notes=runtime_notes(rep))
    write_results(console, "runtime", rep, tgts, machine, args.quick, args.out, pool_size=args.pool)
    return 1 if rep.errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small n's: a smoke run that finishes in well under a minute")
    ap.add_argument("--pool", type=int, default=4, help="warm pool size K (default 4)")
    ap.add_argument("--counts", default="", help="sandbox counts for the memory section, e.g. 50,100")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/runtime.json)")
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    console, machine = pre
    # The World is built before the event loop runs: pyroute2's sync API, which it uses, starts an event
    # loop of its own and fails inside a running one.
    world = World()
    world.start()
    try:
        world.serve(*BULK_ADDR[:2], tw.bulk(bulk_size(args.quick)), name=BULK_ADDR[2])
        world.serve(*ECHO_ADDR[:2], tw.echo, name=ECHO_ADDR[2])
        return asyncio.run(run(args, console, world, machine))
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
