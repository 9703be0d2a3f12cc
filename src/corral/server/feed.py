"""The dashboard's data (server/dashboard.py serves it): snapshots of sandboxes, findings and runs, and
the live stream each open page holds.

Each stream holds a bounded queue of findings (QUEUE_MAX) fed by Runtime.subscribe_findings, and a bounded
set of sandboxes whose state changed fed by Runtime.subscribe (sent as they are at send time, so a busy
sandbox costs one update per send, not one per command). The callbacks run inside Runtime.emit on the
event loop: they only put_nowait and return. A client that reads too slowly (or died and is not yet
noticed) loses findings past the bound; they are counted, the page is told how many and refetches the
snapshot: nothing is lost silently and nothing grows. A stream ends after STREAM_S and the browser
reconnects with Last-Event-ID (findings after it are replayed): uvicorn waits for open responses when it
shuts down, and an endless stream would hold `corral serve` up for its whole grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from corral.errors import StoreError
from corral.events import Event, EventKind, Finding
from corral.text import clip_counted

if TYPE_CHECKING:
    from corral.runtime import Runtime
    from corral.sandbox.sandbox import Sandbox
    from corral.server.state import _Server

QUEUE_MAX = 256  # findings waiting for one client
DIRTY_MAX = 1024  # sandboxes with unsent changes, per client
STREAM_S = 10.0
TICK_S = 2.0  # resource samples and keep-alive comments
RECENT = 200  # findings in the snapshot, and replayable after a reconnect
RUNS = 6  # runs in the table, newest first
RUNS_TTL = 5.0  # seconds a runs summary is reused (it reads every finding of those runs)
BINS = 24  # chart buckets over a run's time
CMD_MAX = 2000  # characters of a command sent to the page; more is cut with a visible mark
_STATE_KINDS = frozenset({EventKind.SANDBOX, EventKind.COMMAND, EventKind.ACTION})
log = logging.getLogger("corral")


# -- per-app state ----------------------------------------------------------------------------------------
class _Hub:
    """The dashboard's state for one app: the cookie key, open streams, recent findings, cached summaries."""

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)  # per process: a restart ends every cookie
        self.streams = 0
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.last_id = 0
        self.problem: str | None = None
        self._lock = asyncio.Lock()
        self._runs_lock = asyncio.Lock()  # a runs summary can take a while: findings do not wait for it
        self._runs: tuple[float, list[dict], int] = (-1e9, [], 0)
        self._usage: tuple[float, dict[str, dict]] = (-1e9, {})

    async def findings(self, rt: Runtime) -> list[dict]:
        """The run's newest findings, oldest first: read on from the last one seen (the store's reads
        wait for its writer: off the event loop)."""
        async with self._lock:
            try:
                news = await asyncio.to_thread(rt.store.findings, run_id=rt.run_id, after_id=self.last_id)
                self.problem = None
            except StoreError as e:
                news, self.problem = [], f"the event store cannot be read: {e}"
            for f in news:
                self.recent.append(finding_row(f))
                self.last_id = max(self.last_id, f.id or 0)
            return list(self.recent)

    async def runs(self, rt: Runtime) -> list[dict]:
        """Reused for RUNS_TTL, or for a second once this run has new findings (a burst is read once)."""
        async with self._runs_lock:
            at, cached, mark = self._runs
            age = time.monotonic() - at
            if age >= RUNS_TTL or (mark != self.last_id and age >= 1.0):
                mark = self.last_id
                with contextlib.suppress(StoreError):
                    cached = await asyncio.to_thread(_runs, rt)
                self._runs = (time.monotonic(), cached, mark)
            return cached

    async def usage(self, rt: Runtime) -> dict[str, dict]:
        """Resource use of every sandbox, read at most once a second whoever asks (cgroup files)."""
        at, cached = self._usage
        if time.monotonic() - at >= 1.0:
            cached = await asyncio.to_thread(_usage, list(rt.sandboxes.values()))
            self._usage = (time.monotonic(), cached)
        return cached


_HUBS: weakref.WeakKeyDictionary[Any, _Hub] = weakref.WeakKeyDictionary()


def hub(srv: _Server) -> _Hub:
    h = _HUBS.get(srv)
    if h is None:
        h = _HUBS[srv] = _Hub()
    return h


def visibility(srv: _Server, tenant: str) -> Callable[[str | None], bool]:
    """Which sandbox ids this tenant may see (server/dashboard.py says why)."""
    if len(set(srv.tokens.values())) <= 1:
        return lambda _sid: True

    def visible(sid: str | None) -> bool:
        boxes = [*srv.boxes.get(tenant, {}).values(), *srv.deleted.get(tenant, [])]
        return sid is not None and any(b.sb.id == sid for b in boxes)

    return visible


# -- what the page shows ----------------------------------------------------------------------------------
def clip(text: str | None, limit: int = CMD_MAX) -> str | None:
    """At most `limit` characters, the cut visible: never a silently shortened command."""
    return None if text is None else clip_counted(text, limit)


def finding_row(f: Finding) -> dict:
    return {"id": f.id, "ts": f.ts, "rule_id": f.rule_id, "title": f.title, "severity": str(f.severity),
            "technique": f.technique, "sandbox_id": f.sandbox_id, "episode_id": f.episode_id, "run_id": f.run_id,
            "step": f.step, "command": clip(f.command), "action": f.action}


def sandbox_row(srv: _Server, sb: Sandbox) -> dict:
    state = "closed" if sb.closed else "ended" if sb.terminated else "frozen" if sb.frozen else "running"
    lim = sb.config.limits
    name = next((b.rock_id for boxes in srv.boxes.values() for b in boxes.values() if b.sb is sb), None)
    return {"id": sb.id, "name": name if name != sb.id else None, "state": state, "reason": sb.terminated,
            "episode_id": sb.episode_id, "step": sb.step, "created": sb.created_at, "gpu": sb.config.gpu,
            "limits": {"memory_mb": lim.memory_mb, "cpus": lim.cpus, "pids": lim.pids}}


def _usage(boxes: list[Sandbox]) -> dict[str, dict]:
    out = {}
    for sb in boxes:
        cg = sb.cgroup  # once: close() may take it away meanwhile
        if cg is None:
            continue
        st = cg.stats()
        out[sb.id] = {"cpu_s": st["cpu_ns"] / 1e9 if "cpu_ns" in st else None,
                      "memory_mb": round(st["memory_bytes"] / (1 << 20), 1) if "memory_bytes" in st else None,
                      "pids": cg.task_count(), "oom_kills": st.get("oom_kills", 0)}
    return out


def _runs(rt: Runtime) -> list[dict]:
    """Per run: each rule's findings, the share of episodes (sandboxes, in a run without episodes) with
    one, and its findings over the run's time in BINS buckets."""
    out, now = [], time.time()
    for run in rt.store.runs(limit=RUNS):
        unit = "episodes" if run["episodes"] else "sandboxes"
        total, start = run[unit], run["started"]
        width = max((run["ended"] or now) - start, 1e-6)
        rules: dict[str, dict] = {}
        seen: dict[str, set] = {}
        for f in rt.store.findings(run_id=run["id"]):
            r = rules.setdefault(f.rule_id, {"rule_id": f.rule_id, "severity": str(f.severity), "count": 0,
                                             "bins": [0] * BINS})
            r["count"] += 1
            r["bins"][min(BINS - 1, max(0, int((f.ts - start) / width * BINS)))] += 1
            who = f.episode_id if unit == "episodes" else f.sandbox_id
            if who:
                seen.setdefault(f.rule_id, set()).add(who)
        for r in rules.values():
            r["units"] = len(seen.get(r["rule_id"], ()))
            r["rate"] = r["units"] / total if total else None
        out.append({**{k: run.get(k) for k in ("id", "kind", "label", "started", "ended", "events", "sandboxes",
                                               "episodes", "findings", "violating")},
                    "current": run["id"] == rt.run_id, "unit": unit, "total": total,
                    "rules": sorted(rules.values(), key=lambda r: (-r["count"], r["rule_id"]))})
    return out


# -- the stream ---------------------------------------------------------------------------------------------
class Client:
    """One open stream: what its callbacks collected and its writer has not sent yet, bounded."""

    def __init__(self, visible: Callable[[str | None], bool]) -> None:
        self.visible = visible
        self.findings: asyncio.Queue[dict] = asyncio.Queue(QUEUE_MAX)
        self.dirty: set[str] = set()  # sandboxes whose state changed: sent as they are at send time
        self.dropped = 0  # findings that found the queue full
        self.overflow = False  # changes past DIRTY_MAX: the page refetches every sandbox
        self.wake = asyncio.Event()

    def on_finding(self, f: Finding, _ev: Event) -> None:
        if not self.visible(f.sandbox_id):
            return
        try:
            self.findings.put_nowait(finding_row(f))
        except asyncio.QueueFull:  # this client is behind: count, never wait, never grow
            self.dropped += 1
        self.wake.set()

    def on_event(self, ev: Event) -> None:
        # Runtime.emit does not guard plain subscribers: nothing here may raise into judging
        try:
            if ev.kind not in _STATE_KINDS or not ev.sandbox_id or not self.visible(ev.sandbox_id):
                return
            if len(self.dirty) >= DIRTY_MAX and ev.sandbox_id not in self.dirty:
                self.overflow = True
            else:
                self.dirty.add(ev.sandbox_id)
            self.wake.set()
        except Exception:
            log.exception("corral: the dashboard's event callback failed")


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    # json.dumps escapes newlines and every non-ASCII character: a value can never end the frame
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def events(srv: _Server, client: Client, after: int) -> AsyncIterator[str]:
    rt = srv.runtime
    assert rt is not None
    h = hub(srv)
    loop = asyncio.get_running_loop()
    h.streams += 1
    unsubscribe: list[Callable[[], None]] = []
    try:  # subscribed inside: a stream that never starts leaves no callback behind
        unsubscribe = [rt.subscribe(client.on_event), rt.subscribe_findings(client.on_finding)]
        yield "retry: 1000\n\n"
        # whatever changed while the page was not connected: every sandbox, the findings after its last one
        yield sse("sandboxes", [sandbox_row(srv, sb) for sb in list(rt.sandboxes.values()) if client.visible(sb.id)])
        recent = await h.findings(rt)
        if after and len(recent) == RECENT and (recent[0]["id"] or 0) > after + 1:
            yield sse("dropped", {"count": None})  # older than the replay keeps: the page refetches
        for f in recent:
            if (f["id"] or 0) > after and client.visible(f["sandbox_id"]):
                yield sse("finding", f, f["id"])
        end, tick = loop.time() + STREAM_S, 0.0
        while (now := loop.time()) < end:
            out = []
            if now >= tick:
                usage = await h.usage(rt)
                out.append(sse("usage", {k: v for k, v in usage.items() if client.visible(k)}))
                tick = now + TICK_S
            if client.dropped or client.overflow:
                out.append(sse("dropped", {"count": client.dropped}))
                client.dropped, client.overflow = 0, False
            while not client.findings.empty():
                f = client.findings.get_nowait()
                out.append(sse("finding", f, f["id"]))
            dirty, client.dirty = client.dirty, set()
            if dirty:
                out.append(sse("sandboxes", [sandbox_row(srv, rt.sandboxes[s]) if s in rt.sandboxes
                                              else {"id": s, "state": "closed"} for s in sorted(dirty)]))
            yield "".join(out) or ": keep-alive\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.wake.wait(), max(0.0, min(tick, end) - loop.time()))
            client.wake.clear()
    finally:
        for unsub in unsubscribe:
            with contextlib.suppress(ValueError):
                unsub()
        h.streams -= 1

