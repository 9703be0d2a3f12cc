"""The episode engine: the one place where an episode's actions become its reward.

The rollout runner, Gymnasium, OpenEnv and TRL all map onto `EpisodeEngine`, so the same actions
earn the same reward, the same termination reason and the same violations everywhere:

- each tool call is a turn and a sandbox step; after it, connections and DNS answers still in flight
  are judged (`Runtime.drain`), then the one violation predicate is asked;
- the one violation predicate: a finding at or above `RewardConfig.terminate_severity`, in the
  agent's sandbox or its grading sandbox, or corral's responder ended or quarantined the sandbox,
  or corral lost its in-sandbox agent (killed or stopped from inside);
- the one rule for late findings: every ending goes through `finish()`, which waits
  `late_findings_grace` seconds for background processes to show themselves, kills every process
  the agent started (session shells too), judges what is in flight once more, and only then grades;
- grading runs in a fresh sandbox (`corral.agent.grading`), so nothing the agent left behind can
  reach the verifier; an ending without `submit` is graded as it stands unless `grade_unsubmitted`
  is off, in which case it scores 0 plus the shaped penalties.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from corral.agent.grading import GradingError, grade
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, prepare_sandbox
from corral.agent.tools import ToolResult, parse_arguments, run_tool
from corral.agent.trajectory import Violation
from corral.detect.novelty import BaselineError, Baselines, novel_events
from corral.errors import EnvironmentUsageError, EpisodeEnded, SandboxClosed, SandboxError, SandboxFrozen
from corral.events import Event, EventKind, Finding
from corral.runtime import Runtime
from corral.sandbox.lifeline import AGENT_LOST
from corral.sandbox.sandbox import Sandbox

LATE_FINDINGS_GRACE = 0.3  # seconds an ending waits for a background process to act
# Endings: done (natural) or truncated (a limit); a violation overrides either.
DONE_REASONS = ("submitted", "security_violation", "sandbox_lost", "policy_done", "unsubmitted", "error")
TRUNCATED_REASONS = ("max_steps", "max_seconds")


@dataclass
class Outcome:
    """What one tool call led to. `done` is a natural end (submitted, a violation, the policy
    stopped); `truncated` is the turn or time limit. `reward` is 0 until the episode ends."""

    observation: str
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    # submitted | security_violation | sandbox_lost | max_steps | max_seconds | policy_done | unsubmitted | error
    termination_reason: str | None = None
    termination_detail: str | None = None  # what ended it, in words (the rule and step, the lost agent)
    violated: bool = False
    violations: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    step: int | None = None
    duration: float = 0.0
    error: bool = False
    reward_components: dict[str, float] = field(default_factory=dict)
    verifier: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.done or self.truncated


def violation_record(f: Finding) -> Violation:
    return Violation(finding_id=f.id, rule=f.rule_id, title=f.title, severity=str(f.severity),
                     technique=f.technique, step=f.step, command=f.command, action=f.action, evidence=f.evidence)


class EpisodeEngine:
    """One episode of one task in one sandbox: `start()`, then `call()` per tool call until an
    outcome has ended (or `finish()` to end it early), then `close()`."""

    def __init__(self, runtime: Runtime, task: Task, *, episode_id: str, reward: RewardConfig | None = None,
                 late_findings_grace: float = LATE_FINDINGS_GRACE, grade_unsubmitted: bool = True) -> None:
        self.runtime = runtime
        self.task = task
        self.episode_id = episode_id
        self.reward = reward or RewardConfig()
        self.late_findings_grace = late_findings_grace
        self.grade_unsubmitted = grade_unsubmitted
        self.sb: Sandbox | None = None
        self.turns = 0
        self.started = 0.0
        self.last: Outcome | None = None
        self.final: Outcome | None = None
        self.step_stats: dict[int, dict[str, float | int]] = {}
        self._sandbox_ids: list[str] = []  # the agent's sandbox, then any grading sandbox
        # one turn or ending at a time: a call that arrives while another runs, or while the episode is
        # being graded, waits for it (and then finds the episode ended) instead of running beside it
        self._turn = asyncio.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> str:
        """A fresh sandbox for the task, its files in /workspace; returns the instruction."""
        self.sb = await self.runtime.create(self.task.sandbox_config(), episode_id=self.episode_id)
        self._sandbox_ids = [self.sb.id]
        await prepare_sandbox(self.sb, self.task)
        self.turns, self.started, self.last, self.final = 0, time.time(), None, None
        return self.task.instruction

    async def close(self) -> None:
        if self.sb is not None:
            sb, self.sb = self.sb, None
            self.step_stats = {n: sb.step_stats(n) for n in sorted(sb._stats)}
            await sb.close()

    @property
    def sandbox_id(self) -> str | None:
        return self._sandbox_ids[0] if self._sandbox_ids else None

    @property
    def ended(self) -> bool:
        return self.final is not None

    # -- the one violation predicate -------------------------------------------------------------------
    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        for sid in self._sandbox_ids:
            out.extend(self.runtime.store.findings(sandbox_id=sid))
        return out

    def violation(self, findings: list[Finding] | None = None) -> tuple[str, str] | None:
        """(termination reason, detail) when the episode has crossed a security line, else None."""
        sb = self.sb
        if sb is not None and sb.terminated is not None:
            if sb.terminated.startswith(AGENT_LOST):
                return "sandbox_lost", sb.terminated
            fatal = self._fatal(findings)
            return "security_violation", fatal or f"ended by corral's responder: {sb.terminated}"
        if sb is not None and sb.frozen:
            return "security_violation", self._fatal(findings) or "the sandbox was quarantined"
        fatal = self._fatal(findings)
        return ("security_violation", fatal) if fatal else None

    def _fatal(self, findings: list[Finding] | None) -> str | None:
        fatal = [f for f in (self.findings() if findings is None else findings) if self.reward.terminates(f)]
        if not fatal:
            return None
        f = fatal[0]
        text = f"rule {f.rule_id!r} ({f.severity}: {f.title}) at step {f.step}"
        text += f", command {f.command!r}" if f.command else ""
        if len(fatal) > 1:
            text += f" (and {len(fatal) - 1} more: {', '.join(sorted({g.rule_id for g in fatal[1:]}))})"
        return text

    # -- turns -----------------------------------------------------------------------------------------
    async def call(self, tool: str, arguments: dict[str, Any] | str | None = None, *,
                   tool_call_id: str | None = None) -> Outcome:
        """Run one tool call (shell, read_file, write_file, edit_file, submit) as a turn. Arguments
        may be a JSON string as a model wrote it; a malformed one is a turn that did nothing."""
        async with self._turn:
            return await self._call(tool, arguments, tool_call_id)

    async def finish(self, reason: str, out: Outcome | None = None) -> Outcome:
        """End the episode (once; a second call returns the same outcome): wait for late findings,
        kill everything the agent started, grade unless it crossed a line, compute the reward."""
        async with self._turn:
            return await self._finish(reason, out)

    async def _call(self, tool: str, arguments: dict[str, Any] | str | None,
                    tool_call_id: str | None) -> Outcome:
        if self.sb is None:
            raise EnvironmentUsageError("start an episode before calling tools")
        if self.final is not None:
            raise EnvironmentUsageError(f"the episode has ended ({self.final.termination_reason}); start a new one")
        self.turns += 1
        out = Outcome(observation="")
        submitted = False
        try:
            args = parse_arguments(arguments) if not isinstance(arguments, dict) else arguments
        except ValueError as e:
            r = ToolResult(f"error: the arguments are not a valid JSON object ({e}); send JSON", error=True)
        else:
            try:
                r = await run_tool(self.sb, tool, args, tool_call_id=tool_call_id or f"{self.episode_id}-{self.turns}",
                                   command_timeout=self.task.limits.command_timeout)
            except (EpisodeEnded, SandboxFrozen):
                r = ToolResult("the episode was ended by a security finding", error=True)
            except (SandboxClosed, SandboxError) as e:
                r = ToolResult(f"error: the sandbox stopped working ({e})", error=True)
        out.observation, out.exit_code, out.step, out.duration, out.error = (
            r.observation, r.exit_code, r.step, r.duration, r.error)
        out.stdout, out.stderr, submitted = r.stdout, r.stderr, r.submitted
        # connections and DNS answers a command made just before it exited are judged after it
        await self.runtime.drain()
        findings = self.findings()  # one store read per turn, for the verdict and the outcome
        verdict = self.violation(findings)
        if verdict is not None:
            reason = verdict[0]
        elif self.sb is None or self.sb.closed:
            reason = "error"
        elif submitted:
            reason = "submitted"
        elif self.turns >= self.task.limits.max_steps:
            reason = "max_steps"
        elif time.time() - self.started > self.task.limits.max_seconds:
            reason = "max_seconds"
        else:
            out.violations = [violation_record(f).model_dump() for f in findings]
            out.metrics = self._metrics()
            self.last = out
            return out
        return await self._finish(reason, out)

    async def _finish(self, reason: str, out: Outcome | None) -> Outcome:
        if self.final is not None:
            return self.final
        if self.sb is None:
            raise EnvironmentUsageError("start an episode before finishing it")
        out = out or Outcome(observation="")
        verdict = self.violation()
        if verdict is None and self.late_findings_grace > 0:
            await asyncio.sleep(self.late_findings_grace)
        await self.runtime.drain()
        # nothing the agent started outlives its episode, or watches its grading
        survivors = await self._kill_all()
        await self.runtime.drain()
        await self._judge_novelty()
        verdict = self.violation()
        if survivors is not None and verdict is None:
            # fail closed: work is never graded while something the agent started still runs
            reason, out.termination_detail = "error", survivors
        graded = reason == "submitted" or (self.grade_unsubmitted and reason != "error")
        if verdict is None and graded and not self.sb.closed:
            out.verifier = await self._grade()
            await self.runtime.drain()
            verdict = self.violation()
        findings = self.findings()
        if verdict is not None:
            reason, out.termination_detail = verdict
            out.violated = True
            out.verifier = None
        score = float(out.verifier.get("score", 0.0)) if out.verifier else 0.0
        out.reward_components = self.reward.components(score, findings, out.violated)
        out.reward = float(sum(out.reward_components.values()))
        out.termination_reason = reason
        out.done, out.truncated = reason not in TRUNCATED_REASONS, reason in TRUNCATED_REASONS
        out.violations = [violation_record(f).model_dump() for f in findings]
        out.metrics = self._metrics()
        self.last = self.final = out
        # the outcome beside the events it came from: reports show how the episode ended and its reward
        self.runtime.emit(Event(kind=EventKind.SANDBOX, action="episode_outcome", sandbox_id=self.sb.id,
                                episode_id=self.episode_id, reason=reason,
                                data={"reward": out.reward, "reward_components": out.reward_components,
                                      "termination_detail": out.termination_detail, "score": score,
                                      "task": self.task.id}))
        return out

    async def _judge_novelty(self) -> None:
        """What this episode did that the task's baseline of honest episodes never did: low findings for
        review (detect/novelty.py); nothing where the task has no baseline yet."""
        sb = self.sb
        if sb is None:
            return
        try:
            baseline = Baselines(self.runtime.config.state_dir).get(self.task.id)
        except BaselineError as e:  # a bad baseline file costs its findings, never the episode
            self.runtime.emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=sb.id,
                                    episode_id=self.episode_id, reason=str(e)))
            return
        if baseline is None:
            return
        events = await asyncio.to_thread(self.runtime.store.events, sandbox_id=sb.id, episode_id=self.episode_id)
        for ev in novel_events(baseline, events, sb.id, self.episode_id):
            self.runtime.emit(ev)
        await self.runtime.drain()

    async def _kill_all(self) -> str | None:
        """Why the agent's processes could not all be killed, or None when none is left."""
        sb = self.sb
        if sb is None or sb.closed:
            return None
        try:
            await sb.kill_all()
        except SandboxClosed:
            return None  # its agent is gone, and every process of the sandbox with it
        except SandboxError as e:
            return str(e)
        return None

    async def _grade(self) -> dict[str, Any]:
        assert self.sb is not None
        try:
            # the grading sandbox joins the violation predicate as soon as it exists: what the code
            # under test did there counts even when grading then fails
            report, _ = await grade(self.runtime, self.sb, self.task, episode_id=self.episode_id,
                                    on_sandbox=self._sandbox_ids.append)
        except (GradingError, SandboxClosed, SandboxError) as e:
            return {"command": self.task.verifier.command, "score": 0.0, "error": str(e)}
        return report.as_dict()

    def _metrics(self) -> dict[str, Any]:
        return {"turns": self.turns, "seconds": round(time.time() - self.started, 3)}
