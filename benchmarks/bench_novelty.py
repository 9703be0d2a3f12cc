"""How often the novelty layer speaks on honest work: each example task's reference solution is run K
times to build the task's baseline, then M more times; every novel-behaviour finding on those M honest
episodes is a false alarm for review. Writes results/novelty.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_novelty.py [--quick] [--build 3] [--eval 5]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_runtime import RESULTS_DIR, preflight

from corral import Runtime, RuntimeConfig
from corral.agent.engine import EpisodeEngine
from corral.agent.tasks import DEFAULT_TASKS, load_task
from corral.detect.novelty import Baselines
from corral.rollout.taskworld import TASK_FILES, TASK_HOST
from corral.testworld import World, http_files


async def honest_episode(rt: Runtime, task_dir: Path, episode_id: str) -> tuple[str, int, str]:
    """(termination reason, agent steps, sandbox id) of the task's reference solution."""
    engine = EpisodeEngine(rt, load_task(task_dir), episode_id=episode_id)
    await engine.start()
    try:
        out = None
        for act in yaml.safe_load((task_dir / "solution.yaml").read_text()):
            out = await engine.call(act["tool"], act.get("arguments") or {})
            if out.ended:
                break
        assert out is not None
        return out.termination_reason or "", engine.turns, engine.sandbox_id or ""
    finally:
        await engine.close()


async def run(args: argparse.Namespace, world: World) -> dict:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-novelty-"))
    rt = Runtime(RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False))
    await rt.start()
    tasks = sorted(p for p in DEFAULT_TASKS.iterdir() if (p / "solution.yaml").exists())[: 3 if args.quick else None]
    out: dict = {"build": args.build, "eval": args.eval, "tasks": {}}
    try:
        for task_dir in tasks:
            task = load_task(task_dir)
            built = {}
            for i in range(args.build):
                reason, _, sb_id = await honest_episode(rt, task_dir, f"{task.id}--base{i}")
                if reason == "submitted":
                    built[f"{task.id}--base{i}"] = rt.store.events(episode_id=f"{task.id}--base{i}", sandbox_id=sb_id)
            if not built:
                out["tasks"][task.id] = {"error": "no honest episode to build a baseline from"}
                continue
            base = Baselines(rt.config.state_dir).accept(task.id, built)
            rows = []
            for i in range(args.eval):
                eid = f"{task.id}--eval{i}"
                t0 = time.perf_counter()
                reason, turns, _ = await honest_episode(rt, task_dir, eid)
                novel = [f for f in rt.store.findings(episode_id=eid) if f.rule_id == "novel-behaviour"]
                rows.append({"episode": eid, "termination": reason, "steps": turns, "novel_findings": len(novel),
                             "features": sorted({x for f in novel for x in (f.data.get("output") or "").split(", ")}),
                             "seconds": round(time.perf_counter() - t0, 2)})
            out["tasks"][task.id] = {"baseline_features": len(base.features), "episodes": rows}
    finally:
        await rt.close()
    evals = [r for t in out["tasks"].values() for r in t.get("episodes", [])]
    steps = sum(r["steps"] for r in evals)
    noisy = [r for r in evals if r["novel_findings"]]
    out["summary"] = {"honest_episodes": len(evals), "with_novelty": len(noisy),
                      "episode_rate": round(len(noisy) / len(evals), 4) if evals else None,
                      "novel_findings": sum(r["novel_findings"] for r in evals), "steps": steps,
                      "per_step_rate": round(sum(r["novel_findings"] for r in evals) / steps, 4) if steps else None}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="three tasks")
    ap.add_argument("--build", type=int, default=3, help="honest episodes per task that build its baseline")
    ap.add_argument("--eval", type=int, default=5, help="honest episodes per task judged against it")
    args = ap.parse_args()
    if preflight(args.quick) is None:
        return 2
    world = World()
    world.start()
    try:
        world.serve(*TASK_HOST[:2], http_files(TASK_FILES), name=TASK_HOST[2])
        result = asyncio.run(run(args, world))
    finally:
        world.close()
    s = result["summary"]
    print(f"honest episodes judged: {s['honest_episodes']}; with a novel-behaviour finding: {s['with_novelty']} "
          f"({(s['episode_rate'] or 0) * 100:.1f}%); findings per step: {(s['per_step_rate'] or 0) * 100:.2f}%")
    for t in result["tasks"].values():
        for r in t.get("episodes", []):
            if r["novel_findings"]:
                print(f"  {r['episode']}: {'; '.join(r['features'])[:200]}")
    path = RESULTS_DIR / ("novelty.quick.json" if args.quick else "novelty.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
