"""Tasks: what an agent is asked to do, in what sandbox, and how it is graded.

A task is a directory with `task.yaml` (plus `files/` copied into /workspace before the episode and
`verifier/` copied in only at grading time), or a single YAML file with inline `files`. The verifier
paths are protected for the whole episode: an agent that writes there is tampering, and that is a
finding.

    id: fizzbuzz
    instruction: Write fizzbuzz(n) in /workspace/fizz.py ...
    files: {README.md: "..."}            # inline, relative to /workspace (files/ dir also works)
    egress: ["pkg.example.com:80"]        # what the sandbox may reach
    verifier:
      command: python3 -m pytest -q tests  # run in /workspace after the verifier files are copied in
      files: {tests/test_fizz.py: "..."}  # inline (verifier/ dir also works), relative to /workspace
      timeout: 120
      score: pytest                       # pytest: fraction of tests passed; exit_code: 1.0 or 0.0
    limits: {max_steps: 30, max_seconds: 600, memory_mb: 1024, cpus: 1, pids: 256}
    protected_paths: []                   # more globs; the verifier's paths are always protected
    setup: []                             # shell commands run (as corral) before the agent starts
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.config import EgressPolicy, EgressRule, Limits, SandboxConfig, load_yaml
from corral.errors import ConfigError, UnknownTask

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox

# the example suite in the source tree, the task set used when none is given
DEFAULT_TASKS = Path(__file__).resolve().parents[3] / "examples" / "tasks"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TaskError(ConfigError):
    """A task file is malformed: the message names the file and the field."""


class VerifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = "python3 -m pytest -q tests"
    files: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(120.0, gt=0)
    score: Literal["pytest", "exit_code"] = "pytest"


class TaskLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(30, ge=1)
    max_seconds: float = Field(600.0, gt=0)
    memory_mb: int = Field(1024, ge=16)
    cpus: float = Field(1.0, gt=0)
    pids: int = Field(256, ge=8)
    command_timeout: float = Field(120.0, gt=0)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    instruction: str = Field(min_length=1)
    files: dict[str, str] = Field(default_factory=dict)
    egress: list[str] = Field(default_factory=list)
    verifier: VerifierSpec = VerifierSpec()
    limits: TaskLimits = TaskLimits()
    protected_paths: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)
    # an OCI image as the root of the task's sandboxes (the agent's and the grader's: the verifier runs
    # with the image's tools); None: the host's root
    image: str | None = None
    source: str | None = None  # where it was loaded from

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("use letters, digits, '-', '_' and '.' (up to 128), starting with a letter or digit")
        return v

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: list[str]) -> list[str]:
        for rule in v:
            EgressRule.parse(rule)  # raises PolicyError with the rule and the fix
        return v

    @field_validator("files")
    @classmethod
    def _relative(cls, v: dict[str, str]) -> dict[str, str]:
        for p in v:
            if p.startswith("/") or ".." in Path(p).parts:
                raise ValueError(f"file path {p!r} must be relative to /workspace, without '..'")
        return v

    def verifier_paths(self) -> list[str]:
        return [f"/workspace/{p}" for p in self.verifier.files]

    def sandbox_config(self) -> SandboxConfig:
        protected = tuple(self.verifier_paths()) + tuple(self.protected_paths)
        lim = self.limits
        return SandboxConfig(
            egress=EgressPolicy.allowing(*self.egress),
            limits=Limits(memory_mb=lim.memory_mb, cpus=lim.cpus, pids=lim.pids, timeout=lim.command_timeout),
            protected_paths=protected, image=self.image,
        )


def load_task(path: str | Path) -> Task:
    p = Path(path)
    yaml_path = p / "task.yaml" if p.is_dir() else p
    data = load_yaml(yaml_path, TaskError, "task (give a task directory or YAML file)") or {}
    if not isinstance(data, dict):
        raise TaskError(f"{yaml_path}: a task is a YAML mapping with id, instruction and verifier")
    if p.is_dir():
        data.setdefault("id", p.name)
        data["files"] = {**_read_tree(p / "files"), **(data.get("files") or {})}
        ver = data.setdefault("verifier", {}) or {}
        if isinstance(ver, dict):
            ver["files"] = {**_read_tree(p / "verifier"), **(ver.get("files") or {})}
            data["verifier"] = ver
    data["source"] = str(yaml_path)
    try:
        return Task.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
                             for err in e.errors())
        raise TaskError(f"{yaml_path}: {problems}") from None


def load_tasks(path: str | Path) -> list[Task]:
    """A task directory, a task YAML file, or a directory of those (sorted by name)."""
    p = Path(path)
    if p.is_file() or (p / "task.yaml").exists():
        return [load_task(p)]
    if not p.is_dir():
        raise TaskError(f"{p}: no such task file or directory")
    tasks = [load_task(c) for c in sorted(p.iterdir())
             if (c.is_dir() and (c / "task.yaml").exists()) or c.suffix in (".yaml", ".yml")]
    if not tasks:
        raise TaskError(f"{p}: no tasks found (a task is a directory with task.yaml, or a .yaml file)")
    ids = [t.id for t in tasks]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise TaskError(f"{p}: duplicate task ids {sorted(dup)}; ids must be unique")
    return tasks


def resolve_tasks(tasks: str | Path | list[Task] | None) -> list[Task]:
    """Tasks as given, or loaded from a path (the example suite when None); never an empty list."""
    found = tasks if isinstance(tasks, list) else load_tasks(tasks or DEFAULT_TASKS)
    if not found:
        raise UnknownTask("no tasks were given; pass a task directory or a list of Task")
    return found


async def prepare_sandbox(sb: Sandbox, task: Task) -> None:
    """A task's files into /workspace and its own setup commands: the task's preparation, not an
    agent step."""
    for path, content in task.files.items():
        await sb.write_file(f"/workspace/{path}", content)
    for cmd in task.setup:
        await sb.exec(cmd, _internal=True)


def _read_tree(root: Path) -> dict[str, str]:
    if not root.is_dir():
        return {}
    out = {}
    for f in sorted(root.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            out[str(f.relative_to(root))] = f.read_text()
    return out
