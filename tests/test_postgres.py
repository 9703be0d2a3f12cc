"""The PostgreSQL store against a real server: Debian's `postgresql`, started here (tests/pgserver.py) on
127.0.0.1 of the suite's own network namespace, through psycopg 3, with no mocks. The Store API, the async
writer, JSON and 64-bit columns, two stores (two runtimes) sharing one database, the migration of a store
from before runs, clear errors when the server cannot be reached, and a real Runtime recording into it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Event, EventKind, Finding, Runtime, RuntimeConfig, Severity, Store, StoreError, Verdict
from corral.store import StoreUnavailable

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'corral[postgres]'; "
                                                "`make test` installs it with .[dev])")

from pgserver import PASSWORD, PgServer, free_port, run_as, server_binaries  # noqa: E402

HERE = Path(__file__).parent


def _binaries() -> Path:
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL's server binaries are not installed (/usr/lib/postgresql/<version>/bin: "
                    "apt-get install postgresql; `make test` installs it)")
    try:
        run_as()
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as")
    return bindir


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer(_binaries())
    try:
        server.start()
        yield server
    finally:
        server.close()
    assert not server.alive() and not server.root.exists()


@pytest.fixture(scope="session")
def pg_url(pg_server: PgServer) -> str:
    """postgresql+psycopg://corral:...@127.0.0.1:PORT/corral"""
    return pg_server.create_database("corral")


_dbs = itertools.count()


@pytest.fixture
def fresh_url(pg_server: PgServer) -> str:
    """A database of its own for a test that needs an empty one."""
    return pg_server.create_database(f"t{os.getpid()}_{next(_dbs)}")


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    s = Store(pg_url)
    yield s
    s.close()


def _open_at_once(url: str, n: int) -> tuple[list[Store], list[BaseException]]:
    """n stores opening one database at the same moment (each would create or migrate the schema)."""
    stores: list[Store] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(n)

    def opener() -> None:
        try:
            gate.wait()
            stores.append(Store(url))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return stores, errors


def _uid(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# --- the Store API ------------------------------------------------------------------------------------------
def test_record_query_and_json_round_trip(store):
    sb, other = _uid("sb"), _uid("sb")
    big = 2**31 + 12345  # bytes counts past a 32-bit integer
    argv = ["curl", "-H", "X-Ünïcødé: ✓ 日本語", "--data", '{"a": [1, 2]}', ""]
    data = {"nested": {"list": [1, 2.5, None, True, "ß"], "deep": {"k": {"v": "€"}}}, "emoji": "🐍", "n": -7}
    e = store.record(Event(kind=EventKind.CONNECT, action="connect", sandbox_id=sb, episode_id="ep-1", step=3,
                           dst_ip="198.51.100.1", dst_port=443, verdict=Verdict.DENY, argv=argv, data=data,
                           bytes_up=big, bytes_down=2**40, ts=1234567890.123456))
    assert isinstance(e.id, int) and e.id > 0
    many = store.record_many([Event(kind=EventKind.DNS, action="query", sandbox_id=sb, step=i, name=f"n{i}.example",
                                    run_id="run-a" if i % 2 else None) for i in range(5)])
    assert [x.id for x in many] == sorted(x.id for x in many) and many[0].id > e.id
    store.record(Event(kind=EventKind.DNS, action="query", sandbox_id=other, name="other.example"))

    (got,) = store.events(sandbox_id=sb, kind="connect")
    assert got.argv == argv and got.data == data and got.bytes_up == big and got.bytes_down == 2**40
    assert got.ts == 1234567890.123456 and got.step == 3 and got.dst_port == 443 and got.verdict == Verdict.DENY
    assert [x.step for x in store.events(sandbox_id=sb, kind=EventKind.DNS)] == [0, 1, 2, 3, 4]
    assert [x.id for x in store.events(sandbox_id=sb, verdict="deny")] == [e.id]
    assert [x.id for x in store.events(sandbox_id=sb, step=3)] == [e.id, many[3].id]
    assert [x.id for x in store.events(sandbox_id=sb, episode_id="ep-1")] == [e.id]
    assert [x.step for x in store.events(sandbox_id=sb, run_id="run-a")] == [1, 3]
    assert [x.id for x in store.events(sandbox_id=sb, after_id=many[2].id)] == [many[3].id, many[4].id]
    assert len(store.events(sandbox_id=sb, limit=2)) == 2
    assert [x.name for x in store.events(sandbox_id=other)] == ["other.example"]

    f = store.record_finding(Finding(rule_id="r1", title="Tïtle ✓", severity=Severity.HIGH, sandbox_id=sb,
                                     episode_id="ep-1", run_id="run-a", step=3, command="curl …", evidence=[e.id],
                                     data={"why": {"argv": argv}}))
    f2 = store.record_finding(Finding(rule_id="r2", title="t", severity=Severity.LOW, sandbox_id=other))
    assert f2.id > f.id
    (gf,) = store.findings(sandbox_id=sb)
    assert (gf.id, gf.evidence, gf.data, gf.title, gf.severity) == (f.id, [e.id], {"why": {"argv": argv}},
                                                                     "Tïtle ✓", Severity.HIGH)
    assert [x.id for x in store.findings(episode_id="ep-1") if x.sandbox_id == sb] == [f.id]
    assert [x.id for x in store.findings(run_id="run-a") if x.sandbox_id == sb] == [f.id]
    assert [x.id for x in store.findings(after_id=f.id) if x.sandbox_id in (sb, other)] == [f2.id]


def test_runs_episodes_and_like_escapes(fresh_url):
    s = Store(fresh_url)
    try:
        s.start_run("r1", "rollout", "rollout tasks -n 2", data={"tasks": ["a", "b"], "ü": 1}, started=100.0)
        s.start_run("r2", "demo", started=200.0)
        evs = [Event(kind=EventKind.COMMAND, action="start", sandbox_id=f"sb{i % 2}", episode_id=f"t_1--{i}@r1",
                     run_id="r1", ts=1000.0 + i) for i in range(3)]
        evs += [Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb9", episode_id="tx1--0@r2", run_id="r2",
                      ts=2000.0),
                Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb9", episode_id="a%b\\c@r2", run_id="r2",
                      ts=2001.0),
                Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb9", episode_id="t_1--0@r1", run_id="r2",
                      ts=2002.0)]
        s.record_many(evs)
        s.record_finding(Finding(rule_id="x", title="x", severity=Severity.HIGH, sandbox_id="sb0",
                                 episode_id="t_1--0@r1", run_id="r1"))
        s.record_finding(Finding(rule_id="y", title="y", severity=Severity.LOW, sandbox_id="sb0",
                                 episode_id="t_1--0@r1", run_id="r1"))
        s.end_run("r1")
        r2, r1 = s.runs()  # newest first
        assert (r1["id"], r1["kind"], r1["label"], r1["data"]) == ("r1", "rollout", "rollout tasks -n 2",
                                                                   {"tasks": ["a", "b"], "ü": 1})
        assert (r1["events"], r1["sandboxes"], r1["episodes"], r1["findings"], r1["violating"]) == (3, 2, 3, 2, 1)
        assert r1["ended"] is not None and r2["ended"] is None
        assert (r2["events"], r2["sandboxes"], r2["episodes"], r2["findings"], r2["violating"]) == (3, 1, 3, 0, 0)
        assert [r["id"] for r in s.runs(limit=1)] == ["r2"]
        assert s.run_of_episode("t_1--0@r1") == ["r2", "r1"] and s.run_of_episode("nope") == []
        # LIKE's wildcards in a name are literal: t_1 is not tx1, a%b\c is itself
        assert s.episodes_named("t_1--0") == ["t_1--0@r1"] and s.episodes_named("t_1--2") == ["t_1--2@r1"]
        assert s.episodes_named("tx1--0") == ["tx1--0@r2"] and s.episodes_named("t%") == []
        assert s.episodes_named("a%b\\c") == ["a%b\\c@r2"] and s.episodes_named("a_b\\c") == []
        s.start_run("r1", "rollout")  # resumed: running again, not a second row
        assert [r["id"] for r in s.runs()] == ["r2", "r1"] and s.runs()[1]["ended"] is None
    finally:
        s.close()


def test_async_writer_batches_and_fills_in_evidence(store):
    sb = _uid("w")
    w = store.start_writer()
    assert store.start_writer() is w
    evs = [Event(kind=EventKind.PROCESS, action="exec", sandbox_id=sb, step=i, exe="/usr/bin/x", argv=["x", str(i)])
           for i in range(300)]
    seqs = [w.submit(e) for e in evs]
    assert all(seqs)
    hit = Event(kind=EventKind.PROCESS, action="exec", sandbox_id=sb, step=999, exe="/tmp/xmrig", data={"a": "ü"})
    seq = w.submit(hit, evidence=True, matched=True)
    f = Finding(rule_id="miner-binary", title="miner", severity=Severity.CRITICAL, sandbox_id=sb, step=999)
    w.wait(w.submit_finding(f, hit, seq), timeout=30)
    assert hit.id and f.id and f.evidence == [hit.id]
    store.flush()
    got = store.events(sandbox_id=sb)
    assert [e.step for e in got] == [*range(300), 999] and got[5].argv == ["x", "5"]
    assert [e.id for e in got] == [e.id for e in [*evs, hit]]  # every submitted event got its committed id
    (gf,) = store.findings(sandbox_id=sb)
    assert gf.evidence == [hit.id] and w.failing is None and w.pending == 0
    w.check(sb)  # nothing refused


def test_ids_are_64_bit(fresh_url, pg_server):
    """A shared store outlives 2**31 events (a month at 1000 a second): its ids are BIGINT, so the sequence
    goes on past a 32-bit integer instead of failing every later write."""
    s = Store(fresh_url)
    try:
        with pg_server.connect(fresh_url.rsplit("/", 1)[1]) as c:
            types = dict(c.execute("SELECT table_name, data_type FROM information_schema.columns "
                                   "WHERE column_name = 'id' AND table_name IN ('events', 'findings')").fetchall())
            assert types == {"events": "bigint", "findings": "bigint"}
            c.execute("SELECT setval('events_id_seq', 3000000000)")
            c.execute("SELECT setval('findings_id_seq', 5000000000)")
        e = s.record(Event(kind=EventKind.SANDBOX, action="created", sandbox_id="big"))
        f = s.record_finding(Finding(rule_id="r", title="t", severity=Severity.LOW, sandbox_id="big",
                                     evidence=[e.id]))
        assert e.id == 3000000001 and f.id == 5000000001
        assert [x.id for x in s.events(after_id=3000000000)] == [e.id] and s.findings()[0].evidence == [e.id]
    finally:
        s.close()


def test_values_postgresql_refuses_are_fitted_not_fatal(store):
    """NUL characters, lone surrogates and strings longer than a VARCHAR: SQLite keeps them, PostgreSQL
    refuses them. One such event must not fail its batch on every retry (the writer, failing closed, would
    then refuse every sandbox's actions for good): it is recorded with the values fitted."""
    sb = _uid("odd")
    w = store.start_writer()
    long_episode = "e" * 300
    w.submit(Event(kind=EventKind.COMMAND, action="start", sandbox_id=sb, command="echo a\x00b", name="h\x00st",
                   argv=["a\x00b"], data={"k\x00": "v\x00"}))
    w.submit(Event(kind=EventKind.COMMAND, action="start", sandbox_id=sb, command="bad \udcff byte",
                   episode_id=long_episode, protocol="p" * 100))
    w.submit_finding(Finding(rule_id="r" * 200, title="t\x00", severity=Severity.LOW, sandbox_id=sb,
                             technique="T" * 40, episode_id=long_episode), None, 0)
    ok = Event(kind=EventKind.COMMAND, action="start", sandbox_id=sb, command="echo fine")
    w.wait(w.submit(ok), timeout=30)
    assert w.failing is None and ok.id
    w.check(sb)
    a, b, c = store.events(sandbox_id=sb)
    assert (a.command, a.name) == ("echo a\ufffdb", "h\ufffdst")
    assert a.argv == ["a\x00b"] and a.data == {"k\x00": "v\x00"}  # JSON keeps them (escaped as \u0000)
    assert b.command == "bad \\udcff byte" and b.episode_id == "e" * 128 and b.protocol == "p" * 32
    assert c.command == "echo fine"
    assert [e.id for e in store.events(episode_id=long_episode)] == [b.id]  # a filter is fitted the same way
    (f,) = store.findings(sandbox_id=sb)
    assert (f.rule_id, f.title, f.technique) == ("r" * 128, "t\ufffd", "T" * 32)
    assert [x.id for x in store.findings(episode_id=long_episode)] == [f.id]


# --- two runtimes sharing one database ----------------------------------------------------------------------
def test_two_stores_open_write_and_read_concurrently(fresh_url):
    """Two stores (two runtimes) open one new database at the same moment (each creates the schema if it
    is missing), write from several threads at once, directly and through their writers, and each reads
    the other's rows. A third follows by id as `corral events --follow` does and misses none: ids are
    committed in order across writers."""
    stores, errors = _open_at_once(fresh_url, 4)
    assert errors == [] and len(stores) == 4
    a, b, follower, extra = stores
    extra.close()
    n, batch = 30, 7
    done = threading.Event()
    followed: list[int] = []

    def follow() -> None:
        last = 0
        while True:
            finished = done.is_set()
            new = follower.events(after_id=last)
            followed.extend(e.id for e in new)  # type: ignore[misc]
            last = new[-1].id if new else last
            if finished:
                return
            time.sleep(0.002)

    def write(s: Store, name: str) -> None:
        try:
            for i in range(n):
                s.record_many([Event(kind=EventKind.COMMAND, action="start", sandbox_id=name, step=i * batch + j)
                               for j in range(batch)])
                s.record_finding(Finding(rule_id="r", title="t", severity=Severity.LOW, sandbox_id=name, step=i))
        except BaseException as e:
            errors.append(e)

    def write_async(s: Store, name: str) -> None:
        try:
            w = s.start_writer()
            for i in range(n * batch):
                w.submit(Event(kind=EventKind.FILE, action="write", sandbox_id=name, step=i, data={"i": i}))
            s.flush()
        except BaseException as e:
            errors.append(e)

    fol = threading.Thread(target=follow)
    fol.start()
    writers = [threading.Thread(target=write, args=(a, "a")), threading.Thread(target=write, args=(b, "b")),
               threading.Thread(target=write_async, args=(a, "a-async")),
               threading.Thread(target=write_async, args=(b, "b-async"))]
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    fol.join(60)
    try:
        assert errors == []
        for s in (a, b):  # each sees its own rows and the other's
            for name in ("a", "b", "a-async", "b-async"):
                assert [e.step for e in s.events(sandbox_id=name)] == list(range(n * batch)), name
            assert len(s.findings(sandbox_id="a")) == len(s.findings(sandbox_id="b")) == n
        every = [e.id for e in a.events()]
        assert len(every) == len(set(every)) == 4 * n * batch
        assert followed == every  # in id order, none skipped
    finally:
        for s in (a, b, follower):
            s.close()


def test_runtimes_starting_one_run_at_once(fresh_url):
    """Runtimes of one rollout (a Ray cluster's nodes) sharing the store start the same run id together:
    one row, no error."""
    stores = [Store(fresh_url) for _ in range(4)]
    errors: list[BaseException] = []
    try:
        for k in range(5):
            gate = threading.Barrier(len(stores))

            def start(s: Store, run: str = f"shared-{k}", gate: threading.Barrier = gate) -> None:
                try:
                    gate.wait()
                    s.start_run(run, "rollout", "ray")
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=start, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert errors == []
        assert sorted(r["id"] for r in stores[0].runs()) == [f"shared-{k}" for k in range(5)]
    finally:
        for s in stores:
            s.close()


# --- migration ----------------------------------------------------------------------------------------------
OLD_EVENTS = ("CREATE TABLE events (id SERIAL PRIMARY KEY, ts FLOAT NOT NULL, kind VARCHAR(16) NOT NULL, "
              "action VARCHAR(32) NOT NULL, sandbox_id VARCHAR(64) NOT NULL, episode_id VARCHAR(128), step INTEGER, "
              "command TEXT, pid INTEGER, ppid INTEGER, exe TEXT, argv JSON, dst_ip VARCHAR(64), dst_port INTEGER, "
              "name TEXT, protocol VARCHAR(32), verdict VARCHAR(8), reason TEXT, bytes_up BIGINT, bytes_down BIGINT, "
              "data JSON)")
OLD_FINDINGS = ("CREATE TABLE findings (id SERIAL PRIMARY KEY, ts FLOAT NOT NULL, rule_id VARCHAR(128) NOT NULL, "
                "title TEXT NOT NULL, severity VARCHAR(16) NOT NULL, technique VARCHAR(32), "
                "sandbox_id VARCHAR(64) NOT NULL, episode_id VARCHAR(128), step INTEGER, command TEXT, pid INTEGER, "
                "evidence JSON, action VARCHAR(32), data JSON)")


def test_a_store_written_before_runs_gains_them_and_keeps_its_events(fresh_url, pg_server):
    """A PostgreSQL store from before run ids, opened by two runtimes at once: it gains the run_id columns
    and their indexes once; old rows stay, with no run."""
    db = fresh_url.rsplit("/", 1)[1]
    with pg_server.connect(db) as c:
        c.execute(OLD_EVENTS)
        c.execute(OLD_FINDINGS)
        c.execute("INSERT INTO events (ts, kind, action, sandbox_id, argv, data) "
                  "VALUES (1.0, 'sandbox', 'created', 'old', '[\"sh\", \"ü\"]', '{\"n\": {\"x\": 1}}')")
        c.execute("INSERT INTO findings (ts, rule_id, title, severity, sandbox_id, evidence, action, data) "
                  "VALUES (1.0, 'old-rule', 'old', 'high', 'old', '[1]', 'record', '{}')")
    opened, errors = _open_at_once(fresh_url, 3)
    assert errors == []
    for extra in opened[1:]:
        extra.close()
    s = opened[0]
    try:
        with pg_server.connect(db) as c:
            cols = {r[0] for r in c.execute("SELECT table_name FROM information_schema.columns "
                                            "WHERE column_name = 'run_id'")}
            idx = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'ix_%_run'")}
        assert cols == {"events", "findings"} and idx == {"ix_events_run", "ix_findings_run"}
        s.start_run("r1", "rollout", "rollout tasks -n 1")
        s.record(Event(kind=EventKind.COMMAND, action="start", sandbox_id="new", episode_id="t--0@r1", run_id="r1"))
        s.record_finding(Finding(rule_id="x", title="x", severity=Severity.HIGH, sandbox_id="new",
                                 episode_id="t--0@r1", run_id="r1"))
        old, new = s.events()
        assert (old.sandbox_id, old.run_id, old.argv, old.data) == ("old", None, ["sh", "ü"], {"n": {"x": 1}})
        assert new.run_id == "r1" and new.id == 2  # the old sequence goes on
        assert [e.sandbox_id for e in s.events(run_id="r1")] == ["new"]
        assert [f.rule_id for f in s.findings()] == ["old-rule", "x"] and s.findings()[0].run_id is None
        assert len(s.findings(run_id="r1")) == 1 and s.findings(run_id="r2") == []
        s.end_run("r1")
        (run,) = s.runs()
        assert (run["id"], run["kind"], run["episodes"], run["findings"], run["violating"]) == (
            "r1", "rollout", 1, 1, 1)
        assert run["ended"] is not None and s.run_of_episode("t--0@r1") == ["r1"]
    finally:
        s.close()
    Store(fresh_url).close()  # opened again: nothing left to migrate


# --- errors -------------------------------------------------------------------------------------------------
def test_unreachable_or_refusing_server_is_a_clear_store_error(pg_server):
    closed = free_port()
    with pytest.raises(StoreError, match=r"cannot open event store .*:\d+/corral: .*Connection refused") as e:
        Store(pg_server.url(port=closed))
    assert PASSWORD not in str(e.value)
    with pytest.raises(StoreError, match="password authentication failed") as e:
        Store(pg_server.url(password="not-the-password"))
    assert "not-the-password" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(StoreError, match='database "no_such_db" does not exist'):
        Store(pg_server.url("no_such_db"))


def test_server_down_then_back(fresh_url, pg_server):
    """The server stops under an open store: writes and reads raise StoreError (never a driver traceback),
    the writer fails closed (check() raises StoreUnavailable) and keeps what was submitted; once the server
    is back, that lands and the store goes on. (This test stops the session's server and starts it again.)"""
    s = Store(fresh_url)
    w = s.start_writer()
    try:
        w.wait(w.submit(Event(kind=EventKind.SANDBOX, action="created", sandbox_id="sb")), timeout=30)
        pg_server.stop()
        assert not pg_server.alive()
        with pytest.raises(StoreError, match="cannot write to event store") as e:
            s.record(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb"))
        assert PASSWORD not in str(e.value) and "server" in str(e.value)
        with pytest.raises(StoreError, match=r"cannot read event store .*Connection refused"):
            s.events()
        with pytest.raises(StoreError):
            s.record_finding(Finding(rule_id="r", title="t", severity=Severity.LOW, sandbox_id="sb"))
        with pytest.raises(StoreError):
            s.start_run("r-down", "run")
        queued = Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb", command="queued while down")
        seq = w.submit(queued)
        with pytest.raises(StoreUnavailable):
            w.wait(seq, timeout=30)
        with pytest.raises(StoreUnavailable, match="Connection refused"):
            w.check("sb")
    finally:
        if not pg_server.alive():
            pg_server.start()
    try:
        deadline = time.monotonic() + 30
        while w.failing is not None or not queued.id:  # retried (every RETRY_S) until it lands
            assert time.monotonic() < deadline, w.failing
            time.sleep(0.05)
        w.check("sb")
        assert queued.id and [e.command for e in s.events(sandbox_id="sb")] == [None, "queued while down"]
        assert s.record(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb")).id
    finally:
        s.close()


def test_a_server_cannot_outlive_the_process_that_started_it(tmp_path):
    """The process that started a server is SIGKILLed (no finalizer runs): the watchdog stops the
    server and removes its directory."""
    _binaries()
    out = tmp_path / "started"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(HERE)!r})
        from pgserver import PgServer, server_binaries
        s = PgServer(server_binaries())
        s.start()
        open({str(out)!r}, "w").write(f"{{s.pid}} {{s.root}} {{s.data}}")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    pid, root, data = out.read_text().split()

    def running() -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return data.encode() in f.read()
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while (running() or Path(root).exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running() and not Path(root).exists()


# --- a real runtime ---------------------------------------------------------------------------------------------
async def test_a_runtime_records_into_postgresql(pg_url, tmp_path):
    """A Runtime with store_url: a sandbox runs a renamed miner, corral refuses it; a second store reads
    the events, the finding and the run from PostgreSQL."""
    rt = Runtime(RuntimeConfig(store_url=pg_url, state_dir=tmp_path / "state", system_dns=False,
                               run_kind="run", run_label="postgres e2e"))
    await rt.start()
    try:
        assert rt.store.engine.dialect.name == "postgresql" and PASSWORD not in rt.store.url
        sb = await rt.create()
        ok = await sb.exec("echo hello")
        assert ok.ok and ok.stdout == "hello\n"
        r = await sb.exec("cp /bin/sleep /tmp/xmrig && /tmp/xmrig 1")
        assert r.refused and "miner-binary" in r.error
        sid, run = sb.id, rt.run_id
        await sb.close()
    finally:
        await rt.close()
    reader = Store(pg_url)
    try:
        (f,) = [f for f in reader.findings(sandbox_id=sid) if f.rule_id == "miner-binary"]
        assert f.run_id == run and f.step == r.step and f.command == "cp /bin/sleep /tmp/xmrig && /tmp/xmrig 1"
        evs = reader.events(sandbox_id=sid)
        assert all(e.run_id == run for e in evs)
        (ev,) = [e for e in evs if e.id in f.evidence]  # the command, refused before it ran
        assert (ev.kind, ev.command, ev.verdict, ev.step) == (EventKind.COMMAND, f.command, Verdict.DENY, r.step)
        assert "miner-binary" in (ev.reason or "")
        assert any(e.kind == EventKind.COMMAND and e.command == "echo hello" for e in evs)
        assert {e.action for e in evs if e.kind == EventKind.SANDBOX} >= {"created"}
        (row,) = [x for x in reader.runs() if x["id"] == run]
        assert (row["kind"], row["label"]) == ("run", "postgres e2e") and row["ended"] is not None
        assert row["findings"] >= 1 and row["sandboxes"] >= 1 and row["events"] == len(reader.events(run_id=run))
    finally:
        reader.close()
