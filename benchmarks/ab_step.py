"""Two trees of corral on the agent's step path, alternating round by round in one run: the tree at
hand and an older one (a worktree, `git worktree add /tmp/old COMMIT`), each round in a fresh
interpreter of each, so machine noise falls on both alike. Workloads, in one sandbox per round:
- a session command (`echo hi`) back to back, and after a 0.1 s idle gap (an agent's step comes after
  its model's turn, and this machine runs cold code about twice as slow after an idle moment);
- `sb.exec("echo hi")`, 50 ms apart;
- 300 x `/bin/true` in a session command (every exec judged).
Prints p50 per tree and the ratio (new / old), and writes results/ab-step-<old commit>.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/ab_step.py --old /tmp/old [--rounds 6]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOOP = "for i in $(seq 300); do /bin/true; done"
WORKLOADS = ("session_back_to_back", "session_after_gap", "exec", "loop_300_true")


async def child() -> dict[str, list[float]]:
    from corral import Runtime, RuntimeConfig, SandboxConfig

    out: dict[str, list[float]] = {k: [] for k in WORKLOADS}

    async def timed(key: str, coro) -> None:
        t = time.perf_counter()
        await coro
        out[key].append(1000 * (time.perf_counter() - t))

    async with Runtime(RuntimeConfig(state_dir=Path(tempfile.mkdtemp(prefix="corral-ab-")))) as rt:
        sb = await rt.create(SandboxConfig())
        await sb.create_session("s")
        for _ in range(20):  # every path warm once
            await sb.run_in_session("s", "echo hi")
            await sb.exec("echo hi")
        for _ in range(60):
            await timed("session_back_to_back", sb.run_in_session("s", "echo hi"))
        for _ in range(15):
            await asyncio.sleep(0.1)
            await timed("session_after_gap", sb.run_in_session("s", "echo hi"))
        for _ in range(15):
            await asyncio.sleep(0.05)
            await timed("exec", sb.exec("echo hi"))
        for _ in range(2):
            await timed("loop_300_true", sb.run_in_session("s", LOOP))
    return out


def commit_of(src: Path) -> str:
    """The tree's commit, `+dirty` when its sources differ from it (what was measured is not that commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--old", help="the older tree (a worktree's root)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child())))
        return 0
    if not args.old:
        ap.error("--old is required (git worktree add /tmp/old COMMIT)")
    here = Path(__file__).resolve().parent.parent
    trees = {"old": Path(args.old).resolve(), "new": here}
    samples: dict[str, dict[str, list[float]]] = {t: {k: [] for k in WORKLOADS} for t in trees}
    for r in range(args.rounds):
        for tree, root in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            env = {**os.environ, "PYTHONPATH": str(root / "src")}
            p = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=env,
                               timeout=600)
            if p.returncode != 0:
                print(f"{tree} tree failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                return 1
            for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items():
                samples[tree][k].extend(v)
    commits = {t: commit_of(root) for t, root in trees.items()}
    table = {}
    print(f"{'workload (p50, ms)':<24} {'old ' + commits['old']:>14} {'new ' + commits['new']:>14} {'new/old':>8}")
    for k in WORKLOADS:
        old, new = statistics.median(samples["old"][k]), statistics.median(samples["new"][k])
        table[k] = {"old_p50_ms": round(old, 3), "new_p50_ms": round(new, 3), "ratio": round(new / old, 3),
                    "n": len(samples["new"][k])}
        print(f"{k:<24} {old:14.3f} {new:14.3f} {new / old:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS / f"ab-step-{commits['old']}.json"
    dest.write_text(json.dumps({"commits": commits, "rounds": args.rounds, "nproc": os.cpu_count(),
                                "p50": table, "samples": samples}, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
