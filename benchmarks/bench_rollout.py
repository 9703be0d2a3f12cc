"""Benchmark: episodes per minute, and corral's overhead per agent step.

1. Episodes per minute for a trivial task (write a file, run one command, submit, verify) with the
   scripted policy, at concurrency 1, 8 and 32 (each its own rollout, same runtime).
2. Overhead per step: one shell tool call through the episode machinery (runner + sandbox session +
   monitor) against a bare `subprocess.run` of the same command on the host, measured in the same run.

Run it as `make bench` does, inside a private network namespace:
    unshare --net --mount --propagation private -- \
        sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_rollout.py'
Figures are printed and written to benchmarks/results/rollout.json (rollout.quick.json with --quick).
"""

from __future__ import annotations

import argparse
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
    render,
    run_script,
    write_results,
)
from rich.console import Console

from corral import Runtime, RuntimeConfig
from corral.agent.scripted import ScriptedPolicy
from corral.agent.tasks import Task
from corral.agent.tools import run_tool
from corral.rollout.runner import run_rollout

CMD = "echo step"


def trivial_task(i: int) -> Task:
    return Task.model_validate({
        "id": f"trivial{i}", "instruction": "Create ok.txt containing ok, then submit.",
        "verifier": {"command": "test \"$(cat ok.txt)\" = ok", "score": "exit_code"},
        "limits": {"max_steps": 5}})


ACTIONS = [{"tool": "write_file", "arguments": {"path": "/workspace/ok.txt", "content": "ok"}},
           {"tool": "shell", "arguments": {"command": "cat ok.txt"}},
           {"tool": "submit", "arguments": {}}]


async def episodes_per_minute(rt: Runtime, rep: Report, concurrency: int, episodes: int, tmp: Path) -> None:
    tasks = [trivial_task(i) for i in range(episodes)]
    policy = ScriptedPolicy({t.id: ACTIONS for t in tasks})
    out = tmp / f"c{concurrency}.jsonl"
    t0 = time.perf_counter()
    s = await run_rollout(rt, tasks, policy, n=1, concurrency=concurrency, out=out)
    elapsed = time.perf_counter() - t0
    rate = 60.0 * s.ran_now / elapsed
    rep.add(Metric(f"epm_c{concurrency}", f"episodes/min at concurrency {concurrency} ({episodes} episodes)",
                   "ep/min", [rate], higher_is_better=True,
                   extra={"pass_rate": s.pass_rate, "elapsed_s": round(elapsed, 2), "errors": s.errors}))


async def step_overhead(rt: Runtime, rep: Report, n: int) -> None:
    sb = await rt.create()
    try:
        await sb.create_session("agent")
        corral_ms, host_ms = [], []
        for i in range(n):  # interleaved, so noise hits both alike
            t0 = time.perf_counter()
            r = await run_tool(sb, "shell", {"command": CMD}, tool_call_id=f"b{i}")
            corral_ms.append((time.perf_counter() - t0) * 1000)
            assert r.exit_code == 0, r.observation
            t0 = time.perf_counter()
            subprocess.run(["bash", "-c", CMD], capture_output=True, check=True)
            host_ms.append((time.perf_counter() - t0) * 1000)
        rep.add(Metric("step_host", 'baseline: host subprocess.run(["bash", "-c", "echo step"])', "ms", host_ms))
        rep.add(Metric("step_corral", "one shell tool call (runner + sandbox session + monitor)", "ms", corral_ms,
                       baseline="step_host"))
    finally:
        await sb.close()


def targets() -> list[Target]:
    return [Target("episodes/min at concurrency 8 (reported, no target)",
                   lambda r: r.metrics["epm_c8"].p50 if "epm_c8" in r.metrics else None,
                   lambda v: True, lambda v: f"{v:.0f}/min")]


async def main(args: argparse.Namespace, console: Console, machine: dict[str, Any]) -> int:
    rep = Report()
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-rollout-"))
    rt = Runtime(RuntimeConfig(state_dir=tmp / "state", system_dns=False))
    await rt.start()
    try:
        rep.group("1. episodes per minute (trivial task, scripted policy)")
        for c in (1, 8, 32):
            try:
                await episodes_per_minute(rt, rep, c, episodes=max(c, 8) if args.quick else max(2 * c, 16), tmp=tmp)
            except Exception as e:  # report, keep measuring
                rep.errors[f"concurrency {c}"] = f"{type(e).__name__}: {e}"
        rep.group("2. overhead per agent step")
        await step_overhead(rt, rep, 20 if args.quick else 100)
    finally:
        await rt.close()
    tgts = targets()
    render(console, rep, tgts, "corral rollout benchmark")
    write_results(console, "rollout", rep, tgts, machine, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(__doc__, "fewer episodes and steps: a smoke run", main))
