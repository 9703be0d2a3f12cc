"""Per-sandbox budgets: what one tenant may cost corral, so that one sandbox never degrades another.

Judging is never budgeted: every exec, connection and query is judged by the rules whatever a
sandbox has spent. What is budgeted is what costs corral's shared resources:

- recording: events and bytes written to the store per window. Above either cap, low-value events
  (allowed, matched by no rule: the exec of a loop that fails, a lookup of an allowed name) are
  counted instead of written, and one aggregated `sandbox/suppressed` event per window says how many
  and of which kinds. Findings' evidence is always written whole; denials and rule matches are
  always written, with a bulky argv cut down (`data.argv_truncated` says by how much) above the
  bytes cap;
- the store writer's backlog, shared by all sandboxes: past `writer_queue` events (or
  `writer_bytes`), new blockable actions are refused rather than let through unrecorded;
- DNS queries per second (net/dns.py): above the cap, queries are answered REFUSED;
- new outbound TCP connections per second (a token bucket, `Pace`): above the rate, a connect() is
  held stopped until its turn, then judged like any other. Each connection costs corral's shared event
  loop work (judging, attribution, relaying, recording), so a sandbox opening them as fast as it can
  would otherwise take the loop from every other tenant;
- the share of corral's event loop spent judging one sandbox's execs and connects (per 0.1 s
  window): past it, while another sandbox's calls are being judged too, that sandbox's calls wait,
  stopped in the kernel, until the next window, and the loop serves the others. A sandbox alone is
  never slowed by it (the share divides the loop, it does not idle it);
- bytes of executables hashed per window (monitor/masquerade.py): above it, a copy's identity is
  unknown, and the exec is judged as fail-closed (see masquerade.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral.events import Event, EventKind, Verdict


class Budgets(BaseModel):
    """Caps per sandbox (per `window_s`), and the store writer's backlog bound (shared)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(1.0, gt=0)
    events: int = Field(1000, ge=1)  # events recorded per sandbox per window
    bytes: int = Field(2 << 20, ge=1024)  # bytes recorded per sandbox per window (approximate)
    dns_qps: int = Field(100, ge=1)  # DNS queries answered per sandbox per second
    connect_rate: float = Field(50.0, gt=0)  # new outbound TCP connections per sandbox per second ...
    connect_burst: int = Field(100, ge=1)  # ... after a burst of this many; above it, connect() waits
    loop_share: float = Field(0.5, gt=0, le=1)  # of corral's event loop, per 0.1 s, judging one sandbox's calls
    hash_bytes: int = Field(256 << 20, ge=0)  # executable bytes hashed per sandbox per window
    writer_queue: int = Field(20000, ge=1)  # events waiting for the writer before blockable actions are refused
    writer_bytes: int = Field(128 << 20, ge=1 << 20)  # ... or bytes waiting


# events a sandbox cannot flood: lifecycle, containment actions, commands (one per step), file changes
_NEVER_SUPPRESSED = {EventKind.SANDBOX, EventKind.ACTION, EventKind.COMMAND, EventKind.FILE}
ARGV_KEEP_BYTES = 4096  # of a denial's argv, above the bytes cap


def approx_size(ev: Event) -> int:
    """Bytes an event costs the store, roughly: its variable-length fields. Cheap (no JSON encoding)."""
    n = 160
    for s in (ev.command, ev.exe, ev.reason, ev.name):
        if s:
            n += len(s)
    if ev.argv:
        n += sum(len(a) + 4 for a in ev.argv)
    if ev.data:
        n += _size(ev.data, 3)
    return n


def _size(v: Any, depth: int) -> int:
    if isinstance(v, str):
        return len(v) + 2
    if depth <= 0:
        return 16
    if isinstance(v, dict):
        return sum(len(str(k)) + 4 + _size(x, depth - 1) for k, x in v.items())
    if isinstance(v, list | tuple):
        return sum(_size(x, depth - 1) + 1 for x in v)
    return 8


def suppressible(ev: Event) -> bool:
    """A low-value event: allowed and not of a kind a sandbox cannot flood. A connection's close that
    received bytes is kept: provenance (monitor/provenance.py) reads it to know a file was downloaded.
    A sandbox's `degraded` notes are suppressible past the budget (a loop of execs that cannot be
    judged makes one per exec); each refused action is itself a denial, which is kept."""
    if ev.kind == EventKind.SANDBOX and ev.action == "degraded" and ev.verdict != Verdict.DENY:
        return True
    if ev.kind in _NEVER_SUPPRESSED or ev.verdict == Verdict.DENY:
        return False
    return not (ev.kind == EventKind.CONNECT and ev.action == "close" and (ev.bytes_down or 0) > 0)


def compacted(ev: Event) -> Event:
    """A copy of `ev` with its argv cut to ARGV_KEEP_BYTES (a denial over the bytes cap)."""
    if not ev.argv:
        return ev
    kept: list[str] = []
    total = 0
    for a in ev.argv:
        if total + len(a) > ARGV_KEEP_BYTES:
            kept.append(a[: max(0, ARGV_KEEP_BYTES - total)])
            break
        kept.append(a)
        total += len(a)
    data = {**ev.data, "argv_truncated": {"args": len(ev.argv), "bytes": sum(len(a) for a in ev.argv)}}
    return ev.model_copy(update={"argv": kept, "data": data})


class Pace:
    """A token bucket: `take()` says how long the caller must wait for its turn (0: at once). Debt
    accrues, so callers that keep coming wait in line; one that waits does not slow other sandboxes."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.paced = 0  # calls that had to wait, ever

    def take(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        self.paced += 1
        return -self._tokens / self.rate


class Admit(Enum):
    RECORD = "record"
    COMPACT = "compact"  # recorded with its argv cut down
    DROP = "drop"  # counted in the window's `suppressed` event


@dataclass
class _Window:
    start: float
    events: int = 0
    bytes: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    kinds: Counter = field(default_factory=Counter)
    episode_id: str | None = None
    step: int | None = None


class RecordBudget:
    """Per-sandbox recording budget. Not thread-safe: the store writer calls it under its own lock."""

    def __init__(self, budgets: Budgets) -> None:
        self.b = budgets
        self._w: dict[str, _Window] = {}
        self._ready: list[Event] = []  # summaries of windows that ended with drops

    def admit(self, ev: Event, size: int, *, evidence: bool = False, matched: bool = False,
              now: float | None = None) -> Admit:
        """`evidence`: the event backs a new finding (always written whole); `matched`: a rule matched it."""
        now = time.monotonic() if now is None else now
        w = self._w.get(ev.sandbox_id)
        if w is None or now - w.start >= self.b.window_s:
            if w is not None and w.dropped:
                self._ready.append(self._summary(ev.sandbox_id, w, now))
            w = self._w[ev.sandbox_id] = _Window(now)
        w.events += 1
        w.bytes += size
        if evidence or (w.events <= self.b.events and w.bytes <= self.b.bytes):
            return Admit.RECORD
        if matched or not suppressible(ev):
            return Admit.COMPACT if w.bytes > self.b.bytes and ev.argv else Admit.RECORD
        w.dropped += 1
        w.dropped_bytes += size
        w.kinds[f"{ev.kind}:{ev.action}"] += 1
        w.episode_id, w.step = ev.episode_id or w.episode_id, ev.step or w.step
        return Admit.DROP

    def due(self, *, force: bool = False, now: float | None = None) -> list[Event]:
        """One `suppressed` event per sandbox and window that ended with drops (and for the current
        windows too when forced: a reader wants to see everything so far). Idle windows are forgotten."""
        now = time.monotonic() if now is None else now
        out, self._ready = self._ready, []
        for sid, w in list(self._w.items()):
            ended = now - w.start >= self.b.window_s
            if w.dropped and (ended or force):
                out.append(self._summary(sid, w, now))
                w.dropped, w.dropped_bytes, w.kinds = 0, 0, Counter()
            if ended:
                del self._w[sid]
        return out

    def _summary(self, sid: str, w: _Window, now: float) -> Event:
        return Event(
            kind=EventKind.SANDBOX, action="suppressed", sandbox_id=sid, episode_id=w.episode_id, step=w.step,
            reason=(f"suppressed {w.dropped} events ({w.dropped_bytes} bytes): above the per-sandbox recording "
                    f"budget of {self.b.events} events / {self.b.bytes} bytes per {self.b.window_s:g} s; each "
                    "was judged, and none was a denial, a rule match or a finding's evidence"),
            data={"events": w.dropped, "bytes": w.dropped_bytes, "kinds": dict(w.kinds),
                  "window_s": round(min(now - w.start, self.b.window_s), 3)})
