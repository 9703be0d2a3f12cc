"""Durable store for events and findings: SQLite (WAL) by default, PostgreSQL by URL.

Each record() commits before it returns, so an event the caller saw recorded survives a crash of
corral. WAL with synchronous=NORMAL keeps that true for process crashes at ~tens of microseconds per
commit; `durable="full"` also survives power loss.

A runtime does not call record() on its hot paths: it starts one Writer (store/writer.py), which
batches events off the event loop, and every read here flushes that writer first, so a reader sees
every event submitted before the read.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from corral.budget import Budgets
from corral.errors import StoreError
from corral.events import Event, EventKind, Finding
from corral.store.writer import Writer

metadata = sa.MetaData()

# Row ids: 64-bit on PostgreSQL (BIGSERIAL; a SERIAL runs out after 2**31 rows, a month of a busy shared store),
# INTEGER on SQLite, where only that spelling makes the id the table's 64-bit rowid.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("sandbox_id", sa.String(64), nullable=False),
    sa.Column("episode_id", sa.String(128)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("step", sa.Integer),
    sa.Column("command", sa.Text),
    sa.Column("pid", sa.Integer),
    sa.Column("ppid", sa.Integer),
    sa.Column("exe", sa.Text),
    sa.Column("argv", sa.JSON),
    sa.Column("dst_ip", sa.String(64)),
    sa.Column("dst_port", sa.Integer),
    sa.Column("name", sa.Text),
    sa.Column("protocol", sa.String(32)),
    sa.Column("verdict", sa.String(8)),
    sa.Column("reason", sa.Text),
    sa.Column("bytes_up", sa.BigInteger),
    sa.Column("bytes_down", sa.BigInteger),
    sa.Column("data", sa.JSON),
    sa.Index("ix_events_sandbox", "sandbox_id", "id"),
    sa.Index("ix_events_episode", "episode_id", "step"),
    sa.Index("ix_events_kind", "kind", "ts"),
    sa.Index("ix_events_run", "run_id", "id"),
)

findings = sa.Table(
    "findings",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("rule_id", sa.String(128), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("technique", sa.String(32)),
    sa.Column("sandbox_id", sa.String(64), nullable=False),
    sa.Column("episode_id", sa.String(128)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("step", sa.Integer),
    sa.Column("command", sa.Text),
    sa.Column("pid", sa.Integer),
    sa.Column("evidence", sa.JSON),  # event ids
    sa.Column("action", sa.String(32)),
    sa.Column("data", sa.JSON),
    sa.Index("ix_findings_sandbox", "sandbox_id", "id"),
    sa.Index("ix_findings_episode", "episode_id", "step"),
    sa.Index("ix_findings_run", "run_id", "id"),
)

# One row per run: a rollout, a demo, a `corral run`, a `serve` session, a library Runtime's life.
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
    sa.Column("data", sa.JSON),
)

# Columns added since the first release: a store written before them gains them when opened.
_ADDED = {"events": [("run_id", "VARCHAR(64)", "ix_events_run", "run_id, id")],
          "findings": [("run_id", "VARCHAR(64)", "ix_findings_run", "run_id, id")]}

_EVENT_COLS = [c.name for c in events.columns if c.name != "id"]
_JSON_COLS = {c.name for c in events.columns if isinstance(c.type, sa.JSON)}
_FINDING_COLS = [c.name for c in findings.columns if c.name != "id"]
_TEXT_LIMITS = {t.name: {c.name: c.type.length for c in t.columns if isinstance(c.type, sa.String)}
                for t in (events, findings, runs)}
# A key of PostgreSQL's advisory locks: one per database, taken by a store creating or migrating the schema
# and by every transaction that writes events or findings (see _write_lock)
_PG_LOCK = 0x636F7272616C  # "corral"


def _shown(url: str) -> str:
    """A store URL as messages (and Store.url) show it: with its password, if any, as ***."""
    try:
        u = sa.engine.make_url(url)
    except SQLAlchemyError:
        return re.sub(r"^([^:/]+://[^:/@]*):[^@]*@", r"\1:***@", url)
    return u.render_as_string(hide_password=True) if u.password else url


def _fit(value: str, length: int | None) -> str:
    """A string as PostgreSQL takes it. It refuses NUL characters in text and strings longer than a VARCHAR,
    which SQLite keeps, and lone surrogates (psycopg cannot encode them). One such event would fail its batch
    on every retry, and the writer, failing closed, would refuse every sandbox's actions from then on. So: NUL
    becomes U+FFFD, a surrogate its \\udcxx escape, and a string is cut to the column's length."""
    value = _encodable(value.replace("\x00", "\ufffd") if "\x00" in value else value)
    return value if length is None or len(value) <= length else value[:length]


def _encodable(value: str) -> str:
    """A lone surrogate (text an agent chose: a command, a model's tool call) as its \\udcxx escape: the
    database driver cannot encode it, and one such event would fail its batch on every retry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


def _sqlite_pragmas(durable: str):
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={'FULL' if durable == 'full' else 'NORMAL'}")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    return on_connect


class Store:
    """Events and findings. Thread-safe; many readers (CLI `events --follow`) may share the file."""

    def __init__(self, url: str | Path = ".corral/corral.db", *, durable: str = "process") -> None:
        url = str(url)
        if "://" not in url:
            path = Path(url).expanduser()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create {path.parent} for the event store: {e.strerror}") from None
            url = f"sqlite:///{path}"
        self.url = _shown(url)  # what messages, trajectories and reports show: never a password
        try:
            self.engine = sa.create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas(durable))
            self._pg = self.engine.dialect.name == "postgresql"
            # PostgreSQL (and other servers) enforce what SQLite does not: see _fit
            self._limits = _TEXT_LIMITS if self.engine.dialect.name != "sqlite" else None
            with self.engine.begin() as conn:
                if self._pg:  # runtimes opening one database at once: one creates or migrates, the others wait
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK)))
                metadata.create_all(conn)
                self._migrate(conn)
        except ModuleNotFoundError as e:  # the URL's database driver is not installed
            extra = " (pip install 'corral[postgres]')" if url.startswith("postgres") else ""
            raise StoreError(f"the event store {url.split('@')[-1]} needs the Python driver {e.name!r}, which is not "
                             f"installed{extra}") from None
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open event store {self.url}: {e.__class__.__name__}: {e.args[0]}") from None
        self._lock = threading.Lock()
        self.writer: Writer | None = None
        self._conn = self.engine.connect()
        # SQLite writes go straight through the driver: an insert and commit is ~30 us instead of
        # ~200 us through SQLAlchemy's statement machinery, and every exec waits on one.
        self._fast = None
        if self.engine.dialect.name == "sqlite" and self.engine.url.database:
            raw = sqlite3.connect(self.engine.url.database, check_same_thread=False, isolation_level=None)
            _sqlite_pragmas(durable)(raw, None)
            self._fast = raw
            cols = ", ".join(_EVENT_COLS)
            self._fast_sql = f"INSERT INTO events ({cols}) VALUES ({', '.join('?' * len(_EVENT_COLS))})"

    def _migrate(self, conn: sa.Connection) -> None:
        have = sa.inspect(conn)
        for table, cols in _ADDED.items():
            names = {c["name"] for c in have.get_columns(table)}
            for col, sql_type, index, on in cols:
                if col not in names:
                    conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {col} {sql_type}"))
                    conn.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {index} ON {table} ({on})"))

    def _fitted(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        if self._limits is not None:
            limits = self._limits[table]
            for k, v in row.items():
                if isinstance(v, str) and k in limits:
                    row[k] = _fit(v, limits[k])
        else:  # SQLite keeps NUL and any length; a lone surrogate it cannot encode either
            for k, v in row.items():
                if isinstance(v, str):
                    row[k] = _encodable(v)
        return row

    def _arg(self, col: sa.Column, value: Any) -> Any:
        """A filter's value fitted as a written one was, so that what was written is found by it."""
        if self._limits is not None and isinstance(value, str):
            return _fit(value, self._limits[col.table.name].get(col.name))  # type: ignore[attr-defined]
        return value

    def _write_lock(self) -> None:
        """On PostgreSQL, the transaction's events and findings get their ids and commit while it holds this
        lock. Ids come from a sequence, so without it a writer could take ids before another's and commit
        after it, and a reader following by id (`corral events --follow`, after_id) would skip its rows for
        good. SQLite has one writer at a time anyway."""
        if self._pg:
            self._conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK)))

    def _hint(self) -> str:
        return ("free disk space or fix permissions" if self.engine.dialect.name == "sqlite"
                else "is the database server up and reachable?")

    # -- runs ------------------------------------------------------------------------------------
    def start_run(self, run_id: str, kind: str, label: str | None = None, data: dict | None = None,
                  started: float | None = None) -> None:
        """Record a run's start; a run that is resumed (a rollout continued into its own output) keeps
        its row and is marked running again."""
        with self._lock:
            try:
                try:
                    with self._conn.begin():
                        if self._conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id)).first():
                            self._conn.execute(runs.update().where(runs.c.id == run_id).values(ended=None))
                        else:
                            row = self._fitted("runs", {"id": run_id, "kind": kind, "label": label})
                            self._conn.execute(runs.insert().values(**row, started=started or time.time(),
                                                                    data=data or {}))
                except IntegrityError:  # another runtime sharing the store started this run just now
                    with self._conn.begin():
                        self._conn.execute(runs.update().where(runs.c.id == run_id).values(ended=None))
            except DBAPIError as e:
                raise StoreError(f"cannot record run {run_id} in {self.url}: {e.orig}") from None

    def end_run(self, run_id: str) -> None:
        self.flush()
        with self._lock, contextlib.suppress(OperationalError), self._conn.begin():
            self._conn.execute(runs.update().where(runs.c.id == run_id).values(ended=time.time()))

    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Runs, newest first, each with its counts: sandboxes, episodes, findings (and the episodes
        with one), events."""
        ev_counts = (sa.select(events.c.run_id, sa.func.count().label("events"),
                               sa.func.count(sa.distinct(events.c.sandbox_id)).label("sandboxes"),
                               sa.func.count(sa.distinct(events.c.episode_id)).label("episodes"))
                     .group_by(events.c.run_id).subquery())
        f_counts = (sa.select(findings.c.run_id, sa.func.count().label("findings"),
                              sa.func.count(sa.distinct(findings.c.episode_id)).label("violating"))
                    .group_by(findings.c.run_id).subquery())
        q = (sa.select(runs, ev_counts.c.events, ev_counts.c.sandboxes, ev_counts.c.episodes,
                       f_counts.c.findings, f_counts.c.violating)
             .outerjoin(ev_counts, ev_counts.c.run_id == runs.c.id)
             .outerjoin(f_counts, f_counts.c.run_id == runs.c.id)
             .order_by(runs.c.started.desc()))
        if limit:
            q = q.limit(limit)
        out = []
        for r in self._read(q):
            row = dict(r._mapping)
            for k in ("events", "sandboxes", "episodes", "findings", "violating"):
                row[k] = row[k] or 0
            out.append(row)
        return out

    def run_of_episode(self, episode_id: str) -> list[str]:
        """The runs that recorded an episode id, newest first (ids from before runs: none)."""
        q = (sa.select(events.c.run_id, sa.func.max(events.c.ts).label("last"))
             .where(events.c.episode_id == self._arg(events.c.episode_id, episode_id))
             .group_by(events.c.run_id).order_by(sa.desc("last")))
        return [r.run_id for r in self._read(q) if r.run_id]

    def episodes_named(self, name: str) -> list[str]:
        """Episode ids `name@<run>` (an episode's name within its run), newest first."""
        pattern = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "@%"
        q = (sa.select(events.c.episode_id, sa.func.max(events.c.ts).label("last"))
             .where(events.c.episode_id.like(pattern, escape="\\")).group_by(events.c.episode_id)
             .order_by(sa.desc("last")))
        return [r.episode_id for r in self._read(q)]

    # -- writing ---------------------------------------------------------------------------------
    def start_writer(self, budgets: Budgets | None = None) -> Writer:
        """The store's one async writer (idempotent): Runtime.emit hands it every event."""
        if self.writer is None:
            self.writer = Writer(self, budgets)
        return self.writer

    def flush(self, timeout: float | None = 30.0) -> None:
        """Everything handed to the writer so far is written (or the store is failing: see Writer.flush)."""
        if self.writer is not None:
            self.writer.flush(timeout)

    def record(self, event: Event) -> Event:
        """Persist one event; returns it with its id. Committed before return."""
        return self.record_many([event])[0]

    def record_many(self, batch: Iterable[Event]) -> list[Event]:
        batch = list(batch)
        rows = [e.model_dump(include=set(_EVENT_COLS), mode="json") for e in batch]
        if self._fast is not None:
            return self._record_fast(batch, rows)
        with self._lock:
            try:
                with self._conn.begin():
                    self._write_lock()
                    for event, row in zip(batch, rows, strict=True):
                        ins = events.insert().values(**self._fitted("events", row))
                        event.id = self._conn.execute(ins).inserted_primary_key[0]
            except DBAPIError as e:
                raise StoreError(
                    f"cannot write to event store {self.url}: {e.orig}; {self._hint()} "
                    "(events already recorded are kept)"
                ) from None
        return batch

    def _record_fast(self, batch: list[Event], rows: list[dict]) -> list[Event]:
        assert self._fast is not None
        with self._lock:
            try:
                cur = self._fast.cursor()
                cur.execute("BEGIN")
                for event, row in zip(batch, rows, strict=True):
                    params = [json.dumps(row[c]) if c in _JSON_COLS and row[c] is not None else row[c]
                              for c in _EVENT_COLS]
                    try:
                        cur.execute(self._fast_sql, params)
                    except UnicodeEncodeError:  # checked only when it happens: the common path stays as fast
                        cur.execute(self._fast_sql, [_encodable(p) if isinstance(p, str) else p for p in params])
                    event.id = cur.lastrowid
                cur.execute("COMMIT")
            except (sqlite3.Error, UnicodeEncodeError) as e:
                with contextlib.suppress(sqlite3.Error):
                    self._fast.execute("ROLLBACK")
                raise StoreError(
                    f"cannot write to event store {self.url}: {e}; free disk space or fix permissions "
                    "(events already recorded are kept)"
                ) from None
        return batch

    def record_finding(self, finding: Finding) -> Finding:
        row = finding.model_dump(include=set(_FINDING_COLS), mode="json")
        with self._lock:
            try:
                with self._conn.begin():
                    self._write_lock()
                    ins = findings.insert().values(**self._fitted("findings", row))
                    finding.id = self._conn.execute(ins).inserted_primary_key[0]
            except DBAPIError as e:
                raise StoreError(f"cannot write finding to {self.url}: {e.orig}") from None
        return finding

    # -- reading ---------------------------------------------------------------------------------
    def events(
        self,
        *,
        sandbox_id: str | None = None,
        episode_id: str | None = None,
        kind: EventKind | str | None = None,
        verdict: str | None = None,
        step: int | None = None,
        after_id: int = 0,
        limit: int | None = None,
        run_id: str | None = None,
    ) -> list[Event]:
        q = sa.select(events).where(events.c.id > after_id).order_by(events.c.id)
        for col, value in (
            (events.c.sandbox_id, sandbox_id),
            (events.c.episode_id, episode_id),
            (events.c.run_id, run_id),
            (events.c.kind, str(kind) if kind else None),
            (events.c.verdict, verdict),
            (events.c.step, step),
        ):
            if value is not None:
                q = q.where(col == self._arg(col, value))
        if limit:
            q = q.limit(limit)
        return [Event.model_validate(dict(r._mapping)) for r in self._read(q)]

    def findings(
        self, *, sandbox_id: str | None = None, episode_id: str | None = None, after_id: int = 0,
        run_id: str | None = None,
    ) -> list[Finding]:
        q = sa.select(findings).where(findings.c.id > after_id).order_by(findings.c.id)
        if sandbox_id:
            q = q.where(findings.c.sandbox_id == self._arg(findings.c.sandbox_id, sandbox_id))
        if episode_id:
            q = q.where(findings.c.episode_id == self._arg(findings.c.episode_id, episode_id))
        if run_id:
            q = q.where(findings.c.run_id == self._arg(findings.c.run_id, run_id))
        return [Finding.model_validate(dict(r._mapping)) for r in self._read(q)]

    def _read(self, query: sa.Select) -> Iterator[sa.Row]:
        self.flush()
        with self._lock:
            try:
                return iter(self._conn.execute(query).fetchall())
            except DBAPIError as e:
                raise StoreError(f"cannot read event store {self.url}: {e.orig}") from None
            finally:
                self._conn.rollback()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        with self._lock:
            self._conn.close()
            if self._fast is not None:
                self._fast.close()
        self.engine.dispose()
