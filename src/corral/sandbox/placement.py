"""Every child the agent forks is placed in its cgroup (its step's, or its session's) before it may
run: the kernel then knows which command started each process. The next step's child is forked and
placed ahead of time ("staged"), so a command starts without waiting for a cgroup migration (which
takes ~10 ms on cgroup v1)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.errors import SandboxClosed, SessionError
from corral.sandbox.boundary import INTERNAL_STEP

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox
    from corral.sandbox.sessions import Session


@dataclass
class _Stage:
    key: str
    pid: int | None = None
    step: int | None = None  # set once the child sits in this step's cgroup
    parked: str | None = None  # the cgroup its step's was renamed to, when a session took that step
    joined: int | None = None  # the step whose cgroup it was sent to join itself


STAGE_AFTER = 0.05  # seconds into a command before the next step's child is forked


class Placement:
    """Mixed into Sandbox (whose state it uses); kept apart because it is one job."""

    # -- staged children: the next step's process, already in its cgroup -------------------------------
    def _request_stage(self: Sandbox) -> None:
        if self._dep is None or self.closed:
            return
        self._stage_seq += 1
        stage = self._stage = _Stage(f"stage:{self._stage_seq}")
        # The child moves itself into the next step's cgroup through a descriptor sent with the request
        # (~0.1 ms: a thread moving itself skips the lock that a move by pid waits ~5-15 ms for); the
        # kernel's list of the cgroup is checked when it announces itself, and a move by pid follows
        # if it is not there (an agent without the descriptor, a step number taken meanwhile).
        fd = self._join_fd(f"step-{self.step + 1}")
        stage.joined = self.step + 1 if fd is not None else None
        with contextlib.suppress(SandboxClosed):
            self._send(_fd=fd, op="stage", id=stage.key)

    def _join_fd(self: Sandbox, name: str) -> int | None:
        """The descriptor a new child of the agent (an exec's own when no staged one was ready, a
        session's shell) moves itself into the cgroup `name` with; _admit checks that it did."""
        if self.cgroup is None:
            return None
        try:
            return self.cgroup.join_fd(name)
        except OSError:
            return None  # moved by pid in _admit instead

    async def _place_stage(self: Sandbox, stage: _Stage) -> None:
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
                self._replace_stage(stage)

    def _replace_stage(self: Sandbox, stage: _Stage) -> None:
        """Kill a staged child that cannot serve the next step, and stage a fresh one."""
        self._stage = None
        with contextlib.suppress(SandboxClosed):
            self._send(op="kill", id=stage.key, sig=signal.SIGKILL)
        self._request_stage()

    def _restage(self: Sandbox, step: int) -> None:
        """A session command took the step a staged child sits in: place the child again, for the
        step after (else it would idle in a step that is not its own, and never be used)."""
        st = self._stage
        if st is not None and st.step == step:
            st.step = None
            task = asyncio.get_running_loop().create_task(self._place_stage(st))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unpark(self: Sandbox, stage: _Stage, step: int) -> bool:
        """A parked staged child into this step's cgroup, by renaming its cgroup; False (and the child
        killed) when that cannot be done."""
        if self.cgroup is None or stage.parked is None:
            return True
        if await asyncio.to_thread(self.cgroup.rename, stage.parked, f"step-{step}"):
            stage.parked, stage.step = None, step
            return True
        with contextlib.suppress(SandboxClosed):
            self._send(op="kill", id=stage.key, sig=signal.SIGKILL)
        return False

    async def _shell_into_step(self: Sandbox, s: Session, step: int) -> None:
        """A session's shell into this step's cgroup, so what it forks for the command belongs to it.
        Renamed there when it can be (no migration: see SandboxCgroup.rename): the staged child's
        cgroup, which holds this step's number, is renamed out of the way, then the shell's idle
        cgroup becomes the step's, provided the shell is alone in it (what it forked while idle stays
        its last command's). Otherwise the shell is moved, as on cgroup v2."""
        cg = self.cgroup
        assert cg is not None and s.hostpid
        if s.homing is not None:  # its move after the previous command, if it needed one
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await s.homing
            s.homing = None
        st = self._stage
        stage_here = st is not None and st.step == step and st.pid is not None
        park = f"stage-{st.key.split(':')[-1]}" if stage_here and st is not None else None
        hostpid, home = s.hostpid, s.cgroup

        def rename() -> tuple[bool, bool]:
            if park is not None and not cg.rename(f"step-{step}", park):
                return False, False
            return cg.alone(home, hostpid) and cg.rename(home, f"step-{step}"), park is not None

        # a read and two renames (~0.2 ms) on the loop: a thread's round trip would cost more
        renamed, parked = rename() if cg.renames else (False, False)
        if parked and st is not None and self._stage is st:
            st.parked, st.step = park, None  # parked: the next exec renames its cgroup to its own step
        else:
            self._restage(step)
        if not renamed:
            cg.forget(home)
            await asyncio.to_thread(cg.move, hostpid, step)
        s.cgroup = f"step-{step}"

    def _take_stage(self: Sandbox, step: int) -> _Stage | None:
        """The staged child for this step: placed in its cgroup, or parked (its cgroup is renamed to
        the step's by exec, see _unpark)."""
        st = self._stage
        if st is None or not (st.step == step or (st.parked and st.step is None and st.pid)):
            return None
        self._stage = None
        # the next step's child is forked a moment later: forking the agent now would take the CPU from
        # the command that just started (a command that ends sooner asks for it then: see exec)
        self._stage_soon = asyncio.get_running_loop().call_later(STAGE_AFTER, self._stage_now)
        return st

    def _stage_now(self: Sandbox) -> None:
        handle, self._stage_soon = self._stage_soon, None
        if handle is not None:
            handle.cancel()
            if self._stage is None:
                self._request_stage()

    def _on_spawned(self: Sandbox, key: str, hostpid: int | None) -> None:
        step = INTERNAL_STEP
        if key.startswith("stage:"):
            if self._stage is not None and self._stage.key == key and hostpid:
                stage = self._stage
                stage.pid = hostpid
                if (stage.joined is not None and self.cgroup is not None
                        and self.cgroup.holds(f"step-{stage.joined}", hostpid)):
                    if stage.joined == self.step + 1:
                        stage.step = stage.joined  # it placed itself
                        return
                    # a command took that step meanwhile: a fresh child joins the next one itself, sooner
                    # than a move by pid would
                    self._replace_stage(stage)
                    return
                task = asyncio.get_running_loop().create_task(self._place_stage(stage))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        waiter = None
        session = None
        if key.startswith("s:"):
            s = self._session_by_key(key)
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

    async def _admit(self: Sandbox, key: str, hostpid: int | None, step: int, waiter: asyncio.Future | None,
                     session: int | None = None) -> None:
        """Place a newly announced child in its step's cgroup (a session shell: in its session's),
        then let it run (and only then tell a waiting create_session)."""
        if self.cgroup is not None and hostpid:
            cmd = self._cmds.get(key)
            try:
                if session is not None:
                    if not self.cgroup.holds(f"session-{session}", hostpid):
                        await asyncio.to_thread(self.cgroup.move_to_session, hostpid, session)
                elif not (cmd is not None and cmd.joined == step and self.cgroup.holds(f"step-{step}", hostpid)):
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
