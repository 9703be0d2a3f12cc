"""The trajectory schema: one JSON line per episode, what trainers consume.

`messages` and `tools` are in OpenAI chat format (tool-call arguments as JSON strings), so a
trajectory can be replayed or fed to an SFT/RL pipeline as is. `violations` carry each finding's
rule, severity, step, command and evidence event ids; `corral report <episode_id>` opens the full
timeline from the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1


class StepRecord(BaseModel):
    index: int  # the agent's turn
    tool: str
    tool_call_id: str
    arguments: dict[str, Any] | str  # the raw string when it was not valid JSON
    observation: str
    exit_code: int | None = None
    duration: float = 0.0
    sandbox_step: int | None = None  # the sandbox step number (events and findings use it)
    error: bool = False


class Violation(BaseModel):
    finding_id: int | None
    rule: str
    title: str
    severity: str
    technique: str | None = None
    step: int | None = None
    command: str | None = None
    action: str
    evidence: list[int] = Field(default_factory=list)


class Trajectory(BaseModel):
    schema_version: int = SCHEMA_VERSION
    episode_id: str
    task_id: str
    sandbox_id: str
    run_id: str | None = None  # the run it belongs to (`corral runs`); a resumed rollout keeps it
    policy: str
    model: str | None = None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    steps: list[StepRecord]
    reward: float
    reward_components: dict[str, float]
    terminated: bool
    truncated: bool
    termination_reason: str  # submitted | security_violation | max_steps | max_seconds | policy_done | error
    violations: list[Violation]
    metrics: dict[str, Any]
    verifier: dict[str, Any] = Field(default_factory=dict)  # command, exit code, passed, failed, output tail
    store_url: str | None = None
    started: float
    finished: float


def append_jsonl(path: Path, traj: Trajectory) -> None:
    """One line per episode, written whole and flushed: a crash never leaves a half episode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = traj.model_dump_json() + "\n"
    with path.open("a") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[Trajectory]:
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Trajectory.model_validate_json(line))
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not a trajectory line ({e})") from None
    return out


def to_parquet(trajectories: list[Trajectory], path: Path) -> None:
    """Flat columns for the scalars; nested fields as JSON strings (every engine reads those)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for t in trajectories:
        d = t.model_dump(mode="json")
        for key in ("messages", "tools", "steps", "reward_components", "violations", "metrics", "verifier"):
            d[key] = json.dumps(d[key])
        rows.append(d)
    pq.write_table(pa.Table.from_pylist(rows), path)
