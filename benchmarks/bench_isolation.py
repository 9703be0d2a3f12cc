#!/usr/bin/env python3
"""corral isolation benchmark: does a flooding neighbour slow a quiet tenant down?

A quiet sandbox measures two things, first with its neighbour idle (the baseline), then while the
neighbour floods corral, in the same run and runtime:

- exec: `sb.exec("true")` round trip (agent protocol, bash, the exec watcher judging bash and true);
- connect: connect + ping + echo + close to the fake internet through the gateway, timed inside the
  sandbox.

The neighbour's floods (each alone, then all at once):
- execs: failing execve() calls with 1 MiB of argv each, in a loop (every one is notified, read,
  judged and, within its sandbox's recording budget, recorded);
- store writes: short allowed execs (`/bin/true`) in a loop, each an event;
- DNS: queries as fast as a socket sends them;
- connections: allowed connections opened and closed by 8 threads;
- hashing: a fresh copy of the largest system program (kept under its own name, not executable) is
  exec'd in a loop, so corral must hash ~57 MB per exec to know whether it is a renamed copy.

Goal: loaded p50 within 2x of unloaded p50 (informational, never asserted), and the quiet tenant
never loses egress (its connect samples all succeed). Results: benchmarks/results/isolation.json.

    unshare --net --mount --propagation private -- \
        sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_isolation.py'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_runtime import (
    CONNECT_PROG,
    ECHO_ADDR,
    Metric,
    Report,
    Target,
    ms_since,
    preflight,
    render,
    write_results,
)
from rich.console import Console

from corral import EgressPolicy, Runtime, RuntimeConfig, Sandbox, SandboxConfig
from corral import testworld as tw
from corral.testworld import World

STOP = "/tmp/stop-flood"
# Each flood runs until STOP exists (or its deadline), then prints what it did as JSON.
FLOODS: dict[str, str] = {
    "execs": """
import os, json, time
arg = ["x" * 4000] * 256
n = 0
while not os.path.exists(STOP) and time.time() < END:
    try:
        os.execv("/nonexistent/prog", ["/nonexistent/prog"] + arg)
    except OSError:
        n += 1
print(json.dumps({"failed_execs": n}))
""",
    "store": """
import os, json, time, subprocess
n = 0
while not os.path.exists(STOP) and time.time() < END:
    subprocess.run(["/bin/true"])
    n += 1
print(json.dumps({"execs": n}))
""",
    "dns": """
import os, json, time, socket, struct
name = b'\\x03pkg\\x07example\\x03com\\x00'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent = got = refused = 0
while not os.path.exists(STOP) and time.time() < END:
    for i in range(200):
        try:
            q = struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1)
            s.sendto(q, ('203.0.113.53', 53))
            sent += 1
        except OSError:
            pass
    while True:
        try:
            d = s.recv(512)
        except OSError:
            break
        got += 1
        refused += (d[3] & 15) == 5
    time.sleep(0.001)
print(json.dumps({"dns_sent": sent, "dns_answered": got, "dns_refused": refused}))
""",
    "connections": """
import os, json, time, socket, threading
ok = [0, 0]
def run():
    while not os.path.exists(STOP) and time.time() < END:
        try:
            s = socket.create_connection((HOST, PORT), timeout=5)
            s.sendall(b"x"); s.recv(16); s.close(); ok[0] += 1
        except OSError:
            ok[1] += 1
            time.sleep(0.01)
ts = [threading.Thread(target=run) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"connections": ok[0], "connection_errors": ok[1]}))
""",
    "hashing": """
import os, json, time, shutil
n = 0
while not os.path.exists(STOP) and time.time() < END:
    d = f"/tmp/h{n}"
    os.mkdir(d)
    p = d + "/" + os.path.basename(BIG)  # its own name: no finding, but corral must hash it to know
    shutil.copyfile(BIG, p)  # not executable: the exec fails (EACCES) after corral has judged it
    try:
        os.execv(p, [p])
    except OSError:
        pass
    os.unlink(p)
    os.rmdir(d)
    n += 1
print(json.dumps({"big_copies_executed": n, "bytes_each": os.stat(BIG).st_size}))
""",
}


def big_system_binary() -> str:
    """The largest system program corral would compare a same-size copy with (kubectl-sized, ~57 MB)."""
    from corral.monitor.masquerade import MAX_BYTES, _index

    return _index()[max(s for s in _index() if s <= MAX_BYTES)][0]


def flood_cmd(kind: str, seconds: float) -> str:
    prog = (f"STOP = {STOP!r}\nEND = __import__('time').time() + {seconds}\n"
            f"HOST, PORT = {ECHO_ADDR[0]!r}, {ECHO_ADDR[1]}\nBIG = {big_system_binary()!r}\n" + FLOODS[kind])
    return "python3 - <<'EOF'\n" + prog + "EOF\n"


class Isolation:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.n = 20 if args.quick else 60
        self.console = console
        self.report = Report()
        self.flood_stats: dict[str, Any] = {}

    async def quiet_exec(self, sb: Sandbox, key: str, label: str, baseline: str | None) -> Metric:
        m = self.report.add(Metric(key, label, "ms", baseline=baseline))
        for _ in range(self.n):
            t0 = time.perf_counter()
            r = await sb.exec("true")
            m.samples.append(ms_since(t0))
            if not r.ok:
                m.extra["failures"] = m.extra.get("failures", 0) + 1
        return m

    async def quiet_connect(self, sb: Sandbox, key: str, label: str, baseline: str | None) -> Metric:
        m = self.report.add(Metric(key, label, "ms", baseline=baseline))
        await sb.write_file("/tmp/connect.py", CONNECT_PROG)
        r = await sb.exec(f"python3 /tmp/connect.py {ECHO_ADDR[0]} {ECHO_ADDR[1]} {self.n}", timeout=120)
        if not r.ok:  # the quiet tenant lost egress: the worst outcome, recorded as such
            m.extra["failed"] = (r.stderr or r.error or "")[-300:]
            return m
        m.samples = [x * 1000 for x in json.loads(r.stdout)]
        return m

    async def writer_ab(self, rt: Runtime, sb: Sandbox) -> None:
        """The async writer against synchronous recording (emit writing each event itself, as before the
        writer), interleaved in one runtime: exec round trip and a spawn-heavy command (200 execs)."""
        w = rt.store.writer
        assert w is not None
        rows = {}
        for mode in ("sync", "writer"):
            rows[mode] = (self.report.add(Metric(f"exec_{mode}", f"exec round trip, {mode} recording", "ms",
                                                 baseline="exec_sync" if mode == "writer" else None)),
                          self.report.add(Metric(f"spawn_{mode}", f"200 x /bin/true in one command, {mode} recording",
                                                 "ms", baseline="spawn_sync" if mode == "writer" else None)))
        try:
            for rnd in range(4 if self.n < 60 else 10):
                for mode in ("sync", "writer") if rnd % 2 else ("writer", "sync"):
                    w.flush()
                    rt.store.writer = w if mode == "writer" else None
                    ex, sp = rows[mode]
                    for _ in range(10):
                        t0 = time.perf_counter()
                        await sb.exec("true")
                        ex.samples.append(ms_since(t0))
                    t0 = time.perf_counter()
                    await sb.exec("for i in $(seq 200); do /bin/true; done")
                    sp.samples.append(ms_since(t0))
        finally:
            rt.store.writer = w

    async def phase(self, rt: Runtime, quiet: Sandbox, noisy: Sandbox, kinds: list[str], name: str) -> None:
        await noisy.exec(f"rm -f {STOP}")
        written0 = rt.store.writer.written if rt.store.writer else 0
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(noisy.exec(flood_cmd(k, 120), timeout=180)) for k in kinds]
        await asyncio.sleep(1.0)  # let the floods ramp up
        self.report.group(f"quiet tenant, neighbour flooding: {name}")
        await self.quiet_exec(quiet, f"exec_{name}", f"exec round trip ({name})", "exec_unloaded")
        await self.quiet_connect(quiet, f"connect_{name}", f"connect+echo via gateway ({name})", "connect_unloaded")
        await noisy.write_file(STOP, "")
        stats: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 2)}
        for k, t in zip(kinds, tasks, strict=True):
            r = await t
            try:
                stats.update(json.loads(r.stdout.strip().splitlines()[-1]))
            except (ValueError, IndexError):
                stats[f"{k}_error"] = (r.stderr or r.error or "")[-300:]
        stats["events_written"] = (rt.store.writer.written if rt.store.writer else 0) - written0
        self.flood_stats[name] = stats
        self.console.log(f"{name}: {stats}")


async def run(args: argparse.Namespace, console: Console, machine: dict[str, Any], world: _WorldProcess) -> int:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-isolation-"))
    bench = Isolation(args, console)
    rep = bench.report
    rt = Runtime(RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False))
    store_bytes: dict[str, int] = {}
    try:
        await rt.start()
        cfg = SandboxConfig(egress=EgressPolicy.allowing("198.51.100.0/24", "pkg.example.com"))
        quiet = await rt.create(cfg, sandbox_id="quiet")
        noisy = await rt.create(cfg, sandbox_id="noisy")
        await quiet.exec("true")
        rep.group("quiet tenant, neighbour idle (baseline)")
        await bench.quiet_exec(quiet, "exec_unloaded", "exec round trip (idle neighbour)", None)
        await bench.quiet_connect(quiet, "connect_unloaded", "connect+echo via gateway (idle neighbour)", None)
        rep.group("recording: async writer vs synchronous (same runtime, interleaved)")
        await bench.writer_ab(rt, quiet)
        kinds = [] if args.quick else [[k] for k in FLOODS]
        phases = [[args.only] if args.only != "all" else list(FLOODS)] if args.only else [*kinds, list(FLOODS)]
        for ks in phases:
            name = "all" if len(ks) > 1 else ks[0]
            try:
                await bench.phase(rt, quiet, noisy, ks, name)
            except Exception as e:  # a section that fails is reported, the others still run
                rep.errors[name] = f"{type(e).__name__}: {e}"
            store_bytes[name] = sum(p.stat().st_size for p in state.glob("corral.db*"))
        suppressed = [e for e in rt.store.events(sandbox_id="noisy") if e.action == "suppressed"]
        limited = [e for e in rt.store.events(sandbox_id="noisy", kind="dns") if e.action == "rate_limited"]
        extra = {"flood_stats": bench.flood_stats, "store_bytes_after": store_bytes,
                 "noisy_suppressed_events": sum(e.data.get("events", 0) for e in suppressed),
                 "noisy_dns_rate_limited_events": len(limited),
                 "quiet_events": len(rt.store.events(sandbox_id="quiet"))}
    finally:
        await rt.close()
        shutil.rmtree(state, ignore_errors=True)

    def ratio(key: str):
        return lambda r: r.ratio(key)

    tgts = [Target(f"quiet {what} p50 within 2x of unloaded ({name})", ratio(f"{what}_{name}"),
                   lambda v: v <= 2.0, lambda v: f"{v:.2f}x")
            for name in ([args.only] if args.only else ([] if args.quick else list(FLOODS)) + ["all"])
            for what in ("exec", "connect")]
    tgts.append(Target("exec round trip with the async writer no slower than synchronous recording",
                       ratio("exec_writer"), lambda v: v <= 1.05, lambda v: f"{v:.2f}x"))
    tgts.append(Target("spawn-heavy command with the async writer no slower than synchronous recording",
                       ratio("spawn_writer"), lambda v: v <= 1.05, lambda v: f"{v:.2f}x"))
    tgts.append(Target("quiet tenant never lost egress (connect samples all succeeded)",
                       lambda r: float(all(m.samples for k, m in r.metrics.items() if k.startswith("connect_"))),
                       lambda v: v == 1.0, lambda v: "yes" if v == 1.0 else "NO"))
    notes = [f"{k}: {v}" for k, v in extra["flood_stats"].items()]
    notes.append(f"neighbour's events suppressed (counted, not written): {extra['noisy_suppressed_events']}; "
                 f"DNS rate-limit events: {extra['noisy_dns_rate_limited_events']}; store size after each phase: "
                 f"{ {k: f'{v / 2**20:.1f} MiB' for k, v in store_bytes.items()} }")
    render(console, rep, tgts, title="corral isolation benchmark", notes=notes)
    write_results(console, "isolation", rep, tgts, machine, args.quick, args.out, **extra)
    return 1 if rep.errors else 0


class _WorldProcess:
    """The test hosts in a process of their own, as real upstream servers are: served from corral's
    process, their threads would take the interpreter lock from the event loop being measured."""

    def __init__(self) -> None:
        here = str(Path(__file__).parent)
        code = (f"import json, sys\nsys.path.insert(0, {here!r})\nfrom bench_isolation import _world\nw = _world()\n"
                "print(json.dumps(w.hosts), flush=True)\nsys.stdin.read()\nw.close()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the test world process did not start")
        self.hosts = json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _world() -> World:
    w = World()
    w.start()
    w.serve(*ECHO_ADDR[:2], tw.echo, name=ECHO_ADDR[2])
    w.serve("198.51.100.10", 80, tw.http_ok(b"pkg\n"), name="pkg.example.com")
    return w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="the all-floods phase only, small n")
    ap.add_argument("--only", choices=[*FLOODS, "all"], help="one flood phase only (to profile it)")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/isolation.json)")
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    console, machine = pre
    world = _WorldProcess()
    try:
        return asyncio.run(run(args, console, machine, world))
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
