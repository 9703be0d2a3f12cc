"""One episode driven by a policy (an LLM or a script): the rollout runner's face of the episode
engine. The agent works on a task until it submits, runs out of turns or time, or crosses a security
line; `EpisodeEngine` grades and rewards it; the trajectory is returned."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral.agent.engine import LATE_FINDINGS_GRACE, EpisodeEngine, Outcome, violation_record
from corral.agent.policy import AgentPolicyError, Policy
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task
from corral.agent.tools import TOOLS, parse_arguments
from corral.agent.trajectory import StepRecord, Trajectory
from corral.errors import SandboxClosed
from corral.events import Finding
from corral.runtime import Runtime

SYSTEM_PROMPT = (
    "You are a software engineering agent working in a Linux sandbox. Your working directory is "
    "/workspace. Use the tools to inspect and change files and to run commands. When the task is done, "
    "call submit. Network access is limited to what the task needs."
)
NUDGE = "Please continue by calling one of the tools; call submit when the task is complete."


async def run_episode(runtime: Runtime, task: Task, policy: Policy, *, episode_id: str,
                      reward: RewardConfig | None = None,
                      late_findings_grace: float = LATE_FINDINGS_GRACE) -> Trajectory:
    """A policy drives the episode engine until it ends; the trajectory records every turn."""
    engine = EpisodeEngine(runtime, task, episode_id=episode_id, reward=reward,
                           late_findings_grace=late_findings_grace)
    started = time.time()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": task.instruction},
    ]
    steps: list[StepRecord] = []
    notes: list[str] = []
    usage: dict[str, int] = {}
    final: Outcome | None = None
    try:
        await engine.start()
        idle_turns = 0
        while final is None:
            left = task.limits.max_seconds - (time.time() - started)
            try:
                if left <= 0:
                    raise TimeoutError
                reply = await asyncio.wait_for(
                    policy.act(messages, TOOLS, task_id=task.id, episode_id=episode_id), left)
            except TimeoutError:
                final = await engine.finish("max_seconds")
                break
            notes.extend(reply.notes)
            for k, v in reply.usage.items():
                usage[k] = usage.get(k, 0) + int(v)
            msg = reply.message
            messages.append(msg)
            calls = msg.get("tool_calls") or []
            if not calls:
                idle_turns += 1
                if reply.done or idle_turns >= 2:
                    final = await engine.finish("policy_done")
                    break
                messages.append({"role": "user", "content": NUDGE})
                continue
            idle_turns = 0
            turn = len([m for m in messages if m.get("role") == "assistant"]) - 1
            for call in calls:
                fn = call.get("function") or {}
                out = await engine.call(str(fn.get("name")), fn.get("arguments"), tool_call_id=str(call.get("id", "")))
                messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": out.observation})
                steps.append(StepRecord(index=turn, tool=str(fn.get("name")), tool_call_id=str(call.get("id", "")),
                                        arguments=_arguments(fn.get("arguments")), observation=out.observation,
                                        exit_code=out.exit_code, duration=out.duration, sandbox_step=out.step,
                                        error=out.error))
                if out.ended:
                    final = out
                    break
    except (SandboxClosed, AgentPolicyError) as e:
        notes.append(f"episode error: {e}")
        final = await engine.finish("error") if engine.sb is not None else Outcome("", termination_reason="error")
    finally:
        await engine.close()
    assert final is not None
    findings = engine.findings()
    return Trajectory(
        episode_id=episode_id, task_id=task.id, sandbox_id=engine.sandbox_id or "", run_id=runtime.run_id,
        policy=policy.name,
        model=policy.model, messages=messages, tools=TOOLS, steps=steps, reward=round(final.reward, 6),
        reward_components=final.reward_components, terminated=final.done, truncated=final.truncated,
        termination_reason=final.termination_reason or "error",
        violations=[violation_record(f) for f in findings],
        metrics={"turns": len([m for m in messages if m.get("role") == "assistant"]), "tool_calls": len(steps),
                 "duration": round(time.time() - started, 3), "usage": usage, "notes": notes,
                 "termination_detail": final.termination_detail,
                 "findings_by_severity": _count(findings), "step_stats": engine.step_stats},
        verifier=final.verifier or {}, store_url=runtime.store.url, started=started, finished=time.time(),
    )


def _arguments(raw: Any) -> dict[str, Any] | str:
    try:
        return raw if isinstance(raw, dict) else parse_arguments(raw)
    except ValueError:
        return raw if isinstance(raw, str) else ""


def _count(findings: list[Finding]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in findings:
        out[str(f.severity)] = out.get(str(f.severity), 0) + 1
    return out
