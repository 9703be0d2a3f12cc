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

import dataclasses
import json
import string
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task
from corral.agent.tools import OBSERVATION_LIMIT, TOOLS
from corral.config import RuntimeConfig
from corral.envs.episode import ToolEpisode
from corral.sync import SyncRuntime

CHARSET = string.printable  # letters, digits, punctuation and whitespace
MAX_TEXT = OBSERVATION_LIMIT + 256
EXAMPLE_ACTION = '{"tool": "shell", "arguments": {"command": "ls"}}'


def _text(s: str) -> str:
    """Observations stay inside the declared space: printable ASCII, bounded length."""
    allowed = set(CHARSET)
    return "".join(c if c in allowed else "?" for c in s)[:MAX_TEXT]


class SandboxEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, tasks: str | Path | list[Task] | None = None, *, runtime: SyncRuntime | None = None,
                 runtime_config: RuntimeConfig | None = None, reward: RewardConfig | None = None) -> None:
        self.episode = ToolEpisode(tasks, runtime=runtime, runtime_config=runtime_config, reward=reward,
                                   id_prefix="gym")
        self.action_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)
        self.observation_space = spaces.Text(max_length=MAX_TEXT, min_length=0, charset=CHARSET)

    @property
    def sb(self):
        return self.episode.sb

    @property
    def runtime(self) -> SyncRuntime | None:
        return self.episode.runtime

    # -- gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        options = options or {}
        tasks = self.episode.tasks
        task = options.get("task_id") or tasks[int(self.np_random.integers(len(tasks)))]
        instruction = self.episode.start(task, episode_id=options.get("episode_id"))
        return _text(instruction), {"task_id": self.episode.task.id, "episode_id": self.episode.episode_id,
                                    "sandbox_id": self.episode.sandbox_id, "tools": TOOLS}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        try:
            call = json.loads(action)
            tool, args = call["tool"], call.get("arguments") or {}
            if not isinstance(args, dict):
                raise ValueError("arguments must be an object")
        except (ValueError, KeyError, TypeError) as e:
            # a malformed action is a turn that did nothing; the agent reads why
            out = self.episode.call("", {})
            out.observation = f"error: the action must be JSON like {EXAMPLE_ACTION} ({e})"
        else:
            out = self.episode.call(str(tool), args)
        info = {k: v for k, v in dataclasses.asdict(out).items()
                if k not in ("observation", "reward", "done", "truncated")}
        # wall-clock seconds would make two identically seeded runs differ (Gymnasium checks that)
        info["metrics"].pop("seconds", None)
        return _text(out.observation), out.reward, out.done, out.truncated, info

    def close(self) -> None:
        self.episode.close()


def register() -> None:
    if "corral/Sandbox-v0" not in gym.registry:
        gym.register(id="corral/Sandbox-v0", entry_point="corral.envs.gym_env:SandboxEnv")
