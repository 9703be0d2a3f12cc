"""The one set of types every stage shares: events (facts) and findings (judgements over events).

The sandbox, the gateway, the DNS resolver, the monitor and the detector all emit these; the store
persists them; reports, rewards and APIs read them. No stage passes its internals to another.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class EventKind(StrEnum):
    SANDBOX = "sandbox"  # lifecycle: created, reset, closed, frozen, released
    COMMAND = "command"  # a command about to run (a step) and its result
    PROCESS = "process"  # a process exec inside a sandbox
    CONNECT = "connect"  # an outbound connection attempt through the gateway
    DNS = "dns"  # a DNS query through corral's resolver
    FILE = "file"  # a change to a protected path
    GPU = "gpu"  # a GPU process or utilisation sample
    ACTION = "action"  # a containment action corral took


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class _Ranked(StrEnum):
    """An enum whose members are declared weakest first: `rank` orders them, one ordering everywhere."""

    @property
    def rank(self) -> int:
        return _ranks(type(self))[self]

    @classmethod
    def strongest(cls, values: Iterable[str]) -> str | None:
        ranked = [cls(v) for v in values]
        return max(ranked, key=lambda v: v.rank).value if ranked else None


@functools.cache
def _ranks(cls: type[_Ranked]) -> dict[_Ranked, int]:
    # judged per matched rule on every event: a lookup, not a scan of the members
    return {m: i for i, m in enumerate(cls)}


class Severity(_Ranked):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Action(_Ranked):
    """What a rule's match does, weakest first (corral/respond.py carries it out)."""

    RECORD = "record"
    ALERT = "alert"
    BLOCK = "block"
    KILL = "kill"
    END_EPISODE = "end_episode"
    QUARANTINE = "quarantine"


class Event(BaseModel):
    """A fact observed about a sandbox, with the context needed to attribute it."""

    id: int | None = None  # assigned by the store
    ts: float = Field(default_factory=time.time)
    kind: EventKind
    action: str  # e.g. "created", "exec", "connect", "query", "exit"
    sandbox_id: str
    episode_id: str | None = None
    run_id: str | None = None  # the run (rollout, demo, serve session, library runtime) that recorded it
    step: int | None = None
    command: str | None = None
    pid: int | None = None
    ppid: int | None = None
    exe: str | None = None
    argv: list[str] | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    name: str | None = None  # resolved/queried domain, SNI or Host
    protocol: str | None = None  # classification of the first bytes
    verdict: Verdict | None = None
    reason: str | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Finding(BaseModel):
    """A rule's judgement over events, attributed to the step whose command caused it."""

    id: int | None = None
    ts: float = Field(default_factory=time.time)
    rule_id: str
    title: str
    severity: Severity
    technique: str | None = None  # MITRE ATT&CK id, e.g. T1496
    sandbox_id: str
    episode_id: str | None = None
    run_id: str | None = None
    step: int | None = None
    command: str | None = None
    pid: int | None = None
    evidence: list[int] = Field(default_factory=list)  # event ids
    action: str = "record"
    data: dict[str, Any] = Field(default_factory=dict)


def new_run_id() -> str:
    """Sortable by start and unique: the UTC time to the second and 24 random bits (20261207T062130-3f9a2c)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def episode_name(episode_id: str) -> str:
    """An episode's name within its run: `calc--0` for `calc--0@20261207T062130-3f9a2c`."""
    return episode_id.split("@", 1)[0]
