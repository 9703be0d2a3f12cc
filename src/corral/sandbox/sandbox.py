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
import concurrent.futures
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral.bounded import Recent
from corral.budget import Pace
from corral.config import SandboxConfig
from corral.detect.command import SHORT_LINE, input_texts, too_long
from corral.detect.command import prepare as prepare_line
from corral.detect.command import split as split_command
from corral.errors import (
    IsolationUnavailable,
    SandboxClosed,
    SandboxError,
)
from corral.events import Event, EventKind, Verdict
from corral.monitor.execwatch import ExecWatch
from corral.monitor.files import FileWatch
from corral.monitor.provenance import Downloads
from corral.monitor.writers import WriterWatch
from corral.sandbox.attribution import Attribution, StepStats, _Connect, _StepInfo
from corral.sandbox.boundary import INTERNAL_STEP, Boundary
from corral.sandbox.cgroups import SandboxCgroup
from corral.sandbox.codepipes import CodePipes
from corral.sandbox.deployment import Deployment
from corral.sandbox.files import Files
from corral.sandbox.lifeline import check_open
from corral.sandbox.placement import Placement, _Stage
from corral.sandbox.protocol import Reply
from corral.sandbox.sessions import Session, Sessions

if TYPE_CHECKING:
    from corral.net.netns import SandboxNet
    from corral.runtime import Runtime

STDIN_CHUNK = 48 * 1024
YIELD_AFTER = 0.005  # seconds of judging one line before the loop serves others
# one thread reads long lines, for all sandboxes: a flood of them queues, never takes more cores
_READER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-line")
SPARE_DELAY = 0.2  # seconds from a reset to launching the next spare
KILL_WAIT = 2.0  # how long a killed command's shell gets to finish it before it is taken for stuck
KILL_AGAIN = 0.05  # meanwhile, how often what the session's shell went on to start is killed
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
    joined: int | None = None  # the step whose cgroup its child was sent to join itself (placement.py)


class Sandbox(Boundary, Placement, Sessions, Files, Attribution):
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
        self._stage_soon: asyncio.TimerHandle | None = None  # the next staged child, asked for shortly
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
        self._code_pipes = CodePipes()  # who writes the code a shell or interpreter reads from a pipe
        # host pid -> (protected script, pidfd): live processes that are a task script's own file commands
        self._task_steps: dict[int, tuple[str, int]] = {}
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
                                  self._note_datagram, self._exec_degraded, share=share, on_attempt=self._note_attempt)
        self._dep = dep
        self.cgroup = dep.cgroup
        self._request_stage()
        self._watch_files()

    def _watch_files(self) -> None:
        dep = self._dep
        if self._runtime is None or dep is None or dep.agent_pid is None:
            return
        try:
            det = self._runtime.detector
            creds = tuple(str(g) for g in det.ruleset.lists.get("credential_files", ())) if det is not None else ()
            dep.filewatch = FileWatch(dep.agent_pid, self.config.protected_paths, self._file_event,
                                      self._runtime.emit, credentials=creds)
        except OSError as e:
            self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id,
                             reason=f"file monitoring unavailable: {e}"))
            return
        try:
            dep.writers = WriterWatch(dep.agent_pid)
        except OSError as e:
            self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id,
                             reason=f"which process wrote a file is not known (a file fetched by a client other "
                                    f"than curl or wget is not recognised when it runs): {e}"))
        if dep.filewatch.fid_fd is None:
            self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id,
                             reason="deletions and renames of protected paths are not watched: fanotify's "
                                    f"file-handle mode is unavailable on kernel {os.uname().release} (it needs "
                                    "Linux >= 5.9 and file handles on the sandbox's tmpfs; run 'corral doctor')"))

    def _detach(self) -> Deployment | None:
        """Forget the running deployment: its staged child, tasks, commands (failed now) and sessions."""
        dep, self._dep = self._dep, None
        self._stage = None
        if self._stage_soon is not None:
            self._stage_soon.cancel()
            self._stage_soon = None
        for task in list(self._tasks):
            task.cancel()
        self._internal_pids.clear()
        for pid in list(self._task_steps):
            self._end_task_step(pid)
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
            # a moment later: the new episode's first command then runs without a launch competing
            # with it for the CPU (a reset again before then relaunches, as without a spare)
            await asyncio.sleep(SPARE_DELAY)
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

    @property
    def spare_ready(self) -> bool:
        """Whether the next reset() swaps in a deployment launched ahead (milliseconds) rather than
        launching one (a cold start): true from a while after the first reset, with
        RuntimeConfig.reset_spare."""
        return self._spare is not None and not self._spare.stopped

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
        try:
            if old is not None:
                # nothing of the old episode may run once the new one can: killed before the swap
                await (old.kill() if spare is not None else old.stop())
        except BaseException:
            if spare is not None:
                self._retire(spare)
            raise
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
        check_open(self, allow_terminated=allow_terminated)

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
    def _send(self, _fd: int | None = None, **msg: Any) -> None:
        """Queue a request to the agent, in order; flushed now or as soon as the socket has room. `_fd`
        rides along (SCM_RIGHTS) and is the channel's to close."""
        if self._dep is None:
            if _fd is not None:
                os.close(_fd)
            raise SandboxClosed(f"sandbox {self.id} is not running")
        self._dep.send(msg, _fd)

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
            s = self._session_by_key(msg["id"])
            if s is not None:
                s.alive = False
        elif op == "error":
            cmd = self._cmds.get(msg.get("id") or "")
            waiter = self._session_waiters.get(msg.get("id") or "")
            err = SandboxError(f"sandbox {self.id}: {msg['error']}")
            for fut in (cmd.future if cmd else None, waiter):
                if fut is not None and not fut.done():
                    fut.set_exception(err)

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
            if not _internal and (refusal := await self._precheck(cmd, step, stdin=stdin)) is not None:
                return refusal
            limit = max_output or self.config.limits.output_bytes
            c = self._register(step, limit, on_output)
            msg = {"op": "exec", "id": c.id, "cmd": cmd, "env": env, "cwd": cwd, "max_output": limit,
                   "stdin": bool(stdin)}
            stage = None if _internal else self._take_stage(step)
            if stage is not None and stage.parked and not await self._unpark(stage, step):
                stage = None
            join = None
            if stage is not None:
                msg["stage"] = stage.key
                c.hostpid = stage.pid
            else:
                if not _internal and self._stage is None:
                    asyncio.get_running_loop().call_soon(self._request_stage)  # gone with a kill_all()
                join = step
            return await self._run(c, cmd, msg, timeout, session=None, internal=_internal,
                                   tool_call_id=tool_call_id, stdin=stdin, join=join)
        finally:
            self._open_steps.discard(step)
            if self._stage_soon is not None:
                self._stage_now()

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

    async def _precheck(self, cmd: str, step: int, session: str | None = None,
                        stdin: bytes | None = None) -> ExecResult | None:
        """Judge each program the command line would run, before anything runs. Text the step feeds
        it on standard input (the write_file tool's content, a script for `python3 -`) is judged with
        the line, as a here-document would be (cmd.text)."""
        if self._runtime is None or self._runtime.detector is None:
            return None
        if (why := too_long(cmd)) is not None:
            return self._refuse(cmd, step, why)
        if len(cmd) > SHORT_LINE:
            # the parse of a long line (~0.1 ms a word) must not stall every other sandbox's events
            await asyncio.get_running_loop().run_in_executor(_READER, prepare_line, cmd)
        info = self._steps.get(step)
        since = time.perf_counter()
        for text in input_texts(cmd, stdin) or [None]:
            for simple in split_command(cmd):
                if time.perf_counter() - since > YIELD_AFTER:  # many commands, or windows: others' events go between
                    await asyncio.sleep(0)
                    since = time.perf_counter()
                ev = Event(kind=EventKind.COMMAND, action="check", sandbox_id=self.id, episode_id=self.episode_id,
                           step=step, command=cmd, argv=simple.argv,
                           data={"redirects": simple.redirects, "writes": simple.writes, "session": session,
                                 "tool_call_id": info.tool_call_id if info else None,
                                 "protected": self.config.protected_paths, **({"text": text} if text else {})})
                j = self._runtime.emit(ev, persist=False)
                # any blocking judgement refuses, a rule's or the store's (which names no rule): fail closed
                if j is not None and j.blocks:
                    why = f"refused by rule {j.rule.id}: {j.rule.title}" if j.rule is not None else j.reason
                    return self._refuse(cmd, step, why)
        return None

    def _refuse(self, cmd: str, step: int, why: str) -> ExecResult:
        self._emit(Event(kind=EventKind.COMMAND, action="refused", sandbox_id=self.id, episode_id=self.episode_id,
                         step=step, command=cmd, verdict=Verdict.DENY, reason=why))
        return ExecResult(exit_code=None, stdout_bytes=b"", stderr_bytes=b"", duration=0.0, step=step,
                          refused=True, error=why)

    def _register(self, step: int, limit: int, on_output: Callable[[OutputChunk], None] | None,
                  session: str | None = None) -> _Cmd:
        c = _Cmd(self._new_id(), step, limit, on_output, asyncio.get_running_loop().create_future(), session=session)
        self._cmds[c.id] = c
        return c

    async def _run(self, c: _Cmd, cmd: str, msg: dict, timeout: float | None, *, session: str | None,
                   internal: bool, tool_call_id: str | None = None, stdin: bytes | None = None,
                   join: int | None = None) -> ExecResult:
        """Send the request and wait for the command's end. `join`: the step whose cgroup the agent's new
        child is to move itself into (placement.py)."""
        timeout = timeout if timeout is not None else self.config.limits.timeout
        # small reads before and after each command: the step's fork refusals, the sandbox's OOM kills
        oom_before = self.cgroup.oom_kills() if self.cgroup and not internal else 0
        pids_before = self.cgroup.pids_max_hits(c.step) if self.cgroup and not internal else 0
        # made now, recorded right after the request is sent: the agent starts on the command while
        # corral records its start (nothing of the step is judged before this callback returns)
        start = None if internal else Event(kind=EventKind.COMMAND, action="start", sandbox_id=self.id, step=c.step,
                                            command=cmd, episode_id=self.episode_id,
                                            data={"session": session, "tool_call_id": tool_call_id})
        t0 = time.perf_counter()
        timed_out = False
        error = None
        if internal:
            self._internal += 1
        try:
            try:
                fd = None if join is None else self._join_fd(f"step-{join}")
                c.joined = join if fd is not None else None
                self._send(_fd=fd, **msg)
            finally:
                if start is not None:
                    self._emit(start)
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
        pids_hit = bool(self.cgroup and not internal and self.cgroup.pids_max_hits(c.step) > pids_before)
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
        """Timeout or interrupt: kill every process the step started, background and daemonized ones
        included. A session's shell is spared and goes on with the rest of the command (`echo; sleep 30`,
        the next turn of a loop): what it starts after a kill is killed in turn, until it has finished
        the command (a kill that came before the shell forked left the new child running, and the
        session was then closed as stuck)."""
        sess = self._sessions.get(session) if session else None
        again = sess is not None and self.cgroup is not None
        deadline = time.monotonic() + KILL_WAIT
        try:
            while True:
                if self.cgroup is not None:
                    await asyncio.to_thread(self.cgroup.kill, c.step, self._session_pids())
                else:
                    with contextlib.suppress(SandboxClosed):
                        self._send(op="kill", id=sess.key if sess is not None else c.id, sig=signal.SIGKILL)
                left = deadline - time.monotonic()
                try:
                    return await asyncio.wait_for(asyncio.shield(c.future), min(left, KILL_AGAIN) if again else left)
                except TimeoutError:
                    if not again or time.monotonic() >= deadline:
                        raise
        except (TimeoutError, SandboxError):
            if sess is not None:
                # The shell itself is stuck (a builtin loop): it has to go, and the session with it.
                with contextlib.suppress(SandboxClosed):
                    self._send(op="session_close", id=sess.key)
                sess.alive = False
                if self._sessions.get(session or "") is sess:
                    self._sessions.pop(session or "")
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

    def _emit(self, ev: Event):
        if self._runtime is not None:
            return self._runtime.emit(ev)
        return None
