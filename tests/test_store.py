"""The store is a real SQLite file: events survive a crash of the process that wrote them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from corral import Event, EventKind, Finding, Severity, Store, Verdict
from corral.store import writer as writer_mod


def test_record_and_query(tmp_path):
    st = Store(tmp_path / "c.db")
    e = st.record(Event(kind=EventKind.CONNECT, action="connect", sandbox_id="sb-1", step=3, dst_ip="198.51.100.1",
                        dst_port=443, verdict=Verdict.DENY, argv=["curl", "x"], data={"k": 1}))
    assert e.id == 1
    st.record(Event(kind=EventKind.DNS, action="query", sandbox_id="sb-2", name="a.example.com"))
    got = st.events(sandbox_id="sb-1")
    assert len(got) == 1 and got[0].argv == ["curl", "x"] and got[0].data == {"k": 1} and got[0].step == 3
    assert [x.sandbox_id for x in st.events(kind="dns")] == ["sb-2"]
    assert st.events(verdict="deny")[0].dst_port == 443
    assert [x.id for x in st.events(after_id=1)] == [2]
    f = st.record_finding(Finding(rule_id="r1", title="t", severity=Severity.HIGH, sandbox_id="sb-1",
                                  step=3, evidence=[e.id]))
    assert st.findings(sandbox_id="sb-1")[0].evidence == [f.evidence[0]]
    st.close()


def test_events_survive_sigkill_of_writer(tmp_path):
    db = tmp_path / "crash.db"
    code = textwrap.dedent(f"""
        import os, signal
        from corral import Event, EventKind, Store
        st = Store({str(db)!r})
        for i in range(500):
            st.record(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb", step=i))
        print("recorded", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL and "recorded" in p.stdout
    st = Store(db)
    evs = st.events(sandbox_id="sb")
    assert [e.step for e in evs] == list(range(500))
    st.close()


def test_unwritable_store_is_a_clear_error(tmp_path):
    import pytest

    from corral import StoreError

    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "c.db").mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="cannot open event store"):
        Store(ro / "c.db")
    assert os.path.isdir(ro / "c.db")


def test_a_store_written_before_runs_gains_them_and_keeps_its_events(tmp_path):
    """An event store from before run ids: opened, it gains the run_id columns; old rows stay, with no run."""
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT NOT NULL, kind VARCHAR(16) "
                "NOT NULL, action VARCHAR(32) NOT NULL, sandbox_id VARCHAR(64) NOT NULL, episode_id VARCHAR(128), "
                "step INTEGER, command TEXT, pid INTEGER, ppid INTEGER, exe TEXT, argv JSON, dst_ip VARCHAR(64), "
                "dst_port INTEGER, name TEXT, protocol VARCHAR(32), verdict VARCHAR(8), reason TEXT, bytes_up BIGINT, "
                "bytes_down BIGINT, data JSON)")
    con.execute("CREATE TABLE findings (id INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT NOT NULL, rule_id "
                "VARCHAR(128) NOT NULL, title TEXT NOT NULL, severity VARCHAR(16) NOT NULL, technique VARCHAR(32), "
                "sandbox_id VARCHAR(64) NOT NULL, episode_id VARCHAR(128), step INTEGER, command TEXT, pid INTEGER, "
                "evidence JSON, action VARCHAR(32), data JSON)")
    con.execute("INSERT INTO events (ts, kind, action, sandbox_id, data) "
                "VALUES (1.0, 'sandbox', 'created', 'old', '{}')")
    con.commit()
    con.close()
    s = Store(db)
    try:
        s.start_run("r1", "rollout", "rollout tasks -n 1")
        s.record(Event(kind=EventKind.COMMAND, action="start", sandbox_id="new", episode_id="t--0@r1", run_id="r1"))
        s.record_finding(Finding(rule_id="x", title="x", severity=Severity.HIGH, sandbox_id="new",
                                 episode_id="t--0@r1", run_id="r1"))
        old, new = s.events()
        assert old.sandbox_id == "old" and old.run_id is None and new.run_id == "r1"
        assert [e.sandbox_id for e in s.events(run_id="r1")] == ["new"]
        assert len(s.findings(run_id="r1")) == 1 and s.findings(run_id="r2") == []
        s.end_run("r1")
        (run,) = s.runs()
        assert (run["id"], run["kind"], run["episodes"], run["findings"], run["violating"]) == (
            "r1", "rollout", 1, 1, 1)
        assert run["ended"] is not None and s.run_of_episode("t--0@r1") == ["r1"]
        s.start_run("r1", "rollout")  # resumed: running again, not a second row
        assert [r["id"] for r in s.runs()] == ["r1"] and s.runs()[0]["ended"] is None
    finally:
        s.close()


def test_text_the_driver_cannot_encode_never_wedges_the_writer(tmp_path):
    """A lone surrogate in a command (an agent's tool call can carry one) is stored escaped; the events
    around it, and a finding naming it, are recorded, and the writer keeps taking writes."""
    s = Store(tmp_path / "c.db")
    try:
        w = s.start_writer()
        bad = "echo \ud800 done"
        for i, cmd in enumerate(["echo before", bad, "echo after"]):
            w.submit(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb", step=i + 1, command=cmd))
        s.record_finding(Finding(rule_id="x", title="x", severity=Severity.HIGH, sandbox_id="sb", command=bad))
        s.flush()
        assert w.failing is None
        got = [e.command for e in s.events(sandbox_id="sb")]
        assert got == ["echo before", "echo \\ud800 done", "echo after"]
        assert s.findings(sandbox_id="sb")[0].command == "echo \\ud800 done"
    finally:
        s.close()


def test_the_writer_gathers_a_burst_and_never_keeps_a_waiter_waiting(tmp_path, monkeypatch):
    """The writer lets a burst of events gather into one transaction, but anyone who waits for a
    commit (a finding's containment, a reader) has it at once. With the gathering stretched to an
    hour, a wait that did not cut it short would time out."""
    monkeypatch.setattr(writer_mod, "LINGER_S", 3600.0)
    s = Store(tmp_path / "c.db")
    try:
        w = s.start_writer()
        seqs = [w.submit(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb", step=i)) for i in range(1, 4)]
        assert w._done == 0  # gathering: nothing written yet
        w.wait(seqs[1], timeout=30)  # the waiter's event, and the burst before it, written now
        assert w._done >= seqs[1]
        seq = w.submit(Event(kind=EventKind.COMMAND, action="exit", sandbox_id="sb", step=4))
        assert [e.step for e in s.events(sandbox_id="sb")] == [1, 2, 3, 4] and w._done >= seq  # a reader flushes
    finally:
        s.close()
