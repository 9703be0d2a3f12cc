"""The one path of every event, mixed into Runtime: judged by the rules, recorded by the store's
writer, its findings acted on, then handed to subscribers. Kept apart from the runtime's resources
(instance, gateway, pools) because it is one job, and the one that must never let an action through
that it could not judge or record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.detect import Judgement
from corral.events import Event, EventKind, Finding, Verdict
from corral.respond import BLOCKABLE
from corral.store import StoreUnavailable

if TYPE_CHECKING:
    from corral.runtime import Runtime

log = logging.getLogger("corral")
# a finding waits for its commit only behind a short backlog, and only so long (see emit)
FINDING_WAIT_BACKLOG = 256
FINDING_WAIT_S = 0.2
# events of blockable kinds that report what already happened: nothing left to refuse
_AFTER_THE_FACT = frozenset({"close", "exit", "connect_failed", "refused", "sample", "malformed", "start"})


class Refusal(Judgement):
    """What emit returns when the store cannot take a blockable event: the action is refused."""

    def __init__(self, error: StoreUnavailable, base: Judgement | None) -> None:
        super().__init__(findings=list(base.findings) if base else [], matched=list(base.matched) if base else [],
                         action="block", rule=None)
        self.error = error

    @property
    def reason(self) -> str:
        return f"refused: the event store cannot record it ({self.error})"


class EventPath:
    """Mixed into Runtime (whose detector, store, responder and subscribers it uses)."""

    # -- events ------------------------------------------------------------------------------------
    def emit(self: Runtime, ev: Event, *, judge: bool = True, persist: bool = True) -> Judgement | None:
        """The one path of every event: judged by the rules synchronously (a blocking rule turns the
        event into a denial), handed to the store's writer (store/writer.py), its findings recorded
        and acted on, then handed to subscribers. `persist=False` records the event only if a rule
        matched it (pre-run command checks). An event's `id` is set once the writer commits it; an
        event that backs a finding is waited for, so findings and containment carry ids.

        Fail closed: emit does not raise for store failures. When the store cannot take a blockable
        event (an exec, connect, DNS query or command check: its writer failed, e.g. disk full or
        read-only, or is past its backlog bound), the event is denied (`ev.verdict = DENY`) and the
        returned Judgement is a `Refusal` (`blocks` is true, `.error` is the StoreUnavailable or
        StoreBehind). Callers deny on `j.blocks` or `ev.verdict`, as for a blocking rule. A `degraded`
        event is queued for the sandbox and written once the store takes writes again. Recording is
        capped per sandbox (Budgets): judging never is."""
        if ev.run_id is None:
            ev.run_id = self.run_id
        j = self._judge(ev) if judge and self.detector is not None else None
        if j is not None and j.blocks and ev.verdict != Verdict.DENY:
            ev.verdict = Verdict.DENY
            ev.reason = j.reason
        writer = self.store.writer
        if (writer is not None and ev.kind in BLOCKABLE and ev.verdict != Verdict.DENY
                and ev.action not in _AFTER_THE_FACT):
            try:
                writer.check(ev.sandbox_id)
            except StoreUnavailable as e:
                j = Refusal(e, j)
                ev.verdict, ev.reason = Verdict.DENY, j.reason
                self._note_degraded(ev.sandbox_id, e)
        findings = j.findings if j is not None else []
        for f in findings:
            f.run_id = ev.run_id
        if writer is None:
            if persist or (j is not None and j.matched):
                self.store.record(ev)
            for f in findings:
                f.evidence = [ev.id] if ev.id else []
                self.store.record_finding(f)
        else:
            seq = 0
            if persist or (j is not None and j.matched):
                seq = writer.submit(ev, evidence=bool(findings), matched=bool(j is not None and j.matched))
            last = 0
            for f in findings:
                last = writer.submit_finding(f, ev, seq)
            if last and writer.failing is None and writer.pending <= FINDING_WAIT_BACKLOG:
                # containment names the finding and its event by id, so a finding waits for its commit,
                # briefly: this is the event loop every tenant shares. A failing or lagging store does not
                # hold it up (they are written with ids resolved, only the action's data lacks them)
                with contextlib.suppress(StoreUnavailable):
                    writer.wait(last, timeout=FINDING_WAIT_S)
        for f in findings:
            self.responder.act(f, ev)
            for fn in list(self._finding_subscribers):
                try:
                    fn(f, ev)
                except Exception:  # an exporter or alert sink must never take judging down
                    log.exception("corral: a finding subscriber failed on %s", f.rule_id)
        for fn in list(self._subscribers):
            fn(ev)
        return j

    def _judge(self: Runtime, ev: Event) -> Judgement:
        """The rules' judgement. A rule that raises has not judged the event: a blockable action (a
        connection, DNS query, command or exec about to happen) is then refused, never let through,
        and a `degraded` event, attributed like the action, names the rule."""
        assert self.detector is not None
        try:
            j = self.detector.evaluate(ev)
        except Exception as e:  # the detector itself failed: nothing was judged
            log.exception("corral: judging a %s/%s event failed", ev.kind, ev.action)
            j = Judgement(errors=[f"the detector raised {type(e).__name__}: {e}"])
        if j.errors and ev.kind in BLOCKABLE and ev.action not in _AFTER_THE_FACT:
            j.action, j.rule = "block", None
            if ev.verdict != Verdict.DENY:
                ev.verdict, ev.reason = Verdict.DENY, j.reason
            if ev.kind != EventKind.PROCESS:  # the exec watcher records its own, with the process's step
                self._emit_degraded(ev, j.reason)
        return j

    def _emit_degraded(self: Runtime, ev: Event, reason: str) -> None:
        note = Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=ev.sandbox_id, episode_id=ev.episode_id,
                     step=ev.step, command=ev.command, pid=ev.pid, exe=ev.exe, reason=reason,
                     data={"event_kind": str(ev.kind), "event_action": ev.action})
        with contextlib.suppress(Exception):  # the store may be what failed: the refusal stands regardless
            self.emit(note, judge=False)

    def _note_degraded(self: Runtime, sandbox_id: str, e: StoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._degraded_at.get(sandbox_id, -1e9) < 10.0:  # one per sandbox per 10 s of failure
            return
        self._degraded_at[sandbox_id] = now
        writer = self.store.writer
        if writer is not None:
            writer.note_degraded(sandbox_id, f"blockable actions refused: {e}")

    async def drain(self: Runtime) -> None:
        """Wait (bounded) for connections, DNS answers and containment actions still in flight: a
        connection a command made just before it exited is judged after exec() returns."""
        if self.gateway is not None:
            await self.gateway.drain()
        if self.dns is not None:
            await self.dns.drain()
        await self.responder.drain()
        if self._store is not None:  # what was judged is written before the caller reads it
            await asyncio.to_thread(self._store.flush)

    def subscribe(self: Runtime, fn: Callable[[Event], None]) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def subscribe_findings(self: Runtime, fn: Callable[[Finding, Event], None]) -> Callable[[], None]:
        """`fn(finding, event)` for every finding, after it is recorded and acted on (metrics, alert
        sinks, dashboards); on the event loop, so it must return at once. Returns the unsubscriber."""
        self._finding_subscribers.append(fn)
        return lambda: self._finding_subscribers.remove(fn)
