"""`corral.envs.CorralTRLEnv`: corral's episodes as a TRL environment.

    from trl import GRPOConfig, GRPOTrainer
    from corral.envs.trl_env import CorralTRLEnv

    CorralTRLEnv.configure(runtime_config=RuntimeConfig(...), tasks="examples/tasks")  # optional
    trainer = GRPOTrainer(model=..., train_dataset=ds, environment_factory=CorralTRLEnv, args=GRPOConfig(...))
    trainer.train()
    CorralTRLEnv.shutdown()  # also registered with atexit

TRL's contract (GRPOTrainer, `environment_factory`) and how corral's episode maps onto it:

- TRL makes one instance per generation slot and reuses them across batches; every rollout starts
  with `reset(**row)`, where `row` is the dataset row. The row's `task_id` names the corral task (rows
  without one take the tasks in turn). `reset` returns the task's instruction, which TRL appends to
  the row's last user message.
- Every public method other than `reset` and `get_reward` is a tool whose JSON schema TRL builds
  from the type hints and docstring: `shell`, `read_file`, `write_file`, `edit_file`, `submit`. Each
  call is one step of the episode (`corral.envs.episode.ToolEpisode`) in the rollout's sandbox.
  Helpers are private, and configuration is on classmethods, because TRL would expose anything else.
- A tool that raises is not fatal to TRL: the exception's message becomes the tool's result
  (`{"error": ...}`) and counts in `tools/failure_frequency`. corral uses that to end an episode: a
  finding at or above the terminating severity makes the call that caused it, and every call after
  it, raise `EpisodeEnded` naming the rule, step and command. After `submit` or a turn/time limit,
  calls raise `EnvironmentUsageError`.
- TRL calls `get_reward()` once per rollout after generation ends. It returns:
    * after a violation: the violation penalty (`RewardConfig.violation_penalty`, -1.0 by default);
    * after `submit`: the verifier's score plus the shaped penalties of lesser findings;
    * when the model stopped without calling `submit` (TRL ends a rollout when the model stops
      calling tools, or at its own length and iteration limits) or hit a turn/time limit: by default
      the work is graded as it stands, as if submitted then — the verifier scores what the sandbox
      holds, like TRL's own Harbor environments do — so findings that arrive late are still judged
      and a correct solution is not scored 0 for a missing `submit`. With `grade_unsubmitted=False`
      it is 0.0 plus the shaped penalties instead (the violation penalty if a violation shows up),
      which teaches a model to submit.
  The reward is computed once; the sandbox is then closed (its events stay in the runtime's store)
  and the next `reset` creates a new one.

All instances in a process share one `SyncRuntime`, started on the first `reset` with the
`RuntimeConfig` given to `configure()`; `shutdown()` closes every instance's sandbox and that runtime.
An instance may instead be given its own `runtime=` (e.g. `functools.partial(CorralTRLEnv,
runtime=rt)` as the factory); closing that runtime stays its owner's job.

Safety apart from the task score: TRL logs each reward function under its own name, and
`get_reward()` is one number. `CorralTRLSplitEnv` is the same environment without `get_reward`; its
reward comes from two TRL reward functions, `corral_task_reward` (the verifier's score,
`reward_components["verifier"]`) and `corral_safety_reward` (the violation penalty or the shaped
penalties, `reward_components["safety"]`), whose sum is what `get_reward()` returns:

    GRPOTrainer(..., environment_factory=CorralTRLSplitEnv,
                reward_funcs=[corral_task_reward, corral_safety_reward])   # rewards/corral_*_reward/mean

With `CorralTRLEnv` the two can be added with `GRPOConfig(reward_weights=[0.0, 0.0])` to be logged
only (the trained reward stays `get_reward()`'s). `corral_safety_reward` also logs
`corral/violation_rate` and `corral/finding_rate` through TRL's `log_metric`, so they reach every
`report_to` backend. `on_scored(fn)` calls `fn(outcome)` for every rollout scored in this process
(`corral.observe.trainer_log.SafetyCallback` uses it for per-step safety metrics).

This module imports neither TRL nor torch.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, resolve_tasks
from corral.config import RuntimeConfig
from corral.envs.episode import Outcome, ToolEpisode
from corral.errors import CorralError, EnvironmentUsageError, EpisodeEnded, SandboxClosed
from corral.sync import SyncRuntime

log = logging.getLogger(__name__)

PROMPT_SUFFIX = ("\n\nYour working directory is /workspace. Use the tools to inspect and change files and to run "
                 "commands; call submit when the task is done.")


class _Shared:
    """Process-wide settings and the runtime every instance without its own shares."""

    lock = threading.Lock()
    runtime_config: RuntimeConfig | None = None
    tasks: str | Path | list[Task] | None = None
    loaded: list[Task] | None = None
    reward: RewardConfig | None = None
    grade_unsubmitted: bool = True
    runtime: SyncRuntime | None = None
    atexit_registered = False
    envs: weakref.WeakSet[_TRLEnvBase] = weakref.WeakSet()
    turn = itertools.count()  # rows without a task_id take the tasks in turn, across instances
    listeners: list[Callable[[Outcome], None]] = []  # on_scored()


class _TRLEnvBase:
    """Everything of `CorralTRLEnv` but `get_reward`: TRL treats a `get_reward` method as a reward source
    of its own, so the split environment must not have one at all."""

    PROMPT_SUFFIX = PROMPT_SUFFIX

    def __init__(self, tasks: str | Path | list[Task] | None = None, *, runtime: SyncRuntime | None = None,
                 reward: RewardConfig | None = None, grade_unsubmitted: bool | None = None) -> None:
        self._tasks = resolve_tasks(tasks) if tasks is not None else _shared_tasks()
        self._given_runtime = runtime
        self._reward_config = reward or _Shared.reward or RewardConfig()
        self._grade_unsubmitted = _Shared.grade_unsubmitted if grade_unsubmitted is None else grade_unsubmitted
        self._episode: ToolEpisode | None = None  # made on the first reset, when a runtime is needed
        self._stop: tuple[type[Exception], str] | None = None  # why tool calls are refused
        self._outcome: Outcome | None = None
        self._final: Outcome | None = None  # the scored outcome (get_reward or the reward functions)
        _Shared.envs.add(self)

    # -- configuration (classmethods: TRL exposes only plain functions as tools) ------------------------
    @classmethod
    def configure(cls, *, runtime_config: RuntimeConfig | None = None,
                  tasks: str | Path | list[Task] | None = None, reward: RewardConfig | None = None,
                  grade_unsubmitted: bool = True) -> None:
        """Set the process-wide defaults: the shared runtime's config, the task set (a directory, a task
        file or a list of Task; examples/tasks by default), the reward config and what an unsubmitted
        episode scores. Call it before the trainer is built: instances read it when created."""
        with _Shared.lock:
            if runtime_config is not None and _Shared.runtime is not None:
                raise EnvironmentUsageError("the shared runtime is already running; call CorralTRLEnv.shutdown() "
                                            "before configuring another runtime_config")
            _Shared.runtime_config = runtime_config
            _Shared.tasks, _Shared.loaded = tasks, None
            _Shared.reward, _Shared.grade_unsubmitted = reward, grade_unsubmitted

    @classmethod
    def shared_runtime(cls) -> SyncRuntime:
        """The runtime instances share (started now if it is not yet), e.g. to read its event store."""
        with _Shared.lock:
            if _Shared.runtime is None:
                _Shared.runtime = SyncRuntime(_Shared.runtime_config).start()
                if not _Shared.atexit_registered:
                    atexit.register(cls.shutdown)
                    _Shared.atexit_registered = True
            return _Shared.runtime

    @classmethod
    def on_scored(cls, fn: Callable[[Outcome], None]) -> Callable[[], None]:
        """Call `fn(outcome)` with the final outcome of every rollout scored in this process (any
        instance, either class); returns a function that stops it. A listener that raises is logged and
        never fails the trainer."""
        with _Shared.lock:
            _Shared.listeners.append(fn)

        def stop() -> None:
            with _Shared.lock, contextlib.suppress(ValueError):
                _Shared.listeners.remove(fn)
        return stop

    @classmethod
    def shutdown(cls) -> None:
        """Close every instance's sandbox, then the shared runtime. Instances stay usable: the next
        reset starts a new shared runtime."""
        for env in list(_Shared.envs):
            with contextlib.suppress(CorralError):  # a sandbox already gone must not keep the rest open
                env._close()
        with _Shared.lock:
            rt, _Shared.runtime = _Shared.runtime, None
        if rt is not None:
            rt.close()

    # -- TRL's lifecycle -----------------------------------------------------------------------------
    def reset(self, task_id: str | None = None, **row: Any) -> str:
        """Start an episode of the row's task in a fresh sandbox; returns its instruction."""
        runtime = self._given_runtime or self.shared_runtime()
        if self._episode is None or self._episode.runtime is not runtime:  # first reset, or after shutdown()
            self._episode = ToolEpisode(self._tasks, runtime=runtime, reward=self._reward_config, id_prefix="trl",
                                        grade_unsubmitted=self._grade_unsubmitted)
        if task_id is None:
            task: Task | str = self._tasks[next(_Shared.turn) % len(self._tasks)]
        else:
            task = str(task_id)
        self._stop, self._outcome, self._final = None, None, None
        # unique across instances: the driver's default id counts per instance, and TRL resets a whole pool
        # of instances within the same millisecond
        episode_id = f"trl-{task if isinstance(task, str) else task.id}-{uuid.uuid4().hex[:12]}"
        instruction = self._episode.start(task, episode_id=episode_id)
        return _separator(row.get("prompt")) + instruction + self.PROMPT_SUFFIX

    # -- tools ---------------------------------------------------------------------------------------
    def shell(self, command: str) -> str:
        """Run a bash command in a persistent shell in the sandbox; the working directory, environment
        variables and shell state carry over between calls.

        Args:
            command: The command line to run.

        Returns:
            The exit code, stdout and stderr of the command.
        """
        return self._call("shell", {"command": command})

    def read_file(self, path: str) -> str:
        """Read a text file in the sandbox.

        Args:
            path: The file's path, absolute or relative to /workspace.

        Returns:
            The file's content.
        """
        return self._call("read_file", {"path": path})

    def write_file(self, path: str, content: str) -> str:
        """Create or overwrite a file in the sandbox.

        Args:
            path: The file's path, absolute or relative to /workspace.
            content: The text to write.

        Returns:
            How many characters were written where.
        """
        return self._call("write_file", {"path": path, "content": content})

    def edit_file(self, path: str, old: str, new: str) -> str:
        """Replace one exact occurrence of a text in a file (fails if it occurs zero or several times).

        Args:
            path: The file's path, absolute or relative to /workspace.
            old: The exact text to replace; it must occur once in the file.
            new: The text to put in its place.

        Returns:
            Whether the file was edited.
        """
        return self._call("edit_file", {"path": path, "old": old, "new": new})

    def submit(self) -> str:
        """Finish the task: the work is graded and the episode ends. Call it when the task is done.

        Returns:
            A confirmation that the work was submitted.
        """
        return self._call("submit", {})

    # -- read-only views (properties are not tools) ------------------------------------------------------
    @property
    def outcome(self) -> Outcome | None:
        """The last tool call's outcome, or the final one once the rollout is scored."""
        return self._outcome

    @property
    def task_id(self) -> str | None:
        return self._episode.task.id if self._episode is not None and self._episode.task is not None else None

    @property
    def episode_id(self) -> str | None:
        return self._episode.episode_id if self._episode is not None else None

    @property
    def sandbox_id(self) -> str | None:
        return self._episode.sandbox_id if self._episode is not None else None

    # -- internals -----------------------------------------------------------------------------------
    def _started(self) -> ToolEpisode:
        if self._episode is None or self._episode.task is None:
            raise EnvironmentUsageError("no episode: TRL calls reset(**row) before the tools and get_reward()")
        return self._episode

    def _call(self, tool: str, arguments: dict[str, Any]) -> str:
        ep = self._started()
        if self._stop is not None:
            kind, message = self._stop
            raise kind(message)
        try:
            out = ep.call(tool, arguments)
        except SandboxClosed as e:
            self._stop = (EnvironmentUsageError, f"the sandbox is gone ({e}); the episode is over")
            raise EnvironmentUsageError(self._stop[1]) from e
        self._outcome = out
        if out.violated:
            self._stop = (EpisodeEnded, self._violation_message(ep, out))
            raise EpisodeEnded(self._stop[1])
        if out.done:
            self._stop = (EnvironmentUsageError, f"the work was submitted at turn {ep.turns} and the episode is "
                          "over; no more tool calls are accepted")
        elif out.truncated:
            limit = (f"turn limit ({ep.task.limits.max_steps} tool calls)" if out.termination_reason == "max_steps"
                     else f"time limit ({ep.task.limits.max_seconds:g} s)")
            then = "the work is graded as it stands" if self._grade_unsubmitted else "it scores as unsubmitted"
            self._stop = (EnvironmentUsageError, f"the episode reached its {limit}; no more tool calls are "
                          f"accepted and {then}")
            return f"{out.observation}\n[{self._stop[1]}]"
        return out.observation

    def _score(self) -> Outcome:
        """The rollout's final outcome (see the module docstring), its reward and reward components;
        computed once, then the sandbox is closed."""
        if self._final is not None:
            return self._final
        ep = self._started()
        out = self._outcome
        if out is None or not out.done:
            out = self._finish(ep)
        self._outcome = self._final = out
        self._stop = self._stop or (EnvironmentUsageError, "this episode was scored (its reward is final); "
                                    "reset() starts a new one")
        ep.close_sandbox()
        with _Shared.lock:
            listeners = list(_Shared.listeners)
        for fn in listeners:
            try:
                fn(out)
            except Exception:  # observing the reward never breaks training
                log.exception("corral: an on_scored listener failed")
        return out

    def _violation_message(self, ep: ToolEpisode, out: Outcome) -> str:
        cause = out.termination_detail or "corral ended the sandbox"
        return (f"security violation: {cause}. The episode is over: no more tool calls are accepted, and its "
                f"reward is the violation penalty {ep.reward.violation_penalty:g}.")

    def _finish(self, ep: ToolEpisode) -> Outcome:
        """The final outcome of an episode the model did not end with submit: the engine's one ending
        (late findings judged, every process killed, graded as it stands unless configured not to)."""
        try:
            return ep.finish("unsubmitted")
        except SandboxClosed:
            return Outcome(observation="", termination_reason="error", done=True)

    def _close(self) -> None:
        if self._episode is not None:
            self._episode.close_sandbox()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()


class CorralTRLEnv(_TRLEnvBase):
    """A corral sandbox episode for `trl.GRPOTrainer(environment_factory=CorralTRLEnv)`; see the module
    docstring for the contract. Arguments left out use what `configure()` set."""

    def get_reward(self) -> float:
        """The rollout's reward (see the module docstring); computed once, then the sandbox is closed."""
        return self._score().reward


class CorralTRLSplitEnv(_TRLEnvBase):
    """`CorralTRLEnv` without `get_reward`: its reward comes from the reward functions
    `corral_task_reward` and `corral_safety_reward`, so TRL logs (and can weight) the task score and
    safety apart; their sum is `CorralTRLEnv.get_reward()`."""


# -- TRL reward functions -------------------------------------------------------------------------------
def corral_task_reward(environments: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """TRL reward function: each corral rollout's task score, the verifier's (0 after a violation).
    Rollouts of other environments get None (TRL leaves them out). Scores the rollout if nothing has."""
    return [None if o is None else float(o.reward_components.get("verifier", 0.0))
            for o in _scored(environments, "corral_task_reward")]


def corral_safety_reward(environments: list[Any] | None = None, **kwargs: Any) -> list[float | None]:
    """TRL reward function: each corral rollout's safety component, the violation penalty after a
    violation, else the (negative) shaped penalties of lesser findings; 0 for a clean rollout. Also
    logs `corral/violation_rate` and `corral/finding_rate` of the batch through TRL's `log_metric`."""
    outcomes = _scored(environments, "corral_safety_reward")
    ours = [o for o in outcomes if o is not None]
    log_metric = kwargs.get("log_metric")
    if ours and callable(log_metric):
        log_metric("corral/violation_rate", sum(o.violated for o in ours) / len(ours))
        log_metric("corral/finding_rate", sum(bool(o.violations) for o in ours) / len(ours))
    return [None if o is None else float(o.reward_components.get("safety", 0.0)) for o in outcomes]


def _scored(environments: list[Any] | None, name: str) -> list[Outcome | None]:
    if environments is None:
        raise EnvironmentUsageError(f"{name} reads the rollouts' environments: pass it to a GRPOTrainer whose "
                                    "environment_factory is CorralTRLSplitEnv (or CorralTRLEnv)")
    return [e._score() if isinstance(e, _TRLEnvBase) else None for e in environments]


def _shared_tasks() -> list[Task]:
    # loaded once: TRL makes an instance per generation slot
    with _Shared.lock:
        if _Shared.loaded is None:
            _Shared.loaded = resolve_tasks(_Shared.tasks)
        return _Shared.loaded


def _separator(prompt: Any) -> str:
    """TRL appends reset()'s text to the last user message as is; keep it apart from a non-empty one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    return "\n\n" if isinstance(prompt, str) and prompt.strip() else ""
