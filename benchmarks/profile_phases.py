"""A step's phases, method by method: each of the runtime's methods on a session command's and an
`sb.exec`'s path wrapped with a timer (a profiler, not a benchmark: the timers cost a little, and
nested methods count in their callers too), then 200 `echo hi` of each. Prints, per method, its p50 and
its time per command, and writes results/phases.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/profile_phases.py'

A method the sources do not have is left out, so the same script times an older tree for a
before-and-after (`PYTHONPATH=OLD/src .venv/bin/python benchmarks/profile_phases.py --out old.json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_runtime import RESULTS_DIR, preflight
from timers import TIMES, timed

import corral.monitor.execwatch as execwatch_mod
import corral.sandbox.cgroups as cgroups_mod
import corral.sandbox.codepipes as codepipes_mod
import corral.sandbox.sandbox as sandbox_mod
from corral import Runtime, RuntimeConfig, SandboxConfig

Sandbox, Cgroup, Watch = sandbox_mod.Sandbox, cgroups_mod.SandboxCgroup, execwatch_mod.ExecWatch
PHASES = [  # (label, owner, method): what the session and exec paths call, outermost first
    ("pre-run rules (_precheck)", Sandbox, "_precheck"),
    ("shell into the step's cgroup", Sandbox, "_shell_into_step"),
    ("the command's round trip (_run)", Sandbox, "_run"),
    ("request to the agent (_send)", Sandbox, "_send"),
    ("events recorded (_emit)", Sandbox, "_emit"),
    ("OOM counter read", Cgroup, "oom_kills"),
    ("pids-limit counter read", Cgroup, "pids_max_hits"),
    ("cgroup rename", Cgroup, "rename"),
    ("exec notification, whole (_serve_one)", Watch, "_serve_one"),
    ("  the exec judged (_exec)", Watch, "_exec"),
    ("  its event built (_process_event)", Sandbox, "_process_event"),
    ("  rules and recording (_judge_exec)", Sandbox, "_judge_exec"),
    ("  its pipes noted (CodePipes.exec)", getattr(codepipes_mod, "CodePipes", None), "exec"),
    ("  the answer to the kernel (_respond)", Watch, "_respond"),
]
def wrap(label: str, owner: Any, name: str) -> None:
    fn = getattr(owner, name, None)
    if fn is not None:
        setattr(owner, name, timed(label, fn, asyncio.iscoroutinefunction(fn)))


def summary(n: int) -> dict[str, dict[str, float]]:
    return {k: {"calls_per_command": round(len(v) / n, 2), "p50_ms": round(statistics.median(v), 3),
                "ms_per_command": round(sum(v) / n, 3)} for k, v in TIMES.items()}


async def run(n: int) -> dict[str, Any]:
    for label, owner, name in PHASES:
        wrap(label, owner, name)
    out: dict[str, Any] = {"n": n}
    async with Runtime(RuntimeConfig(state_dir=Path(tempfile.mkdtemp(prefix="corral-phases-")))) as rt:
        sb = await rt.create(SandboxConfig())
        await sb.create_session("s")
        for _ in range(20):
            await sb.run_in_session("s", "echo hi")
        TIMES.clear()
        walls = []
        for _ in range(n):  # back to back, as profile_step.py's session row
            t = time.perf_counter()
            await sb.run_in_session("s", "echo hi")
            walls.append(1000 * (time.perf_counter() - t))
        out["session"] = {"wall_ms_p50": round(statistics.median(walls), 3), "phases": summary(n)}
        TIMES.clear()
        walls = []
        for _ in range(n):  # 50 ms apart: the next exec's child is staged and placed by then
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            await sb.exec("echo hi")
            walls.append(1000 * (time.perf_counter() - t))
        out["exec"] = {"wall_ms_p50": round(statistics.median(walls), 3), "phases": summary(n)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=200, help="commands of each kind (default 200)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "phases.json"))
    args = ap.parse_args()
    if preflight(False) is None:
        return 2
    out = asyncio.run(run(args.n))
    out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    for kind in ("session", "exec"):
        print(f"\n{kind}: p50 {out[kind]['wall_ms_p50']} ms; per method (p50, ms per command):")
        for label, v in out[kind]["phases"].items():
            print(f"  {label:<42} {v['p50_ms']:7.3f} {v['ms_per_command']:7.3f}")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
