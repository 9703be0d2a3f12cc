"""Containment: carry out a finding's action. Every action taken is itself an event.

record       the finding is stored, nothing else
alert        stored and announced to alert hooks (operators, dashboards)
block        the triggering connection, DNS answer, exec or command is refused (by its caller)
kill         block, and kill every process of the step that started the offender (lineage, so a
             background miner from step 14 dies even when found at step 20)
end_episode  kill, and end the sandbox's episode: later commands are refused until reset()
quarantine   freeze every process of the sandbox where it stands, kept for forensics until
             release() or close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.events import Event, EventKind, Finding
from corral.inflight import InFlight

if TYPE_CHECKING:
    from corral.runtime import Runtime

log = logging.getLogger("corral.alerts")
# what a block can still stop when it is judged (a file write or a GPU sample has already happened)
BLOCKABLE = {EventKind.CONNECT, EventKind.DNS, EventKind.COMMAND, EventKind.PROCESS}


class Responder:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.alert_hooks: list[Callable[[Finding], None]] = []
        self._actions = InFlight()

    def act(self, finding: Finding, ev: Event) -> None:
        if finding.action != "record":
            log.warning("corral finding %s [%s] in %s step %s: %s", finding.rule_id, finding.severity,
                        finding.sandbox_id, finding.step, finding.title)
            for hook in list(self.alert_hooks):
                with contextlib.suppress(Exception):
                    hook(finding)
        if finding.action in ("record", "alert", "block"):
            if finding.action == "block" and ev.kind in BLOCKABLE:
                self._record(finding, "block", {"event": ev.id, "what": f"{ev.kind}:{ev.action}"})
            return
        sb = self.runtime.sandboxes.get(finding.sandbox_id)
        if sb is None:
            return
        self._actions.start(self._contain(sb, finding, ev, sb.generation))

    async def _contain(self, sb, finding: Finding, ev: Event, generation: int) -> None:
        data: dict = {"event": ev.id}

        def stale() -> bool:
            # Reset, frozen or released since the finding was judged, or its step belongs to an earlier
            # episode (its event judged only after the reset): its processes are gone or held, and
            # acting now would end the next episode or undo an operator's release.
            earlier = bool(finding.step and finding.step < sb.first_step)
            if sb.generation == generation and not sb.closed and not earlier:
                return False
            self._record(finding, "skipped", {**data, "why": "the finding is from an earlier episode, or the "
                                                              "sandbox was reset, frozen, released or closed since"})
            return True

        try:
            if stale():
                return
            if finding.step:
                data["killed"] = await sb.kill_step(finding.step)
            elif finding.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(finding.pid, signal.SIGKILL)
                    data["killed"] = 1
            self._record(finding, "kill", data)
            if finding.action == "kill" or stale():
                return
            if finding.action == "end_episode":
                await sb.end_episode(f"{finding.rule_id}: {finding.title}", finding)
                self._record(finding, "end_episode", {"event": ev.id})
            elif finding.action == "quarantine":
                await sb.freeze(f"{finding.rule_id}: {finding.title}")
                self._record(finding, "quarantine", {"event": ev.id})
        except Exception as e:  # containment failing is itself worth an event
            self._record(finding, "failed", {"error": f"{type(e).__name__}: {e}"})

    def _record(self, finding: Finding, action: str, data: dict) -> None:
        self.runtime.emit(Event(
            kind=EventKind.ACTION, action=action, sandbox_id=finding.sandbox_id, episode_id=finding.episode_id,
            step=finding.step, command=finding.command, pid=finding.pid,
            data={"finding": finding.id, "rule": finding.rule_id, **data},
        ), judge=False)

    async def drain(self) -> None:
        await self._actions.drain(timeout=None)
