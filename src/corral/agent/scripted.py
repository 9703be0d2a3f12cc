"""Scripted and replay policies: deterministic actions, for tests, demos and reproducing incidents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from corral.agent.policy import AgentPolicyError, PolicyReply
from corral.agent.tools import TOOL_NAMES
from corral.events import episode_name


def actions_to_messages(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": a.get("say"),
             "tool_calls": [{"id": f"call_{i}", "type": "function",
                             "function": {"name": a["tool"], "arguments": json.dumps(a.get("arguments") or {})}}]}
            for i, a in enumerate(actions)]


class ScriptedPolicy:
    """A list of actions per task: `{task_id: [{tool: shell, arguments: {command: ...}}, ...]}`."""

    name = "scripted"
    model = None

    def __init__(self, actions: dict[str, list[dict[str, Any]]]) -> None:
        for task_id, acts in actions.items():
            for i, a in enumerate(acts):
                if not isinstance(a, dict) or a.get("tool") not in TOOL_NAMES:
                    raise AgentPolicyError(f"scripted actions for {task_id!r}, item {i}: 'tool' must be one of "
                                           f"{sorted(TOOL_NAMES)}, got {a!r}")
                if not isinstance(a.get("arguments", {}), dict):
                    raise AgentPolicyError(f"scripted actions for {task_id!r}, item {i}: 'arguments' must be a mapping")
        self.actions = actions
        self._pos: dict[str, int] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedPolicy:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise AgentPolicyError(f"{path}: cannot read scripted actions: {e}") from None
        if not isinstance(data, dict):
            raise AgentPolicyError(f"{path}: expected a mapping of task id -> list of actions")
        return cls(data)

    @classmethod
    def from_solutions(cls, tasks_dir: str | Path) -> ScriptedPolicy:
        """Each example task's solution.yaml (a list of actions) as one policy: the tasks of a directory of
        tasks, or the one task a task directory is."""
        out = {}
        root = Path(tasks_dir)
        own = [root / "solution.yaml"] if (root / "solution.yaml").exists() else []
        for sol in sorted([*root.glob("*/solution.yaml"), *own]):
            out[sol.parent.name] = yaml.safe_load(sol.read_text()) or []
        return cls(out)

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, task_id: str,
                  episode_id: str) -> PolicyReply:
        acts = self.actions.get(task_id)
        if acts is None:
            raise AgentPolicyError(f"no scripted actions for task {task_id!r}; add it to the actions file")
        i = self._pos.get(episode_id, 0)
        if i >= len(acts):
            return PolicyReply(message={"role": "assistant", "content": "(script finished)"}, done=True)
        self._pos[episode_id] = i + 1
        a = acts[i]
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": a["tool"], "arguments": json.dumps(a.get("arguments") or {})}}
        return PolicyReply(message={"role": "assistant", "content": a.get("say"), "tool_calls": [call]})


class ReplayPolicy:
    """Replays the assistant messages of recorded trajectories, per task, in order."""

    name = "replay"
    model = None

    def __init__(self, by_task: dict[str, list[dict[str, Any]]],
                 by_episode: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.by_task = by_task
        self.by_episode = by_episode or {}  # a recording for one episode id wins over its task's
        self._pos: dict[str, int] = {}

    @classmethod
    def from_actions(cls, by_episode: dict[str, list[dict[str, Any]]]) -> ReplayPolicy:
        """Recorded actions ({tool, arguments} lists, as scripted ones) turned into assistant messages."""
        return cls({}, {ep: actions_to_messages(acts) for ep, acts in by_episode.items()})

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ReplayPolicy:
        from corral.agent.trajectory import read_jsonl

        try:
            trajs = read_jsonl(Path(path))
        except (OSError, ValueError) as e:
            raise AgentPolicyError(f"cannot replay {path}: {e}") from None
        by_task: dict[str, list[dict[str, Any]]] = {}
        for t in trajs:
            by_task.setdefault(t.task_id, [m for m in t.messages if m.get("role") == "assistant"])
        return cls(by_task)

    async def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *, task_id: str,
                  episode_id: str) -> PolicyReply:
        # recordings name episodes within a run (calc--0); ids carry their run (calc--0@<run>)
        msgs = self.by_episode.get(episode_id) or self.by_episode.get(episode_name(episode_id)) or self.by_task.get(
            task_id)
        if msgs is None:
            raise AgentPolicyError(f"no recorded trajectory for task {task_id!r} to replay")
        i = self._pos.get(episode_id, 0)
        if i >= len(msgs):
            return PolicyReply(message={"role": "assistant", "content": "(replay finished)"}, done=True)
        self._pos[episode_id] = i + 1
        return PolicyReply(message=dict(msgs[i]))
