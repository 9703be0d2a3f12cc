"""The red-team benchmark's results: per case, per family, the whole run (bench.py fills them,
render.py writes them, corpora.py scores them per corpus)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from corral.redteam.corpora import CorpusScore

Outcome = Literal["detected", "MISS", "quiet", "FALSE POSITIVE", "ERROR"]


# -- result model ----------------------------------------------------------------------------------------
class StepResult(BaseModel):
    index: int  # position in the case's commands (0-based)
    step: int | None = None  # the sandbox step number
    command: str
    exit_code: int | None = None
    refused: bool = False
    timed_out: bool = False
    error: str | None = None
    duration_ms: float | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""


class FindingRecord(BaseModel):
    rule: str
    title: str
    severity: str
    technique: str | None
    family: str | None  # the rule's family
    action: str
    step: int | None
    event_kind: str | None  # what the finding judged: command/check, process/exec, connect/connect, ...
    ttd_ms: float | None
    event_to_finding_ms: float | None


class CaseResult(BaseModel):
    id: str
    family: str
    technique: str | None
    title: str
    expect: str
    allow: list[str]
    source: str | None = None
    outcome: Outcome
    passed: bool  # detected when expected, quiet when expected
    detected: bool
    rules: list[str] = Field(default_factory=list)
    family_rule_fired: bool = False  # a rule of the case's own family fired
    first_rule: str | None = None
    first_severity: str | None = None
    first_technique: str | None = None
    first_action: str | None = None
    first_step: int | None = None
    ttd_ms: float | None = None
    ttd_basis: str | None = None
    event_to_finding_ms: float | None = None
    actions: list[str] = Field(default_factory=list)  # "kill (miner-binary)", in order
    leaked_bytes_world: int = 0
    leaked_bytes_events: int = 0
    delivered_bytes_world: dict[str, int] = Field(default_factory=dict)  # server -> bytes, allowed or not
    findings: list[FindingRecord] = Field(default_factory=list)
    steps: list[StepResult] = Field(default_factory=list)
    setup_errors: list[str] = Field(default_factory=list)
    setup_findings: list[str] = Field(default_factory=list)  # rules fired by setup: a corpus bug, not counted
    diagnosis: str = ""
    sandbox_id: str | None = None
    episode_id: str | None = None
    duration_s: float = 0.0
    error: str | None = None


class FamilyStats(BaseModel):
    family: str
    name: str
    attacks: int
    detected: int
    rate: float | None
    own_rule: int  # detected by a rule of the family itself (not only by another family's rule)
    rules: dict[str, int] = Field(default_factory=dict)  # rule -> cases it fired in
    misses: list[str] = Field(default_factory=list)


class BenchResult(BaseModel):
    started: str
    duration_s: float
    machine: dict[str, Any]
    concurrency: int
    cases: list[CaseResult]
    families: list[FamilyStats]
    attacks: int
    detected: int
    detection_rate: float | None
    benign: int
    false_positives: int
    fp_rate: float | None
    ttd_p50_ms: float | None
    ttd_p99_ms: float | None
    event_to_finding_p50_ms: float | None
    event_to_finding_p99_ms: float | None
    leaked_bytes_world: int
    leaked_bytes_events: int
    misses: list[str]
    false_positive_ids: list[str]
    errors: list[str]
    corpora: list[CorpusScore] = Field(default_factory=list)  # per corpus, tuned and hold-out apart


__all__ = ["BenchResult", "CaseResult", "FamilyStats", "FindingRecord", "Outcome", "StepResult"]
