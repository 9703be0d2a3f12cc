"""Commands, streaming, sessions, files, reset and close behave as a user expects."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from corral import SandboxClosed, SessionError
from corral.sandbox import ExecResult, OutputChunk

pytestmark = pytest.mark.asyncio


async def test_exec_result_fields(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert r.duration > 0 and not r.timed_out and not r.truncated
    assert r.step == sb.step


async def test_exec_env_cwd_stdin(sb_factory):
    sb = await sb_factory()
    await sb.exec("mkdir -p /workspace/sub")
    r = await sb.exec("pwd; echo $FOO; cat", env={"FOO": "bar"}, cwd="/workspace/sub", stdin=b"from stdin")
    assert r.stdout == "/workspace/sub\nbar\nfrom stdin"
    big = os.urandom(300_000)
    r = await sb.exec("sha256sum", stdin=big)
    import hashlib

    assert r.stdout.split()[0] == hashlib.sha256(big).hexdigest()


async def test_streaming_output(sb_factory):
    sb = await sb_factory()
    chunks = []
    async for item in sb.stream("for i in 1 2 3; do echo line$i; sleep 0.05; done"):
        chunks.append(item)
    assert isinstance(chunks[-1], ExecResult)
    outs = [c for c in chunks if isinstance(c, OutputChunk)]
    assert len(outs) >= 2  # arrived piecewise, not at the end
    assert b"".join(c.data for c in outs) == b"line1\nline2\nline3\n"


async def test_session_keeps_cwd_env_and_functions(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    await s.run("cd /tmp && export GREETING=hi && f() { echo func-$1; }")
    r = await s.run("pwd; echo $GREETING; f x")
    assert r.stdout == "/tmp\nhi\nfunc-x\n"
    r = await s.run("false")
    assert r.exit_code == 1
    r = await s.run("echo no newline at end | tr -d '\\n'")
    assert r.stdout == "no newline at end"


async def test_session_survives_syntax_error_and_stdin_readers(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    r = await s.run("echo 'unterminated")
    assert r.exit_code != 0 and r.error is None
    r = await s.run("cat; echo after-cat")  # must not eat the session's own input
    assert r.stdout == "after-cat\n"
    assert (await s.run("echo alive")).stdout == "alive\n"


async def test_session_timeout_kills_command_keeps_shell(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    await s.run("export KEEP=1")
    r = await s.run("sleep 300", timeout=0.5)
    assert r.timed_out
    assert (await s.run("echo $KEEP")).stdout == "1\n"


async def test_session_exit_and_errors(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    r = await s.run("exit 3")
    assert r.exit_code is None and r.error
    await asyncio.sleep(0.1)
    with pytest.raises(SessionError):
        await sb.run_in_session("main", "true")
    with pytest.raises(SessionError):
        await sb.run_in_session("nope", "true")


async def test_many_sessions_and_parallel_execs(sb_factory):
    sb = await sb_factory()
    await sb.create_session("a")
    await sb.create_session("b")
    ra, rb, rc = await asyncio.gather(
        sb.run_in_session("a", "sleep 0.2; echo a"),
        sb.run_in_session("b", "echo b"),
        sb.exec("echo c"),
    )
    assert (ra.stdout, rb.stdout, rc.stdout) == ("a\n", "b\n", "c\n")


async def test_files_roundtrip(sb_factory, tmp_path):
    sb = await sb_factory()
    await sb.write_file("/workspace/dir/a.txt", "hello")
    assert await sb.read_file("/workspace/dir/a.txt") == b"hello"
    blob = os.urandom(2_000_000)
    await sb.write_file("/tmp/blob", blob)
    assert await sb.read_file("/tmp/blob") == blob
    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "m.py").write_text("x = 1\n")
    (src / "run.sh").write_text("echo run\n")
    await sb.upload(src, "/workspace/proj")
    assert (await sb.exec("cat /workspace/proj/pkg/m.py; sh /workspace/proj/run.sh")).stdout == "x = 1\nrun\n"
    await sb.exec("echo new > /workspace/proj/new.txt; ln -s /etc/passwd /workspace/proj/link")
    out = tmp_path / "out"
    skipped = await sb.download("/workspace/proj", out)
    assert skipped == ["./link"]  # a symlink to the host's /etc/passwd is never extracted
    assert not (out / "link").exists()
    assert (out / "new.txt").read_text() == "new\n"
    assert (out / "pkg" / "m.py").read_text() == "x = 1\n"
    from corral import FileAccessError

    with pytest.raises(FileAccessError):
        await sb.read_file("/workspace/missing")


async def test_workspace_template_and_reset(sb_factory, tmp_path):
    from corral import SandboxConfig

    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "task.txt").write_text("solve me\n")
    sb = await sb_factory(SandboxConfig(workspace_template=tpl))
    assert (await sb.exec("cat /workspace/task.txt")).stdout == "solve me\n"
    await sb.exec("echo junk > /workspace/junk; echo t > /tmp/t; rm /workspace/task.txt")
    await sb.create_session("main")
    await sb.exec("sleep 1000 > /dev/null 2>&1 &")
    bg_pids = await _wait_for_comm(sb, "sleep", 1)
    await sb.reset()
    r = await sb.exec("ls -A /workspace; ls -A /tmp")
    assert r.stdout == "task.txt\n"
    assert sb.sessions() == []
    for pid in bg_pids:
        assert not _alive(pid)


async def test_close_kills_background_processes(sb_factory, runtime):
    sb = await sb_factory()
    await sb.exec("setsid sleep 1000 > /dev/null 2>&1 & nohup sleep 1001 >/dev/null 2>&1 &")
    pids = await _wait_for_comm(sb, "sleep", 2)
    await sb.close()
    for pid in pids:
        assert not _alive(pid)
    with pytest.raises(SandboxClosed):
        await sb.exec("true")
    events = runtime.store.events(sandbox_id=sb.id, kind="sandbox")
    assert [e.action for e in events][-1] == "closed"


async def test_many_sandboxes_at_once(sb_factory):
    sbs = await asyncio.gather(*(sb_factory() for _ in range(12)))
    results = await asyncio.gather(*(sb.exec(f"echo {i}") for i, sb in enumerate(sbs)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert len({sb.net.ip for sb in sbs}) == 12


async def test_async_with_and_sync_wrapper(runtime):
    from corral import Sandbox

    async with Sandbox(runtime=runtime) as sb:
        assert (await sb.exec("echo ctx")).stdout == "ctx\n"
    assert sb.closed


async def _wait_for_comm(sb, comm: str, count: int) -> list[int]:
    for _ in range(1000):
        pids = []
        for p in sb.pids():
            try:
                with open(f"/proc/{p}/comm") as f:
                    if f.read().strip() == comm:
                        pids.append(p)
            except FileNotFoundError:
                continue
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} {comm} processes, found {pids}")


def _alive(pid: int) -> bool:
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True
