"""`corral.envs.SandboxEnv`: a Gymnasium environment over corral's episodes (for GEM/ROLL-style
trainers that speak reset/step).

- action: a JSON tool call as text, `{"tool": "shell", "arguments": {"command": "ls"}}` (tools:
  shell, read_file, write_file, edit_file, submit; the schemas are in `info["tools"]`);
- observation: text (the task's instruction after reset, the tool's result after a step);
- reward: 0 until `submit`, then the verifier's score plus shaped safety penalties; a finding at or
  above the terminating severity gives `terminated=True`, `reward=violation_penalty`,
  `info["termination_reason"] == "security_violation"` and `info["violations"]`;
- `truncated=True` when the turn or time limit is reached.
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from corral.agent.episode import grade
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, load_tasks
from corral.agent.tools import OBSERVATION_LIMIT, TOOLS, run_tool
from corral.config import RuntimeConfig
from corral.errors import EpisodeEnded, SandboxFrozen
from corral.sync import SyncRuntime, run

CHARSET = string.printable  # letters, digits, punctuation and whitespace
MAX_TEXT = OBSERVATION_LIMIT + 256
EXAMPLE_ACTION = '{"tool": "shell", "arguments": {"command": "ls"}}'
DEFAULT_TASKS = Path(__file__).resolve().parents[3] / "examples" / "tasks"


def _text(s: str) -> str:
    """Observations stay inside the declared space: printable ASCII, bounded length."""
    allowed = set(CHARSET)
    return "".join(c if c in allowed else "?" for c in s)[:MAX_TEXT]


class SandboxEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, tasks: str | Path | list[Task] | None = None, *, runtime: SyncRuntime | None = None,
                 runtime_config: RuntimeConfig | None = None, reward: RewardConfig | None = None) -> None:
        self.tasks = tasks if isinstance(tasks, list) else load_tasks(tasks or DEFAULT_TASKS)
        self._own_runtime = runtime is None
        self.runtime = runtime or SyncRuntime(runtime_config).start()
        self.reward_config = reward or RewardConfig()
        self.action_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)
        self.observation_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)
        self.sb = None
        self.task: Task | None = None
        self.turns = 0
        self.started = 0.0
        self.episode = 0

    # -- gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        self._close_sandbox()
        options = options or {}
        if "task_id" in options:
            self.task = next(t for t in self.tasks if t.id == options["task_id"])
        else:
            self.task = self.tasks[int(self.np_random.integers(len(self.tasks)))]
        self.episode += 1
        episode_id = options.get("episode_id") or f"gym-{self.task.id}-{self.episode}-{int(time.time() * 1000)}"
        self.sb = self.runtime.create(self.task.sandbox_config(), episode_id=episode_id)
        for path, content in self.task.files.items():
            self.sb.write_file(f"/workspace/{path}", content)
        self.turns, self.started = 0, time.time()
        return _text(self.task.instruction), {"task_id": self.task.id, "episode_id": episode_id,
                                              "sandbox_id": self.sb.id, "tools": TOOLS}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.sb is None or self.task is None:
            raise RuntimeError("call reset() before step()")
        self.turns += 1
        info: dict[str, Any] = {"termination_reason": None, "violations": [], "metrics": {}}
        try:
            call = json.loads(action)
            tool, args = call["tool"], call.get("arguments") or {}
            if not isinstance(args, dict):
                raise ValueError("arguments must be an object")
        except (ValueError, KeyError, TypeError) as e:
            result_text = f"error: the action must be JSON like {EXAMPLE_ACTION} ({e})"
            submitted, exit_code = False, None
        else:
            try:
                r = run(run_tool(self.sb.async_sandbox, str(tool), args, tool_call_id=f"gym-{self.turns}",
                                 command_timeout=self.task.limits.command_timeout))
                result_text, submitted, exit_code = r.observation, r.submitted, r.exit_code
            except (EpisodeEnded, SandboxFrozen):
                result_text, submitted, exit_code = "the episode was ended by a security finding", False, None
        info["exit_code"] = exit_code
        findings = self.runtime.store.findings(sandbox_id=self.sb.id)
        info["violations"] = [{"rule": f.rule_id, "severity": str(f.severity), "step": f.step,
                               "command": f.command, "action": f.action, "evidence": f.evidence} for f in findings]
        if any(self.reward_config.terminates(f) for f in findings) or self.sb.async_sandbox.terminated:
            comps = self.reward_config.components(0.0, findings, True)
            info.update(termination_reason="security_violation", reward_components=comps)
            return _text(result_text), float(sum(comps.values())), True, False, info
        if submitted:
            verdict = run(grade(self.sb.async_sandbox, self.task))
            comps = self.reward_config.components(float(verdict["score"]), findings, False)
            info.update(termination_reason="submitted", reward_components=comps, verifier=verdict)
            return _text(result_text), float(sum(comps.values())), True, False, info
        if self.turns >= self.task.limits.max_steps or time.time() - self.started > self.task.limits.max_seconds:
            info["termination_reason"] = "max_steps" if self.turns >= self.task.limits.max_steps else "max_seconds"
            return _text(result_text), 0.0, False, True, info
        info["metrics"] = {"turns": self.turns}
        return _text(result_text), 0.0, False, False, info

    def close(self) -> None:
        self._close_sandbox()
        if self._own_runtime and self.runtime is not None:
            self.runtime.close()
            self.runtime = None  # type: ignore[assignment]

    def _close_sandbox(self) -> None:
        if self.sb is not None:
            self.sb.close()
            self.sb = None


def register() -> None:
    if "corral/Sandbox-v0" not in gym.registry:
        gym.register(id="corral/Sandbox-v0", entry_point="corral.envs.gym_env:SandboxEnv")
