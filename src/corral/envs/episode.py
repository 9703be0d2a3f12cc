"""Episodes for the trainer adapters: a task picker over `corral.agent.engine.EpisodeEngine`, with
the blocking API that Gymnasium and TRL speak.

Gymnasium, OpenEnv and TRL differ only in how they name things; what happens (each tool call a
step, the one violation predicate, the one rule for late findings, grading in a fresh sandbox) is
the engine's, shared with the rollout runner. Every adapter maps `Outcome` onto its own conventions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from corral.agent.engine import LATE_FINDINGS_GRACE, EpisodeEngine, Outcome
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, resolve_tasks
from corral.config import RuntimeConfig
from corral.errors import EnvironmentUsageError, UnknownTask
from corral.events import Finding
from corral.runtime import Runtime
from corral.sandbox.sandbox import Sandbox
from corral.sync import SyncRuntime, run

__all__ = ["AsyncToolEpisode", "Outcome", "ToolEpisode"]


class AsyncToolEpisode:
    """The episode driver on corral's async API: `start()` then `call()` until an outcome is done or
    truncated. Shares a `Runtime` with whatever else the process runs (corral serve's sandboxes)."""

    def __init__(self, runtime: Runtime, tasks: str | Path | list[Task] | None = None, *,
                 reward: RewardConfig | None = None, id_prefix: str = "ep",
                 late_findings_grace: float = LATE_FINDINGS_GRACE, grade_unsubmitted: bool = True) -> None:
        self.tasks = resolve_tasks(tasks)
        self.runtime = runtime
        self.reward = reward or RewardConfig()
        self.id_prefix = id_prefix
        self.late_findings_grace = late_findings_grace
        self.grade_unsubmitted = grade_unsubmitted
        self.engine: EpisodeEngine | None = None
        self.count = 0

    def task_by_id(self, task_id: str) -> Task:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise UnknownTask(f"no task {task_id!r}; known: {', '.join(t.id for t in self.tasks)}")

    async def start(self, task: Task | str, *, episode_id: str | None = None) -> str:
        """A fresh sandbox for the task, its files in /workspace; returns the instruction."""
        await self.close_sandbox()
        chosen = self.task_by_id(task) if isinstance(task, str) else task
        self.count += 1
        eid = episode_id or f"{self.id_prefix}-{chosen.id}-{self.count}-{int(time.time() * 1000)}"
        self.engine = EpisodeEngine(self.runtime, chosen, episode_id=eid, reward=self.reward,
                                    late_findings_grace=self.late_findings_grace,
                                    grade_unsubmitted=self.grade_unsubmitted)
        return await self.engine.start()

    @property
    def sb(self) -> Sandbox | None:
        return self.engine.sb if self.engine is not None else None

    @property
    def task(self) -> Task | None:
        return self.engine.task if self.engine is not None else None

    @property
    def episode_id(self) -> str | None:
        return self.engine.episode_id if self.engine is not None else None

    @property
    def turns(self) -> int:
        return self.engine.turns if self.engine is not None else 0

    @property
    def last(self) -> Outcome | None:
        return self.engine.last if self.engine is not None else None

    @property
    def sandbox_id(self) -> str | None:
        return self.sb.id if self.sb is not None else None

    @property
    def ended(self) -> bool:
        return self.engine is not None and self.engine.ended

    def findings(self) -> list[Finding]:
        return self.engine.findings() if self.engine is not None else []

    def _engine(self) -> EpisodeEngine:
        if self.engine is None or self.engine.sb is None:
            raise EnvironmentUsageError("start an episode (reset) before calling tools")
        return self.engine

    async def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Outcome:
        """Run one tool call (shell, read_file, write_file, edit_file, submit) as a step."""
        eng = self._engine()
        return await eng.call(tool, arguments or {}, tool_call_id=f"{self.id_prefix}-{eng.turns + 1}")

    async def finish(self, reason: str = "unsubmitted") -> Outcome:
        """End the episode now (the trainer stopped calling tools): graded as it stands unless
        `grade_unsubmitted` is off."""
        return await self._engine().finish(reason)

    async def close_sandbox(self) -> None:
        if self.engine is not None:
            await self.engine.close()


class ToolEpisode:
    """Blocking wrapper of `AsyncToolEpisode` for sync trainers (Gymnasium, TRL); owns its runtime
    unless one is given."""

    def __init__(self, tasks: str | Path | list[Task] | None = None, *, runtime: SyncRuntime | None = None,
                 runtime_config: RuntimeConfig | None = None, reward: RewardConfig | None = None,
                 id_prefix: str = "ep", grade_unsubmitted: bool = True) -> None:
        self._own_runtime = runtime is None
        self.runtime: SyncRuntime | None = runtime or SyncRuntime(runtime_config).start()
        try:
            self.core = AsyncToolEpisode(self.runtime.async_runtime, tasks, reward=reward, id_prefix=id_prefix,
                                         grade_unsubmitted=grade_unsubmitted)
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

    def finish(self, reason: str = "unsubmitted") -> Outcome:
        return run(self.core.finish(reason))

    def close_sandbox(self) -> None:
        if "core" in self.__dict__:
            run(self.core.close_sandbox())

    def close(self) -> None:
        self.close_sandbox()
        if self._own_runtime and self.runtime is not None:
            self.runtime.close()
        self.runtime = None
