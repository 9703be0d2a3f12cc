"""The boundary between the agent's commands and corral's own processes, attacked from inside a real
sandbox: corral's agent, its staged children and the session plumbing cannot be read, written,
signalled or stopped; kill_all() leaves nothing the agent started; a lost agent ends the episode
with its reason; and every file change is judged, corral's own known positively."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from corral import EpisodeEnded, SandboxConfig
from corral.errors import FileAccessError
from corral.sandbox.lifeline import AGENT_LOST
from tests.conftest import eventually

pytestmark = pytest.mark.asyncio

# Run inside the sandbox by a step: try every way into the /proc entries of corral's processes
# (the agent is PID 1; a staged child is a fork of it, waiting for the next step).
PROBE = r'''
import ctypes, errno, json, os, time
def attempt(fn):
    try:
        fn()
        return "ALLOWED"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def corral_pids():
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) not in (1, os.getpid()):
            try:
                if b"/.corral-agent" in open(f"/proc/{p}/cmdline", "rb").read():
                    out.append(int(p))
            except OSError:
                pass
    return out
for _ in range(400):  # the next step's staged child is forked as this step starts
    staged = corral_pids()
    if staged:
        break
    time.sleep(0.025)
libc = ctypes.CDLL(None, use_errno=True)
report = {}
for pid in [1] + staged:
    r = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = [str(n) for n in range(12)]
    for fd in fds:
        r[f"open fd/{fd}"] = attempt(lambda: os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)))
        r[f"open fd/{fd} ro"] = attempt(lambda: os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)))
        r[f"readlink fd/{fd}"] = attempt(lambda: os.readlink(f"/proc/{pid}/fd/{fd}"))
    r["mem"] = attempt(lambda: os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR)))
    r["mem ro"] = attempt(lambda: os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY)))
    r["environ"] = attempt(lambda: os.close(os.open(f"/proc/{pid}/environ", os.O_RDONLY)))
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open: allowed, it only names the process
    for fd in fds:  # pidfd_getfd: take the descriptor itself (the agent's socket among them)
        got = libc.syscall(438, pidfd, int(fd), 0)
        r[f"pidfd_getfd {fd}"] = "ALLOWED" if got >= 0 else errno.errorcode[ctypes.get_errno()]
    report[pid] = r
print(json.dumps(report))
'''


async def _script(sb, name: str, code: str) -> str:
    """Put an attack script in the sandbox as corral's own file: the rules judge command lines, and
    these tests are about what the kernel and corral's plumbing allow whatever the rules say."""
    await sb.write_file(f"/tmp/attack/{name}", code)
    return f"python3 /tmp/attack/{name}"


async def test_corral_processes_cannot_be_opened_through_proc(sb_factory):
    sb = await sb_factory()
    r = await sb.exec(await _script(sb, "probe.py", PROBE))
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert "1" in report and len(report) >= 2, report  # the agent and at least one staged child
    for pid, attempts in report.items():
        assert any(k.startswith("open fd/") for k in attempts)
        allowed = [k for k, v in attempts.items() if v == "ALLOWED"]
        assert allowed == [], f"pid {pid}: {allowed}"
        assert attempts["mem"] == "EACCES" and attempts["environ"] == "EACCES"
    # the staged child the probe saw was not harmed: the next step runs in it as usual
    assert (await sb.exec("echo next")).stdout == "next\n"


SIGNALS = r"""
import os, signal
agent = os.getpid()  # corral's agent: the ancestor that runs its code (it forked this step's command)
while b"/.corral-agent" not in open(f"/proc/{agent}/cmdline", "rb").read():
    agent = int(open(f"/proc/{agent}/stat").read().rsplit(")", 1)[1].split()[1])
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGSEGV):
    os.kill(agent, sig)  # delivered without error, and ignored: it is init, with no handler for them
print("sent", agent)
"""


async def test_agent_ignores_kill_and_stop_from_inside(sb_factory, runtime):
    sb = await sb_factory()
    agent = sb.agent_hostpid
    r = await sb.exec(await _script(sb, "signals.py", SIGNALS))
    assert r.stdout == "sent 1\n", (r.stdout, r.stderr)
    assert (await sb.exec("echo alive", timeout=10)).stdout == "alive\n"
    assert sb.agent_hostpid == agent and sb.terminated is None
    await asyncio.sleep(1.5)  # past a sampler tick, which would see a stopped agent
    assert sb.terminated is None
    assert not [e for e in runtime.store.events(sandbox_id=sb.id, kind="sandbox") if e.action == "degraded"]


ZOMBIES = r"""
import os
print(sum(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
          for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")))
"""


async def test_agent_reaps_the_sandboxs_orphans(sb_factory):
    sb = await sb_factory()
    # orphans re-parent to the namespace's init, corral's agent, which must collect them when they exit
    r = await sb.exec("for i in $(seq 20); do (sleep 0.2 >/dev/null 2>&1 &); done; echo started")
    assert r.stdout == "started\n"
    count = await _script(sb, "zombies.py", ZOMBIES)

    async def zombies() -> int:
        return int((await sb.exec(count)).stdout)

    for _ in range(200):
        if not sb.cgroup.pids(step=r.step) and await zombies() == 0:
            break
        await asyncio.sleep(0.05)
    assert sb.cgroup.pids(step=r.step) == [] and await zombies() == 0
    assert (await sb.exec("echo fine")).stdout == "fine\n"


# From any step: write a command into the session shell's stdin (or forge its output) through /proc.
INJECT = r"""
import errno, os, sys
shell = int(sys.argv[1]) if len(sys.argv) > 1 else next(
    int(p) for p in os.listdir("/proc") if p.isdigit()
    and open(f"/proc/{p}/cmdline", "rb").read().startswith(b"/bin/bash\0--noprofile"))
kinds, opened = set(), []
for fd in os.listdir(f"/proc/{shell}/fd"):
    target = os.readlink(f"/proc/{shell}/fd/{fd}")
    kinds.add(target.split(":")[0])
    if target.startswith(("socket:", "pipe:")):
        try:
            os.write(os.open(f"/proc/{shell}/fd/{fd}", os.O_WRONLY), b"touch /tmp/pwned\n")
            opened.append(fd)
        except OSError as e:
            assert e.errno == errno.ENXIO, e  # a socket cannot be opened through /proc
print(sorted(kinds - {"/dev/null"}), opened)
"""


async def test_session_shell_streams_cannot_be_reopened(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    assert (await s.run("echo ready")).stdout == "ready\n"
    inject = await _script(sb, "inject.py", INJECT)
    r = await sb.exec(inject)  # from another step
    assert (r.stdout, r.exit_code) == ("['socket'] []\n", 0), r.stderr
    own = await s.run(f'{inject} "$$"')  # from a command of the session itself, at its own shell
    assert (own.stdout, own.exit_code) == ("['socket'] []\n", 0), own.stderr
    assert (await s.run("echo still")).stdout == "still\n"
    assert not (await sb.exec("test -e /tmp/pwned")).ok


async def test_session_shell_leaves_a_step_that_left_processes_running(sb_factory):
    sb = await sb_factory()
    s = await sb.create_session("main")
    shell = sb._sessions["main"]
    assert sb.cgroup.group(shell.hostpid) == ("session", shell.index)
    r = await s.run("echo in-step")
    assert r.ok
    assert r.step not in sb.live_steps() and not sb.busy()  # the idle shell is corral's, wherever it is
    # alone in its last step's cgroup, the shell stays there (what it forks while idle is that step's
    # either way); the next command renames the cgroup to its own step
    assert shell.homing is None and sb.cgroup.group(shell.hostpid) == ("step", r.step)
    # a command that leaves a process running: the shell moves out, the process stays its step's
    bg = await s.run("sleep 300 >/dev/null 2>&1 &")
    await eventually(lambda: sb.cgroup.group(shell.hostpid) == ("session", shell.index), "the shell's move out")
    sleeper = sb.cgroup.pids(step=bg.step)
    assert len(sleeper) == 1 and bg.step in sb.live_steps()
    r2 = await s.run("echo again")  # and into the next step's cgroup again (renamed there on cgroup v1)
    assert r2.ok and r2.step == bg.step + 1
    assert sb.cgroup.pids(step=bg.step) == sleeper and sb.cgroup.group(shell.hostpid) == ("step", r2.step)


async def test_a_process_in_a_finished_steps_cgroup_is_sampled_and_killed(sb_factory):
    sb = await sb_factory()
    done = await sb.exec("true")  # a step that ended with nothing left behind
    bg = await sb.exec("sleep 300 >/dev/null 2>&1 &")
    pid = sb.cgroup.pids(step=bg.step)[0]
    # The process arrives in the finished step's cgroup afterwards (as one a session shell forked
    # there would): only reading the cgroups themselves finds it.
    await asyncio.to_thread(sb.cgroup.move, pid, done.step)
    assert sb.live_steps() == [done.step]
    await eventually(lambda: sb.step_stats(done.step)["peak_rss_mb"] > 0, "the sampler to sample it")
    await sb.end_episode("test: end the episode")
    assert set(sb.cgroup.pids()) == {sb._dep.proc.pid, sb.agent_hostpid}
    assert sb.live_steps() == []


def running_step(sb) -> int | None:
    return next((c.step for c in sb._cmds.values() if c.session == "busy"), None)


async def test_kill_all_leaves_only_corral(sb_factory):
    sb = await sb_factory()
    await sb.exec("sleep 300 >/dev/null 2>&1 &")
    await sb.exec("setsid sh -c 'sleep 300 & sleep 300' </dev/null >/dev/null 2>&1 &")  # daemonized
    busy = await sb.create_session("busy")
    await busy.run("sleep 300 >/dev/null 2>&1 &")
    await sb.create_session("idle")
    running = asyncio.ensure_future(sb.run_in_session("busy", "sleep 300"))
    await eventually(lambda: running_step(sb) and len(sb.cgroup.pids(step=running_step(sb))) >= 2,
                     "the session's command to start")
    killed = await sb.kill_all()
    assert killed >= 8  # 5 sleeps, the daemon's sh, 2 shells (and the staged child)
    assert set(sb.cgroup.pids()) == {sb._dep.proc.pid, sb.agent_hostpid}
    assert sb.sessions() == []
    r = await asyncio.wait_for(running, 30)
    assert r.exit_code is None and "session shell exited" in (r.error or "")
    assert sb.live_steps() == []  # its command has returned too
    # the sandbox carries on: a new command, a new session
    assert (await sb.exec("echo after")).stdout == "after\n"
    assert (await (await sb.create_session("busy")).run("echo again")).stdout == "again\n"


async def test_agent_killed_ends_the_episode_with_its_reason(sb_factory, runtime):
    sb = await sb_factory()
    await sb.create_session("main")
    pending = asyncio.ensure_future(sb.exec("sleep 300", timeout=300))
    in_session = asyncio.ensure_future(sb.run_in_session("main", "sleep 300", timeout=300))
    await eventually(lambda: len(sb.live_steps()) == 2, "the commands to start")
    os.kill(sb.agent_hostpid, signal.SIGKILL)  # what no command can do: corral's agent dies
    for fut in (pending, in_session):
        with pytest.raises(EpisodeEnded, match=AGENT_LOST):
            await asyncio.wait_for(fut, 30)  # at once, not after the commands' timeouts
    assert sb.terminated == f"{AGENT_LOST}: killed by signal 9 (SIGKILL)"
    degraded = [e for e in runtime.store.events(sandbox_id=sb.id, kind="sandbox") if e.action == "degraded"]
    assert [e.reason for e in degraded] == [sb.terminated]
    assert degraded[0].data["cause"] == "killed" and degraded[0].data["signal"] == 9
    with pytest.raises(EpisodeEnded, match="killed by signal 9"):
        await sb.exec("true")
    await sb.reset()
    assert sb.terminated is None and (await sb.exec("echo new episode")).stdout == "new episode\n"


async def test_agent_stopped_ends_the_episode(sb_factory, runtime):
    sb = await sb_factory()
    bg = await sb.exec("sleep 300 >/dev/null 2>&1 &")
    pending = asyncio.ensure_future(sb.exec("sleep 300", timeout=300))
    await eventually(lambda: len(sb.live_steps()) == 2, "the commands to start")
    os.kill(sb.agent_hostpid, signal.SIGSTOP)  # as a debugger would; no command can
    with pytest.raises(EpisodeEnded, match=AGENT_LOST):
        await asyncio.wait_for(pending, 30)  # seen on the sampler's tick
    assert sb.terminated == f"{AGENT_LOST}: stopped by a signal (state T)"
    degraded = [e for e in runtime.store.events(sandbox_id=sb.id, kind="sandbox") if e.action == "degraded"]
    assert len(degraded) == 1 and degraded[0].data["cause"] == "stopped"
    # every process the agent started is killed, though the agent cannot help
    await eventually(lambda: not sb.cgroup.pids(step=bg.step), "the step's processes to be killed")
    await sb.reset()  # a stopped agent is torn down like any other
    assert (await sb.exec("echo fresh")).stdout == "fresh\n"


# --- file events ---------------------------------------------------------------------------------------
FORKED_WRITER = r"""
import os, sys
n = sys.argv[1]
if os.fork() == 0:  # the child writes and is gone at once: it never execs, nothing looks at it
    with open("/root/.bashrc", "a") as f:
        f.write(f"alias ls='/tmp/.x/implant {n}'\n")
    with open(f"/workspace/tests/test_planted_{n}.py", "w") as f:
        f.write("def test_ok(): assert True\n")
    os._exit(0)
os.wait()
"""


def _file_events(runtime, sb, path: str) -> list:
    return [e for e in runtime.store.events(sandbox_id=sb.id, kind="file") if e.data.get("path") == path]


async def test_a_forked_writer_that_exits_at_once_is_judged_20_of_20(sb_factory, runtime):
    sb = await sb_factory(SandboxConfig(protected_paths=("/workspace/tests/*",)))
    await sb.write_file("/workspace/tests/test_ok.py", "def test_ok(): assert True\n")  # corral's own
    writer = await _script(sb, "writer.py", FORKED_WRITER)
    steps = []
    for n in range(20):
        r = await sb.exec(f"{writer} {n}")
        steps.append(r.step)
        planted = f"/workspace/tests/test_planted_{n}.py"
        # one close-after-write of each file per run, none dropped, whoever wrote it
        await eventually(lambda n=n: len(_file_events(runtime, sb, "/root/.bashrc")) == n + 1,
                         f"run {n}'s write of /root/.bashrc")
        await eventually(lambda p=planted: _file_events(runtime, sb, p), f"run {n}'s planted test")
    evs = [e for e in runtime.store.events(sandbox_id=sb.id, kind="file")
           if e.data["path"] == "/root/.bashrc" or "test_planted_" in e.data["path"]]
    assert len(evs) == 40
    for ev in evs:
        # the step where corral still knew the writer's; otherwise said to be unattributed (and no
        # pid to kill: a pid that is gone may be another process's) - never taken for corral's own
        if ev.step is not None:
            assert ev.step in steps and ev.command == f"{writer} {steps.index(ev.step)}" and ev.pid
        else:
            assert ev.data["attribution"] == "unattributed" and ev.pid is None and ev.data["writer_pid"]
    judged = {e.id for e in evs}
    for rule in ("shell-profile-write", "protected-file-tampered"):
        found = [f for f in runtime.store.findings(sandbox_id=sb.id) if f.rule_id == rule and judged & set(f.evidence)]
        assert len(found) == 20, rule
    assert not _file_events(runtime, sb, "/workspace/tests/test_ok.py")


ALIVE_WRITER = r"""
import os, time
if os.fork() == 0:
    with open("/root/.profile", "a") as f:
        f.write("alias ls=/tmp/.x/implant\n")
    time.sleep(60)
"""


async def test_a_writer_still_alive_is_attributed_to_its_step(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(await _script(sb, "alive.py", ALIVE_WRITER))
    evs = await eventually(lambda: _file_events(runtime, sb, "/root/.profile"), "the write")
    assert evs[0].step == r.step and evs[0].command.endswith("alive.py") and evs[0].pid
    assert evs[0].data.get("attribution") != "unattributed"
    f = await eventually(lambda: [f for f in runtime.store.findings(sandbox_id=sb.id)
                                  if f.rule_id == "shell-profile-write"], "the finding")
    assert f[0].step == r.step


async def test_corral_writes_are_its_own_and_never_follow_links(sb_factory, runtime, tmp_path):
    sb = await sb_factory(SandboxConfig(protected_paths=("/workspace/tests/*",)))
    # a task's setup, before the agent's first step, is preparation: whichever process wrote, even a
    # forked subshell gone long before corral looks
    setup = await sb.exec("(echo 'export TASK=1' >> /root/.bashrc); mkdir -p /workspace/tests; "
                          "(echo 'def test_0(): pass' > /workspace/tests/test_0.py)", _internal=True)
    assert setup.ok, setup.stderr
    assert (await sb.exec("echo first step")).ok  # past preparation: only the writer says it is corral's
    # corral's own commands later on: their exec'd helpers are known as corral's
    assert (await sb.exec("cat /etc/hostname > /root/.bash_profile", _internal=True)).ok
    await sb.write_file("/workspace/tests/test_a.py", "def test_a(): assert True\n")
    await sb.write_file("/root/.bashrc", "# corral's own\n")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "test_d.py").write_text("def test_d(): assert True\n")
    (tree / "link").symlink_to("sub/test_d.py")
    await sb.upload(tree, "/workspace/tests/tree")
    r = await sb.exec("cat /workspace/tests/tree/sub/test_d.py; readlink /workspace/tests/tree/link")
    assert r.stdout == "def test_d(): assert True\nsub/test_d.py\n"
    await asyncio.sleep(0.3)
    assert runtime.store.events(sandbox_id=sb.id, kind="file") == []  # corral's own, known positively
    assert runtime.store.findings(sandbox_id=sb.id) == []
    # The agent plants links where corral will write: a file link to a file of its own, a directory
    # link to a directory of links to /dev/null.
    r = await sb.exec("echo mine > /tmp/mine && ln -s /tmp/mine /workspace/notes.txt && "
                      "mkdir -p /tmp/nul && ln -s /dev/null /tmp/nul/test_c.py && ln -s /tmp/nul /workspace/spec")
    assert r.ok, r.stderr
    await sb.write_file("/workspace/notes.txt", "corral's notes\n")
    assert await sb.read_file("/tmp/mine") == b"mine\n"  # not written through the link ...
    assert (await sb.exec("test -L /workspace/notes.txt")).exit_code == 1  # ... which is replaced
    assert await sb.read_file("/workspace/notes.txt") == b"corral's notes\n"
    with pytest.raises(FileAccessError, match="symbolic link"):
        await sb.write_file("/workspace/spec/test_c.py", "def test_c(): assert True\n")
    assert (await sb.exec("test -L /tmp/nul/test_c.py")).ok
    # modes: a new file 0644, an existing one keeps its own, an explicit one is applied
    await sb.write_file("/workspace/run.sh", "#!/bin/sh\n", mode=0o755)
    await sb.write_file("/workspace/run.sh", "#!/bin/sh\necho hi\n")
    assert (await sb.exec("stat -c %a /workspace/run.sh /workspace/tests/test_a.py")).stdout == "755\n644\n"


async def test_a_session_command_takes_its_step_by_renaming_the_shells_cgroup(sb_factory, monkeypatch):
    """On cgroup v1 the shell's idle cgroup (its last step's) is renamed to the next step's: no
    migration, which after an idle moment waits for an RCU grace period. A process the idle shell
    forked is not swept along: it stays its last command's."""
    sb = await sb_factory()
    s = await sb.create_session("r")
    shell = sb._sessions["r"]
    if not sb.cgroup.renames or sb.cgroup.h.version != 1:
        pytest.skip("this hierarchy has no rename (cgroup v2): the shell is moved")
    first = await s.run("true")
    assert shell.homing is None and sb.cgroup.group(shell.hostpid) == ("step", first.step)  # alone: stays
    moved: list[int] = []
    real = sb.cgroup.move
    monkeypatch.setattr(sb.cgroup, "move", lambda pid, step: (moved.append(pid), real(pid, step))[1])
    r = await s.run("cat /proc/self/cgroup")
    assert f"/step-{r.step}\n" in r.stdout and shell.hostpid not in moved, (r.stdout, moved)
    # the staged child that held this step's number was parked; the next exec renames it into its step
    staged = sb._stage.pid if sb._stage is not None and sb._stage.parked else None
    assert staged is not None
    x = await sb.exec("cat /proc/self/cgroup")
    assert f"/step-{x.step}\n" in x.stdout and staged not in moved and x.step == r.step + 1, (x.stdout, moved)
    assert shell.homing is None
    # as if the idle shell had forked it between commands: it is in the shell's cgroup, its last step's
    bg = await sb.exec("sleep 300 >/dev/null 2>&1 &")
    stray = sb.cgroup.pids(step=bg.step)[0]
    await asyncio.to_thread(real, stray, r.step)
    last = r.step
    r = await s.run("cat /proc/self/cgroup")
    assert f"/step-{r.step}\n" in r.stdout and shell.hostpid in moved  # moved, not renamed
    assert sb.cgroup.group(stray) == ("step", last) and first.step < last < r.step
