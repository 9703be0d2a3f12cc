"""The deployment seam: the agent's protocol checked on receipt, and reset() as a swap to a spare
deployment launched ahead, with nothing of the old episode left to run in the new one."""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest

from corral import Runtime, RuntimeConfig, SandboxConfig
from corral.sandbox.channel import AgentChannel
from corral.sandbox.protocol import ProtocolError, decode
from tests.conftest import eventually

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("raw", [
    b"not json", b"[1, 2]", b'{"op": "ready"}', b'{"op": "ready", "pid": true}', b'{"op": "rm -rf"}',
    b'{"op": "out", "id": "c1", "fd": 3, "data": ""}', b'{"op": "exit", "id": "c1"}',
    b'{"op": "exit", "id": "c1", "code": 0, "dropped": "lots"}', b'{"op": "error", "error": "x"}',
])
async def test_protocol_refuses_what_is_no_reply(raw):
    with pytest.raises(ProtocolError):
        decode(raw)


async def test_protocol_takes_the_agents_replies():
    assert decode(b'{"op":"exit","id":"c1","code":null,"error":"gone","dropped":{"1":3}}')["error"] == "gone"
    assert decode(b'{"op":"out","id":"c2","fd":2,"data":"aGk="}')["fd"] == 2
    assert decode(b'{"op":"ready","pid":1}')["pid"] == 1


async def test_a_channel_whose_agent_breaks_the_protocol_is_gone(tmp_path):
    """A reply that is not one is not guessed at: the channel closes, says why, and closes the
    descriptors that came with it (the Sandbox then ends the episode: the agent is lost)."""
    host, child = AgentChannel.pair()
    got, gone = [], []
    ch = AgentChannel(host, lambda m, pid, fds: got.append((m, pid, fds)), gone.append, "test")
    child.send(b'{"op":"spawned","id":"c1"}')
    await eventually(lambda: got, "the good reply")
    assert got[0][0] == {"op": "spawned", "id": "c1"} and got[0][1] == os.getpid()  # the kernel's pid
    n0 = len(os.listdir("/proc/self/fd"))
    leak = os.open(tmp_path, os.O_RDONLY)
    child.sendmsg([b'{"op":"exec","id":"c1","cmd":"id"}'],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [leak]))])
    os.close(leak)
    await eventually(lambda: gone, "the channel to give up")
    assert "unknown message op 'exec'" in gone[0] and not ch.open and len(got) == 1
    # the host's end is closed, and the descriptor that rode along was closed, not kept
    assert len(os.listdir("/proc/self/fd")) == n0 - 1
    child.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def _spare_ready(sb) -> None:
    await eventually(lambda: sb._spare is not None, "the spare deployment to be ready", timeout=30)


async def test_reset_swaps_in_a_spare_and_nothing_of_the_old_episode_survives(sb_factory, runtime):
    sb = await sb_factory()
    await sb.reset()  # the first: a relaunch, after which a spare is launched ahead
    await _spare_ready(sb)
    old_cgroup = sb.cgroup.dirs[sb.cgroup.h.tracking]
    spare_cgroup = sb._spare.cgroup.dirs[sb._spare.cgroup.h.tracking]
    assert spare_cgroup != old_cgroup and spare_cgroup.name.startswith(old_cgroup.name + "+")
    # the agent's attempts to outlive its episode: a daemon, a session's job, a fork loop, files
    r = await sb.exec("setsid sh -c 'while :; do sleep 1; done' >/dev/null 2>&1 & "
                      "sh -c 'while :; do sleep 0.05 & done' >/dev/null 2>&1 & "
                      "echo secret > /workspace/x; echo t > /tmp/y; echo ok")
    assert r.stdout == "ok\n"
    await sb.create_session("s")
    await sb.run_in_session("s", "sleep 600 &")
    old = [p for p in sb.cgroup.pids() if p not in (sb.agent_hostpid, sb._dep.proc.pid)]
    assert len(old) >= 3
    step_before = sb.step
    await sb.reset()
    await runtime.drain()
    resets = [e for e in runtime.store.events(sandbox_id=sb.id) if e.action == "reset"]
    assert resets[-1].data["spare"] is True and resets[0].data["spare"] is False
    assert not [p for p in old if _alive(p)], "a process of the old episode outlived the reset"
    r = await sb.exec("ls /workspace /tmp; echo $$")
    assert r.ok and "x" not in r.stdout.split() and "y" not in r.stdout.split(), r.stdout
    assert r.step == step_before + 1  # steps count on across resets
    assert sb.cgroup.dirs[sb.cgroup.h.tracking] == spare_cgroup and sb.sessions() == []
    assert set(sb.cgroup.group(p) for p in sb.cgroup.pids(step=r.step)) <= {("step", r.step)}
    await eventually(lambda: not old_cgroup.exists(), "the old deployment's cgroup to be removed")
    await _spare_ready(sb)  # and the next one is on its way
    nxt = sb._spare.cgroup.dirs[sb._spare.cgroup.h.tracking]
    await sb.close()
    assert not nxt.exists() and not spare_cgroup.exists(), "a spare's cgroup outlived the sandbox"


async def test_a_lost_spare_means_a_relaunch_not_a_lost_episode(sb_factory, runtime):
    sb = await sb_factory()
    await sb.reset()
    await _spare_ready(sb)
    os.kill(sb._spare.agent_pid, signal.SIGKILL)
    await eventually(lambda: sb._spare is None, "the spare's loss to be noticed")
    assert sb.terminated is None and (await sb.exec("echo on")).stdout == "on\n"
    await sb.reset()
    await runtime.drain()
    resets = [e for e in runtime.store.events(sandbox_id=sb.id) if e.action == "reset"]
    assert resets[-1].data["spare"] is False and (await sb.exec("echo again")).stdout == "again\n"


async def test_no_spare_when_the_runtime_says_so(world, tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False, reset_spare=False))
    await rt.start()
    try:
        sb = await rt.create()
        await sb.reset()
        await asyncio.sleep(0.5)
        assert sb._spare is None and sb._spare_task is None
        await sb.close()
    finally:
        await rt.close()


async def test_a_sandbox_named_like_a_spare_gets_a_cgroup_of_its_own(sb_factory):
    """Python callers may choose any id: one that reads like another sandbox's spare cgroup must not
    share it (it would share its limits, its freezer and its kills)."""
    a = await sb_factory(sandbox_id="twin")
    await a.reset()
    await _spare_ready(a)
    b = await sb_factory(SandboxConfig(), sandbox_id="twin+1")
    dirs = {x.cgroup.dirs[x.cgroup.h.tracking] for x in (a, b)} | {a._spare.cgroup.dirs[a._spare.cgroup.h.tracking]}
    assert len(dirs) == 3
    await b.exec("true")
    await a.reset()  # kills the old deployment's cgroup: b lives on
    assert (await b.exec("echo alive")).stdout == "alive\n"
