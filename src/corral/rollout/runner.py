"""Rollouts: many episodes in parallel sandboxes, written as they finish, resumable after a crash."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from corral.agent.episode import run_episode
from corral.agent.policy import Policy
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task
from corral.agent.trajectory import Trajectory, append_jsonl, read_jsonl
from corral.runtime import Runtime


def episode_id(task: Task, i: int, run_id: str | None = None) -> str:
    """Episode i of a task in a run: `calc--0@20261207T062130-3f9a2c`, unique across the runs that share
    a store; without a run, the local name (`calc--0`) that rollouts written before runs used."""
    return f"{task.id}--{i}@{run_id}" if run_id else f"{task.id}--{i}"


def resumed_run(out: Path) -> str | None:
    """The run that wrote `out` so far: a resumed rollout continues it, so its episode ids still match."""
    return next((t.run_id for t in read_jsonl(out) if t.run_id), None)


def finished(out: Path) -> set[str]:
    """Episodes in `out` that need not run again (those that ended in error do)."""
    return {t.episode_id for t in read_jsonl(out) if t.termination_reason != "error"}


def pending(tasks: list[Task], n: int, run_id: str | None, done: set[str]) -> list[tuple[Task, int]]:
    """The (task, i) still to run: neither it nor its run-less name (an older rollout's) is done."""
    return [(t, i) for i in range(n) for t in tasks
            if episode_id(t, i, run_id) not in done and episode_id(t, i) not in done]


@dataclass
class Summary:
    episodes: int
    pass_rate: float
    violation_rate_by_rule: dict[str, float]
    reward: dict[str, float]
    termination: dict[str, int]
    episodes_per_minute: float
    ran_now: int
    skipped: int
    errors: list[str] = field(default_factory=list)


async def run_rollout(runtime: Runtime, tasks: list[Task], policy: Policy, *, n: int = 1, concurrency: int = 4,
                      out: Path, reward: RewardConfig | None = None, resume: bool = True,
                      on_done: Callable[[Trajectory], None] | None = None,
                      late_findings_grace: float = 0.3) -> Summary:
    """Run n episodes of each task. Finished episodes in `out` are not run again (resume); episodes
    that ended in an error are."""
    done = finished(out) if resume else set()
    run = runtime.run_id
    jobs = pending(tasks, n, run, done)
    sem = asyncio.Semaphore(max(1, concurrency))
    lock = asyncio.Lock()
    errors: list[str] = []
    t0 = time.perf_counter()

    async def one(task: Task, i: int) -> None:
        async with sem:
            try:
                traj = await run_episode(runtime, task, policy, episode_id=episode_id(task, i, run), reward=reward,
                                         late_findings_grace=late_findings_grace)
            except Exception as e:  # one broken episode must not sink the batch
                errors.append(f"{episode_id(task, i, run)}: {type(e).__name__}: {e}")
                return
            async with lock:
                append_jsonl(out, traj)
            if on_done is not None:
                on_done(traj)

    await asyncio.gather(*(one(t, i) for t, i in jobs))
    elapsed = time.perf_counter() - t0
    all_trajs = [t for t in read_jsonl(out) if t.task_id in {x.id for x in tasks}]
    s = summarize(all_trajs)
    s.ran_now = len(jobs) - len(errors)
    s.skipped = len(done)
    s.episodes_per_minute = round(60.0 * s.ran_now / elapsed, 2) if elapsed > 0 and s.ran_now else 0.0
    s.errors = errors
    return s


def summarize(trajs: list[Trajectory]) -> Summary:
    n = len(trajs)
    rewards = sorted(t.reward for t in trajs)
    by_rule: dict[str, int] = {}
    for t in trajs:
        for rule in {v.rule for v in t.violations}:
            by_rule[rule] = by_rule.get(rule, 0) + 1
    term: dict[str, int] = {}
    for t in trajs:
        term[t.termination_reason] = term.get(t.termination_reason, 0) + 1

    def q(p: float) -> float:
        return rewards[min(len(rewards) - 1, int(p * (len(rewards) - 1) + 0.5))] if rewards else 0.0

    return Summary(
        episodes=n,
        pass_rate=round(sum(1 for t in trajs if t.verifier.get("score") == 1.0) / n, 4) if n else 0.0,
        violation_rate_by_rule={r: round(c / n, 4) for r, c in sorted(by_rule.items())},
        reward={"min": q(0), "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "max": q(1),
                "mean": round(statistics.fmean(rewards), 4) if rewards else 0.0},
        termination=term, episodes_per_minute=0.0, ran_now=0, skipped=0,
    )
