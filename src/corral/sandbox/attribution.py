"""Attribution: which episode, step and command each process, connection, datagram and exec belongs
to, from the kernel's facts (cgroups, the exec watcher's records, socket identities), and what each
step's processes used."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.budget import Pace
from corral.events import Event, EventKind, Verdict
from corral.monitor.netcalls import listening_ports
from corral.monitor.provenance import fetched_origin
from corral.monitor.taskfiles import script_step
from corral.monitor.writers import WRITABLE
from corral.net.netns import HOST_IP
from corral.sandbox import procs
from corral.sandbox.cgroups import SandboxCgroup

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "tcsh", "csh"})


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



class Attribution:
    """Mixed into Sandbox (whose state it uses); kept apart because it is one job."""

    # -- attribution -------------------------------------------------------------------------------
    def pids(self: Sandbox) -> list[int]:
        """Processes of the sandbox (bwrap, the agent, commands), not counting the idle staged child."""
        if self.cgroup is not None:
            staged = self._stage.pid if self._stage else None
            return [p for p in self.cgroup.pids() if p != staged]
        proc = self._dep.proc if self._dep is not None else None
        return procs.descendants(proc.pid) if proc else []

    def _note_connect(self: Sandbox, pid: int, ip: str, port: int, inode: int | None = None) -> float:
        """A TCP connect() that will proceed (the watcher keeps none that fail at once), with its
        socket's inode: the gateway's connection is matched to it by that identity first. Returns how
        long the call must wait for its turn under the sandbox's connection rate (0: at once);
        connections within the sandbox (loopback, its own address) cost corral nothing and never wait."""
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback or (self.net is not None and str(addr) == self.net.ip):
            if port in self._local_watch_ports() and self._first_in_a_while((pid, str(addr), port, "local")):
                # a relay inside the sandbox, or traffic handed to one: the gateway never sees it
                ev = Event(kind=EventKind.CONNECT, action="local", sandbox_id=self.id, verdict=Verdict.ALLOW,
                           dst_ip=str(addr), dst_port=port, protocol="tcp")
                self.attribute(ev, pid=pid)
                self._emit(ev)
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

    def _first_in_a_while(self: Sandbox, key: tuple[int, str, int, str]) -> bool:
        """Once per process, destination and kind every 10 s: events the gateway never sees (datagrams,
        connections inside the sandbox) cost their sandbox an event each, not a flood of them."""
        now = time.monotonic()
        if now - self._datagrams.get(key, -1e9) < 10.0:
            return False
        self._datagrams[key] = now
        return True

    def _local_watch_ports(self: Sandbox) -> frozenset[int]:
        """Ports on the sandbox's own addresses whose connections are events (the rules' `proxy_ports`
        list: proxy conventions); every other connection inside the sandbox is its own business."""
        det = self._runtime.detector if self._runtime is not None else None
        lists = det.ruleset.lists if det is not None else {}
        return _ports(tuple(lists.get("proxy_ports", ())))

    def _exec_degraded(self: Sandbox, pid: int, why: str) -> None:
        """An exec, connect or send refused because it could not be judged (or an exec killed
        because what ran is not what was judged): recorded against the process's step."""
        ev = Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=self.id, verdict=Verdict.DENY, reason=why)
        self.attribute(ev, pid=pid)
        self._emit(ev)

    def _note_attempt(self: Sandbox, ev: Event) -> None:
        """A refused escape or capture attempt (monitor/execwatch.py ATTEMPTED): judged and recorded, once per
        process and call every 10 s (a loop of refused mounts is one attempt, not a flood)."""
        if self._runtime is not None and self._first_in_a_while((ev.pid, ev.data.get("syscall"))):
            self._runtime.emit(ev)

    def _note_datagram(self: Sandbox, pid: int, ip: str, port: int, sent: bool, inode: int | None = None) -> None:
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
        if self._runtime is None or addr.is_loopback or (port == 53 and (not sent or str(addr) == HOST_IP)):
            return
        # DNS addressed to some other server: nftables hands it to corral's resolver all the same, but a
        # tunnel or covert channel picks its own server, and that choice is the evidence
        action = "dns-elsewhere" if port == 53 else "connect" if sent else "udp-connect"
        if not self._first_in_a_while((pid, ip, port, action)):
            return
        reason = ("DNS to a server other than the sandbox's resolver (redirected to corral's)" if port == 53 else
                  "UDP other than DNS never leaves a sandbox (dropped)" if sent else
                  "a UDP socket aimed here; datagrams it sends are dropped (UDP other than DNS never leaves)")
        ev = Event(kind=EventKind.CONNECT, action=action, sandbox_id=self.id, dst_ip=ip, dst_port=port,
                   protocol="udp", verdict=Verdict.DENY, bytes_up=0, bytes_down=0, reason=reason)
        self.attribute(ev, pid=pid)
        self._runtime.emit(ev)

    def _claim_connect(self: Sandbox, ip: str, port: int,
                       inode: Callable[[], int | None] | None = None) -> _Connect | None:
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

    def step_info(self: Sandbox, step: int | None) -> _StepInfo | None:
        return self._steps.get(step) if step else None

    def attribute(self: Sandbox, ev: Event, sock: tuple[str, int] | None = None, pid: int | None = None,
                  group: tuple[str, int] | None = None, cwd: bool = False) -> None:
        """Fill in episode, step, command and process of an event (from a sandbox socket or pid;
        `group`: the pid's cgroup as the caller already read it, a moment that may have been its last;
        `cwd`: the process's working directory too, in data)."""
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
                if cwd and info.cwd is not None:
                    ev.data["cwd"] = info.cwd
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
        # a process writing what a shell or interpreter runs reaches out: what it fetches is code
        if ev.pid and ev.kind in (EventKind.CONNECT, EventKind.DNS) and (readers := self._code_pipes.feeds(ev.pid)):
            ev.data["feeds_code"] = readers

    def _process_event(self: Sandbox, pid: int, group: tuple[str, int] | None = None) -> Event:
        ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id=self.id)
        self.attribute(ev, pid=pid, group=group, cwd=True)
        if ev.ppid and (parent := procs.argv_of(ev.ppid)):
            ev.data["parent_name"] = os.path.basename(parent[0])
        ev.data["gpu_granted"] = self.config.gpu
        if self.config.protected_paths:  # rules judge what a program writes against them (F12)
            ev.data["protected"] = self.config.protected_paths
        return ev

    def stats_for(self: Sandbox, step: int) -> StepStats:
        if step not in self._stats:
            self._stats[step] = StepStats()
        return self._stats[step]

    def step_stats(self: Sandbox, step: int) -> dict[str, float | int]:
        """Per-step accounting: CPU seconds, peak memory, processes started, connections made."""
        return self.stats_for(step).as_dict()

    def _judge_exec(self: Sandbox, ev: Event) -> bool:
        """An exec is about to happen: record it and let the detector refuse it."""
        if ev.step and not ev.data.get("derived"):  # an interpreter or loader target is the same process
            self.stats_for(ev.step).processes += 1
        if ev.pid:
            self._pids[ev.pid] = (ev.step, ev.exe, ev.argv)
            if ev.step is None:
                self._note_internal_exec(ev.pid)
                if ev.pid in self._internal_pids:
                    ev.data["internal"] = True  # corral's own helper: still judged; reports hide it
        if self._runtime is None:
            return True
        if ev.pid and not ev.data.get("derived") and os.path.basename(ev.exe or "") in SHELLS:
            # a shell started by a process that listens (or that holds the listening socket itself): it
            # serves whoever connects, a bind shell or a web shell, whatever the server is written in
            with contextlib.suppress(Exception):
                # corral's agent, the parent of every command's first process, listens on nothing
                parent = [ev.ppid] if ev.ppid and ev.ppid != self.agent_hostpid else []
                if ports := listening_ports(ev.pid, *parent):
                    ev.data["parent_listening"] = ports
        if ev.pid and not ev.data.get("derived") and ev.argv:
            # piped code's writers, a socket's peer (codepipes.py); unreadable descriptors leave them out
            with contextlib.suppress(OSError):
                writers, peer = self._code_pipes.exec(ev.pid, ev.argv, ev.data.get("renamed_from"))
                if writers:
                    ev.data["code_writers"] = writers
                if peer:
                    ev.data["code_socket"] = peer
        if ev.pid and not ev.data.get("derived"):
            self._note_task_step(ev)
        origin = None
        with contextlib.suppress(Exception):  # provenance must never keep an exec from being judged
            origin = self._downloads.origin(ev, self._received, self._fetched)
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

    def _note_task_step(self: Sandbox, ev: Event) -> None:
        """Is this exec a task script's own file command (monitor/taskfiles.py)? The process keeps the
        mark for the file changes it makes until it execs something else or exits; at its exit the
        changes it queued are read first, so a later process given its pid never carries the mark."""
        assert ev.pid is not None
        self._end_task_step(ev.pid)
        fw = self._filewatch
        script = None
        with contextlib.suppress(Exception):  # unknown: judged as the agent's, as before
            script = script_step(fw.snapshot if fw else None, ev.pid, ev.ppid, ev.argv or [], ev.exe)
        if script is None:
            return
        try:
            fd = os.pidfd_open(ev.pid)
        except OSError:
            return  # gone already (its exec fails): nothing of it to spare
        self._task_steps[ev.pid] = (script, fd)
        asyncio.get_running_loop().add_reader(fd, self._end_task_step, ev.pid, True)
        ev.data["task_script"] = script

    def _end_task_step(self: Sandbox, pid: int, exited: bool = False) -> None:
        if pid not in self._task_steps:
            return
        if exited and (fw := self._filewatch) is not None:
            fw.drain()  # what it changed was queued before it exited: read while it still carries the mark
        mark = self._task_steps.pop(pid)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(mark[1])
        os.close(mark[1])

    def task_script_of(self: Sandbox, pid: int) -> str | None:
        """The script whose step `pid` is (marked at its exec, until it exits or execs again)."""
        mark = self._task_steps.get(pid)
        return mark[0] if mark is not None else None

    def _received(self: Sandbox, step: int | None, pid: int) -> float | None:
        """When the last allowed transfer of process `pid` (in `step`) that received bytes ended."""
        return max(self._transfers(step, pid), default=None)

    def _transfers(self: Sandbox, step: int | None, pid: int) -> list[float]:
        """When each allowed transfer of process `pid` (in `step`) that received bytes ended."""
        if self._runtime is None:
            return []
        return [e.ts for e in self._runtime.store.events(sandbox_id=self.id, kind=EventKind.CONNECT, step=step)
                if e.action == "close" and e.pid == pid and (e.bytes_down or 0) > 0]

    def _fetched(self: Sandbox, path: str, pid: int) -> dict | None:
        """Where the file at `path` (as process `pid` sees it) came from, if the process that last
        wrote it fetched it."""
        dep = self._dep
        watch = dep.writers if dep is not None else None
        if watch is None or (not dep.image and not path.startswith(_WRITABLE_DIRS)):
            return None  # outside an image's root, only the writable mounts hold what the agent wrote
        written = watch.writer(pid, path)
        if written is None or (writer := self._pids.get(written[0])) is None:
            return None
        step, exe, argv = writer
        return fetched_origin(path, step, exe, argv or [], written[1], self._transfers(step, written[0]))


_WRITABLE_DIRS = tuple(m + "/" for m in WRITABLE)


@functools.lru_cache(maxsize=8)
def _ports(items: tuple[object, ...]) -> frozenset[int]:
    return frozenset(int(p) for p in items if str(p).isdigit())
