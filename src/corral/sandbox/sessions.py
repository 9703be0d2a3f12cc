"""Sessions: persistent shells whose cwd, environment and shell state carry over between commands.
Between commands a session's shell waits in a cgroup of its own; during one, in the step's: its idle
cgroup is renamed to the step's where the hierarchy allows (placement.py), else the shell is moved."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral.errors import SandboxClosed, SessionError

if TYPE_CHECKING:
    from corral.sandbox.cgroups import SandboxCgroup
    from corral.sandbox.sandbox import ExecResult, OutputChunk, Sandbox


class Session:
    """A persistent shell: cwd, environment and shell state carry over between commands."""

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        self.sandbox = sandbox
        self.name = name
        self.hostpid: int | None = None
        self.alive = True
        self.index = 0
        # the cgroup it is in: session-<index> at first; then its last command's step-<n>, renamed from
        # one to the next while it is alone in it, or session-<index> again when that command left
        # processes behind (see _move_out)
        self.cgroup = ""
        self.last_step: int | None = None  # what it forks while idle belongs to its last command
        self.homing: asyncio.Future | None = None  # its move out of a step it shares, after a command
        self.interactive = False  # see Sandbox.create_session

    @property
    def key(self) -> str:
        """Its name with the agent: one per shell ever started, never a name's. A shell that is closing
        (killed after an interrupt or a timeout) reports its exit later, maybe once a new session has
        taken its name; keyed by name, that late exit marked the new one dead."""
        return f"s:{self.index}:{self.name}"

    async def run(self, cmd: str, *, timeout: float | None = None, **kw: Any) -> ExecResult:
        return await self.sandbox.run_in_session(self.name, cmd, timeout=timeout, **kw)

    async def close(self) -> None:
        await self.sandbox.close_session(self.name)


def running_session(sb: Any, name: str) -> Session:
    """The session a command is for (a Sandbox's or the fake's): the sandbox open, the shell alive."""
    sb._check_open()
    s = sb._sessions.get(name)
    if s is None or not s.alive:
        raise SessionError(f"no running session {name!r} in sandbox {sb.id}; call create_session({name!r})")
    return s


class Sessions:
    """Mixed into Sandbox (whose state it uses); kept apart because it is one job."""

    # -- sessions ----------------------------------------------------------------------------------
    async def create_session(self: Sandbox, name: str = "default", *, env: dict[str, str] | None = None,
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
        s.cgroup = f"session-{s.index}"
        self._sessions[name] = s
        key = s.key
        waiter = asyncio.get_running_loop().create_future()
        self._session_waiters[key] = waiter
        # the shell joins its session's cgroup itself (placement.py), checked when it announces itself
        self._send(_fd=self._join_fd(s.cgroup), op="session_new", id=key, env=env, cwd=cwd,
                   shell=self.config.shell, interactive=interactive, user=user)
        await asyncio.wait_for(waiter, 10)
        return s

    async def run_in_session(self: Sandbox, name: str, cmd: str, *, timeout: float | None = None,
                             env: dict[str, str] | None = None, cwd: str | None = None,
                             on_output: Callable[[OutputChunk], None] | None = None,
                             max_output: int | None = None, tool_call_id: str | None = None) -> ExecResult:
        s = running_session(self, name)
        step = self._begin_step(cmd, name, tool_call_id, False)
        s.last_step = step
        try:
            if (refusal := await self._precheck(cmd, step, session=name)) is not None:
                self._restage(step)
                return refusal
            if self.cgroup is not None and s.hostpid:
                await self._shell_into_step(s, step)
            else:
                self._restage(step)
            limit = max_output or self.config.limits.output_bytes
            c = self._register(step, limit, on_output, session=name)
            msg = {"op": "session_run", "id": c.id, "sid": s.key, "cmd": cmd, "env": env, "cwd": cwd,
                   "max_output": limit, "merge": s.interactive}
            return await self._run(c, cmd, msg, timeout, session=name, internal=False, tool_call_id=tool_call_id)
        finally:
            self._open_steps.discard(step)
            cg = self.cgroup
            if (cg is not None and s.hostpid and s.alive and self._sessions.get(name) is s
                    and s.cgroup == f"step-{step}" and not cg.alone(s.cgroup, s.hostpid)):
                # the command left processes running: the shell moves out, after the result is handed
                # back (it is idle meanwhile), and before its next command (which waits for it)
                s.homing = asyncio.ensure_future(_move_out(cg, s, step))
                s.homing.add_done_callback(_quiet)

    async def close_session(self: Sandbox, name: str) -> None:
        s = self._sessions.pop(name, None)
        if s is not None and s.alive:
            with contextlib.suppress(SandboxClosed):
                self._send(op="session_close", id=s.key)

    def sessions(self: Sandbox) -> list[str]:
        return [n for n, s in self._sessions.items() if s.alive]

    def _session_by_key(self: Sandbox, key: str) -> Session | None:
        """The session an agent message is about; None for one already closed (or replaced)."""
        return next((s for s in self._sessions.values() if s.key == key), None)


async def _move_out(cg: SandboxCgroup, s: Session, step: int) -> None:
    """A shell out of the step whose command left processes running, into a cgroup of the session's
    own, so they stay the step's and the next command does not take them along. (A shell alone in its
    step's cgroup stays there: the next command renames that cgroup to its own step, and what the shell
    forks while idle is its last command's either way, see attribution.) The move (~6 ms on v1, a
    migration) goes to a thread, while the agent thinks about its next step."""
    assert s.hostpid
    cg.forget(f"step-{step}")  # no longer the session's cgroup
    await asyncio.to_thread(cg.move_to_session, s.hostpid, s.index)
    s.cgroup = f"session-{s.index}"


def _quiet(fut: asyncio.Future) -> None:
    """A move back that failed (the shell is gone, killed with a timed-out command): nothing to do."""
    if not fut.cancelled():
        fut.exception()
