#!/usr/bin/env python3
"""corral monitor benchmarks: time to detect, the monitor's idle CPU, and the slowdown monitoring causes.

1. Time to detect (p50, p99): a stratum client inside a sandbox talking to a pool in the fake internet
   (gateway → sniff → rules), and a miner binary hidden in a script (exec watcher → rules). Each figure
   is measured twice: from the event corral built (Event.ts) to the finding (Finding.ts), and end to end
   from a clock read inside the sandbox right before the offending syscall. Both are wall clocks of the
   same kernel (a sandbox has no time namespace), so they can be subtracted.
2. Monitor CPU with idle sandboxes: this process's CPU time (getrusage, every thread: event loop,
   gateway, exec watchers, process sampler, the World's servers) over an idle window, as % of one
   core, with 20 idle sandboxes and with none (same run, before and after).
3. Slowdown of benign work: a CPU-bound and a process-spawning task, in a sandbox of a runtime with
   detection on, one with detection off, and on the host, interleaved.

Run it with `make bench`, i.e. as root inside a private network namespace:

    unshare --net --mount --propagation private -- \
        sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_monitor.py'

It refuses to run anywhere else: the benchmark builds a fake internet (corral.testworld) and must never
reach the machine's real network. `--quick` shrinks every n for a smoke run (results go to a separate
file so they never overwrite a full run's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Shared with the runtime benchmark (same directory): statistics, the report model, the environment checks.
from bench_runtime import (
    BenchBase,
    Metric,
    Report,
    Target,
    _r,
    host_run,
    ms_since,
    must_exec,
    percentile,
    preflight,
    render,
    write_results,
)
from rich.console import Console

from corral import EgressPolicy, Runtime, RuntimeConfig, Sandbox, SandboxConfig
from corral import testworld as tw
from corral.events import Event, Finding
from corral.testworld import World

# The mining pool of the fake internet (a documentation address, routed only to the World).
POOL_ADDR = ("203.0.113.5", 3333, "pool.example.net")
IDLE_SANDBOXES = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Inside the sandbox: read the clock, say it (flushed: the rules kill this process as soon as they see the
# pool's protocol), then connect and speak stratum. The socket is made before the clock is read.
STRATUM_PROG = """\
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(5)
t0 = time.time()
sys.stdout.write("T %.6f\\n" % t0)
sys.stdout.flush()
try:
    s.connect((host, port))
    s.sendall(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5"]}\\n')
    s.recv(4096)
except OSError:
    pass
"""

# A miner hidden in a script: the pre-run check sees only `bash /workspace/setup.sh`; the exec watcher sees
# /tmp/xmrig. $EPOCHREALTIME is a bash builtin, so reading the clock is no exec of its own; between it and
# the execve there is only bash's fork.
MINER_SCRIPT = 'cp /bin/sleep /tmp/xmrig\necho "T $EPOCHREALTIME"\n/tmp/xmrig 5\n'
MINER_CMD = "bash /workspace/setup.sh"


def cpu_prog(iterations: int) -> str:
    """CPU-bound, no syscalls in the loop; times itself (interpreter start-up excluded)."""
    return ("import hashlib, time\nt = time.perf_counter()\nh = b'x'\n"
            f"for _ in range({iterations}):\n    h = hashlib.sha256(h).digest()\n"
            "print(time.perf_counter() - t)\n")


def spawn_cmd(count: int) -> str:
    """Process-spawning: `count` execs of /bin/true (plus one of seq); times itself with bash's clock."""
    return (f's=$EPOCHREALTIME; for i in $(seq {count}); do /bin/true; done; e=$EPOCHREALTIME; '
            'echo "$s $e"')


def parse_t(stdout: str) -> float:
    for line in stdout.splitlines():
        if line.startswith("T "):
            return float(line.split()[1])
    raise RuntimeError(f"no timestamp in the sandbox's output: {stdout[-300:]!r}")


def throttled(sb: Sandbox) -> tuple[int, float]:
    """CFS bandwidth throttling of a sandbox so far: (periods throttled, seconds throttled)."""
    if sb.cgroup is None:
        return 0, 0.0
    v1 = sb.cgroup.h.version == 1
    path = sb.cgroup.dirs["cpu" if v1 else "unified"] / "cpu.stat"
    try:
        kv = dict(line.split() for line in path.read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0.0
    secs = int(kv.get("throttled_time", 0)) / 1e9 if v1 else int(kv.get("throttled_usec", 0)) / 1e6
    return int(kv.get("nr_throttled", 0)), secs


def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu_seconds(pids: list[int]) -> float:
    """utime+stime of live processes from /proc (1/CLK_TCK resolution); exited ones are not counted."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


class Bench(BenchBase):
    # 1. time to detect ------------------------------------------------------------------------------------
    async def detect(self, rt: Runtime, kind: str) -> None:
        """One sandbox, n samples; each sample is a new exec, hence a new step (findings are deduplicated
        per rule and step, so every sample raises a finding of its own)."""
        n = self.n(50, 10)
        rep = self.report
        notified: dict[int, float] = {}  # event id -> when a subscriber saw it (its findings already stored)

        def on_event(ev: Event) -> None:
            if ev.id is not None and ev.kind in ("connect", "process"):
                notified[ev.id] = time.time()

        if kind == "stratum":
            rule, ev_kind, target = "stratum-protocol", "connect", "stratum"
            # The pool's range is allowed: the only reason to stop the connection is what it says.
            cfg = SandboxConfig(hostname="bench-stratum", egress=EgressPolicy.allowing("203.0.113.0/24"))
            cmd = f"{shlex.quote(self.python3)} -c {shlex.quote(STRATUM_PROG)} {POOL_ADDR[0]} {POOL_ADDR[1]}"
            e2f = rep.add(Metric("stratum_event_finding", "stratum: CONNECT event → finding", "ms"))
            e2e = rep.add(Metric("stratum_syscall_finding", "stratum: client clock before connect() → finding",
                                 "ms"))
            stored = rep.add(Metric("stratum_event_stored", "  stratum: CONNECT event → finding stored "
                                    "(subscriber)", "ms"))
        else:
            rule, ev_kind, target = "miner-binary", "process", "miner"
            cfg = SandboxConfig(hostname="bench-miner")
            cmd = MINER_CMD
            e2f = rep.add(Metric("miner_event_finding", "miner: exec event → finding", "ms"))
            e2e = rep.add(Metric("miner_syscall_finding", "miner: script clock before fork+exec → finding", "ms"))
            stored = rep.add(Metric("miner_event_stored", "  miner: exec event → finding stored (subscriber)",
                                    "ms"))
        sb = await rt.create(cfg)
        unsubscribe = rt.subscribe(on_event)
        misattributed = 0
        try:
            if kind == "miner":
                await sb.write_file("/workspace/setup.sh", MINER_SCRIPT)
            else:
                await must_exec(sb, f"{shlex.quote(self.python3)} -c pass")  # warm the page cache, not counted
            for i in range(n):
                after = max((f.id or 0 for f in rt.store.findings(sandbox_id=sb.id)), default=0)
                r = await sb.exec(cmd, timeout=30)
                t_client = parse_t(r.stdout)
                f = await self._finding(rt, sb, rule, after)
                # (bash's "Operation not permitted" may never be written: the kill can beat it)
                if kind == "miner" and r.duration > 4:
                    raise RuntimeError(f"sample {i}: the miner ran ({r.duration:.1f}s): its exec was not refused")
                if f.step != r.step:
                    misattributed += 1
                ev = next((e for e in rt.store.events(sandbox_id=sb.id, kind=ev_kind, step=f.step)
                           if e.id in f.evidence), None)
                if ev is None:
                    raise RuntimeError(f"sample {i}: the {ev_kind} event {f.evidence} behind the finding is missing")
                e2f.samples.append((f.ts - ev.ts) * 1000)
                e2e.samples.append((f.ts - t_client) * 1000)
                if ev.id in notified:
                    stored.samples.append((notified[ev.id] - ev.ts) * 1000)
                if kind == "stratum" and i == 0:
                    e2f.extra["first_bytes_timeout_s"] = cfg.egress.first_bytes_timeout
                    e2f.extra["event_data"] = {k: ev.data.get(k) for k in ("first_bytes", "attribution")}
        finally:
            unsubscribe()
            await sb.close()
        e2e.extra.update({"target": target, "rule": rule, "findings_attributed_to_another_step": misattributed})

    @staticmethod
    async def _finding(rt: Runtime, sb: Sandbox, rule: str, after: int, wait: float = 5.0) -> Finding:
        deadline = time.monotonic() + wait
        while True:
            got = [f for f in rt.store.findings(sandbox_id=sb.id, after_id=after) if f.rule_id == rule]
            if got:
                return got[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {rule} finding within {wait:.0f}s")
            await asyncio.sleep(0.01)

    # 2. monitor CPU with idle sandboxes ------------------------------------------------------------------
    async def _idle_window(self, seconds: float, sbs: list[Sandbox]) -> tuple[list[float], float, dict[str, Any]]:
        """Per-second CPU of this process (% of one core), the whole window's figure, and the sandboxes' own
        CPU over the window."""
        slices: list[float] = []
        cg0 = [sb.cgroup.stats().get("cpu_ns") if sb.cgroup else None for sb in sbs]
        pids = [p for sb in sbs for p in (sb.cgroup.pids() if sb.cgroup else sb.pids())]
        proc0 = proc_cpu_seconds(pids)
        c_start, w_start = rusage_cpu(), time.perf_counter()
        for _ in range(max(1, round(seconds))):
            c0, w0 = rusage_cpu(), time.perf_counter()
            await asyncio.sleep(1.0)
            slices.append((rusage_cpu() - c0) / (time.perf_counter() - w0) * 100)
        wall = time.perf_counter() - w_start
        whole = (rusage_cpu() - c_start) / wall * 100
        cg1 = [sb.cgroup.stats().get("cpu_ns") if sb.cgroup else None for sb in sbs]
        sandboxes: dict[str, Any] = {"wall_s": round(wall, 3)}
        if sbs and all(a is not None and b is not None for a, b in zip(cg0, cg1, strict=True)):
            ns = sum(b - a for a, b in zip(cg0, cg1, strict=True))  # type: ignore[operator]
            sandboxes["cgroup_cpu_pct_of_core"] = round(ns / 1e9 / wall * 100, 4)
        elif sbs:
            sandboxes["cgroup_cpu_pct_of_core"] = None
            sandboxes["cgroup_cpu_note"] = "sb.cgroup.stats() has no cpu_ns here"
        if sbs:
            sandboxes["proc_cpu_pct_of_core"] = round((proc_cpu_seconds(pids) - proc0) / wall * 100, 4)
            sandboxes["procs"] = len(pids)
        return slices, whole, sandboxes

    async def idle_cpu(self, rt: Runtime) -> None:
        seconds = self.n(10, 3)
        rep = self.report
        threads0 = len(os.listdir("/proc/self/task"))
        base = rep.add(Metric("idle_cpu_0", "runtime started, 0 sandboxes: this process", "% core"))
        slices, whole, _ = await self._idle_window(seconds, [])
        base.samples, base.extra = slices, {"window_pct_of_core": _r(whole), "threads": threads0}

        sbs: list[Sandbox] = []
        try:
            cfg = SandboxConfig(hostname="bench-idle")
            while len(sbs) < IDLE_SANDBOXES:
                sbs += await asyncio.gather(*(rt.create(cfg) for _ in range(min(10, IDLE_SANDBOXES - len(sbs)))))
            await asyncio.gather(*(must_exec(sb, "true") for sb in sbs))  # each has run a command, as in use
            await asyncio.sleep(1.0)  # let staged children be placed: creation work is not idle work
            m = rep.add(Metric("idle_cpu_20", f"{IDLE_SANDBOXES} idle sandboxes: this process", "% core",
                               baseline="idle_cpu_0"))
            slices, whole, sandboxes = await self._idle_window(seconds, sbs)
            m.samples = slices
            m.extra = {"window_pct_of_core": _r(whole), "threads": len(os.listdir("/proc/self/task")),
                       "sandboxes": sandboxes}
            own = sandboxes.get("cgroup_cpu_pct_of_core")
            src = "cgroup cpu_ns"
            if own is None:
                own, src = sandboxes.get("proc_cpu_pct_of_core"), "/proc/<pid>/stat of the cgroup's processes"
            if own is not None:
                rep.add(Metric("idle_cpu_sandboxes", f"  the {IDLE_SANDBOXES} sandboxes' own CPU (whole window)",
                               "% core", [own], extra={"source": src, **sandboxes}))
        finally:
            await asyncio.gather(*(sb.close() for sb in sbs), return_exceptions=True)
        await asyncio.sleep(1.0)
        after = rep.add(Metric("idle_cpu_0_after", "0 sandboxes again (after closing them): this process",
                               "% core", baseline="idle_cpu_0"))
        slices, whole, _ = await self._idle_window(seconds, [])
        after.samples = slices
        after.extra = {"window_pct_of_core": _r(whole), "threads": len(os.listdir("/proc/self/task"))}

    # 3. slowdown of benign work --------------------------------------------------------------------------
    async def slowdown(self, rt_on: Runtime, rt_off: Runtime) -> None:
        runs = self.n(5, 2)
        iterations, spawns = self.args.hash_iterations, 300
        rep = self.report
        cfg = SandboxConfig(hostname="bench-slow")
        py = shlex.quote(self.python3)
        cpu_sb = f"{py} -c {shlex.quote(cpu_prog(iterations))}"
        spawn = spawn_cmd(spawns)
        sb_on = await rt_on.create(cfg)
        sb_off = await rt_off.create(cfg)
        try:
            async def cpu_task(sb: Sandbox | None) -> tuple[float, float]:
                t0 = time.perf_counter()
                out = await (must_exec(sb, cpu_sb, timeout=300) if sb is not None
                             else host_run([self.python3, "-c", cpu_prog(iterations)]))
                return float(out.strip().splitlines()[-1]) * 1000, ms_since(t0)

            async def spawn_task(sb: Sandbox | None) -> tuple[float, float]:
                t0 = time.perf_counter()
                out = await (must_exec(sb, spawn, timeout=300) if sb is not None
                             else host_run(["bash", "-c", spawn]))
                s, e = (float(x) for x in out.split())
                return (e - s) * 1000, ms_since(t0)

            tasks: list[tuple[str, str, Callable[[Sandbox | None], Awaitable[tuple[float, float]]]]] = [
                ("cpu", f"CPU-bound: sha256 x {iterations:,}", cpu_task),
                ("spawn", f"spawn-heavy: {spawns} x /bin/true", spawn_task),
            ]
            for key, title, task in tasks:
                on = rep.add(Metric(f"{key}_monitored", f"{title}, detection on", "ms", baseline=f"{key}_unmonitored"))
                off = rep.add(Metric(f"{key}_unmonitored", f"{title}, detection off (exec watcher still on)", "ms",
                                     baseline=f"{key}_host"))
                host = rep.add(Metric(f"{key}_host", f"{title}, host (reference)", "ms"))
                where: list[tuple[Metric, Sandbox | None]] = [(on, sb_on), (off, sb_off), (host, None)]
                for _, sb in where:  # warm-up, not counted
                    await task(sb)
                for i in range(runs):
                    # interleaved and rotated, so neither outside load nor position favours one side
                    for m, sb in where[i % 3:] + where[:i % 3]:
                        thr0 = throttled(sb) if sb is not None else None
                        inner, outer = await task(sb)
                        m.samples.append(inner)
                        m.extra.setdefault("command_wall_ms", []).append(round(outer, 2))
                        if sb is not None and thr0 is not None:
                            thr1 = throttled(sb)
                            m.extra.setdefault("cfs_throttled_periods", []).append(thr1[0] - thr0[0])
                            m.extra.setdefault("cfs_throttled_ms", []).append(round((thr1[1] - thr0[1]) * 1000, 2))
                for m in (on, off, host):
                    m.extra["command_wall_ms_p50"] = _r(percentile(m.extra["command_wall_ms"], 50))
                on.extra["ratio_vs_host"] = _r(on.p50 / host.p50) if host.samples else None
        finally:
            await sb_on.close()
            await sb_off.close()


# -- output ----------------------------------------------------------------------------------------------------
def targets() -> list[Target]:
    def stat(key: str, which: str) -> Callable[[Report], float | None]:
        def get(r: Report) -> float | None:
            m = r.metrics.get(key)
            if m is None or not m.samples:
                return None
            return float(getattr(m, which))

        return get

    def extra(key: str, name: str) -> Callable[[Report], float | None]:
        def get(r: Report) -> float | None:
            m = r.metrics.get(key)
            v = m.extra.get(name) if m is not None else None
            return float(v) if v is not None else None

        return get

    ms = lambda v: f"{v:.1f} ms"  # noqa: E731
    return [
        Target("stratum: time to detect p50 ≤ 100 ms (client clock → finding)",
               stat("stratum_syscall_finding", "p50"), lambda v: v <= 100, ms),
        Target("stratum: time to detect p99 ≤ 100 ms (client clock → finding)",
               stat("stratum_syscall_finding", "p99"), lambda v: v <= 100, ms),
        Target("miner: time to detect p50 ≤ 250 ms (script clock → finding)",
               stat("miner_syscall_finding", "p50"), lambda v: v <= 250, ms),
        Target("miner: time to detect p99 ≤ 250 ms (script clock → finding)",
               stat("miner_syscall_finding", "p99"), lambda v: v <= 250, ms),
        Target(f"monitor CPU with {IDLE_SANDBOXES} idle sandboxes ≤ 2% of a core (whole window)",
               extra("idle_cpu_20", "window_pct_of_core"), lambda v: v <= 2, lambda v: f"{v:.2f}% of a core"),
        Target("CPU-bound task slowdown ≤ 5% (detection on / off, p50)",
               lambda r: r.ratio("cpu_monitored"), lambda v: v <= 1.05, lambda v: f"{(v - 1) * 100:+.1f}%"),
    ]


def monitor_notes(rep: Report) -> list[str]:
    notes = []
    for m in rep.metrics.values():
        if m.key.endswith("_syscall_finding") and m.extra.get("findings_attributed_to_another_step"):
            notes.append(f"{m.extra['target']}: {m.extra['findings_attributed_to_another_step']} finding(s) "
                         "attributed to a step other than the command's")
        if m.key == "stratum_event_finding" and m.extra:
            notes.append(f"the CONNECT event's clock starts at accept, before the gateway reads the first bytes "
                         f"(waits up to {m.extra.get('first_bytes_timeout_s')} s); first event: "
                         f"{m.extra.get('event_data')}")
        if m.key.startswith("idle_cpu") and "window_pct_of_core" in m.extra:
            sbx = m.extra.get("sandboxes") or {}
            tail = ""
            if sbx:
                tail = (f"; sandboxes' own CPU: cgroup {sbx.get('cgroup_cpu_pct_of_core')}, /proc "
                        f"{sbx.get('proc_cpu_pct_of_core')} % of a core over {sbx.get('procs')} processes")
            notes.append(f"{m.label}: {m.extra['window_pct_of_core']:.3f}% of a core over the whole window, "
                         f"{m.extra['threads']} threads{tail}")
        if m.key in ("cpu_monitored", "spawn_monitored"):
            notes.append(f"{m.label}: {m.extra.get('ratio_vs_host')}x the host's p50")
        if m.key.endswith(("_monitored", "_unmonitored", "_host")) and "command_wall_ms_p50" in m.extra:
            thr = m.extra.get("cfs_throttled_ms")
            notes.append(f"{m.label}: whole command p50 {m.extra['command_wall_ms_p50']} ms "
                         "(start-up and exec round trip included)"
                         + (f"; CFS-throttled {sum(thr):.0f} ms over {len(thr)} runs" if thr is not None else ""))
    return notes


# -- main ------------------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace, console: Console, world: World, machine: dict[str, Any]) -> int:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-monitor-"))
    bench = Bench(args, console, state)
    rep = bench.report
    runtimes: list[Runtime] = []
    try:
        base = RuntimeConfig(state_dir=state / "on", hosts=world.hosts, system_dns=False, detection=True)
        rt_on = Runtime(base)
        runtimes.append(rt_on)
        await rt_on.start()
        machine["cgroups"] = rt_on.cgroups.h.version if rt_on.cgroups else None
        machine["cgroup_limits_enforced"] = rt_on.cgroups.limits_enforced if rt_on.cgroups else False
        machine["cgroup_controllers"] = sorted(rt_on.cgroups.h.roots) if rt_on.cgroups else []

        rep.group("1. time to detect")
        await bench.section("detect: stratum", lambda: bench.detect(rt_on, "stratum"))
        await bench.section("detect: miner", lambda: bench.detect(rt_on, "miner"))
        rep.group(f"2. monitor CPU, {IDLE_SANDBOXES} idle sandboxes")
        await bench.section("idle CPU", lambda: bench.idle_cpu(rt_on))
        # The unmonitored runtime starts only now, so that its (idle) presence is not in section 2's figures.
        rt_off = Runtime(base.model_copy(update={"state_dir": state / "off", "detection": False}))
        runtimes.append(rt_off)
        await rt_off.start()
        rep.group("3. slowdown of benign work (detection on vs off vs host)")
        await bench.section("slowdown", lambda: bench.slowdown(rt_on, rt_off))
    finally:
        for rt in runtimes:
            await rt.close()
        shutil.rmtree(state, ignore_errors=True)

    tgts = targets()
    render(console, rep, tgts, "corral monitor benchmark", monitor_notes(rep))
    write_results(console, "monitor", rep, tgts, machine, args.quick, args.out,
                  hash_iterations=args.hash_iterations, idle_sandboxes=IDLE_SANDBOXES)
    return 1 if rep.errors else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small n's: a smoke run that finishes in well under a minute")
    ap.add_argument("--hash-iterations", type=int, default=3_000_000,
                    help="size of the CPU-bound task (default 3,000,000 sha256 rounds, about 1 s)")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/monitor.json)")
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
        world.serve(*POOL_ADDR[:2], tw.stratum_pool, name=POOL_ADDR[2])
        return asyncio.run(run(args, console, world, machine))
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
