"""What the agent started, and what is corral's own: the part of a Sandbox that keeps the two apart.

- Live steps are read from the step cgroups themselves, never from a record of which commands left
  something behind: a process a session shell forks into a finished step's cgroup is seen, sampled
  and killed like any other.
- `kill_all()` kills every process the agent started (every step's, session shells and what they
  forked, corral's own helpers, the staged child) and returns once only bwrap and the agent are left.
- The agent's loss (killed, stopped, exited) is recorded as a `degraded` event and ends the episode.
- A file change is corral's own only when its writer is known to be: the agent itself (write_file,
  upload), or a process of corral's own commands. Any other change is judged, attributed through
  the writer's cgroup, or marked unattributed once the writer is gone; it is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING, Any

from corral.errors import EpisodeEnded, SandboxError
from corral.events import Event, EventKind
from corral.sandbox import procs
from corral.sandbox.lifeline import AGENT_LOST, agent_state, describe_exit, stopped

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox

INTERNAL_STEP = 0  # corral's own helpers (read_file, download, the task's setup) run as step 0
KILL_DEADLINE = 10.0  # seconds kill_all waits for the sandbox to hold only bwrap and the agent


class Boundary:
    """Mixed into Sandbox (whose state it uses); kept apart because it is one job."""

    INFRA_TASKS = 2  # bwrap and the agent (PID 1 of the sandbox: bwrap --as-pid-1 runs no init of its own)

    # -- what is alive --------------------------------------------------------------------------
    def busy(self: Sandbox) -> bool:
        """Whether any process besides corral's own and idle session shells is alive: one read."""
        if self.cgroup is None:
            return False
        # the staged child counts once it exists: one asked for but not yet forked must not hide a
        # process of the agent's (a wrong "busy" costs one extra sampling pass; a wrong "idle", a miss)
        idle = self.INFRA_TASKS + (1 if self._stage is not None and self._stage.pid else 0)
        idle += sum(1 for s in self._sessions.values() if s.alive and s.hostpid)
        return self.cgroup.task_count() > idle

    def live_steps(self: Sandbox) -> list[int]:
        """The agent's steps that have a process alive now, read from their cgroups (so a process
        a session shell forked into a finished step's cgroup counts), and commands in flight."""
        running = {c.step for c in self._cmds.values() if c.step}
        if self.cgroup is None:
            return sorted(running)
        # corral's own: the staged child, and session shells (in the cgroup of their last step until
        # they are moved back, just after it returned). A staged child sits in a step no command has
        # begun yet, from its fork on (it joins that cgroup itself, before corral knows its pid), and
        # nothing else can get there: a sandbox's processes cannot move between cgroups.
        ignore = {self._stage.pid} if self._stage is not None and self._stage.pid else set()
        steps = self.cgroup.live_steps(self._step_over, ignore | self._session_pids())
        return sorted(running | {n for n in steps if n != INTERNAL_STEP and n <= self.step})

    def _step_over(self: Sandbox, step: int) -> bool:
        """A step whose cgroup, once empty, may go: begun, returned, and not corral's own."""
        return INTERNAL_STEP < step <= self.step and step not in self._open_steps

    def live_processes(self: Sandbox) -> list[tuple[int | None, list[int]]]:
        """(step, host pids) for every live step, and for each session's own cgroup: what an idle
        session shell forks belongs to the session's last command (None before its first)."""
        if self.cgroup is None:
            return []
        ours = {self._stage.pid if self._stage is not None else None, *self._session_pids()}
        out = [(n, [p for p in self.cgroup.pids(step=n) if p not in ours]) for n in self.live_steps()]
        for s in self._sessions.values():
            pids = self.cgroup.session_pids(s.index)
            if pids:
                out.append((s.last_step, pids))
        return out

    def _session_by_index(self: Sandbox, index: int) -> Any:
        return next((s for s in self._sessions.values() if s.index == index), None)

    # -- killing everything the agent started ---------------------------------------------------
    async def kill_all(self: Sandbox) -> int:
        """Kill every process corral's agent started in this sandbox: every step's (background and
        daemonized ones too), session shells and whatever they forked, corral's own helpers and
        the staged child. Returns, with how many were killed, only once the sandbox's cgroups hold
        nothing but bwrap and the agent; raises SandboxError if something survives. Sessions are
        gone afterwards; the sandbox stays usable (a later command gets a fresh process)."""
        for s in self._sessions.values():
            s.alive = False
        self._sessions.clear()
        self._stage = None
        dep = self._dep
        keep = {p for p in (self.agent_hostpid, dep.proc.pid if dep is not None and dep.proc else None) if p}
        deadline = time.monotonic() + KILL_DEADLINE
        killed = 0
        while True:
            if self.cgroup is not None:
                killed += await asyncio.to_thread(self.cgroup.kill, None, keep)
                left = [p for p in self.cgroup.pids() if p not in keep]
            else:  # no cgroups: the agent is the namespace's init, everything else descends from it
                left = [p for p in procs.descendants(self.agent_hostpid) if p not in keep] if self.agent_hostpid else []
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
            if not left:
                break
            if time.monotonic() > deadline:
                raise SandboxError(f"sandbox {self.id}: {len(left)} process(es) the agent started survived "
                                   f"{KILL_DEADLINE:g}s of SIGKILL (host pids {left[:8]}); close the sandbox")
            await asyncio.sleep(0.01)
        if self.cgroup is not None:
            self.cgroup.live_steps(self._step_over)  # their cgroups are empty now: removed
            self.cgroup.prune_sessions(set())
        return killed

    # -- the agent's own life -------------------------------------------------------------------
    def check_agent(self: Sandbox) -> None:
        """On the sampler's tick: a stopped agent ends the episode. (Its death is seen at once, when
        its socket closes.)"""
        pid = self.agent_hostpid
        if pid is None or self.frozen or self.closed or self._dep is None:
            return
        state = agent_state(pid)
        why = stopped(state)
        if why is not None:
            self._lose_agent("stopped", f"{why} (state {state})", {})

    def _agent_gone(self: Sandbox) -> None:
        """The running agent's socket closed (or it broke the protocol): the agent is lost. (At
        start-up, the launch fails instead: deployment.py.)"""
        task = asyncio.get_running_loop().create_task(self._agent_ended())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _agent_ended(self: Sandbox) -> None:
        rc = None
        proc = self._dep.proc if self._dep is not None else None
        if proc is not None:
            # bwrap passes on how the agent ended; it exits right after it
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = await asyncio.to_thread(proc.wait, 2)
        cause, detail, data = describe_exit(rc)
        self._lose_agent(cause, detail, data)

    def _lose_agent(self: Sandbox, cause: str, detail: str, data: dict) -> None:
        """Without its agent a sandbox can neither run nor watch commands: the episode ends now with
        the reason, commands waiting on the agent fail at once, and every process the agent started
        is killed."""
        if self.closed or self._dep is None or (self.terminated or "").startswith(AGENT_LOST):
            return
        reason = f"{AGENT_LOST}: {detail}"
        self.terminated = reason
        err = EpisodeEnded(f"sandbox {self.id}: {reason}; call reset() to start a new episode")
        for fut in [c.future for c in self._cmds.values()] + list(self._session_waiters.values()):
            if not fut.done():
                fut.set_exception(err)
        for s in self._sessions.values():
            s.alive = False
        self._emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id, episode_id=self.episode_id,
                         step=self.step or None, reason=reason,
                         data={"cause": cause, "agent_pid": self.agent_hostpid, **data}))
        self._emit(Event(kind=EventKind.SANDBOX, action="episode_ended", sandbox_id=self.id,
                         episode_id=self.episode_id, step=self.step or None, reason=reason))
        task = asyncio.get_running_loop().create_task(self._kill_after_loss())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _kill_after_loss(self: Sandbox) -> None:
        with contextlib.suppress(SandboxError, OSError):
            await self.kill_all()

    # -- whose file change ----------------------------------------------------------------------
    def _note_internal_exec(self: Sandbox, pid: int) -> None:
        """An exec while corral's own commands run: remember it if it is one of theirs, so its file
        changes are known as corral's even once it has exited."""
        if self._internal and self.cgroup is not None and self.cgroup.group(pid) == ("step", INTERNAL_STEP):
            self._internal_pids.add(pid)

    def _internal_done(self: Sandbox) -> None:
        """One of corral's own commands returned: its file events are queued by now; read them while
        its pids are still known, then forget the pids (a pid is soon another process's)."""
        self._internal -= 1
        if self._filewatch is not None:
            self._filewatch.drain()
        if not self._internal:
            self._internal_pids.clear()

    def _file_event(self: Sandbox, pid: int) -> Event | None:
        """The event for a change to a watched path made by host pid `pid`, or None when the writer
        is positively corral's own: the agent itself (write_file, upload) or a process of corral's
        own commands (its cgroup, or the pids they exec'd). Everything else is the agent's and is
        judged: attributed through the writer's cgroup or its exec record; a writer already gone
        that never exec'd is recorded as unattributed."""
        if pid == self.agent_hostpid or pid in self._internal_pids:
            return None
        group = self.cgroup.group(pid) if self.cgroup is not None else None
        if group == ("step", INTERNAL_STEP):
            return None
        ev = self._process_event(pid, group)  # the group read here: the writer may exit any moment
        if group is None and ev.data.get("attribution") != "exec-record":
            # Gone before corral read the event. Its pid may already name another process (pids are
            # reused), so what /proc says of it now is not evidence, and it is no target for a kill.
            ev.pid = ev.ppid = ev.exe = ev.argv = ev.step = ev.command = None
            for key in ("cwd", "parent_name", "tool_call_id"):
                ev.data.pop(key, None)
            ev.data.update(attribution="unattributed", writer_pid=pid)
        elif script := self.task_script_of(pid):
            ev.data["task_script"] = script
        return ev
