"""The store is a real SQLite file: events survive a crash of the process that wrote them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from corral import Event, EventKind, Finding, Severity, Store, Verdict


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
