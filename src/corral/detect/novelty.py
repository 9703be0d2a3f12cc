"""A novelty layer for what no rule names: per task, what its honest episodes do; anything else is
reported, low, for review.

ROME's behaviours were emergent: nobody had listed them, so no rule could. What a task's honest
episodes do is, in contrast, easy to know: the programs they run, the destinations they try, the kinds
of events the monitor sees, and their rough shape. A behaviour a task's baseline has never seen becomes
a `novel-behaviour` finding (severity low, action record): it never ends an episode, and it shapes the
reward only when `RewardConfig.novelty_penalty` says so.

A baseline is built from episodes a person accepts as honest (`corral baseline accept TASK ...`), and
kept as JSON beside the store (`<state_dir>/baselines/<task>.json`): readable, diffable, resettable.

Features of an episode, from its sandbox's events in the agent's steps (corral's own step 0 is not the
agent's):
- `program:<path>`: each program executed (a path under /tmp, /dev/shm, /workspace or $HOME keeps
  its file name only under that directory, so a fresh temporary name is still the same program);
- `connect:<verdict>:<host>:<port>` and `dns:<verdict>:<name>`: destinations attempted (the name when
  the gateway knows one);
- `event:<kind>/<action>` and `file:<category>/<op>`: the kinds of events the monitor saw;
- `shape:processes:<2^k>`, `shape:connections:<2^k>`: the episode's size, in powers of two; novel only
  above twice the largest of the baseline.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from corral.errors import ConfigError
from corral.events import Event, EventKind

NOVELTY_RULE = "novel-behaviour"  # the rule that judges the `sandbox/novel` events made here
_WORK_DIRS = ("/tmp/", "/dev/shm/", "/workspace/", "/root/", "/var/tmp/")
# corral's own bookkeeping: never the agent's behaviour
_PLUMBING = {("command", "start"), ("command", "exit"), ("command", "check"), ("sandbox", "novel")}
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class BaselineError(ConfigError):
    """A baseline cannot be read, written or built: the message names the file or episode."""


class Baseline(BaseModel):
    task: str
    episodes: list[str] = Field(default_factory=list)  # the accepted episodes it was built from
    features: dict[str, int] = Field(default_factory=dict)  # feature -> in how many of them

    def novel(self, found: dict[str, int | None]) -> dict[str, int | None]:
        """What `found` has that the baseline has not. A shape is novel only above twice the largest the
        baseline's episodes reached: doing less than honest work, or a little more, is not news."""
        most: dict[str, int] = {}
        for f in self.features:
            if f.startswith("shape:"):
                kind, _, n = f.rpartition(":")
                most[kind] = max(most.get(kind, 0), int(n))
        out = {}
        for f, step in found.items():
            if f.startswith("shape:"):
                kind, _, n = f.rpartition(":")
                if int(n) <= 2 * most.get(kind, 0):
                    continue
            elif f in self.features:
                continue
            out[f] = step
        return out


def _program(exe: str) -> str:
    for d in _WORK_DIRS:
        if exe.startswith(d):
            return f"program:{d}{os.path.basename(exe)}" if d != "/workspace/" else f"program:{exe}"
    return f"program:{exe}"


def _bucket(n: int) -> int:
    return 0 if n <= 0 else 2 ** math.ceil(math.log2(n))


def features(events: Iterable[Event]) -> dict[str, int | None]:
    """An episode's features, each with the first agent step that showed it."""
    out: dict[str, int | None] = {}
    pids: set[int] = set()
    connections = 0

    def add(feature: str, step: int | None) -> None:
        out.setdefault(feature, step)

    for ev in events:
        if not ev.step:  # corral's own helpers (step 0) and unattributed events are not the agent's
            continue
        kind, action = str(ev.kind), ev.action or ""
        if (kind, action) in _PLUMBING:
            continue
        add(f"event:{kind}/{action}", ev.step)
        if ev.kind == EventKind.PROCESS and action == "exec" and ev.exe:
            add(_program(ev.exe), ev.step)
            if ev.pid:
                pids.add(ev.pid)
        elif ev.kind == EventKind.CONNECT:
            connections += 1
            add(f"connect:{ev.verdict}:{ev.name or ev.dst_ip}:{ev.dst_port}", ev.step)
        elif ev.kind == EventKind.DNS and ev.name:
            add(f"dns:{ev.verdict}:{ev.name.rstrip('.').lower()}", ev.step)
        elif ev.kind == EventKind.FILE:
            add(f"file:{ev.data.get('category')}/{ev.data.get('op')}", ev.step)
    add(f"shape:processes:{_bucket(len(pids))}", None)
    add(f"shape:connections:{_bucket(connections)}", None)
    return out


class Baselines:
    """The baselines of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "baselines"

    def path(self, task: str) -> Path:
        if not _TASK.match(task):
            raise BaselineError(f"{task!r} is not a task id (letters, digits, '-', '_', '.')")
        return self.dir / f"{task}.json"

    def get(self, task: str) -> Baseline | None:
        p = self.path(task)
        if not p.exists():
            return None
        try:
            return Baseline.model_validate_json(p.read_text())
        except (OSError, ValueError) as e:
            raise BaselineError(f"{p}: cannot read the baseline ({e}); fix it or run "
                                f"'corral baseline reset {task}'") from None

    def accept(self, task: str, episodes: dict[str, Iterable[Event]]) -> Baseline:
        """Add honest episodes (id -> its events) to the task's baseline; an episode already in it is not
        counted twice."""
        base = self.get(task) or Baseline(task=task)
        for episode_id, evs in episodes.items():
            if episode_id in base.episodes:
                continue
            found = features(evs)
            if not any(f.startswith("program:") for f in found):
                raise BaselineError(f"episode {episode_id!r} has no agent step in the store; check the id and "
                                    "the store (--db / --state-dir)")
            base.episodes.append(episode_id)
            for f in found:
                base.features[f] = base.features.get(f, 0) + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(task).with_suffix(".tmp")
        tmp.write_text(json.dumps(base.model_dump(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path(task))
        return base

    def reset(self, task: str) -> bool:
        p = self.path(task)
        if p.exists():
            p.unlink()
            return True
        return False


def novel_events(baseline: Baseline, events: list[Event], sandbox_id: str, episode_id: str | None) -> list[Event]:
    """One `sandbox/novel` event per agent step that showed something the baseline has not (the
    episode-wide shape goes to the last step), for the `novel-behaviour` rule to judge."""
    novel = baseline.novel(features(events))
    if not novel:
        return []
    last = max((e.step for e in events if e.step), default=None)
    commands = {e.step: e.command for e in events if e.step and e.command}
    by_step: dict[int | None, list[str]] = {}
    for feature, step in novel.items():
        by_step.setdefault(step if step is not None else last, []).append(feature)
    return [Event(kind=EventKind.SANDBOX, action="novel", sandbox_id=sandbox_id, episode_id=episode_id, step=step,
                  command=commands.get(step),
                  reason=f"not in the baseline of task {baseline.task} ({len(baseline.episodes)} episode(s)): "
                         + ", ".join(sorted(fs)),
                  data={"features": sorted(fs), "task": baseline.task, "baseline_episodes": len(baseline.episodes)})
            for step, fs in sorted(by_step.items(), key=lambda kv: kv[0] or 0)]


__all__ = ["NOVELTY_RULE", "Baseline", "BaselineError", "Baselines", "features", "novel_events"]
