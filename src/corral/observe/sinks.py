"""Alert sinks: each finding at or above a sink's severity is POSTed to it (a JSON webhook, Slack, or
falcosidekick) as it happens.

The runtime hands findings over on its event loop (Runtime.subscribe_findings), where every tenant's
judging runs, so handing over is a bounded append and nothing more: each sink has its own queue of
`queue_size` alerts, and when it is full the oldest alert is dropped and counted. An agent that floods
findings, or a receiver that is slow or gone, costs at most that queue; it never holds up judging and
never grows memory. One background task per sink delivers in order with httpx, retrying connection
errors, timeouts, 408, 429 and 5xx with doubling backoff; an alert that still fails is logged and
counted, never raised. A sink's URL path and headers often hold its secret (a Slack webhook, a token):
logs name only the scheme, host and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

import corral
from corral.config import AlertSink
from corral.events import Event, Finding, Severity
from corral.observe import payloads

if TYPE_CHECKING:
    from corral.runtime import Runtime

log = logging.getLogger(__name__)

BACKOFF_S = 0.5  # before the first retry; doubled for each next one
BACKOFF_MAX_S = 8.0
CLOSE_GRACE_S = 2.0  # at close, alerts still queued get this long to go out


@dataclass(frozen=True)
class _Alert:
    finding: Finding
    event: Event | None
    uuid: str  # one per alert, the same on every retry: a receiver can drop duplicates


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class Sink:
    """One receiver: its queue, its counters, and the loop that delivers to it."""

    def __init__(self, config: AlertSink, hostname: str) -> None:
        self.config = config
        self.target = _target(config.url)
        self._hostname = hostname
        self._min_rank = Severity(config.min_severity).rank
        self.queue: deque[_Alert] = deque()
        self.sent = self.failed = self.retried = self.dropped = 0
        self._wake = asyncio.Event()
        self._busy = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop delivering (set by Alerts.start)

    def offer(self, finding: Finding, event: Event | None) -> None:
        """Queue an alert if the finding is severe enough: O(1), never blocks."""
        if Severity(finding.severity).rank < self._min_rank:
            return
        if len(self.queue) >= self.config.queue_size:
            self.queue.popleft()  # the oldest goes: the newest findings say what the agent is doing now
            self.dropped += 1
        self.queue.append(_Alert(finding, event, str(uuid.uuid4())))
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self.loop or self.loop is None:
            self._wake.set()
        else:  # a finding judged on another thread: asyncio.Event is the loop's alone
            self.loop.call_soon_threadsafe(self._wake.set)

    @property
    def idle(self) -> bool:
        return not self.queue and not self._busy

    def body(self, alert: _Alert) -> dict[str, Any]:
        # rendered when sent, not when queued: the finding has its store id by then, and an alert
        # dropped from a full queue costs nothing
        if self.config.kind == "slack":
            return payloads.slack(alert.finding, alert.event)
        if self.config.kind == "falco":
            return payloads.falco(alert.finding, alert.event, alert.uuid, self._hostname)
        return {"uuid": alert.uuid, **payloads.webhook(alert.finding, alert.event)}

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            alert = self.queue.popleft()
            self._busy = True
            try:
                await self._deliver(client, alert)
            except Exception:  # a bug in rendering or sending loses this alert, never the sink
                self.failed += 1
                log.exception("corral: alert %s to %s sink %s failed", alert.finding.rule_id, self.config.kind,
                              self.target)
            finally:
                self._busy = False

    async def _deliver(self, client: httpx.AsyncClient, alert: _Alert) -> None:
        body = self.body(alert)
        headers = {"User-Agent": f"corral/{corral.__version__}", **self.config.headers}
        problem = "no try made"
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.retried += 1
                await asyncio.sleep(min(BACKOFF_S * 2 ** (attempt - 1), BACKOFF_MAX_S))
            try:
                r = await client.post(self.config.url, json=body, headers=headers, timeout=self.config.timeout_s)
            except httpx.HTTPError as e:  # refused, reset, timed out, TLS: the receiver may come back
                problem = f"{type(e).__name__}: {e}"
                continue
            if r.status_code < 300:
                self.sent += 1
                return
            problem = f"HTTP {r.status_code}"
            if r.status_code < 500 and r.status_code not in (408, 429):
                break  # the receiver refuses this body (or redirects): sending it again changes nothing
        self.failed += 1
        log.warning("corral: alert %s (%s) not delivered to %s sink %s after %d tries: %s",
                    alert.finding.rule_id, alert.finding.severity, self.config.kind, self.target, attempt + 1,
                    problem)

    def stats(self) -> dict[str, Any]:
        return {"kind": self.config.kind, "target": self.target, "queued": len(self.queue), "sent": self.sent,
                "failed": self.failed, "retried": self.retried, "dropped": self.dropped}


class Alerts:
    """The runtime's alert sinks: `submit` is the finding subscriber, `close` delivers what it can in
    a grace period and stops."""

    def __init__(self, configs: Sequence[AlertSink]) -> None:
        hostname = socket.gethostname()
        self.sinks = [Sink(c, hostname) for c in configs]
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self.sinks:
            s.loop = loop
        self._task = loop.create_task(self._run(), name="corral-alerts")

    async def _run(self) -> None:
        # building the client loads the CA bundle (tens of ms): not on the loop every tenant shares
        self._client = await asyncio.to_thread(
            httpx.AsyncClient, trust_env=False, follow_redirects=False,
            limits=httpx.Limits(max_connections=2 * len(self.sinks), max_keepalive_connections=len(self.sinks)))
        # trust_env=False: an HTTP(S)_PROXY meant for the agents' tools never reroutes corral's alerts
        await asyncio.gather(*(s.run(self._client) for s in self.sinks))

    def submit(self, finding: Finding, event: Event | None) -> None:
        for s in self.sinks:
            s.offer(finding, event)

    async def wait_idle(self) -> None:
        """Until every queued alert has been delivered or given up on (tests; close)."""
        while not all(s.idle for s in self.sinks):
            await asyncio.sleep(0.02)

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.sinks]

    async def close(self, grace: float = CLOSE_GRACE_S) -> None:
        if self._unsubscribe is not None:
            with contextlib.suppress(ValueError):
                self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_idle(), grace)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        for s in self.sinks:
            if s.queue:
                log.warning("corral: %d alerts for %s sink %s not delivered before close", len(s.queue),
                            s.config.kind, s.target)


def attach_sinks(runtime: Runtime) -> Alerts:
    """Start delivering the runtime's findings to the sinks its config names; returns what closes them."""
    alerts = Alerts(runtime.config.alerts)
    alerts.start()
    alerts._unsubscribe = runtime.subscribe_findings(alerts.submit)
    return alerts
