"""The native agent (agent.c) against agent.py: the same scenario through both gives the same results,
and the native one is what sandboxes run by default. The rest of the suite runs on the native agent;
this file is where agent.py, the fallback, is still driven through everything a sandbox does."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from corral import Runtime, RuntimeConfig, SandboxConfig
from corral.errors import IsolationUnavailable
from corral.sandbox import native

pytestmark = pytest.mark.asyncio


async def _run_with(agent: str, state: Path) -> list[object]:
    rt = Runtime(RuntimeConfig(state_dir=state, system_dns=False, agent=agent, reset_spare=False))
    await rt.start()
    try:
        return await _scenario(rt)
    finally:
        await rt.close()


async def _scenario(rt: Runtime) -> list[object]:
    """Everything the agent does for a sandbox, as plain values to compare."""
    sb = await rt.create(SandboxConfig(env={"BASE": "b"}))
    out: list[object] = []

    def res(r):
        return (r.exit_code, r.stdout_bytes, r.stderr_bytes, r.stdout_truncated, r.error)

    try:
        out.append(res(await sb.exec("echo hi; echo err >&2; exit 3")))
        out.append(res(await sb.exec("cat; printf 'é\\n'", stdin=b"from stdin\n")))
        out.append(res(await sb.exec("echo $BASE $X; pwd", env={"X": "x y"}, cwd="/tmp")))
        out.append(res(await sb.exec("pwd", cwd="/nonexistent")))
        out.append(res(await sb.exec("head -c 5000 /dev/zero | tr '\\0' a", max_output=100)))
        out.append(res(await sb.exec("kill -TERM $$")))
        # a background job that holds the output pipe: the command is reported once it exits
        out.append(res(await sb.exec("(sleep 5; echo late) & echo now")))
        await sb.create_session("main", env={"S": "s"})
        for cmd in ["echo $S; cd /tmp", "pwd; echo e >&2; false", "x=1; echo \"'$x'\"", "cat",
                    "printf 'no newline'", "echo $((1+1)) )", "f() { echo fn; }; f"]:
            out.append(res(await sb.run_in_session("main", cmd)))
        out.append(res(await sb.run_in_session("main", "echo $Y", env={"Y": "y"}, cwd="/workspace")))
        out.append(res(await sb.run_in_session("main", "exit 4")))
        await sb.write_file("/workspace/deep/er/file.txt", b"\x00\xffdata" * 1000, mode=0o640)
        out.append(await sb.read_file("/workspace/deep/er/file.txt") == b"\x00\xffdata" * 1000)
        out.append(res(await sb.exec("stat -c %a /workspace/deep/er/file.txt; ln -s /etc /workspace/link")))
        try:
            await sb.write_file("/workspace/link/evil", b"x")
            out.append("written through a link")
        except Exception as e:  # the message is what is compared
            out.append(str(e).split(": ", 1)[-1])
        out.append(res(await sb.exec("ls /workspace/link/evil 2>&1; ls /workspace/link/ | grep -c corral-put")))
        out.append(res(await sb.exec("tr -d x", stdin=b"x" * 300_000)))  # more than a pipe holds
    finally:
        await sb.close()
    return out


async def test_native_and_python_agents_do_the_same(tmp_path):
    got = await _run_with("native", tmp_path / "native")
    want = await _run_with("python", tmp_path / "python")
    assert got == want
    # and what both do is right (two agents broken the same way would agree)
    assert got[0] == (3, b"hi\n", b"err\n", False, None)
    assert got[1][1] == "from stdin\né\n".encode()
    assert got[2][1] == b"b x y\n/tmp\n"
    assert got[3][0] == 126 and b"cannot cd to /nonexistent" in got[3][2]
    assert got[4][1] == b"a" * 100 and got[4][3]
    assert got[5][0] == -15
    assert got[6][1] == b"now\n"
    assert got[7][1] == b"s\n" and got[8] == (1, b"/tmp\n", b"e\n", False, None)
    assert got[9][1] == b"'1'\n" and got[10][0] == 0 and got[11][1] == b"no newline"
    assert got[12][0] == 2 and got[13][1] == b"fn\n" and got[14][1] == b"y\n"
    assert got[15][0] is None and got[16] is True and got[17][1].startswith(b"640\n")
    assert "symbolic link" in got[18] and got[19][1].endswith(b"0\n") and got[20][1] == b""


async def test_the_native_agent_is_what_sandboxes_run(runtime):
    sb = await runtime.create()
    try:
        r = await sb.exec("tr '\\0' ' ' < /proc/1/cmdline; echo; ls -l /proc/1/exe 2>&1 | grep -c denied")
        assert r.stdout.splitlines()[0].strip() == "/.corral-agent", r.stdout
        assert r.stdout.splitlines()[1] == "1"  # not dumpable: /proc/1/exe cannot be read
    finally:
        await sb.close()


async def test_native_agent_builds_once_per_source(tmp_path, monkeypatch):
    a = native.build(tmp_path)
    assert a.name.startswith("agent-") and os.access(a, os.X_OK) and a.stat().st_mode & 0o005 == 0o005
    assert native.build(tmp_path) == a and len(list(tmp_path.iterdir())) == 1
    # another source is another binary, never the stale one
    src = tmp_path / "agent.c"
    src.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", src)
    assert native.build(tmp_path) != a


async def test_without_a_compiler_native_is_refused_and_auto_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    native.native_agent.cache_clear()
    try:
        with pytest.raises(IsolationUnavailable, match="no C compiler"):
            native.native_agent("native")
        assert native.native_agent("auto") is None and native.native_agent("python") is None
    finally:
        native.native_agent.cache_clear()
    assert Path(native.SOURCE).exists()


async def test_an_agent_binary_others_could_have_written_is_never_run(tmp_path):
    """The agent is every sandbox's PID 1 and holds corral's exec listener: a cached binary, or its folder,
    writable by anyone but corral's user is refused (fail closed), not bound into sandboxes."""
    good = native.build(tmp_path)
    good.chmod(0o777)
    with pytest.raises(IsolationUnavailable, match="only its own user can write"):
        native.build(tmp_path)
    good.chmod(0o755)
    tmp_path.chmod(0o777)
    try:
        with pytest.raises(IsolationUnavailable, match="only its own user can write"):
            native.build(tmp_path)
    finally:
        tmp_path.chmod(0o755)
    assert native.build(tmp_path) == good


@pytest.mark.parametrize("agent", ["native", "python"])
@pytest.mark.parametrize("can_join", [True, False])
async def test_every_command_runs_in_its_steps_cgroup_placed_by_itself_or_by_pid(tmp_path, monkeypatch, agent,
                                                                                  can_join):
    """Each command's process moves itself into its step's cgroup, through a descriptor corral sends with
    the request (a staged child's, an exec's own, a session's shell): no move by pid, the slow path (a
    v1 migration by pid waits out an RCU grace period). Where corral cannot open that descriptor, the
    move by pid still puts every process where it belongs before it runs. Seen from inside, through the
    kernel's own file."""
    from corral.sandbox.cgroups import SandboxCgroup

    moves: list[int] = []
    real_move, real_to_session = SandboxCgroup.move, SandboxCgroup.move_to_session
    monkeypatch.setattr(SandboxCgroup, "move", lambda self, pid, step: (moves.append(step), real_move(self, pid, step)))
    monkeypatch.setattr(SandboxCgroup, "move_to_session",
                        lambda self, pid, n: (moves.append(-n), real_to_session(self, pid, n)))
    if not can_join:
        def refuse(self, step):
            raise OSError("refused for the test")
        monkeypatch.setattr(SandboxCgroup, "join_fd", refuse)
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, system_dns=False, agent=agent, reset_spare=False))
    await rt.start()
    try:
        if rt.cgroups is None:
            pytest.skip("no usable cgroups here")
        sb = await rt.create(SandboxConfig())
        for i in range(4):
            r = await sb.exec("cat /proc/self/cgroup")  # right after create, then with a staged child
            assert r.exit_code == 0 and f"/step-{r.step}\n" in r.stdout, (i, r.stdout)
            if i == 1:
                await asyncio.sleep(0.2)
        await sb.create_session("s")  # its shell joins its session's cgroup the same way
        r = await sb.run_in_session("s", "cat /proc/self/cgroup")
        assert r.exit_code == 0 and f"/step-{r.step}\n" in r.stdout, r.stdout
        user_moves = [s for s in moves if s >= 1 or s < 0]
        assert (user_moves == []) if can_join else (len(user_moves) >= 5 and min(user_moves) < 0), moves
    finally:
        await rt.close()
