"""Fail closed and bounded per sandbox: a store that cannot write never lets an action through, a writer
that falls behind refuses new actions, and one sandbox flooding execs or DNS queries neither grows the
store without bound nor takes lookups away from another sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from corral import Runtime, RuntimeConfig
from corral.budget import Budgets
from tests.conftest import allow, eventually, py

pytestmark = pytest.mark.asyncio


def _store_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("corral.db*"))


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs of our own (the suite runs in a private mount namespace)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "corral-test", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


async def test_full_disk_store_refuses_execs_and_records_degraded_when_it_can(world, tmp_path):
    """With the store's file system full, an exec is refused, not let through unrecorded; once space
    is back, the refusal and a `degraded` event are in the store and execs run again."""
    with tmpfs(tmp_path / "state", "6m") as state:
        rt = Runtime(RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False))
        await rt.start()
        try:
            sb = await rt.create()
            assert (await sb.exec("echo ok")).stdout == "ok\n"
            before = len(rt.store.events(sandbox_id=sb.id))
            filler = _fill(state)
            writer = rt.store.writer
            # the writer finds out at its next write; the first exec after the disk filled may be the one
            await sb.exec("true")
            await eventually(lambda: writer.failing is not None, "the store writer to report the full disk")
            r = await sb.exec("/bin/echo ran")
            assert "ran" not in r.stdout and r.exit_code != 0
            filler.unlink()
            await eventually(lambda: writer.failing is None and writer.pending == 0, "the writer to recover")
            evs = rt.store.events(sandbox_id=sb.id)
            assert len(evs) > before  # committed events stayed, queued ones were written after recovery
            degraded = [e for e in evs if e.action == "degraded"]
            assert degraded and "event store" in degraded[0].reason
            # refused before it ran: by the command check when the writer was failing then, or by the
            # exec watcher when a commit in between had cleared the failure (a full disk still takes
            # some small writes, so which one sees it first varies)
            refused = [e for e in evs if e.verdict == "deny" and (e.kind == "process"
                                                                  or (e.kind == "command" and e.action == "refused"))]
            assert refused and all("event store" in e.reason for e in refused), [(e.kind, e.reason) for e in evs]
            assert (await sb.exec("/bin/echo again")).stdout == "again\n"
        finally:
            await rt.close()


async def test_writer_behind_its_bound_refuses_new_execs(world, tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(writer_queue=30)))
    await rt.start()
    try:
        sb = await rt.create()
        gate = threading.Event()
        real = rt.store.record_many

        def slow(batch):
            gate.wait(60)  # a store that has stopped keeping up
            return real(batch)

        rt.store.record_many = slow
        r = await sb.exec("for i in $(seq 60); do /bin/true 2>/dev/null && echo ok || echo no; done")
        lines = r.stdout.split()
        assert "no" in lines, r.stdout  # refused once 30 events were waiting
        assert "ok" in lines[:5]  # ... not before
        gate.set()
        await eventually(lambda: rt.store.writer.pending == 0, "the writer to catch up")
        assert (await sb.exec("/bin/echo again")).stdout == "again\n"
        evs = rt.store.events(sandbox_id=sb.id)
        assert any(e.kind == "process" and e.verdict == "deny" and "behind" in e.reason for e in evs)
        assert any(e.action == "degraded" for e in evs)
    finally:
        rt.store.record_many = real
        await rt.close()


async def test_a_sandbox_filling_the_writer_backlog_is_refused_before_the_others(world, tmp_path):
    """Past half the backlog bound, the sandbox whose events are most of the backlog is refused; a
    quiet sandbox's execs still run until the whole bound is reached."""
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(writer_queue=200)))
    await rt.start()
    real = rt.store.record_many
    try:
        noisy, quiet = await rt.create(), await rt.create()
        gate = threading.Event()

        def slow(batch):
            gate.wait(60)  # a store that has stopped keeping up
            return real(batch)

        rt.store.record_many = slow
        r = await noisy.exec("for i in $(seq 150); do /bin/true 2>/dev/null && echo ok || echo no; done")
        assert "no" in r.stdout.split(), r.stdout  # refused with the backlog past half its bound
        waiting = rt.store.writer.pending
        assert 100 <= waiting < 200, waiting
        q = await quiet.exec("/bin/echo quiet-ran")
        assert q.stdout == "quiet-ran\n", (q.stdout, q.stderr, q.error)
        gate.set()
        await eventually(lambda: rt.store.writer.pending == 0, "the writer to catch up")
        denied = [e for e in rt.store.events(sandbox_id=noisy.id, kind="process") if e.verdict == "deny"]
        assert denied and "most of them this sandbox's" in denied[0].reason
        assert not [e for e in rt.store.events(sandbox_id=quiet.id, kind="process") if e.verdict == "deny"]
    finally:
        rt.store.record_many = real
        await rt.close()


FLOOD = """
import os, shutil, subprocess
arg = ["x" * 4000] * {args}
for i in range({n}):
    try:
        os.execv("/nonexistent/prog", ["/nonexistent/prog"] + arg)
    except OSError:
        pass
shutil.copy("/bin/sleep", "/tmp/xmrig")
subprocess.run(["/tmp/xmrig", "1"])
"""


@pytest.mark.parametrize("args", [50, 256], ids=["200KiB-argv", "1MiB-argv"])
async def test_failing_exec_flood_with_big_argv_does_not_grow_the_store_without_bound(world, tmp_path, args):
    """300 failing execs with 200 KiB or 1 MiB of argv each: every one is judged and accounted for
    (written, or counted in a `suppressed` event), few are written whole; the miner started right after,
    in the same window, is still refused and its finding's evidence kept whole."""
    n = 300
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(bytes=512 << 10)))
    await rt.start()
    try:
        sb = await rt.create()
        await sb.write_file("/workspace/flood.py", FLOOD.format(n=n, args=args))
        before = _store_bytes(tmp_path)
        r = await sb.exec("python3 /workspace/flood.py")
        evs = rt.store.events(sandbox_id=sb.id)
        grown = _store_bytes(tmp_path) - before
        # unbounded, every argv would have been written (n * args * 4000 bytes); bounded, about the budget
        # per window while the flood lasts (the loop's share for one sandbox can stretch it under load),
        # with the database's own overhead (its write-ahead log holds a copy)
        per_window = 4 * (r.duration + 2) * (512 << 10)
        assert grown < min(n * args * 4000 // 2, max(n * args * 4000 // 8, per_window)), (grown, r.duration)
        written = [e for e in evs if e.kind == "process" and e.exe == "/nonexistent/prog"]
        # an argv above the exec monitor's cap is refused unjudged, with a `degraded` note instead
        notes = [e for e in evs if e.action == "degraded"]
        suppressed = [e for e in evs if e.action == "suppressed"]
        counted = sum(e.data["kinds"].get("process:exec", 0) + e.data["kinds"].get("sandbox:degraded", 0)
                      for e in suppressed)
        assert len(written) + len(notes) + counted == n  # every exec was seen: written or counted
        if written and all(e.verdict != "deny" for e in written):  # allowed execs: low value past the budget
            assert suppressed and "suppressed" in suppressed[0].reason
            assert len(written) < n // 2
        # judging was not suppressed: the miner is refused, and the finding's evidence is whole
        miner = [e for e in evs if e.kind == "process" and e.exe == "/tmp/xmrig"]
        assert miner and miner[0].verdict == "deny" and miner[0].argv == ["/tmp/xmrig", "1"]
        f = [f for f in rt.store.findings(sandbox_id=sb.id) if f.rule_id == "miner-binary"]
        assert f and f[0].evidence == [miner[0].id] and f[0].step == r.step
    finally:
        await rt.close()


DNS_FLOOD = """
import socket, struct
name = b'\\x03pkg\\x07example\\x03com\\x00'
q = lambda i: struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0) + name + struct.pack('>HH', 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
for i in range({n}):
    s.sendto(q(i), ('203.0.113.53', 53))
s.settimeout(2)
codes = {{}}
try:
    while True:
        d = s.recv(512)
        codes[d[3] & 15] = codes.get(d[3] & 15, 0) + 1
except OSError:
    pass
print('CODES', codes)
"""

LOOKUPS = py("""
import socket, time
ok = 0
for i in range(20):
    try:
        socket.gethostbyname('pkg.example.com'); ok += 1
    except OSError as e:
        print('FAIL', e)
print('OK', ok)
""")


async def test_dns_flood_is_refused_above_the_cap_and_another_sandbox_keeps_resolving(world, tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(dns_qps=50)))
    await rt.start()
    try:
        noisy = await rt.create(allow("pkg.example.com"))
        quiet = await rt.create(allow("pkg.example.com"))
        await noisy.write_file("/workspace/flood.py", DNS_FLOOD.format(n=2000))
        flood, lookups = await asyncio.gather(noisy.exec("python3 /workspace/flood.py"), quiet.exec(LOOKUPS))
        codes = eval(flood.stdout.split("CODES", 1)[1])  # {rcode: count}
        assert codes.get(5, 0) > 0, flood.stdout  # REFUSED
        assert codes.get(0, 0) < 2000 // 2  # answered: 50 per second the flood lasted
        assert "OK 20" in lookups.stdout, lookups.stdout
        await rt.drain()
        limited = [e for e in rt.store.events(sandbox_id=noisy.id, kind="dns") if e.action == "rate_limited"]
        assert limited and limited[0].verdict == "deny" and "50" in limited[0].reason
        assert len(limited) < codes[5]  # one event per second, not one per refused query
        assert not [e for e in rt.store.events(sandbox_id=quiet.id, kind="dns") if e.action == "rate_limited"]
    finally:
        await rt.close()



# -- hashing executables: off the event loop, cached, budgeted --------------------------------------------
def _big_system_binary() -> str:
    from corral.monitor.masquerade import MAX_BYTES, _index

    sizes = [s for s in _index() if 256 << 10 <= s <= MAX_BYTES]
    return os.path.realpath(_index()[max(sizes)][0])


async def test_a_copy_of_a_system_binary_is_hashed_off_the_loop_once_per_file_version(tmp_path):
    from corral.monitor.masquerade import Masquerade

    m = Masquerade()
    src = _big_system_binary()
    copy = tmp_path / "kworker"
    shutil.copy(src, copy)
    c = m.check(str(copy), "kworker", "sb-1")
    assert c.pending and m.hashed_bytes == 0  # nothing is read on the event loop
    threads: list[str] = []
    real = m._digest

    def spy(*a, **kw):
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    m._digest = spy
    got = await m.resolve(str(copy), "kworker", "sb-1")
    assert got.source is not None and os.path.realpath(got.source) == src
    assert threads and all(t.startswith("corral-hash") for t in threads)
    spent = m.hashed_bytes
    again = m.check(str(copy), "kworker", "sb-1")  # cached by (dev, inode, mtime_ns, size)
    assert not again.pending and again.source == got.source and m.hashed_bytes == spent
    os.utime(copy, ns=(1, 1))  # a new version of the file (mtime) is hashed again
    assert m.check(str(copy), "kworker", "sb-1").pending


async def test_a_same_size_file_that_is_no_copy_costs_only_its_first_bytes(tmp_path):
    from corral.monitor.masquerade import HEAD, Masquerade

    m = Masquerade()
    src = _big_system_binary()
    await m.resolve(src, os.path.basename(src), "")  # system files are read once, for everyone
    fake = tmp_path / "big"
    fake.write_bytes(b"\x7fELF-not-the-same" + b"\0" * (os.stat(src).st_size - 17))
    spent = m.hashed_bytes
    assert (await m.resolve(str(fake), "big", "sb-1")).source is None
    assert m.hashed_bytes - spent == HEAD


async def test_hashing_over_the_sandbox_budget_refuses_the_exec_and_spares_other_sandboxes(tmp_path):
    from corral.monitor.masquerade import Masquerade

    src = _big_system_binary()
    size = os.stat(src).st_size
    m = Masquerade(budget_bytes=2 * size + (64 << 10), window_s=3600)
    results = []
    for i in range(4):  # a fresh copy each time: nothing cached helps
        p = tmp_path / f"copy{i}"
        shutil.copy(src, p)
        results.append(await m.resolve(str(p), f"copy{i}", "sb-noisy"))
    assert results[0].source and results[0].refused is None
    refused = [r for r in results if r.refused]
    assert refused and "hashing budget" in refused[0].refused and refused[0].source is None
    other = tmp_path / "other"
    shutil.copy(src, other)
    assert (await m.resolve(str(other), "other", "sb-quiet")).source  # another sandbox's budget is its own


async def test_hashing_a_big_copy_does_not_stall_another_sandbox(world, tmp_path):
    """While a neighbour's 57 MB-class copy is being hashed (held here until the quiet sandbox's command
    is done), the quiet sandbox's commands run: hashing is off the event loop."""
    from corral.monitor import masquerade

    big = _big_system_binary()
    name = os.path.basename(big)
    m = masquerade.DEFAULT
    gate = threading.Event()
    waits: list[list] = []  # [hashing thread, released by the test (not timed out)]
    real = m._digest

    def held(path, st, sandbox_id):
        if sandbox_id:  # the sandbox's copy, not the system program it is compared with
            w = [threading.current_thread().name, None]
            waits.append(w)
            w[1] = gate.wait(30)
        return real(path, st, sandbox_id)

    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False))
    await rt.start()
    m.clear()
    m._digest = held
    try:
        noisy, quiet = await rt.create(), await rt.create()
        copy = f"/tmp/{name}"  # under its own name (no finding), and not executable
        run = py(f"import os, shutil\nshutil.copyfile({big!r}, {copy!r})\n"
                 f"try:\n    os.execv({copy!r}, [{copy!r}])\nexcept OSError as e:\n    print('exec', e.errno)")
        flood = asyncio.create_task(noisy.exec(run))
        await eventually(lambda: waits, "the copy to be hashed")
        r = await quiet.exec("echo quiet")
        gate.set()
        assert r.stdout == "quiet\n"
        out = await flood
        assert "exec" in out.stdout  # refused: by a rule (kubectl is a container tool), or not executable
        assert waits and all(t.startswith("corral-hash") and released for t, released in waits), waits
    finally:
        gate.set()
        m._digest = real
        m.clear()
        await rt.close()


async def test_recording_budget_keeps_denials_and_evidence_and_summarises_the_rest_once_per_window():
    from corral.budget import Admit, RecordBudget, approx_size, compacted
    from corral.events import Event, EventKind, Verdict

    b = RecordBudget(Budgets(events=3, bytes=64 << 10, window_s=1.0))

    def ev(i: int, **kw) -> Event:
        return Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb", exe="/bin/x", argv=["x", str(i)], **kw)

    got = [b.admit(e, approx_size(e), now=10.0) for e in (ev(i) for i in range(10))]
    assert got[:3] == [Admit.RECORD] * 3 and set(got[3:]) == {Admit.DROP}
    assert b.admit(ev(10), 200, evidence=True, now=10.1) is Admit.RECORD  # a finding's evidence: whole
    assert b.admit(ev(11), 200, matched=True, now=10.1) is Admit.RECORD  # a rule match is kept
    denied = ev(12, verdict=Verdict.DENY)
    denied.argv = ["y" * 4000] * 64
    assert b.admit(denied, approx_size(denied), now=10.2) is Admit.COMPACT  # over the bytes cap: argv cut
    small = compacted(denied)
    assert sum(map(len, small.argv)) <= 4096 and small.data["argv_truncated"]["args"] == 64
    other = Event(kind=EventKind.PROCESS, action="exec", sandbox_id="other", exe="/bin/x")
    assert b.admit(other, 200, now=10.3) is Admit.RECORD  # another sandbox's budget is its own
    assert b.due(now=10.5) == []  # the window is not over
    (s,) = b.due(now=11.1)
    assert s.action == "suppressed" and s.sandbox_id == "sb" and s.data["events"] == 7
    assert s.data["kinds"] == {"process:exec": 7} and "7 events" in s.reason
    assert b.due(now=12.5) == []  # one summary per window, and idle windows are forgotten


# -- new connections: paced per sandbox ----------------------------------------------------------------
CONNECTS = """
import json, socket, time
ok, t = 0, []
for i in range({n}):
    s = socket.create_connection(("198.51.100.30", 7), timeout=30)
    s.sendall(b"x"); assert s.recv(1) == b"x"; s.close(); ok += 1
for i in range(50):  # within the sandbox: never paced
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
    c = socket.create_connection(l.getsockname()); c.close(); l.close()
print(json.dumps({{"ok": ok}}))
"""


async def test_connections_above_the_rate_wait_their_turn_and_none_is_refused(world, tmp_path):
    """A sandbox opening connections faster than its rate: after the burst each connect() is held until
    its turn (one `paced` event a second says so, attributed to the step), and every connection still
    succeeds; connections inside the sandbox are not counted; the other sandbox is never paced."""
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(connect_rate=10, connect_burst=4)))
    await rt.start()
    try:
        noisy = await rt.create(allow("198.51.100.0/24"))
        quiet = await rt.create(allow("198.51.100.0/24"))
        await noisy.write_file("/workspace/c.py", CONNECTS.format(n=24))
        await quiet.write_file("/workspace/c.py", CONNECTS.format(n=3))
        r, q = await asyncio.gather(noisy.exec("python3 /workspace/c.py", timeout=60),
                                    quiet.exec("python3 /workspace/c.py", timeout=60))
        assert '"ok": 24' in r.stdout, (r.stdout, r.stderr)
        assert '"ok": 3' in q.stdout, (q.stdout, q.stderr)
        await rt.drain()
        paced = [e for e in rt.store.events(sandbox_id=noisy.id) if e.action == "paced"]
        assert paced, "no paced event"
        assert paced[0].step == r.step and paced[0].pid and paced[0].data["rate"] == 10
        assert paced[0].data["wait_ms"] > 0 and "10 new connections a second" in paced[0].reason
        # 24 gateway connections against a burst of 4: most waited; the 50 loopback ones did not count
        assert max(e.data["paced_total"] for e in paced) <= 20
        assert not [e for e in rt.store.events(sandbox_id=quiet.id) if e.action == "paced"]
        conns = [e for e in rt.store.events(sandbox_id=noisy.id, kind="connect") if e.action == "connect"]
        assert len(conns) == 24 and all(e.verdict == "allow" and e.step == r.step for e in conns)
    finally:
        await rt.close()


async def test_loop_share_divides_the_loop_under_contention_and_never_idles_it(world, tmp_path):
    """A sandbox whose execs take more than its share of the event loop is held back (its calls wait in
    the kernel) only while another sandbox's calls are being judged too; alone it may use the whole loop."""
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                               budgets=Budgets(loop_share=0.01)))
    await rt.start()
    try:
        noisy, quiet = await rt.create(), await rt.create()
        await asyncio.sleep(2 * 0.1)  # any other sandbox's last judged call is older than a window
        # execs with a big argv: each costs the loop a read of its arguments and a judgement
        flood = "a=$(head -c 60000 /dev/zero | tr '\\\\0' x); for i in $(seq 150); do /bin/true $a; done; echo done"
        r = await noisy.exec(flood, timeout=120)
        assert r.stdout.endswith("done\n"), r.stderr
        assert noisy._execwatch.paused == 0  # alone: never held back, however much of the loop it took
        both = await asyncio.gather(noisy.exec(flood, timeout=120),
                                    quiet.exec("for i in $(seq 300); do /bin/true; done; echo done", timeout=120))
        assert all(x.stdout.endswith("done\n") for x in both), [x.stderr for x in both]
        assert noisy._execwatch.paused > 0  # with a neighbour asking too, its calls waited their turn
    finally:
        await rt.close()
