"""The one writer of events: decisions are made on the event loop, events are written by a thread.

`Runtime.emit` judges an event synchronously and hands it here; a thread batches what has queued
into one transaction (SQLite's fast path or SQLAlchemy for PostgreSQL, through Store.record_many), so
a commit is never on the path of a decision. Reads (`Store.events`, `Store.findings`) flush first,
so whoever reads after an action sees its events.

Fail closed. When a write fails (disk full, read-only file system, database gone), the batch stays
queued and is retried every RETRY_S; meanwhile `check()` raises StoreUnavailable, and `Runtime.emit`
denies every blockable action (exec, connect, DNS query, command) rather than let one through
unrecorded. Past `Budgets.writer_queue` events (or `writer_bytes`) waiting, `check()` raises
StoreBehind for the same reason. Events that were committed stay committed; events queued beyond
twice those bounds are dropped and counted, and a `degraded` event per sandbox says how many once
the store takes writes again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from corral.budget import Admit, Budgets, RecordBudget, approx_size, compacted
from corral.errors import StoreError
from corral.events import Event, EventKind, Finding

log = logging.getLogger(__name__)
MAX_BATCH = 512
RETRY_S = 0.5
# A batch's first event waits this long for the rest of its burst (a command's start, execs and exit),
# unless someone waits for a commit (a finding's containment, a reader, flush): one wake of the writer
# and one transaction per burst, instead of the writer's Python taking the GIL from the event loop
# between each event and the next (benchmarks/README.md, "Two trees on the step path").
LINGER_S = 0.02


class StoreUnavailable(StoreError):
    """The event store takes no writes (its writer failed or was closed). Blockable actions are denied
    until it recovers: free disk space, fix permissions or restore the database (see the message)."""


class StoreBehind(StoreUnavailable):
    """The store writer is past its backlog bound; blockable actions are refused until it catches up.
    A sandbox flooding events is capped per sandbox (Budgets); a slow disk or database is the usual cause."""


@dataclass
class _Item:
    seq: int
    copy: Event | Finding  # what is written: a snapshot taken at submit, so later changes by the caller race nothing
    original: Event | Finding  # gets the id once committed
    size: int
    evidence_of: Event | None = None  # a finding's event (its id is known once that is written, earlier in line)


class Writer:
    def __init__(self, store, budgets: Budgets | None = None) -> None:  # store: corral.store.Store
        self.store = store
        self.budgets = budgets or Budgets()
        self._budget = RecordBudget(self.budgets)
        self._cv = threading.Condition()
        self._q: deque[_Item] = deque()
        self._bytes = 0
        self._seq = 0  # last seq given out
        self._done = 0  # every item with seq <= this is committed (or dropped)
        self._failure: StoreUnavailable | None = None
        self._lost: Counter[str] = Counter()  # per sandbox, events dropped past the hard bound
        self._waiting: Counter[str | None] = Counter()  # per sandbox, items in the queue
        self._closed = False
        self._wanted = 0  # the highest seq waited for: no lingering until it is committed
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="corral-store-writer", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------------------------
    def check(self, sandbox_id: str | None = None) -> None:
        """Raise StoreUnavailable (or StoreBehind) when a blockable action must be refused now. Past
        half the backlog bound, a sandbox whose events are most of the backlog is refused first, so one
        flooding sandbox runs into the bound alone while the others go on."""
        with self._cv:
            q = len(self._q)
            if (sandbox_id is not None and 2 * q >= self.budgets.writer_queue
                    and 2 * self._waiting[sandbox_id] >= q):
                raise StoreBehind(
                    f"the store writer of {self.store.url} is {q} events behind, most of them this "
                    f"sandbox's ({self._waiting[sandbox_id]}); its blockable actions are refused until the "
                    "writer catches up")
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise StoreUnavailable(f"the writer of {self.store.url} is closed (the runtime is shutting down)")
            if len(self._q) >= self.budgets.writer_queue or self._bytes >= self.budgets.writer_bytes:
                raise StoreBehind(
                    f"the store writer of {self.store.url} is {len(self._q)} events ({self._bytes} bytes) "
                    "behind; blockable actions are refused until it catches up (is the disk or database slow?)")

    def submit(self, ev: Event, *, evidence: bool = False, matched: bool = False) -> int:
        """Queue `ev` for writing, within its sandbox's recording budget; returns a sequence number for
        wait() (0 when the event was suppressed or dropped). Never raises: whether an action may
        proceed is check()'s question, asked before."""
        size = approx_size(ev)
        copy = ev.model_copy(update={"data": dict(ev.data)})
        with self._cv:
            verdict = self._budget.admit(copy, size, evidence=evidence, matched=matched)
            if verdict is Admit.DROP:
                return 0
            if verdict is Admit.COMPACT:
                copy = compacted(copy)
                size = approx_size(copy)
            if not evidence and (len(self._q) >= 2 * self.budgets.writer_queue
                                 or self._bytes >= 2 * self.budgets.writer_bytes or self._closed):
                self._lost[ev.sandbox_id] += 1
                return 0
            return self._enqueue(copy, ev, size)

    def submit_finding(self, finding: Finding, evidence: Event | None, evidence_seq: int) -> int:
        """Queue a finding after the event it rests on: its evidence is that event's id, filled in when
        the event is written. Findings are never dropped."""
        with self._cv:
            # the evidence was queued just before: look from the newest end
            src = next((it.copy for it in reversed(self._q) if it.seq == evidence_seq), None) if evidence_seq else None
            if src is None and evidence is not None and evidence.id:
                finding.evidence = [evidence.id]
            copy = finding.model_copy(update={"data": dict(finding.data)})
            return self._enqueue(copy, finding, 512, evidence_of=src)  # type: ignore[arg-type]

    def _enqueue(self, copy: Event | Finding, original: Event | Finding, size: int,
                 evidence_of: Event | None = None) -> int:
        self._seq += 1
        self._q.append(_Item(self._seq, copy, original, size, evidence_of))
        self._waiting[copy.sandbox_id] += 1
        self._bytes += size
        if len(self._q) in (1, MAX_BATCH):  # it sleeps on an empty queue, or lingers for a batch: waking
            self._cv.notify_all()         # it per event would cost the loop
        return self._seq

    def note_degraded(self, sandbox_id: str, reason: str) -> None:
        """Queue a `degraded` event for a sandbox (written when the store recovers, if it is failing)."""
        ev = Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=sandbox_id, reason=reason)
        with self._cv:
            self._enqueue(ev, ev, approx_size(ev))

    def wait(self, seq: int, timeout: float | None = 10.0) -> None:
        """Until the event with this sequence number is committed; StoreUnavailable if it cannot be."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if seq > self._wanted:
                self._wanted = seq
                self._cv.notify_all()
            while self._done < seq:
                if self._failure is not None:
                    raise self._failure
                if not self._thread.is_alive():
                    raise StoreUnavailable(f"the writer of {self.store.url} stopped")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise StoreBehind(f"an event was not written to {self.store.url} within {timeout} s")
                self._cv.wait(left)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Write everything submitted so far, this window's `suppressed` summaries included. Returns
        early (without raising) when the store is failing: a reader then sees what was committed."""
        with self._cv:
            for s in self._budget.due(force=True):
                self._enqueue(s, s, approx_size(s))
            seq = self._seq
        with contextlib.suppress(StoreUnavailable):
            self.wait(seq, timeout)

    @property
    def failing(self) -> StoreUnavailable | None:
        return self._failure

    @property
    def pending(self) -> int:
        return len(self._q)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    # -- the writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as e:  # never silently: every later blockable action is refused
            log.exception("corral's store writer stopped")
            with self._cv:
                self._failure = StoreUnavailable(f"the writer of {self.store.url} stopped: {type(e).__name__}: {e}")
                self._cv.notify_all()

    def _step(self) -> bool:
        with self._cv:
            while True:  # windows that ended with drops are summarised even while others keep the queue full
                for s in self._budget.due():
                    self._enqueue(s, s, approx_size(s))
                if self._q or self._closed:
                    break
                self._cv.wait(self.budgets.window_s)
            until = time.monotonic() + LINGER_S
            while not (self._wanted > self._done or self._closed or len(self._q) >= MAX_BATCH):
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if not self._q and self._closed:
                return False
            if self._failure is None and self._lost:
                for sid, n in self._lost.items():
                    ev = Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=sid,
                               reason=f"{n} events were not recorded: the store writer was past twice its backlog "
                                      "bound (or closed); blockable actions were refused meanwhile")
                    self._enqueue(ev, ev, approx_size(ev))
                self._lost.clear()
            batch = [self._q[i] for i in range(min(MAX_BATCH, len(self._q)))]
        try:
            i = 0
            while i < len(batch):  # runs of events in one transaction; a finding after its evidence
                j = i + 1
                if isinstance(batch[i].copy, Event):
                    while j < len(batch) and isinstance(batch[j].copy, Event):
                        j += 1
                    self.store.record_many([it.copy for it in batch[i:j]])
                else:
                    f, src = batch[i].copy, batch[i].evidence_of
                    if src is not None and src.id:
                        f.evidence = [src.id]  # type: ignore[union-attr]
                    self.store.record_finding(f)
                self._committed(batch[i:j])
                i = j
        except Exception as e:  # StoreError and anything the driver raises: nothing is lost yet
            with self._cv:
                if self._failure is None:
                    log.error("corral's event store is failing, blockable actions are refused: %s", e)
                self._failure = StoreUnavailable(
                    f"{e}" if isinstance(e, StoreError) else f"cannot write to event store {self.store.url}: "
                    f"{type(e).__name__}: {e}")
                self._cv.notify_all()
                if self._closed:
                    return False  # shutting down: what could not be written is lost, as a crash would lose it
                self._cv.wait(RETRY_S)
            return True
        return True

    def _unwait(self, it: _Item) -> None:
        sid = it.copy.sandbox_id
        self._waiting[sid] -= 1
        if self._waiting[sid] <= 0:
            del self._waiting[sid]

    def _committed(self, items: list[_Item]) -> None:
        with self._cv:
            for it in items:
                it.original.id = it.copy.id
                if isinstance(it.original, Finding):
                    it.original.evidence = list(it.copy.evidence)  # type: ignore[union-attr]
                self._q.popleft()
                self._unwait(it)
                self._bytes -= it.size
            self._done = items[-1].seq
            self.written += len(items)
            self._failure = None
            self._cv.notify_all()
