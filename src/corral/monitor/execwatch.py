"""Every execve in a sandbox, seen before it happens (seccomp user notification).

The agent installs a filter that hands each execve/execveat to corral (SECCOMP_RET_USER_NOTIF) and
passes the listener fd to the host. For each notification corral reads the path and argv from the
stopped process's memory (execjudge: the whole argv, the interpreter of a #! script, a loader's
target, an execveat descriptor), records a process event (attributed to its step by its cgroup), lets
the detector judge it, and only then answers: continue, or EPERM. Nothing is missed however
short-lived, and a known-bad binary never runs. If corral goes away, the listener closes and every
exec in the sandbox fails (ENOSYS): fail closed.

Every connect() is notified too, whatever its address length, and every send that can carry an
address (sendto with one, sendmsg, sendmmsg): a connection is recorded with its socket's inode, and
only when the call will proceed (a connected or listening socket's connect fails, and is not kept).

Fail closed: any error while judging an exec, a connect or a send (memory that cannot be read, an
argv above the cap, a rule or the store raising) refuses the call (EPERM) and records a `degraded`
event. What stays best-effort is described in execjudge's docstring: after an exec the image that
runs is checked against the one judged (ExecWatch._verify), and a mismatch is killed and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import glob
import logging
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pyseccomp as sc

from corral.events import Event, Verdict
from corral.inflight import InFlight
from corral.monitor import masquerade
from corral.monitor.execjudge import ExecCall, cmdline_of, image_of, int_arg, read_call, tgid_of
from corral.monitor.masquerade import SYSTEM_DIRS
from corral.monitor.netcalls import (
    MMSG_MAX,
    mmsg_names,
    msg_name,
    read_sockaddr,
    socket_inode,
    socket_protocol,
    tcp_connect_fails,
)
from corral.sandbox.procs import ns_pid
from corral.sandbox.seccomp import ATTEMPTS

log = logging.getLogger(__name__)

NOTIF_RECV = 0xC0502100  # SECCOMP_IOCTL_NOTIF_RECV = _IOWR('!', 0, struct seccomp_notif)
NOTIF_SEND = 0xC0182101  # SECCOMP_IOCTL_NOTIF_SEND = _IOWR('!', 1, struct seccomp_notif_resp)
NOTIF_ID_VALID = 0x40082102  # SECCOMP_IOCTL_NOTIF_ID_VALID = _IOW('!', 2, __u64)
FLAG_CONTINUE = 1
# this machine's own numbers (a notification carries the native syscall number)
NR_EXECVEAT, NR_CONNECT, NR_SENDTO, NR_SENDMSG, NR_SENDMMSG = (
    sc.resolve_syscall(sc.Arch.NATIVE, n) for n in ("execveat", "connect", "sendto", "sendmsg", "sendmmsg"))
NETWORK = (NR_CONNECT, NR_SENDTO, NR_SENDMSG, NR_SENDMMSG)
# Attempts that a sandbox cannot carry out (no capabilities; sandbox/seccomp.py's filter leaves them to
# this monitor) but that are evidence: an escape tried (mounts, a new root, a host file opened by handle,
# modules, kexec, BPF, namespaces, a device node made), another process attached to (ptrace), or packets
# captured or forged (a packet or raw socket). Each is refused with the error the filter would give,
# and recorded as a `syscall` event.
S_IFMT, S_IFBLK, S_IFCHR = 0o170000, 0o060000, 0o020000
AF_INET, AF_INET6, AF_PACKET, SOCK_RAW, SOCK_TYPE_MASK = 2, 10, 17, 3, 0xF
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
IPPROTO_ICMP, IPPROTO_ICMPV6 = 1, 58
ATTEMPTED: dict[int, str] = {}
for _name in (*ATTEMPTS, "mknod", "mknodat", "socket"):
    with contextlib.suppress(Exception):
        ATTEMPTED[sc.resolve_syscall(sc.Arch.NATIVE, _name)] = _name
NR_SOCKET = next(nr for nr, name in ATTEMPTED.items() if name == "socket")
MSG_FASTOPEN = 0x20000000
# After an exec is let through: when to look at the image that runs (seconds from the answer). The
# exec completes within microseconds to milliseconds; a failed one leaves the old image, and the
# check gives up after the last delay.
VERIFY_DELAYS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@functools.cache
def exec_filter_bpf() -> bytes:
    """BPF for the agent: notify corral of execve/execveat, allow everything else."""
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.add_rule(sc.NOTIFY, "execve")
    f.add_rule(sc.NOTIFY, "execveat")
    # every connect, whatever its address length (an inet address padded to sockaddr_storage's 128
    # bytes is still one), so a socket closed at once can still be traced to its process and step
    f.add_rule(sc.NOTIFY, "connect")
    # sends that can name a destination: sendto with an address (a plain send() passes none and is
    # not stopped), and every sendmsg/sendmmsg, whose address is in memory BPF cannot read.
    # Datagrams other than DNS never leave, but the attempt is an event (and TCP Fast Open connects).
    f.add_rule(sc.NOTIFY, "sendto", sc.Arg(5, sc.NE, 0))
    f.add_rule(sc.NOTIFY, "sendmsg")
    f.add_rule(sc.NOTIFY, "sendmmsg")
    # attempts that are evidence in themselves, always refused (see ATTEMPTS)
    for name in ATTEMPTS:
        with contextlib.suppress(Exception):  # not a syscall on this architecture
            f.add_rule(sc.NOTIFY, name)
    for name, arg in (("mknod", 1), ("mknodat", 2)):  # device nodes only: FIFOs and files are work
        for kind in (S_IFBLK, S_IFCHR):
            with contextlib.suppress(Exception):
                f.add_rule(sc.NOTIFY, name, sc.Arg(arg, sc.MASKED_EQ, S_IFMT, kind))
    f.add_rule(sc.NOTIFY, "socket", sc.Arg(0, sc.EQ, AF_PACKET))
    for family in (AF_INET, AF_INET6):
        f.add_rule(sc.NOTIFY, "socket", sc.Arg(0, sc.EQ, family), sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, SOCK_RAW))
    fd = os.memfd_create("corral-exec-filter", os.MFD_CLOEXEC)
    with open(fd, "w+b") as buf:
        f.export_bpf(buf)
        buf.seek(0)
        return buf.read()


@dataclass
class _Expect:
    """An exec let through, to check once its new image is in place."""

    tgid: int
    call: ExecCall
    before: tuple[tuple[int, int] | None, list[str] | None]  # the process's image and argv before it
    tries: int = 0
    handle: asyncio.TimerHandle | None = None


SHARE_WINDOW = 0.1  # seconds over which a sandbox's share of the event loop is counted

class ExecWatch:
    """Serves one sandbox's listener fd on the event loop."""

    def __init__(self, fd: int, on_exec: Callable[[Event], bool], make_event: Callable[[int], Event],
                 on_connect: Callable[[int, str, int, int | None], float] | None = None,
                 on_datagram: Callable[[int, str, int, bool, int | None], None] | None = None,
                 on_degraded: Callable[[int, str], None] | None = None, share: float | None = None,
                 on_attempt: Callable[[Event], None] | None = None) -> None:
        self.fd = fd
        # the most of the event loop's time this sandbox's calls may take per SHARE_WINDOW (None: no cap)
        self.share = share
        self._window, self._used = 0.0, 0.0
        self._resume_at: asyncio.TimerHandle | None = None
        self._closed = False
        self.paused = 0  # windows in which this sandbox's calls were held back
        # (host pid, dst ip, dst port, sent): sent for a sendto, not for a UDP socket's connect()
        self.on_datagram = on_datagram
        # (host pid, dst ip, dst port, socket inode), before the SYN leaves, for calls that proceed;
        # returns how long the call waits for its turn (the sandbox's connection rate)
        self.on_connect = on_connect
        self.on_exec = on_exec  # returns False to refuse the exec
        self.make_event = make_event  # an attributed PROCESS event for a host pid
        self.on_degraded = on_degraded  # (host pid, why): a call refused because it could not be judged
        self.on_attempt = on_attempt  # a refused ATTEMPTED call's `syscall` event, to record and judge
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._ready)
        self.count = 0
        self._expect: dict[int, _Expect] = {}  # by tgid
        self._hashing = InFlight()  # execs waiting for a file's hash (answered when it is known)
        self._paced: dict[int, asyncio.TimerHandle] = {}  # connects waiting for their turn, by notification

    def close(self) -> None:
        self._closed = True
        if self._resume_at is not None:
            self._resume_at.cancel()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        for x in self._expect.values():
            if x.handle is not None:
                x.handle.cancel()
        self._expect.clear()
        for h in self._paced.values():
            h.cancel()
        self._paced.clear()

    def _ready(self) -> None:
        t0 = self.loop.time()
        try:
            self._serve_one()
        finally:
            self._charge(t0)

    # the two watchers that were charged last, and when (distinct): is another sandbox asking too?
    _latest: tuple[int, float] = (0, -1e9)
    _previous: tuple[int, float] = (0, -1e9)

    def _contended(self, now: float) -> bool:
        me = id(self)
        return any(who != me and now - when < SHARE_WINDOW for who, when in (ExecWatch._latest, ExecWatch._previous))

    def _charge(self, t0: float) -> None:
        """Count the loop time this sandbox's call took; past its share of the window, while another
        sandbox's calls are being judged too, its calls wait (stopped in the kernel) until the next
        window, and the loop serves the others. Alone, a sandbox may use the whole loop: the cap
        shares it, it does not waste it."""
        now = self.loop.time()
        if now - self._window >= SHARE_WINDOW:
            self._window, self._used = now, 0.0
        self._used += now - t0
        if ExecWatch._latest[0] != id(self):
            ExecWatch._previous = ExecWatch._latest
        ExecWatch._latest = (id(self), now)
        if self.share is not None and self._used > self.share * SHARE_WINDOW and self._resume_at is None \
                and not self._closed and self._contended(now):
            self.loop.remove_reader(self.fd)
            self._resume_at = self.loop.call_at(self._window + SHARE_WINDOW, self._resume)
            self.paused += 1

    def _resume(self) -> None:
        self._resume_at = None
        if not self._closed:
            self.loop.add_reader(self.fd, self._ready)

    def _serve_one(self) -> None:
        req = bytearray(80)
        try:
            fcntl.ioctl(self.fd, NOTIF_RECV, req, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
                return  # the target died before we looked
            self.close()
            return
        nid, pid, _flags, nr, _arch, _ip = struct.unpack_from("=QIIiIQ", req)
        args = struct.unpack_from("=6Q", req, 32)
        allow: bool | None = False
        try:
            if nr in NETWORK:
                wait = self._network(nid, pid, nr, args)
                allow = True
                if wait > 0:  # its turn comes later; the loop serves other calls and sandboxes meanwhile
                    allow = None
                    self._paced[nid] = self.loop.call_later(wait, self._respond_paced, nid)
            elif nr in ATTEMPTED:
                allow = False
                self._attempt(nid, pid, nr, args)
            else:
                allow = self._exec(nid, pid, nr, args)  # None: answered later, once a file is hashed
        except Exception as e:  # fail closed: what could not be judged does not happen
            allow = False
            what = "connect/send" if nr in NETWORK else "exec"
            if self._valid(nid):  # not merely a caller that died while we looked
                self._degraded(pid, f"{what} refused: it could not be judged ({type(e).__name__}: {e})")
        finally:
            # answered whatever happened: an unanswered notification leaves the thread stopped for good
            if allow is not None:
                # a packet socket answers as the filter's family allow-list would
                packet = nr == NR_SOCKET and args[0] == AF_PACKET
                self._respond(nid, allow, errno.EAFNOSUPPORT if packet else errno.EPERM)

    def _degraded(self, pid: int, why: str) -> None:
        log.warning("corral exec monitor: pid %s: %s", pid, why)
        if self.on_degraded is not None:
            try:
                self.on_degraded(pid, why)
            except Exception:  # the store itself may be what failed: the refusal stands, and is logged
                log.exception("corral exec monitor: could not record a degraded event for pid %s", pid)

    # -- connect and send ------------------------------------------------------------------------
    def _network(self, nid: int, pid: int, nr: int, args: tuple[int, ...]) -> float:
        """Notes the call's destinations; returns how long the call must wait for its turn (the
        sandbox's connection rate), 0 to go on at once."""
        if nr == NR_CONNECT:
            dsts = [read_sockaddr(pid, args[1], args[2])]
        elif nr == NR_SENDTO:
            dsts = [read_sockaddr(pid, args[4], args[5])]
        elif nr == NR_SENDMSG:
            dsts = [msg_name(pid, args[1])]
        else:
            dsts = mmsg_names(pid, args[1], min(args[2] & 0xFFFFFFFF, MMSG_MAX))
        dsts = list(dict.fromkeys(d for d in dsts if d is not None))
        if not dsts:
            return 0.0  # no inet address (a unix socket, a connected socket's plain send)
        fd = args[0] & 0xFFFFFFFF
        proto = socket_protocol(pid, fd)
        inode = socket_inode(pid, fd)
        if not self._valid(nid):  # the memory and descriptor we read belonged to this very call
            return 0.0
        flags = args[3] if nr == NR_SENDTO else args[2]
        if proto.startswith("TCP"):
            # a TCP connect, or a TCP Fast Open send that connects: kept only when it will proceed.
            # Any other TCP send ignores its address (it goes where the socket is connected).
            connects = nr == NR_CONNECT or (nr in (NR_SENDTO, NR_SENDMSG) and flags & MSG_FASTOPEN)
            if (connects and self.on_connect is not None and inode is not None
                    and not tcp_connect_fails(pid, fd, inode)):
                return self.on_connect(pid, *dsts[0], inode)
            return 0.0
        # connect() on a UDP socket sends nothing yet, but names the destination of every later
        # send(): the only moment corral sees where such datagrams would go.
        if self.on_datagram is not None:
            for dst in dsts:
                self.on_datagram(pid, *dst, nr != NR_CONNECT, inode)
        return 0.0

    # -- attempts ------------------------------------------------------------------------------------
    def _attempt(self, nid: int, pid: int, nr: int, args: tuple[int, ...]) -> None:
        """A refused attempt (ATTEMPTED), as a `syscall` event of its process."""
        if self.on_attempt is None or not self._valid(nid):
            return
        name = ATTEMPTED[nr]
        if name == "ptrace" and (args[0] & 0xFFFFFFFF not in (PTRACE_ATTACH, PTRACE_SEIZE)
                                 or args[1] & 0xFFFFFFFF in _own_children(pid)):
            # PTRACE_TRACEME, the other requests, and a seize of the caller's own child (strace starting
            # the program it runs): a debugger starting its program (refused all the same)
            return
        if name.startswith("process_vm_") and (args[0] & 0xFFFFFFFF == ns_pid(pid)
                                               or args[0] & 0xFFFFFFFF in _own_children(pid)):
            return  # its own memory, or its own child's (a debugger's, a profiler's): refused all the same
        if name == "pidfd_getfd" and _pidfd_target(pid, int_arg(args[0])) in _own_children(pid, host=True):
            return
        ev = self.make_event(pid)
        ev.action, ev.verdict = "syscall", Verdict.DENY
        ev.data["syscall"] = name
        if name == "socket":
            family, kind = args[0] & 0xFFFFFFFF, args[1] & SOCK_TYPE_MASK
            protocol = args[2] & 0xFFFFFFFF
            # ping's and traceroute's raw ICMP socket is recorded, apart from one that can carry TCP or UDP
            icmp = protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6)
            ev.data["syscall"] = ("socket_packet" if family == AF_PACKET else "socket_raw_icmp" if icmp
                                  else "socket_raw")
            ev.data["socket"] = {"family": family, "type": kind, "protocol": protocol}
        elif name == "ptrace":
            ev.data["syscall"] = "ptrace_attach"
            target = ev.data["target_pid"] = args[1] & 0xFFFFFFFF  # in the sandbox's pid namespace
            with contextlib.suppress(OSError):  # the program it runs, as the sandbox's own /proc names it
                ev.data["target_exe"] = os.readlink(f"/proc/{pid}/root/proc/{target}/exe")
        elif name.startswith("process_vm_"):
            ev.data["target_pid"] = args[0] & 0xFFFFFFFF  # in the sandbox's pid namespace
        elif name == "pidfd_getfd":
            ev.data["target_fd"] = args[1] & 0xFFFFFFFF
        elif name.startswith("mknod"):
            mode = args[2 if name == "mknodat" else 1] & 0xFFFFFFFF
            ev.data["syscall"] = "mknod_device"
            dev = args[3 if name == "mknodat" else 2] & 0xFFFFFFFF
            ev.data["device"] = {"kind": "block" if mode & S_IFMT == S_IFBLK else "char",
                                 "major": os.major(dev), "minor": os.minor(dev)}
        ev.reason = f"{ev.data['syscall']} refused: a sandbox may not"
        self.on_attempt(ev)

    # -- exec ----------------------------------------------------------------------------------------
    def _exec(self, nid: int, pid: int, nr: int, args: tuple[int, ...]) -> bool | None:
        call = read_call(pid, nr == NR_EXECVEAT, args)
        self.count += 1
        if not self._valid(nid):  # the memory we read must belong to this very exec
            return False  # the caller is gone: the answer goes nowhere
        tgid = tgid_of(pid) or pid
        pending = self._expect.pop(tgid, None)
        if pending is not None:
            # this process execs again: its last exec is complete (or failed) now, judge it first
            self._verify(pending, last=True)
        before = (image_of(tgid), cmdline_of(tgid))
        checks = {t.exe: masquerade.DEFAULT.check(f"/proc/{pid}/root{t.exe}", os.path.basename(t.exe), "")
                  for t in call.targets if _compared(t, pid)}
        if any(c.pending for c in checks.values()):
            # a file to hash first (a copy of a system program is as big as it): in corral's hashing
            # threads, within the sandbox's budget, while this exec stays stopped and the loop serves others
            self._hashing.start(self._exec_hashed(nid, pid, call, tgid, before, list(checks)))
            return None
        return self._judge(pid, call, tgid, before, checks)

    async def _exec_hashed(self, nid: int, pid: int, call: ExecCall, tgid: int,
                           before: tuple[tuple[int, int] | None, list[str] | None], exes: list[str]) -> None:
        allow = False
        try:
            sid = self.make_event(pid).sandbox_id
            checks = {exe: await masquerade.DEFAULT.resolve(f"/proc/{pid}/root{exe}", os.path.basename(exe), sid)
                      for exe in exes}
            if self._valid(nid):
                allow = self._judge(pid, call, tgid, before, checks)
        except Exception as e:  # fail closed, as in _ready
            allow = False
            if self._valid(nid):
                self._degraded(pid, f"exec refused: it could not be judged ({type(e).__name__}: {e})")
        finally:
            self._respond(nid, allow)

    def _judge(self, pid: int, call: ExecCall, tgid: int, before: tuple[tuple[int, int] | None, list[str] | None],
               checks: dict[str, masquerade.Check]) -> bool:
        allow = True
        for i, target in enumerate(call.targets):
            ev = self.make_event(pid)
            ev.action = "exec"
            ev.exe = target.exe
            ev.argv = target.argv
            ev.data["comm"] = target.comm
            ev.data.update(target.data)
            if i:  # what the kernel or the loader runs for the exec just judged: the same process
                ev.data["derived"] = True
            elif call.image is None and not call.unverifiable:
                # no such program (a PATH lookup trying each directory, say): the exec will fail; still
                # judged, and reports show it only on request
                ev.data["unopened"] = True
            check = checks.get(target.exe)  # only targets _compared() picked were checked
            if check is not None and check.refused:
                # its identity could not be checked within the sandbox's hashing budget: fail closed
                ev.verdict, ev.reason = Verdict.DENY, check.refused
                self.on_exec(ev)
                return False
            if check is not None and check.source:
                ev.data["renamed_from"] = check.source
            # every target is judged even after a refusal: the evidence names what was really meant to run
            allow = self.on_exec(ev) and allow
        if not allow:
            return False
        self._expect[tgid] = x = _Expect(tgid, call, before)
        x.handle = self.loop.call_later(VERIFY_DELAYS[0], self._verify, x)
        return True

    def _verify(self, x: _Expect, last: bool = False) -> None:
        """Is the image that runs now the one judged? A thread can rewrite the path or argv between
        corral's read and the kernel's: a different image is killed, a different argv judged again."""
        if x.handle is not None:
            x.handle.cancel()
            x.handle = None
        if self._expect.get(x.tgid) is x:
            del self._expect[x.tgid]
        try:
            self._check(x, last)
        except Exception as e:  # fail closed: an exec that cannot be checked is not left running
            self._kill(x.tgid)
            self._degraded(x.tgid, f"exec check failed, process killed ({type(e).__name__}: {e})")

    def _check(self, x: _Expect, last: bool) -> None:
        image, argv = image_of(x.tgid), cmdline_of(x.tgid)
        if image is None or argv is None or x.before[0] is None:
            return  # already gone (or its image could not be read before the exec: nothing to compare)
        call = x.call
        # Not replaced yet, or the exec failed and the old image goes on. The image changes with the
        # address space, all at once; the argv of the new one reads empty for a moment after that.
        same = image == x.before[0] and (image != call.image or argv == x.before[1])
        if same or (not argv and call.argv):
            if not last and x.tries + 1 < len(VERIFY_DELAYS):
                x.tries += 1
                self._expect[x.tgid] = x
                x.handle = self.loop.call_later(VERIFY_DELAYS[x.tries], self._verify, x)
            return
        judged = call.targets[-1]
        if not call.unverifiable and image != call.image and image not in _binfmt_images():
            self._kill(x.tgid)
            ev = self._actual(x.tgid, argv)
            ev.verdict = Verdict.DENY
            ev.reason = (f"exec mismatch: judged {judged.exe!r} (file {call.image}), but {ev.exe!r} (file {image}) "
                         "runs; killed (the path was rewritten or the file replaced between corral's read and "
                         "the kernel's)")
            self.on_exec(ev)
            self._degraded(x.tgid, ev.reason)
            return
        # a #! script's argv is the kernel's own (interpreter, argument, script path as passed, rest)
        want = call.argv[1:] if call.script else call.argv
        got = argv[len(argv) - len(want):] if call.script else argv
        if got != want and (want or not call.script):
            # judged again as it really is: the rules decide, as they would have before the exec
            ev = self._actual(x.tgid, argv)
            ev.data["exec_mismatch"]["what"] = "argv"
            if not self.on_exec(ev):
                self._kill(x.tgid)
                self._degraded(x.tgid, f"exec mismatch: the argv that runs is not the one judged "
                                       f"({judged.argv[:8]!r}...), and it is refused; killed")

    def _actual(self, tgid: int, argv: list[str]) -> Event:
        ev = self.make_event(tgid)
        ev.action = "exec"
        ev.argv = argv
        with contextlib.suppress(OSError):
            ev.exe = os.readlink(f"/proc/{tgid}/exe")
        ev.data["comm"] = os.path.basename(ev.exe) if ev.exe else None
        ev.data["exec_mismatch"] = {"what": "image"}
        ev.data["derived"] = True
        return ev

    def _kill(self, tgid: int) -> None:
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(tgid)
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os.close(pidfd)

    def _respond_paced(self, nid: int) -> None:
        self._paced.pop(nid, None)
        self._respond(nid, True)

    def _respond(self, nid: int, allow: bool, refusal: int = errno.EPERM) -> None:
        resp = struct.pack("=QqiI", nid, 0, 0 if allow else -refusal, FLAG_CONTINUE if allow else 0)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, NOTIF_SEND, bytearray(resp), True)

    def _valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
            return True
        except OSError:
            return False


def _own_children(tid: int, host: bool = False) -> set[int]:
    """The pids, in the sandbox's namespace (or the host's), of the children of the process thread
    `tid` belongs to."""
    out: set[int] = set()
    tgid = tgid_of(tid) or tid
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{tgid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{tgid}/task/{task}/children") as f:
                for child in f.read().split():
                    if host:
                        out.add(int(child))
                    elif (ns := ns_pid(int(child))) is not None:
                        out.add(ns)
    return out


def _pidfd_target(tid: int, fd: int) -> int | None:
    """The host pid a pidfd of thread `tid` refers to (its fdinfo's Pid line, read through the host's
    /proc), or None."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{tid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return None



@functools.cache
def _binfmt_images() -> frozenset[tuple[int, int]]:
    """Interpreters registered with binfmt_misc (qemu-user, say): the kernel maps them in place of
    a program of theirs, so such an image is the judged program's, not a mismatch."""
    out = set()
    for entry in glob.glob("/proc/sys/fs/binfmt_misc/*"):
        with contextlib.suppress(OSError, UnicodeDecodeError), open(entry) as f:
            for line in f:
                if line.startswith("interpreter "):
                    with contextlib.suppress(OSError):
                        st = os.stat(line.split(" ", 1)[1].strip())
                        out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def _compared(target, pid: int) -> bool:
    """Whether a target is checked for being a renamed copy of a system program (monitor/masquerade):
    a path outside the system directories (the file as the host sees it, through the process's root)
    whose file lies on a mount the sandbox can write. A file on one of its read-only mounts (the host's
    own tree) was not put there by anything in the sandbox, whatever name it runs under: git's helpers
    are links named git-receive-pack to a second copy of git."""
    exe = target.exe
    if not (bool(exe) and exe.startswith("/") and not exe.startswith(SYSTEM_DIRS) and "exec_fd" not in target.data):
        return False
    try:
        return not os.statvfs(f"/proc/{pid}/root{exe}").f_flag & os.ST_RDONLY
    except OSError:
        return True  # cannot tell: compared, as before
