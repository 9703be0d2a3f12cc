"""Where an agent step's time goes: a session command's and an `sb.exec`'s round trip, taken apart.

Two views of the same loop of `echo hi` commands on one sandbox (host root, rules on):
1. A timeline of one command: when corral sends each request to the in-sandbox agent and when each
   reply comes back, with every cgroup migration and how long it took (the agent's work and the
   shell's run between the send and the reply; corral's own work around them).
2. cProfile of corral's event loop over the loop: which functions take its CPU per command (cProfile
   inflates every Python call, so read these as shares, not absolute times).
3. The same commands after an idle gap (`--gap`, 0.2 s), as between an agent's steps; a cgroup v1
   migration and a cgroup rename, each after such a gap; and the rules' time per typical event.

Run (root, in a private network namespace, as make bench does):
    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/profile_step.py [--n 300]'
Writes benchmarks/results/profile.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import corral.sandbox.cgroups as cgroups
import corral.sandbox.sandbox as sandbox_mod
from corral import Runtime, RuntimeConfig, SandboxConfig

RESULTS = Path(__file__).parent / "results" / "profile.json"


class Timeline:
    """Marks, in ms since the command began, of the requests, replies and cgroup moves (instrumented)."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.marks: list[tuple[float, str]] = []
        S, C = sandbox_mod.Sandbox, cgroups.SandboxCgroup
        dispatch, send, move, home = S._dispatch, S._send, C.move, C.move_to_session

        def timed_dispatch(sb: Any, msg: Any, hostpid: int | None) -> None:
            self.mark(f"reply {msg['op']}")
            return dispatch(sb, msg, hostpid)

        def timed_send(sb: Any, **msg: Any) -> None:
            self.mark(f"send {msg['op']}")
            return send(sb, **msg)

        def timed(fn: Any, label: str) -> Any:
            def wrapper(cg: Any, *a: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(cg, *a)
                finally:
                    self.mark(f"{label} ({1000 * (time.perf_counter() - t):.2f} ms in the kernel)")
            return wrapper

        S._dispatch, S._send = timed_dispatch, timed_send
        C.move, C.move_to_session = timed(move, "cgroup move to step"), timed(home, "cgroup move back to session")

    def start(self) -> None:
        self.t0, self.marks = time.perf_counter(), []

    def mark(self, what: str) -> None:
        self.marks.append((round(1000 * (time.perf_counter() - self.t0), 2), what))


async def main(n: int, gap: float) -> dict:
    tl = Timeline()
    out: dict[str, Any] = {"n": n}
    with tempfile.TemporaryDirectory(prefix="corral-profile-") as state:
        async with Runtime(RuntimeConfig(state_dir=Path(state), system_dns=False)) as rt:
            sb = await rt.create(SandboxConfig())
            await sb.create_session("s")
            runs = {"session": lambda: sb.run_in_session("s", "echo hi"), "exec": lambda: sb.exec("echo hi")}
            for _ in range(30):  # warm: caches, the staged child, the rules' index
                for run in runs.values():
                    await run()
            for name, run in runs.items():
                walls = []
                for _ in range(n):
                    tl.start()
                    await run()
                    tl.mark("returned")
                    walls.append(tl.marks[-1][0])
                median_run = list(tl.marks)  # the last run's timeline, shown with the median wall time
                tl.t0, tl.marks = time.perf_counter(), []  # nothing is kept of the profiled loop
                prof = cProfile.Profile()
                t = time.perf_counter()
                prof.enable()
                for _ in range(n):
                    await run()
                prof.disable()
                profiled = 1000 * (time.perf_counter() - t) / n
                st = pstats.Stats(prof)
                total = sum(v[2] for v in st.stats.values()) or 1.0
                top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
                cum = sorted((kv for kv in st.stats.items() if "/corral/" in kv[0][0]), key=lambda kv: -kv[1][3])[:15]

                def where(key: tuple) -> str:
                    f, line, fn = key
                    return f"{f.split('/src/')[-1].split('site-packages/')[-1]}:{line}({fn})"

                idle = []  # the same command after an idle gap, as between an agent's steps
                for _ in range(max(n // 10, 10)):
                    await asyncio.sleep(gap)
                    t = time.perf_counter()
                    await run()
                    idle.append(1000 * (time.perf_counter() - t))
                out[name] = {
                    "wall_ms_p50": round(statistics.median(walls), 3),
                    f"after_{gap:g}s_gap_ms_p50": round(statistics.median(idle), 3),
                    "timeline_last_run": median_run,
                    "profiled_ms_per_command": round(profiled, 3),
                    "own_time_share": [(where(k), round(100 * v[2] / total, 1)) for k, v in top],
                    "corral_cumulative_share": [(where(k), round(100 * v[3] / total, 1)) for k, v in cum],
                }
            out["cgroup_after_idle"] = await cgroup_probe(sb, gap) if sb.cgroup is not None else {}
    out["rules_us_p50"] = rules_probe()
    return out


async def cgroup_probe(sb: Any, gap: float, k: int = 10) -> dict[str, float]:
    """One process of the sandbox moved into a step cgroup, and a step cgroup renamed, each after an idle
    gap: the kernel's time for each (timed around the one write or rename, in the worker thread)."""
    cg = sb.cgroup
    bg = await sb.exec("sleep 600 >/dev/null 2>&1 &")
    pid = cg.pids(step=bg.step)[0]

    def timed(fn: Any, *args: Any) -> float:
        t = time.perf_counter()
        fn(*args)
        return 1000 * (time.perf_counter() - t)

    moves, renames = [], []
    for i in range(k):
        await asyncio.sleep(gap)
        moves.append(await asyncio.to_thread(timed, cg.move, pid, 90000 + i))
        await asyncio.sleep(gap)
        renames.append(await asyncio.to_thread(timed, cg.rename, f"step-{90000 + i}", f"step-{91000 + i}"))
    return {"move_ms_p50": round(statistics.median(moves), 3), "rename_ms_p50": round(statistics.median(renames), 3)}


def rules_probe(rounds: int = 2000) -> float:
    """µs for the rules to judge a typical exec or command check (median of 7 runs of `rounds` each)."""
    from corral.detect import Detector
    from corral.events import Event, EventKind

    d = Detector()
    evs = [Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb", step=1, argv=["sh", "-c", "echo hi"],
                 exe="/usr/bin/bash", command="echo hi", pid=5),
           Event(kind=EventKind.COMMAND, action="check", sandbox_id="sb", step=1, argv=["echo", "hi"],
                 command="echo hi", data={"redirects": [], "writes": []}),
           Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb", step=1,
                 argv=["python3", "-m", "pytest", "-q", "tests/"], exe="/usr/bin/python3.11",
                 command="python3 -m pytest -q tests/", pid=6)]
    runs = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(rounds):
            for e in evs:
                d.evaluate(e)
        runs.append(1e6 * (time.perf_counter() - t) / (rounds * len(evs)))
    return round(statistics.median(runs), 1)


def render(res: dict) -> None:
    for name in ("session", "exec"):
        r = res[name]
        gap = next(k for k in r if k.startswith("after_"))
        print(f"\n{name}: p50 {r['wall_ms_p50']} ms over {res['n']} commands back to back, {r[gap]} ms after "
              f"a {gap[6:-11]} gap (p50); under cProfile {r['profiled_ms_per_command']} ms")
        print("  one command's timeline (ms since the call):")
        for t, what in r["timeline_last_run"]:
            print(f"    {t:7.2f}  {what}")
        print("  corral functions, cumulative share of the event loop's time under cProfile:")
        for where, share in r["corral_cumulative_share"][:10]:
            print(f"    {share:5.1f}%  {where}")
        print("  own time share (top):")
        for where, share in r["own_time_share"][:8]:
            print(f"    {share:5.1f}%  {where}")
    c = res["cgroup_after_idle"]
    if c:
        print(f"\ncgroup v1 after an idle gap: moving a process {c['move_ms_p50']} ms, renaming a cgroup "
              f"{c['rename_ms_p50']} ms (p50, in the kernel)")
    print(f"rules judging a typical exec or command check: {res['rules_us_p50']} us (p50)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.2, help="idle seconds before each command of the idle rows")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    result = asyncio.run(main(args.n, args.gap))
    render(result)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults written to {args.out}")
