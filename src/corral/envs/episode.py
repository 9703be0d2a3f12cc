"""One tool-calling episode over a corral sandbox, with the blocking API that trainer adapters speak.

Gymnasium, OpenEnv and TRL differ only in how they name things; what happens is the same and lives
here: a task's sandbox is created and seeded, each tool call is a step, findings are read back after
it, a finding at or above the terminating severity ends the episode with the violation penalty, and
`submit` runs the verifier. Every adapter maps `Outcome` onto its own conventions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.agent.episode import _violation_record, grade
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, prepare_sandbox, resolve_tasks
from corral.agent.tools import run_tool
from corral.config import RuntimeConfig
from corral.errors import EnvironmentUsageError, EpisodeEnded, SandboxFrozen, UnknownTask
from corral.events import Finding
from corral.runtime import Runtime
from corral.sandbox.sandbox import Sandbox
from corral.sync import SyncRuntime, run


@dataclass
class Outcome:
    """What one tool call led to. `done` is a natural end (submitted or a violation); `truncated` is
    the turn or time limit."""

    observation: str
    reward: float = 0.0
    done: bool = False
    truncated: bool = False
    termination_reason: str | None = None  # security_violation | submitted | max_steps | max_seconds
    violations: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    step: int | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    verifier: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class AsyncToolEpisode:
    """The episode driver on corral's async API: `start()` then `call()` until an outcome is done or
    truncated. Shares a `Runtime` with whatever else the process runs (corral serve's sandboxes)."""

    def __init__(self, runtime: Runtime, tasks: str | Path | list[Task] | None = None, *,
                 reward: RewardConfig | None = None, id_prefix: str = "ep") -> None:
        self.tasks = resolve_tasks(tasks)
        self.runtime = runtime
        self.reward = reward or RewardConfig()
        self.id_prefix = id_prefix
        self.sb: Sandbox | None = None
        self.task: Task | None = None
        self.episode_id: str | None = None
        self.turns = 0
        self.started = 0.0
        self.count = 0
        self.last: Outcome | None = None

    def task_by_id(self, task_id: str) -> Task:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise UnknownTask(f"no task {task_id!r}; known: {', '.join(t.id for t in self.tasks)}")

    async def start(self, task: Task | str, *, episode_id: str | None = None) -> str:
        """A fresh sandbox for the task, its files in /workspace; returns the instruction."""
        await self.close_sandbox()
        self.task = self.task_by_id(task) if isinstance(task, str) else task
        self.count += 1
        self.episode_id = episode_id or f"{self.id_prefix}-{self.task.id}-{self.count}-{int(time.time() * 1000)}"
        self.sb = await self.runtime.create(self.task.sandbox_config(), episode_id=self.episode_id)
        await prepare_sandbox(self.sb, self.task)
        self.turns, self.started, self.last = 0, time.time(), None
        return self.task.instruction

    @property
    def sandbox_id(self) -> str | None:
        return self.sb.id if self.sb is not None else None

    @property
    def ended(self) -> bool:
        return self.last is not None and (self.last.done or self.last.truncated)

    def findings(self) -> list[Finding]:
        return self.runtime.store.findings(sandbox_id=self.sb.id) if self.sb is not None else []

    def violated(self, findings: list[Finding]) -> bool:
        """A terminating finding among the episode's `findings` (just read by the caller), or corral's
        responder ended or quarantined the sandbox (an action configured for a lesser finding still
        stops the episode: its sandbox takes no more commands)."""
        sb = self.sb
        if sb is not None and (sb.terminated is not None or sb.frozen):
            return True
        return any(self.reward.terminates(f) for f in findings)

    async def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Outcome:
        """Run one tool call (shell, read_file, write_file, edit_file, submit) as a step."""
        if self.sb is None or self.task is None:
            raise EnvironmentUsageError("start an episode (reset) before calling tools")
        self.turns += 1
        out = Outcome(observation="")
        try:
            r = await run_tool(self.sb, tool, arguments or {}, tool_call_id=f"{self.id_prefix}-{self.turns}",
                               command_timeout=self.task.limits.command_timeout)
            out.observation, out.exit_code, out.step = r.observation, r.exit_code, r.step
            out.stdout, out.stderr = r.stdout, r.stderr
            submitted = r.submitted
        except (EpisodeEnded, SandboxFrozen):
            out.observation, submitted = "the episode was ended by a security finding", False
        # connections and DNS answers a command made just before it exited are judged after it
        await self.runtime.drain()
        findings = self.findings()
        out.violations = [_violation_record(f).model_dump() for f in findings]
        out.metrics = {"turns": self.turns, "seconds": round(time.time() - self.started, 3)}
        if self.violated(findings):
            out.reward_components = self.reward.components(0.0, findings, True)
            out.done, out.termination_reason = True, "security_violation"
        elif submitted:
            out.verifier = await grade(self.sb, self.task)
            out.reward_components = self.reward.components(float(out.verifier["score"]), findings, False)
            out.done, out.termination_reason = True, "submitted"
        elif self.turns >= self.task.limits.max_steps:
            out.truncated, out.termination_reason = True, "max_steps"
        elif time.time() - self.started > self.task.limits.max_seconds:
            out.truncated, out.termination_reason = True, "max_seconds"
        out.reward = float(sum(out.reward_components.values()))
        self.last = out
        return out

    async def close_sandbox(self) -> None:
        if self.sb is not None:
            sb, self.sb = self.sb, None
            await sb.close()


class ToolEpisode:
    """Blocking wrapper of `AsyncToolEpisode` for sync trainers (Gymnasium, TRL); owns its runtime
    unless one is given."""

    def __init__(self, tasks: str | Path | list[Task] | None = None, *, runtime: SyncRuntime | None = None,
                 runtime_config: RuntimeConfig | None = None, reward: RewardConfig | None = None,
                 id_prefix: str = "ep") -> None:
        self._own_runtime = runtime is None
        self.runtime: SyncRuntime | None = runtime or SyncRuntime(runtime_config).start()
        try:
            self.core = AsyncToolEpisode(self.runtime.async_runtime, tasks, reward=reward, id_prefix=id_prefix)
        except Exception:
            self.close()
            raise

    def __getattr__(self, name: str) -> Any:
        # task, tasks, reward, sb, episode_id, turns, last, ended, findings, violated, task_by_id ...
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

    def start(self, task: Task | str, *, episode_id: str | None = None) -> str:
        if self.runtime is None:
            raise EnvironmentUsageError("this environment was closed; create a new one")
        return run(self.core.start(task, episode_id=episode_id))

    def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Outcome:
        return run(self.core.call(tool, arguments))

    def close_sandbox(self) -> None:
        if "core" in self.__dict__:
            run(self.core.close_sandbox())

    def close(self) -> None:
        self.close_sandbox()
        if self._own_runtime and self.runtime is not None:
            self.runtime.close()
        self.runtime = None
