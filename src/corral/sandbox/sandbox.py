"""Sandbox: one isolated environment an agent's commands run in (asyncio API).

A sandbox is a bubblewrap container (own user, pid, mount, ipc, uts and network namespaces; the
host filesystem read-only; tmpfs workspace, /tmp and HOME with size limits; no capabilities;
no_new_privs; seccomp) running corral's agent, inside a network namespace whose only way out is
corral's gateway, inside a cgroup with memory, CPU and process limits. On the host every sandbox
process runs as an unprivileged uid of its own, never as root.

Every command is a step. Its processes are born in the step's cgroup, so any process, connection or
DNS query can be traced back to the exact command that started it, even from a background process
steps later. A session shell waits between its commands in a cgroup of its own.

corral's agent is PID 1 of the sandbox's pid namespace and not dumpable (see agent.py): no command
can signal, stop, trace or read it. Should it be lost all the same, the sandbox records a `degraded`
event and ends the episode (`terminated` starts with "corral agent lost").
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import ipaddress
import logging
import os
import shlex
import signal
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.bounded import Recent
from corral.budget import Pace
from corral.config import SandboxConfig
from corral.detect.command import split as split_command
from corral.errors import (
    EpisodeEnded,
    FileAccessError,
    IsolationUnavailable,
    SandboxClosed,
    SandboxError,
    SandboxFrozen,
    SessionError,
)
from corral.events import Event, EventKind, Verdict
from corral.monitor.execwatch import ExecWatch
from corral.monitor.files import FileWatch
from corral.monitor.provenance import Downloads
from corral.sandbox import procs, transfer
from corral.sandbox.boundary import INTERNAL_STEP, Boundary
from corral.sandbox.cgroups import SandboxCgroup
from corral.sandbox.deployment import Deployment
from corral.sandbox.lifeline import AGENT_LOST
from corral.sandbox.protocol import Reply

if TYPE_CHECKING:
    from corral.net.netns import SandboxNet
    from corral.runtime import Runtime

STDIN_CHUNK = 48 * 1024
log = logging.getLogger("corral")


@dataclass
class ExecResult:
    exit_code: int | None
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    step: int
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False
    oom_killed: bool = False
    pids_limit_hit: bool = False
    refused: bool = False  # a rule refused the command before anything ran
    error: str | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


@dataclass
class OutputChunk:
    stream: str  # "stdout" | "stderr"
    data: bytes


@dataclass
class _Cmd:
    id: str
    step: int
    limit: int
    on_output: Callable[[OutputChunk], None] | None
    future: asyncio.Future
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    dropped: list[int] = field(default_factory=lambda: [0, 0])
    hostpid: int | None = None
    session: str | None = None


@dataclass
class StepStats:
    """What one step's processes used. CPU is a lower bound: the larger of what the command and the
    children it waited for used (rusage) and what the sampler saw all its processes use."""

    cpu_rusage: float = 0.0
    cpu_sampled: float = 0.0
    peak_rss_kb: int = 0
    processes: int = 0
    connections: int = 0

    def add_rusage(self, ru: dict) -> None:
        self.cpu_rusage += float(ru.get("cpu_seconds", 0.0))
        self.peak_rss_kb = max(self.peak_rss_kb, int(ru.get("maxrss_kb", 0)))

    def as_dict(self) -> dict[str, float | int]:
        return {"cpu_seconds": round(max(self.cpu_rusage, self.cpu_sampled), 3),
                "peak_rss_mb": round(self.peak_rss_kb / 1024, 1), "processes": self.processes,
                "connections": self.connections}


@dataclass
class _Stage:
    key: str
    pid: int | None = None
    step: int | None = None  # set once the child sits in this step's cgroup


@dataclass
class _Connect:
    ip: str
    port: int
    pid: int
    step: int | None
    proc: procs.ProcInfo | None
    ambiguous: bool = False
    inode: int | None = None  # the socket's identity, when the watcher could read it


@dataclass
class _StepInfo:
    command: str
    episode_id: str | None
    tool_call_id: str | None
    session: str | None


class Session:
    """A persistent shell: cwd, environment and shell state carry over between commands."""

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        self.sandbox = sandbox
        self.name = name
        self.hostpid: int | None = None
        self.alive = True
        self.index = 0  # its cgroup between commands: session-<index>
        self.last_step: int | None = None  # what it forks while idle belongs to its last command
        self.interactive = False  # see Sandbox.create_session

    async def run(self, cmd: str, *, timeout: float | None = None, **kw: Any) -> ExecResult:
        return await self.sandbox.run_in_session(self.name, cmd, timeout=timeout, **kw)

    async def close(self) -> None:
        await self.sandbox.close_session(self.name)


class Sandbox(Boundary):
    """Create with ``await Sandbox.create(config)`` or ``async with Sandbox(config) as sb``."""

    def __init__(self, config: SandboxConfig | None = None, *, runtime: Runtime | None = None,
                 sandbox_id: str | None = None, episode_id: str | None = None) -> None:
        self.config = config or SandboxConfig()
        self._runtime = runtime
        self.id = sandbox_id or "sb-" + os.urandom(5).hex()
        self.episode_id = episode_id
        self.step = 0
        self.closed = False
        self.frozen = False
        self.terminated: str | None = None  # why the episode was ended by a security finding
        # Bumped by reset, freeze and release: containment judged before one of them is stale, so a
        # late finding can neither end the next episode nor re-freeze what an operator released.
        self.generation = 0
        self.first_step = 1  # the first step of the current episode: steps count on across resets
        self.created_at = time.time()
        self.net: SandboxNet | None = None
        self.cgroup: SandboxCgroup | None = None
        self.uid = 0
        self._seq = 0
        self._dep: Deployment | None = None  # the running launch: root, processes, the agent's channel
        self._spare: Deployment | None = None  # the next one, launched ahead for a fast reset
        self._spare_task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # replaced deployments being reaped
        self._launches = 0
        self._cmds: dict[str, _Cmd] = {}
        self._sessions: dict[str, Session] = {}
        self._steps: dict[int, _StepInfo] = {}
        self._next_id = 0
        self._session_waiters: dict[str, asyncio.Future] = {}
        self._stage: _Stage | None = None
        self._stage_seq = 0
        self._tasks: set[asyncio.Task] = set()
        self._stats: dict[int, StepStats] = {}
        # host pid -> (step, exe, argv) as the exec watcher saw it, newest last, bounded
        self._pids: Recent[int, tuple[int | None, str | None, list[str] | None]] = Recent(8192)
        # recent outbound TCP connect() calls by destination, oldest first, bounded (O(1) to claim)
        self._connects: dict[tuple[str, int], collections.deque[_Connect]] = {}
        self._pace: Pace | None = None  # new connections' token bucket (the runtime's budgets)
        self._paced_noted = 0.0
        # UDP sockets that sent to or connected to port 53, by inode: the process that owns each
        self._dns_socks: Recent[int, int] = Recent(1024)
        # rate limit of datagram events; bounded, so a UDP sweep cannot grow it
        self._datagrams: Recent[tuple[int, str, int, str], float] = Recent(4096)
        self._downloads = Downloads()  # files curl/wget wrote here, to know them when they are run
        self._open_steps: set[int] = set()  # begun and not yet returned: their cgroups stay
        self._session_seq = 0
        self._internal = 0  # corral's own commands in flight
        # pids that corral's own commands exec'd, until their file events have been read
        self._internal_pids: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    async def create(cls, config: SandboxConfig | None = None, *, runtime: Runtime | None = None,
                     **kw: Any) -> Sandbox:
        from corral.runtime import Runtime

        rt = runtime or await Runtime.default()
        return await rt.create(config, **kw)

    async def __aenter__(self) -> Sandbox:
        if self._dep is None and not self.closed:
            from corral.runtime import Runtime

            rt = self._runtime or await Runtime.default()
            await rt.adopt(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    # -- the deployment: what runs, and its monitors ---------------------------------------------
    @property
    def agent_hostpid(self) -> int | None:
        return self._dep.agent_pid if self._dep is not None else None

    @property
    def _execwatch(self) -> ExecWatch | None:
        return self._dep.execwatch if self._dep is not None else None

    @property
    def _filewatch(self) -> FileWatch | None:
        return self._dep.filewatch if self._dep is not None else None

    def _deployment(self, cgroup: SandboxCgroup | None) -> Deployment:
        assert self.net is not None
        self._launches += 1
        name = str(self.uid) if self._launches == 1 else f"{self.uid}.{self._launches}"
        return Deployment(self.id, self.config, self.runtime, self.net, cgroup, self.uid, name)

    async def _launch(self) -> None:
        """Start bubblewrap + the agent in our netns and cgroup; resolves when the agent is ready."""
        dep = self._deployment(self.cgroup)
        await dep.start(self._on_reply, self._on_gone)
        await self._activate(dep)

    async def _activate(self, dep: Deployment) -> None:
        """Make a ready deployment the sandbox's: its exec monitor on, its cgroup the sandbox's, the
        next step's child staged, its files watched."""
        if dep.notify_fd is None:
            # Fail closed: a sandbox whose execs corral cannot see does not run at all.
            await dep.stop()
            raise IsolationUnavailable(
                f"sandbox {self.id}: the exec monitor could not be installed (seccomp user "
                "notification needs Linux 5.5 or newer); run 'corral doctor'")
        share = self._runtime.config.budgets.loop_share if self._runtime is not None else None
        fd, dep.notify_fd = dep.notify_fd, None
        dep.execwatch = ExecWatch(fd, self._judge_exec, self._process_event, self._note_connect,
                                  self._note_datagram, self._exec_degraded, share=share)
        self._dep = dep
        self.cgroup = dep.cgroup
        self._request_stage()
        self._watch_files()

    def _watch_files(self) -> None:
        dep = self._dep
        if self._runtime is None or dep is None or dep.agent_pid is None:
            return
        try:
            dep.filewatch = FileWatch(dep.agent_pid, self.config.protected_paths, self._file_event,
                                      self._runtime.emit)
        except OSError as e:
            self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id,
                             reason=f"file monitoring unavailable: {e}"))
            return
        if dep.filewatch.fid_fd is None:
            self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id,
                             reason="deletions and renames of protected paths are not watched: fanotify's "
                                    f"file-handle mode is unavailable on kernel {os.uname().release} (it needs "
                                    "Linux >= 5.9 and file handles on the sandbox's tmpfs; run 'corral doctor')"))

    def _detach(self) -> Deployment | None:
        """Forget the running deployment: its staged child, tasks, commands (failed now) and sessions."""
        dep, self._dep = self._dep, None
        self._stage = None
        for task in list(self._tasks):
            task.cancel()
        self._internal_pids.clear()
        for cmd in self._cmds.values():
            if not cmd.future.done():
                cmd.future.set_exception(SandboxClosed(f"sandbox {self.id} was stopped while the command ran"))
        self._cmds.clear()
        self._sessions.clear()
        return dep

    async def _teardown_proc(self) -> None:
        dep = self._detach()
        if dep is not None:
            await dep.stop()

    # -- the spare: reset as a swap ------------------------------------------------------------------
    def _want_spare(self) -> None:
        """Launch the next deployment now, in the background, so the next reset only swaps it in. Only
        for sandboxes that have been reset (an RL environment's, typically): others never pay for one."""
        if (self.closed or self._spare is not None or self._spare_task is not None or self._runtime is None
                or not self._runtime.config.reset_spare or self.net is None):
            return
        self._spare_task = asyncio.get_running_loop().create_task(self._launch_spare())

    async def _launch_spare(self) -> None:
        rt, dep = self.runtime, None
        try:
            cgroup = None
            if self.cgroup is not None and rt.cgroups is not None:
                cgroup = await asyncio.to_thread(rt.cgroups.sandbox, self.id, self.config.limits)
            dep = self._deployment(cgroup)
            await dep.start(self._on_reply, self._on_gone)
            if self.closed or dep.notify_fd is None:
                raise SandboxClosed("no longer wanted")
            self._spare, dep = dep, None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the next reset relaunches instead, as without a spare
            log.warning("sandbox %s: no spare for the next reset: %s", self.id, e)
        finally:
            self._spare_task = None
            if dep is not None:
                await asyncio.shield(dep.stop(remove_cgroup=True))

    async def _drop_spare(self) -> None:
        task, self._spare_task = self._spare_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.stop(remove_cgroup=True)

    def _retire(self, dep: Deployment) -> None:
        """Reap a replaced deployment (its processes are already dead) off the reset's path."""
        task = asyncio.get_running_loop().create_task(dep.stop(remove_cgroup=True))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def reset(self) -> None:
        """Back to the initial workspace: every process killed, /workspace, /tmp and HOME fresh (an
        image's whole writable layer), sessions gone, DNS memory cleared. The sandbox id, network and
        limits stay. From the second reset on, a spare launched meanwhile is swapped in: the reset
        costs killing the old processes, not starting new ones."""
        self._check_open(allow_terminated=True)
        t0 = time.perf_counter()
        self.generation += 1  # before any await: containment in flight must see it
        self.first_step = self.step + 1
        spare, self._spare = self._spare, None
        if spare is not None and (spare.stopped or spare.channel is None or not spare.channel.open):
            self._retire(spare)
            spare = None
        old = self._detach()
        if old is not None:
            # nothing of the old episode may run once the new one can: killed before the swap
            await (old.kill() if spare is not None else old.stop())
        self.terminated = None
        self.runtime.forget_dns(self)
        self._downloads.clear()  # the files are gone with the old workspace and /tmp
        if spare is not None:
            if old is not None:
                self._retire(old)
            await self._activate(spare)
        else:
            await self._launch()
        await self._populate()
        self._emit(Event(kind=EventKind.SANDBOX, action="reset", sandbox_id=self.id,
                         data={"duration": time.perf_counter() - t0, "spare": spare is not None}))
        self._want_spare()

    async def _populate(self) -> None:
        if self.config.workspace_template is not None:
            await self.upload(self.config.workspace_template, "/workspace")

    async def close(self) -> None:
        """Kill every process (background ones too), remove network, cgroups and workspace."""
        if self.closed:
            return
        self.closed = True
        # a quarantined sandbox is not thawed first: its processes are killed where they stand
        await self._drop_spare()
        await self._teardown_proc()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._runtime is not None:
            await self._runtime.release(self)
        self._emit(Event(kind=EventKind.SANDBOX, action="closed", sandbox_id=self.id, step=self.step))

    def _check_open(self, *, allow_terminated: bool = False) -> None:
        if self.terminated and allow_terminated and not (self.closed or self.frozen):
            return
        if self.closed:
            raise SandboxClosed(f"sandbox {self.id} is closed; create a new one")
        if self.frozen:
            raise SandboxFrozen(f"sandbox {self.id} is quarantined; call release() before running commands")
        if self.terminated:
            why = "" if self.terminated.startswith(AGENT_LOST) else " by a security finding"
            raise EpisodeEnded(f"sandbox {self.id}: the episode was ended{why} ({self.terminated}); "
                               "call reset() to start a new episode")

    # -- quarantine --------------------------------------------------------------------------------
    async def freeze(self, reason: str = "") -> None:
        """Quarantine: every process stops where it is, kept for forensics until release().
        Commands still running end now, with the quarantine as their error: their processes
        cannot report while frozen, and no caller should wait out a timeout on them."""
        if self.cgroup is None:
            raise IsolationUnavailable("freezing needs cgroups; see 'corral doctor'")
        await asyncio.to_thread(self.cgroup.quarantine, True)
        self.frozen = True
        self.generation += 1
        for c in list(self._cmds.values()):
            if not c.future.done():
                c.future.set_result((None, f"sandbox quarantined ({reason or 'by request'}): its processes "
                                           "are frozen for inspection; call release() to let them run"))
                if c.session is not None:
                    # its shell is still inside the cut-off command: after release it would hand that
                    # command's output and marker to the next one, so the session goes (the agent acts
                    # on this once thawed)
                    await self.close_session(c.session)
        self._emit(Event(kind=EventKind.SANDBOX, action="frozen", sandbox_id=self.id, reason=reason or None))

    async def release(self) -> None:
        if self.cgroup is not None and self.frozen:
            await asyncio.to_thread(self.cgroup.quarantine, False)
        self.frozen = False
        self.generation += 1
        self._emit(Event(kind=EventKind.SANDBOX, action="released", sandbox_id=self.id))

    async def end_episode(self, reason: str, finding: object | None = None) -> None:
        """A security finding ends the episode: every process the agent started dies (session shells
        and anything forked into a finished step's cgroup included), and commands are refused until
        reset()."""
        self.terminated = reason
        try:
            await self.kill_all()
        finally:
            self._emit(Event(kind=EventKind.SANDBOX, action="episode_ended", sandbox_id=self.id,
                             episode_id=self.episode_id, step=self.step, reason=reason))

    # -- agent protocol (protocol.py, over the deployment's channel) ---------------------------------
    def _send(self, **msg: Any) -> None:
        """Queue a request to the agent, in order; flushed now or as soon as the socket has room."""
        if self._dep is None:
            raise SandboxClosed(f"sandbox {self.id} is not running")
        self._dep.send(msg)

    def _on_reply(self, dep: Deployment, msg: Reply, hostpid: int | None, fds: list[int]) -> None:
        for fd in fds:  # only `ready` carries one, and the deployment keeps that
            os.close(fd)
        if dep is self._dep:
            self._dispatch(msg, hostpid)

    def _on_gone(self, dep: Deployment, why: str) -> None:
        if dep is self._dep:
            self._agent_gone()
        elif dep is self._spare:  # the next reset relaunches instead
            self._spare = None
            self._retire(dep)

    def _dispatch(self, msg: Any, hostpid: int | None) -> None:
        op = msg["op"]
        if op == "spawned":
            self._on_spawned(msg["id"], hostpid)
        elif op == "out":
            cmd = self._cmds.get(msg["id"])
            if cmd is not None:
                data = base64.b64decode(msg["data"])
                buf = cmd.out if msg["fd"] == 1 else cmd.err
                room = cmd.limit - len(buf)
                if room < len(data):
                    cmd.dropped[msg["fd"] - 1] += len(data) - max(room, 0)
                buf += data[: max(room, 0)]
                if cmd.on_output is not None:
                    cmd.on_output(OutputChunk("stdout" if msg["fd"] == 1 else "stderr", data))
        elif op == "exit":
            cmd = self._cmds.get(msg["id"])
            if cmd is not None and not cmd.future.done():
                dropped = msg.get("dropped") or {}
                for i, key in ((0, "1"), (1, "2")):
                    cmd.dropped[i] += int(dropped.get(key, 0))
                if msg.get("rusage"):
                    self.stats_for(cmd.step).add_rusage(msg["rusage"])
                cmd.future.set_result((msg.get("code"), msg.get("error")))
        elif op == "session_exit":
            name = msg["id"][2:]
            s = self._sessions.get(name)
            if s is not None:
                s.alive = False
        elif op == "error":
            cmd = self._cmds.get(msg.get("id") or "")
            waiter = self._session_waiters.get(msg.get("id") or "")
            err = SandboxError(f"sandbox {self.id}: {msg['error']}")
            for fut in (cmd.future if cmd else None, waiter):
                if fut is not None and not fut.done():
                    fut.set_exception(err)

    # -- staged children: the next step's process, already in its cgroup -------------------------------
    def _request_stage(self) -> None:
        if self._dep is None or self.closed:
            return
        self._stage_seq += 1
        self._stage = _Stage(f"stage:{self._stage_seq}")
        with contextlib.suppress(SandboxClosed):
            self._send(op="stage", id=self._stage.key)

    async def _place_stage(self, stage: _Stage) -> None:
        """Move a staged child into the next step's cgroup, off the critical path (a v1 cgroup
        migration can take ~10 ms); again if another command took that step number meanwhile."""
        try:
            while self._stage is stage and stage.pid:
                target = self.step + 1
                if self.cgroup is not None:
                    await asyncio.to_thread(self.cgroup.move, stage.pid, target)
                if self._stage is stage and self.step + 1 == target:
                    stage.step = target
                    return
        except OSError:
            if self._stage is stage:
                self._stage = None
                with contextlib.suppress(SandboxClosed):
                    self._send(op="kill", id=stage.key, sig=signal.SIGKILL)
                self._request_stage()

    def _restage(self, step: int) -> None:
        """A session command took the step a staged child sits in: place the child again, for the
        step after (else it would idle in a step that is not its own, and never be used)."""
        st = self._stage
        if st is not None and st.step == step:
            st.step = None
            task = asyncio.get_running_loop().create_task(self._place_stage(st))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_stage(self, step: int) -> _Stage | None:
        st = self._stage
        if st is None or st.step != step:
            return None
        self._stage = None
        asyncio.get_running_loop().call_soon(self._request_stage)  # after this step's exec message
        return st

    def _on_spawned(self, key: str, hostpid: int | None) -> None:
        step = INTERNAL_STEP
        if key.startswith("stage:"):
            if self._stage is not None and self._stage.key == key and hostpid:
                self._stage.pid = hostpid
                task = asyncio.get_running_loop().create_task(self._place_stage(self._stage))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        waiter = None
        session = None
        if key.startswith("s:"):
            s = self._sessions.get(key[2:])
            if s is not None:
                s.hostpid = hostpid
                session = s.index
            waiter = self._session_waiters.pop(key, None)
        else:
            cmd = self._cmds.get(key)
            if cmd is not None:
                cmd.hostpid = hostpid
                step = cmd.step
                if step == INTERNAL_STEP and hostpid:
                    self._internal_pids.add(hostpid)
        task = asyncio.get_running_loop().create_task(self._admit(key, hostpid, step, waiter, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, key: str, hostpid: int | None, step: int, waiter: asyncio.Future | None,
                     session: int | None = None) -> None:
        """Place a newly announced child in its step's cgroup (a session shell: in its session's),
        then let it run (and only then tell a waiting create_session)."""
        if self.cgroup is not None and hostpid:
            try:
                if session is not None:
                    await asyncio.to_thread(self.cgroup.move_to_session, hostpid, session)
                else:
                    await asyncio.to_thread(self.cgroup.move, hostpid, step)
            except OSError as e:
                # Never let an unaccounted process run: refuse to start it.
                with contextlib.suppress(SandboxClosed):
                    self._send(op="kill", id=key, sig=signal.SIGKILL)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(SessionError(f"cannot account the session shell to a cgroup: {e}"))
                return
        with contextlib.suppress(SandboxClosed):
            self._send(op="go", id=key)
        if waiter is not None and not waiter.done():
            waiter.set_result(hostpid)

    def _new_id(self) -> str:
        self._next_id += 1
        return f"c{self._next_id}"

    def _begin_step(self, command: str, session: str | None, tool_call_id: str | None,
                    internal: bool) -> int:
        if internal:
            return INTERNAL_STEP
        if self._filewatch is not None and self._filewatch.preparing:
            # what was written before the agent's first step is the episode's preparation
            self._filewatch.end_preparation()
        self.step += 1
        self._steps[self.step] = _StepInfo(command, self.episode_id, tool_call_id, session)
        self._open_steps.add(self.step)  # its cgroup stays, even while empty, until it returns
        return self.step

    # -- commands ----------------------------------------------------------------------------------
    async def exec(self, cmd: str, *, timeout: float | None = None, env: dict[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes | str | None = None,
                   on_output: Callable[[OutputChunk], None] | None = None,
                   max_output: int | None = None, tool_call_id: str | None = None,
                   _internal: bool = False) -> ExecResult:
        """Run ``cmd`` with the configured shell (bash) -c in a fresh process; no state carries over."""
        self._check_open()
        if isinstance(stdin, str):
            stdin = stdin.encode()
        step = self._begin_step(cmd, None, tool_call_id, _internal)
        try:
            if not _internal and (refusal := self._precheck(cmd, step)) is not None:
                return refusal
            limit = max_output or self.config.limits.output_bytes
            c = self._register(step, limit, on_output)
            msg = {"op": "exec", "id": c.id, "cmd": cmd, "env": env, "cwd": cwd, "max_output": limit,
                   "stdin": bool(stdin)}
            stage = None if _internal else self._take_stage(step)
            if stage is not None:
                msg["stage"] = stage.key
                c.hostpid = stage.pid
            elif not _internal and self._stage is None:
                asyncio.get_running_loop().call_soon(self._request_stage)  # gone with a kill_all()
            return await self._run(c, cmd, msg, timeout, session=None, internal=_internal,
                                   tool_call_id=tool_call_id, stdin=stdin)
        finally:
            self._open_steps.discard(step)

    async def stream(self, cmd: str, **kw: Any) -> AsyncIterator[OutputChunk | ExecResult]:
        """Yield output chunks as they arrive, then the ExecResult."""
        q: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.exec(cmd, on_output=q.put_nowait, **kw))
        task.add_done_callback(lambda _t: q.put_nowait(None))
        while True:
            item = await q.get()
            if item is None:
                break
            yield item
        yield await task

    def _precheck(self, cmd: str, step: int, session: str | None = None) -> ExecResult | None:
        """Judge each program the command line would run, before anything runs."""
        if self._runtime is None or self._runtime.detector is None:
            return None
        info = self._steps.get(step)
        for simple in split_command(cmd):
            ev = Event(kind=EventKind.COMMAND, action="check", sandbox_id=self.id, episode_id=self.episode_id,
                       step=step, command=cmd, argv=simple.argv,
                       data={"redirects": simple.redirects, "writes": simple.writes, "session": session,
                             "tool_call_id": info.tool_call_id if info else None,
                             "protected": self.config.protected_paths})
            j = self._runtime.emit(ev, persist=False)
            # any blocking judgement refuses, a rule's or the store's (which names no rule): fail closed
            if j is not None and j.blocks:
                why = f"refused by rule {j.rule.id}: {j.rule.title}" if j.rule is not None else j.reason
                self._emit(Event(kind=EventKind.COMMAND, action="refused", sandbox_id=self.id,
                                 episode_id=self.episode_id, step=step, command=cmd, verdict=Verdict.DENY,
                                 reason=why))
                return ExecResult(exit_code=None, stdout_bytes=b"", stderr_bytes=b"", duration=0.0, step=step,
                                  refused=True, error=why)
        return None

    def _register(self, step: int, limit: int, on_output: Callable[[OutputChunk], None] | None,
                  session: str | None = None) -> _Cmd:
        c = _Cmd(self._new_id(), step, limit, on_output, asyncio.get_running_loop().create_future(), session=session)
        self._cmds[c.id] = c
        return c

    async def _run(self, c: _Cmd, cmd: str, msg: dict, timeout: float | None, *, session: str | None,
                   internal: bool, tool_call_id: str | None = None, stdin: bytes | None = None) -> ExecResult:
        timeout = timeout if timeout is not None else self.config.limits.timeout
        # two small reads per command: a step's own fork refusals, the sandbox's OOM kills
        oom_before = self.cgroup.oom_kills() if self.cgroup and not internal else 0
        if not internal:
            self._emit(Event(kind=EventKind.COMMAND, action="start", sandbox_id=self.id, step=c.step,
                             command=cmd, episode_id=self.episode_id,
                             data={"session": session, "tool_call_id": tool_call_id}))
        t0 = time.perf_counter()
        timed_out = False
        error = None
        if internal:
            self._internal += 1
        try:
            self._send(**msg)
            if stdin:
                # in pieces: a SEQPACKET message must fit the socket buffer
                for i in range(0, len(stdin), STDIN_CHUNK):
                    piece = stdin[i : i + STDIN_CHUNK]
                    self._send(op="stdin", id=c.id, data=base64.b64encode(piece).decode(),
                               eof=i + STDIN_CHUNK >= len(stdin))
            code, error = await asyncio.wait_for(asyncio.shield(c.future), timeout)
        except TimeoutError:
            timed_out = True
            code, error = await self._kill_step(c, session)
        except asyncio.CancelledError:
            # the caller gave up: the command must not live on unaccounted
            await asyncio.shield(self._kill_step(c, session))
            if not internal:
                self._emit(Event(kind=EventKind.COMMAND, action="exit", sandbox_id=self.id, step=c.step,
                                 command=cmd, episode_id=self.episode_id,
                                 data={"exit_code": None, "interrupted": True, "session": session}))
            raise
        finally:
            self._cmds.pop(c.id, None)
            if internal:
                self._internal_done()
        duration = time.perf_counter() - t0
        pids_hit = bool(self.cgroup and not internal and self.cgroup.pids_max_hits(c.step) > 0)
        oom = bool(self.cgroup and not internal and self.cgroup.oom_kills() > oom_before)
        if pids_hit and self.cgroup is not None:
            # A step that exhausts the process limit is a fork bomb or a runaway: its whole tree goes,
            # so the sandbox stays usable for the next command.
            await asyncio.to_thread(self.cgroup.kill, c.step, self._session_pids())
        res = ExecResult(
            exit_code=code, stdout_bytes=bytes(c.out), stderr_bytes=bytes(c.err), duration=duration,
            step=c.step, stdout_truncated=c.dropped[0] > 0, stderr_truncated=c.dropped[1] > 0,
            timed_out=timed_out, error=error,
            oom_killed=oom,
            pids_limit_hit=pids_hit,
        )
        if res.oom_killed and not res.error:
            res.error = f"killed: memory limit of {self.config.limits.memory_mb} MiB reached"
        elif res.pids_limit_hit and not res.error:
            res.error = (f"process limit of {self.config.limits.pids} reached: every process of this command "
                         "was killed (fork bomb contained)")
        elif timed_out:
            res.error = f"timed out after {timeout:g}s; the command's whole process tree was killed"
        if not internal:
            self._emit(Event(kind=EventKind.COMMAND, action="exit", sandbox_id=self.id, step=c.step,
                             command=cmd, episode_id=self.episode_id,
                             data={"exit_code": code, "duration": duration, "timed_out": timed_out,
                                   "stdout_bytes": len(c.out) + c.dropped[0],
                                   "stderr_bytes": len(c.err) + c.dropped[1],
                                   "truncated": res.truncated, "oom_killed": res.oom_killed,
                                   "pids_limit_hit": res.pids_limit_hit, "error": res.error,
                                   "session": session, **self.step_stats(c.step)}))
        return res

    async def _kill_step(self, c: _Cmd, session: str | None) -> tuple[int | None, str | None]:
        """Timeout: kill every process the step started, background and daemonized ones included."""
        sess = self._sessions.get(session) if session else None
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.kill, c.step, self._session_pids())
        else:
            with contextlib.suppress(SandboxClosed):
                self._send(op="kill", id=f"s:{session}" if session else c.id, sig=signal.SIGKILL)
        try:
            return await asyncio.wait_for(asyncio.shield(c.future), 2.0)
        except (TimeoutError, SandboxError):
            if sess is not None:
                # The shell itself is stuck (a builtin loop): it has to go, and the session with it.
                with contextlib.suppress(SandboxClosed):
                    self._send(op="session_close", id=f"s:{session}")
                sess.alive = False
                self._sessions.pop(session or "", None)
                return None, f"session '{session}' was killed after the timeout; create it again"
            return None, None

    def _session_pids(self) -> set[int]:
        """Session shells sit in the cgroup of their latest step but must survive its kill."""
        return {s.hostpid for s in self._sessions.values() if s.hostpid}

    async def kill_step(self, step: int) -> int:
        """Kill every process a step started (background ones too). Returns how many were killed."""
        if self.cgroup is None:
            raise IsolationUnavailable("killing a step's processes needs cgroups; see 'corral doctor'")
        return await asyncio.to_thread(self.cgroup.kill, step, self._session_pids())

    async def kill_steps(self) -> int:
        """Kill every process any step started (background ones too); session shells stay (kill_all()
        takes them too)."""
        if self.cgroup is None:
            return 0
        killed = 0
        for step in self.live_steps():
            killed += await asyncio.to_thread(self.cgroup.kill, step, self._session_pids())
        return killed

    # -- sessions ----------------------------------------------------------------------------------
    async def create_session(self, name: str = "default", *, env: dict[str, str] | None = None,
                             cwd: str | None = None, interactive: bool = False, user: str | None = None) -> Session:
        """A persistent shell. `interactive`: bash as a terminal runs it, as ROCK's sessions are: a
        background job is announced ("[1] <pid>") and each command's stderr is merged into its stdout
        in the order written (ExecResult.stderr stays empty). `user`: run the shell as this user of the
        sandbox's own /etc/passwd (an image sandbox only: others have one user)."""
        self._check_open()
        if user is not None and self.config.image is None:
            raise SessionError(f"session user {user!r}: only an image sandbox has users of its own; "
                               "run the sandbox on an image (SandboxConfig.image)")
        if user is not None:
            passwd = (await self.read_file("/etc/passwd")).decode(errors="replace")
            if not any(line.split(":", 1)[0] == user for line in passwd.splitlines()):
                raise SessionError(f"no user {user!r} in sandbox {self.id}'s /etc/passwd; add it first "
                                   f"(useradd -m {user})")
        if name in self._sessions and self._sessions[name].alive:
            raise SessionError(f"session {name!r} already exists in sandbox {self.id}; close it first")
        s = Session(self, name)
        s.interactive = interactive
        self._session_seq += 1
        s.index = self._session_seq
        self._sessions[name] = s
        key = f"s:{name}"
        waiter = asyncio.get_running_loop().create_future()
        self._session_waiters[key] = waiter
        self._send(op="session_new", id=key, env=env, cwd=cwd, shell=self.config.shell, interactive=interactive,
                   user=user)
        await asyncio.wait_for(waiter, 10)
        return s

    async def run_in_session(self, name: str, cmd: str, *, timeout: float | None = None,
                             env: dict[str, str] | None = None, cwd: str | None = None,
                             on_output: Callable[[OutputChunk], None] | None = None,
                             max_output: int | None = None, tool_call_id: str | None = None) -> ExecResult:
        self._check_open()
        s = self._sessions.get(name)
        if s is None or not s.alive:
            raise SessionError(f"no running session {name!r} in sandbox {self.id}; call create_session({name!r})")
        step = self._begin_step(cmd, name, tool_call_id, False)
        s.last_step = step
        self._restage(step)
        try:
            if (refusal := self._precheck(cmd, step, session=name)) is not None:
                return refusal
            if self.cgroup is not None and s.hostpid:
                # The shell joins this step's cgroup, so what it forks for this command belongs to it.
                await asyncio.to_thread(self.cgroup.move, s.hostpid, step)
            limit = max_output or self.config.limits.output_bytes
            c = self._register(step, limit, on_output, session=name)
            msg = {"op": "session_run", "id": c.id, "sid": f"s:{name}", "cmd": cmd, "env": env, "cwd": cwd,
                   "max_output": limit, "merge": s.interactive}
            return await self._run(c, cmd, msg, timeout, session=name, internal=False, tool_call_id=tool_call_id)
        finally:
            self._open_steps.discard(step)
            if self.cgroup is not None and s.hostpid and s.alive and self._sessions.get(name) is s:
                # back to its own cgroup: nothing it forks between commands joins a finished step
                with contextlib.suppress(OSError):  # the shell is gone (killed with a timed-out command)
                    await asyncio.to_thread(self.cgroup.move_to_session, s.hostpid, s.index)

    async def close_session(self, name: str) -> None:
        s = self._sessions.pop(name, None)
        if s is not None and s.alive:
            with contextlib.suppress(SandboxClosed):
                self._send(op="session_close", id=f"s:{name}")

    def sessions(self) -> list[str]:
        return [n for n, s in self._sessions.items() if s.alive]

    # -- files (through the agent, as the sandbox user: host symlink tricks cannot apply) -----------
    async def write_file(self, path: str, data: bytes | str, *, mode: int | None = None, as_step: bool = False,
                         tool_call_id: str | None = None) -> None:
        """Write a file inside the sandbox. `as_step=True` makes it one of the agent's steps (judged,
        attributed, its writes watched) rather than corral's own work.

        corral's own write (the default) is made by corral's agent itself: no component of `path`
        is followed through a symbolic link (FileAccessError instead), missing directories are
        created, and the file is written under a temporary name and renamed into place, so a link
        at `path` is replaced, never written through. An existing file keeps its mode unless `mode`
        is given (new files: 0644)."""
        if isinstance(data, str):
            data = data.encode()
        if not as_step:
            await transfer.put(self, [transfer.Entry(path, "file", data, mode)])
            return
        q = shlex.quote(path)
        chmod = f" && chmod {mode:o} -- {q}" if mode is not None else ""
        r = await self.exec(f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q}{chmod}", stdin=data,
                            _internal=not as_step, tool_call_id=tool_call_id)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot write {path} in sandbox {self.id}: {r.error or r.stderr.strip()}")

    async def read_file(self, path: str, *, max_bytes: int = 64 << 20, as_step: bool = False,
                        tool_call_id: str | None = None) -> bytes:
        r = await self.exec(f"cat -- {shlex.quote(path)}", max_output=max_bytes + 1, _internal=not as_step,
                            tool_call_id=tool_call_id)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot read {path} in sandbox {self.id}: {r.error or r.stderr.strip()}")
        if len(r.stdout_bytes) > max_bytes or r.stdout_truncated:
            raise FileAccessError(f"{path} is larger than max_bytes={max_bytes}; use download() or raise it")
        return r.stdout_bytes

    async def upload(self, src: str | Path, dest: str) -> None:
        """Copy a host file or directory into the sandbox (dest is a directory for directories),
        written by corral's agent as write_file() writes: links inside the sandbox are never
        followed; links in `src` are copied as links; modes are kept."""
        src = Path(src)
        if not src.exists():
            raise FileAccessError(f"{src} does not exist on the host")
        if src.is_file():
            await self.write_file(dest, src.read_bytes(), mode=src.stat().st_mode & 0o777)
            return
        await transfer.put(self, await asyncio.to_thread(transfer.tree, src, dest))

    async def download(self, src: str, dest: str | Path, *, max_bytes: int = 256 << 20) -> list[str]:
        """Copy a sandbox file or directory to the host. Members that would escape dest (absolute or
        outward symlinks, device nodes) are skipped and their names returned."""
        dest = Path(dest)
        q = shlex.quote(src)
        r = await self.exec(f"if [ -d {q} ]; then tar -c -C {q} .; else cat -- {q}; fi",
                            max_output=max_bytes + 1, _internal=True)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot download {src}: {r.stderr.strip()}")
        if r.stdout_truncated:
            raise FileAccessError(f"{src} is larger than max_bytes={max_bytes}")
        data = r.stdout_bytes
        skipped: list[str] = []
        if tarfile.is_tarfile(io.BytesIO(data)) and len(data) % 512 == 0:
            dest.mkdir(parents=True, exist_ok=True)

            def safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                try:
                    return tarfile.data_filter(member, path)
                except tarfile.FilterError:
                    skipped.append(member.name)  # absolute/escaping links, devices: never extracted
                    return None

            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(dest, filter=safe)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return skipped

    # -- attribution -------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """Processes of the sandbox (bwrap, the agent, commands), not counting the idle staged child."""
        if self.cgroup is not None:
            staged = self._stage.pid if self._stage else None
            return [p for p in self.cgroup.pids() if p != staged]
        proc = self._dep.proc if self._dep is not None else None
        return procs.descendants(proc.pid) if proc else []

    def _note_connect(self, pid: int, ip: str, port: int, inode: int | None = None) -> float:
        """A TCP connect() that will proceed (the watcher keeps none that fail at once), with its
        socket's inode: the gateway's connection is matched to it by that identity first. Returns how
        long the call must wait for its turn under the sandbox's connection rate (0: at once);
        connections within the sandbox (loopback, its own address) cost corral nothing and never wait."""
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback or (self.net is not None and str(addr) == self.net.ip):
            return 0.0
        ip = str(addr)  # a dual-stack socket's v4-mapped address: the gateway sees the IPv4 one
        step = SandboxCgroup.step_of(pid) if self.cgroup else None
        q = self._connects.get((ip, port))
        if q is None:
            if len(self._connects) >= 4096:  # a sweep of destinations the gateway never saw: forget the oldest
                del self._connects[next(iter(self._connects))]
            q = self._connects[(ip, port)] = collections.deque(maxlen=256)
        q.append(_Connect(ip, port, pid, step, procs.info(pid), inode=inode))
        if self._pace is None:
            if self._runtime is None:
                return 0.0
            b = self._runtime.config.budgets
            self._pace = Pace(b.connect_rate, b.connect_burst)
        wait = self._pace.take()
        now = time.monotonic()
        if wait and now - self._paced_noted >= 1.0:  # one event per sandbox and second
            self._paced_noted = now
            ev = Event(kind=EventKind.SANDBOX, action="paced", sandbox_id=self.id, dst_ip=ip, dst_port=port,
                       reason=(f"more than {self._pace.rate:g} new connections a second (after a burst of "
                               f"{self._pace.burst}): connect() waits its turn ({wait * 1000:.0f} ms now)"),
                       data={"rate": self._pace.rate, "burst": self._pace.burst, "wait_ms": round(wait * 1000, 1),
                             "paced_total": self._pace.paced})
            self.attribute(ev, pid=pid)
            self._emit(ev)
        return wait

    def _exec_degraded(self, pid: int, why: str) -> None:
        """An exec, connect or send refused because it could not be judged (or an exec killed
        because what ran is not what was judged): recorded against the process's step."""
        ev = Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id, verdict=Verdict.DENY, reason=why)
        self.attribute(ev, pid=pid)
        self._emit(ev)

    def _note_datagram(self, pid: int, ip: str, port: int, sent: bool, inode: int | None = None) -> None:
        """UDP to an inet address: DNS goes to corral's resolver; anything else is dropped by
        nftables, never forwarded. A datagram sent to an address is recorded (once per process and
        destination every 10 s) as a denied connection, judged and attributed like one. A UDP
        socket's connect() sends nothing, and a common idiom uses it only to ask which interface
        routes somewhere: it is recorded as `udp-connect`, which the default rules leave alone. The
        sandbox's own loopback is not egress."""
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if port == 53 and inode is not None:
            # a resolver's socket: its queries reach corral's DNS server, which is told whose socket
            # it is here, without looking through every process's descriptors per query
            self._dns_socks[inode] = pid
        if port == 53 or self._runtime is None or addr.is_loopback:
            return
        action = "connect" if sent else "udp-connect"
        key, now = (pid, ip, port, action), time.monotonic()
        if now - self._datagrams.get(key, -1e9) < 10.0:
            return
        self._datagrams[key] = now
        reason = ("UDP other than DNS never leaves a sandbox (dropped)" if sent else
                  "a UDP socket aimed here; datagrams it sends are dropped (UDP other than DNS never leaves)")
        ev = Event(kind=EventKind.CONNECT, action=action, sandbox_id=self.id, dst_ip=ip, dst_port=port,
                   protocol="udp", verdict=Verdict.DENY, bytes_up=0, bytes_down=0, reason=reason)
        self.attribute(ev, pid=pid)
        self._runtime.emit(ev)

    def _claim_connect(self, ip: str, port: int, inode: Callable[[], int | None] | None = None) -> _Connect | None:
        q = self._connects.get((ip, port))
        if not q:
            return None
        rec: _Connect | None = None
        # several calls to this destination: by socket identity while the socket is still there
        # (exact, whatever else went there), looked up only then
        ino = inode() if inode is not None and len(q) > 1 else None
        if ino is not None:
            rec = next((r for r in q if r.inode == ino), None)
            if rec is not None:
                q.remove(rec)
        if rec is None:
            # else oldest unclaimed first: connections reach the gateway in the order they were made
            rec = q[0]
            rec.ambiguous = any(r.pid != rec.pid for r in q)
            q.popleft()
        if not q:
            del self._connects[(ip, port)]
        return rec

    def step_info(self, step: int | None) -> _StepInfo | None:
        return self._steps.get(step) if step else None

    def attribute(self, ev: Event, sock: tuple[str, int] | None = None, pid: int | None = None,
                  group: tuple[str, int] | None = None) -> None:
        """Fill in episode, step, command and process of an event (from a sandbox socket or pid;
        `group`: the pid's cgroup as the caller already read it, a moment that may have been its last)."""
        ev.sandbox_id = self.id
        if pid is None and sock is not None and self.agent_hostpid:
            # The connect() the exec watcher saw names the process and its step (only calls that
            # proceed are kept). Several to one destination: matched by the socket's inode while the
            # socket exists, else (a scanner's connect-and-close) oldest first; when two processes
            # raced there, the socket table decides.
            inode: int | None = None
            looked = False
            agent = self.agent_hostpid

            def lookup() -> int | None:
                nonlocal inode, looked
                if not looked:
                    looked = True
                    diag = self.net.diag if self.net is not None else None
                    if diag is not None and sock[0] == "tcp" and ev.dst_ip and ev.dst_port:
                        with contextlib.suppress(OSError):  # unanswered: attributed as if the socket were gone
                            inode = diag.tcp_inode(self.net.ip, sock[1], ev.dst_ip, ev.dst_port)
                    else:
                        inode = procs.socket_inode(agent, sock[0], sock[1])
                return inode

            rec = self._claim_connect(ev.dst_ip, ev.dst_port or 0, lookup) if ev.dst_ip else None
            if rec is not None and not rec.ambiguous:
                ev.pid, ev.step = rec.pid, rec.step
                if rec.proc is not None:
                    ev.ppid, ev.exe, ev.argv = rec.proc.ppid, rec.proc.exe, rec.proc.argv
                ev.data["attribution"] = "connect-syscall"
                pid = None
            else:
                if (ino := lookup()) is not None:
                    pid = self._dns_socks.get(ino) if sock[0] == "udp" else None
                    if pid is None or not os.path.exists(f"/proc/{pid}"):
                        pid = procs.owner_of_inode(ino, self.pids())
                if pid is not None:
                    ev.data["attribution"] = "socket"
                elif rec is not None:
                    ev.pid, ev.step = rec.pid, rec.step
                    ev.data["attribution"] = "connect-syscall-ambiguous"
        if pid is not None:
            ev.pid = pid
            info = procs.info(pid)
            if info is not None:
                ev.ppid, ev.exe, ev.argv = info.ppid, info.exe, info.argv
            if group is None and self.cgroup is not None:
                group = self.cgroup.group(pid)
            step = group[1] if group is not None and group[0] == "step" else None
            if group is not None and group[0] == "session":
                # forked by a session shell between its commands: the session's last command's doing
                s = self._session_by_index(group[1])
                step = s.last_step if s is not None else None
                ev.data["attribution"] = "session-shell"
            known = self._pids.get(pid)
            if step is None and known is not None:
                # already exited (a short-lived writer, say): what the exec watcher saw of it
                step, ev.exe, ev.argv = known
                ev.data["attribution"] = "exec-record"
            if step:
                ev.step = step
        if ev.kind == EventKind.CONNECT and ev.action == "connect" and ev.step:
            self.stats_for(ev.step).connections += 1
        st = self.step_info(ev.step)
        if st is not None:
            ev.command = st.command
            ev.episode_id = st.episode_id
            if st.tool_call_id:
                ev.data.setdefault("tool_call_id", st.tool_call_id)
        if ev.episode_id is None:
            ev.episode_id = self.episode_id

    def _process_event(self, pid: int, group: tuple[str, int] | None = None) -> Event:
        ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id=self.id)
        self.attribute(ev, pid=pid, group=group)
        if ev.ppid:
            parent = procs.info(ev.ppid)
            if parent is not None and parent.argv:
                ev.data["parent_name"] = os.path.basename(parent.argv[0])
        with contextlib.suppress(OSError):
            ev.data["cwd"] = os.readlink(f"/proc/{pid}/cwd")
        ev.data["gpu_granted"] = self.config.gpu
        if self.config.protected_paths:  # rules judge what a program writes against them (F12)
            ev.data["protected"] = self.config.protected_paths
        return ev

    def stats_for(self, step: int) -> StepStats:
        if step not in self._stats:
            self._stats[step] = StepStats()
        return self._stats[step]

    def step_stats(self, step: int) -> dict[str, float | int]:
        """Per-step accounting: CPU seconds, peak memory, processes started, connections made."""
        return self.stats_for(step).as_dict()

    def _judge_exec(self, ev: Event) -> bool:
        """An exec is about to happen: record it and let the detector refuse it."""
        if ev.step and not ev.data.get("derived"):  # an interpreter or loader target is the same process
            self.stats_for(ev.step).processes += 1
        if ev.pid:
            self._pids[ev.pid] = (ev.step, ev.exe, ev.argv)
            if ev.step is None:
                self._note_internal_exec(ev.pid)
        if self._runtime is None:
            return True
        origin = None
        with contextlib.suppress(Exception):  # provenance must never keep an exec from being judged
            origin = self._downloads.origin(ev, self._received)
        if origin is not None:
            ev.data["downloaded"] = origin
        j = self._runtime.emit(ev)
        if j is not None and j.errors:  # not fully judged: refused (the watcher records it as degraded)
            raise RuntimeError("; ".join(j.errors))
        allowed = not (j is not None and j.blocks)
        if allowed and ev.pid:
            with contextlib.suppress(Exception):
                self._downloads.note(ev, ev.pid)
        return allowed

    def _received(self, step: int | None, pid: int) -> float | None:
        """When the last allowed transfer of process `pid` (in `step`) that received bytes ended."""
        if self._runtime is None:
            return None
        ends = [e.ts for e in self._runtime.store.events(sandbox_id=self.id, kind=EventKind.CONNECT, step=step)
                if e.action == "close" and e.pid == pid and (e.bytes_down or 0) > 0]
        return max(ends, default=None)

    def _emit(self, ev: Event):
        if self._runtime is not None:
            return self._runtime.emit(ev)
        return None
