"""Runaway commands are contained with a clear result, and the sandbox stays usable."""

from __future__ import annotations

import asyncio

import pytest

from corral import Limits, SandboxConfig
from tests.conftest import py

pytestmark = pytest.mark.asyncio


def limits(**kw) -> SandboxConfig:
    return SandboxConfig(limits=Limits(**kw))


async def test_fork_bomb_is_contained(sb_factory, runtime):
    sb = await sb_factory(limits(pids=64))
    r = await sb.exec(":(){ :|:& };:", timeout=3)
    assert r.pids_limit_hit
    assert r.timed_out or r.exit_code is not None
    assert len(sb.pids()) < 20  # the bomb's processes were killed with its step
    assert (await sb.exec("echo still usable")).stdout == "still usable\n"
    assert runtime.store.events(sandbox_id=sb.id, kind="command")[-1].data["exit_code"] == 0


async def test_fork_bomb_in_a_session_is_its_own_steps_alone(sb_factory):
    """A session's shell keeps its cgroup from command to command (renamed to each step), so that
    cgroup's count of refused forks carries the bomb: the commands after it must not be told they hit
    the limit too, nor have what they start in the background killed for it."""
    sb = await sb_factory(limits(pids=24))
    await sb.create_session("s")
    # in a child shell: bash itself exits when a fork of its own fails
    r = await sb.run_in_session("s", "bash -c 'for i in $(seq 60); do sleep 5 & done; wait'", timeout=10)
    assert r.pids_limit_hit and "process limit of 24" in r.error
    for _ in range(200):  # the bomb's last processes reaped: a fork refused now would be the next step's own
        if sb.cgroup.task_count() <= 3:
            break
        await asyncio.sleep(0.02)
    r = await sb.run_in_session("s", "sleep 30 & echo $!")
    assert not r.pids_limit_hit and r.error is None and r.ok
    background = int(r.stdout)
    r = await sb.run_in_session("s", f"kill -0 {background} && echo alive")
    assert r.stdout == "alive\n" and not r.pids_limit_hit


async def test_memory_hog_is_oom_killed(sb_factory):
    sb = await sb_factory(limits(memory_mb=64))
    r = await sb.exec(py("b = bytearray(400 * 1024 * 1024)\nprint('allocated')"))
    assert r.oom_killed
    assert r.exit_code == -9
    assert "memory limit of 64 MiB" in r.error
    assert (await sb.exec("echo ok")).ok


async def test_output_flood_is_truncated(sb_factory):
    sb = await sb_factory(limits(output_bytes=100_000))
    r = await sb.exec("yes corral | head -c 20000000; echo done >&2")
    assert r.stdout_truncated and not r.stderr_truncated
    assert len(r.stdout_bytes) == 100_000
    assert r.stderr == "done\n" and r.exit_code == 0


async def test_disk_fill_hits_workspace_limit(sb_factory, runtime):
    sb = await sb_factory(limits(workspace_mb=8))
    r = await sb.exec("dd if=/dev/zero of=/workspace/big bs=1M count=64")
    assert r.exit_code != 0
    assert "No space left on device" in r.stderr
    assert (await sb.exec("rm /workspace/big && echo x > /workspace/small && cat /workspace/small")).stdout == "x\n"
    starts = [e for e in runtime.store.events(sandbox_id=sb.id, kind="command") if e.action == "start"]
    assert any("dd if=/dev/zero" in e.command for e in starts)  # nothing lost


async def test_tmp_is_size_limited_too(sb_factory):
    sb = await sb_factory(limits(tmp_mb=4))
    r = await sb.exec("dd if=/dev/zero of=/tmp/big bs=1M count=32")
    assert "No space left on device" in r.stderr


async def test_timeout_kills_whole_tree_including_background(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("sleep 1000 & (setsid sleep 1001 &) ; sleep 1002", timeout=0.5)
    assert r.timed_out and "whole process tree was killed" in r.error
    leftover = sb.cgroup.pids(step=r.step) if sb.cgroup else []
    assert leftover == []
    r2 = await sb.exec("ps -eo comm | grep -c sleep || true")
    assert r2.stdout.strip() == "0"


async def test_cpu_quota_written_to_cgroup(sb_factory):
    sb = await sb_factory(limits(cpus=0.5, memory_mb=100, pids=50))
    if sb.cgroup is None:
        pytest.skip("no cgroups on this machine (see corral doctor)")
    cg = sb.cgroup
    if cg.h.version == 1:
        assert (cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text()) == 100 << 20
        assert (cg.dirs["pids"] / "pids.max").read_text().strip() == "50"
    # and corral's cgroups sit beneath the cgroup this process runs in
    with open("/proc/self/cgroup") as f:
        own = f.read().splitlines()
    for ctrl, d in cg.dirs.items():
        line = next(x for x in own if ctrl in x.split(":")[1].split(",") or (ctrl == "unified" and x.startswith("0::")))
        assert line.split(":", 2)[2].rstrip("/") in str(d)


async def test_a_dead_runtimes_cgroups_are_cleared_when_its_instance_is_taken_again():
    """A runtime that crashed leaves corral-<instance> behind (until `corral gc`). The next runtime to
    take that instance clears it: no stale sandbox cgroup, frozen state or process carries over.
    The instance name here is not hex, so gc (run by other tests) never takes it for a runtime's."""
    import os
    import subprocess
    from pathlib import Path

    from corral.sandbox.cgroups import InstanceCgroups, discover

    h = discover("z" + os.urandom(3).hex())  # "z": never a runtime's hex instance, so gc leaves it
    if h.version is None:
        pytest.skip(h.problem or "no usable cgroups")
    dead = InstanceCgroups(h)
    stale = dead.sandbox("sb-stale", Limits())
    proc = subprocess.Popen(["sleep", "300"])
    try:
        for procs in stale.join_files():  # in every hierarchy, as a sandbox's processes are
            Path(procs).write_text(str(proc.pid))
        stale.move(proc.pid, 1)
        stale.quarantine(True)
        assert stale.pids() == [proc.pid]
        if h.version == 1:
            assert (stale.dirs["freezer"] / "freezer.state").read_text().strip() in ("FREEZING", "FROZEN")

        fresh = InstanceCgroups(h)  # what Runtime.start does once it holds the instance's lock
        assert proc.wait(timeout=10) == -9  # corral started it, so corral ends it, by pid
        assert all(root.is_dir() and not any(p.is_dir() for p in root.iterdir()) for root in h.roots.values())
        fresh.remove()
        assert not any(root.exists() for root in h.roots.values())
    finally:
        if proc.poll() is None:
            proc.kill()
        InstanceCgroups(h).remove()
