"""Every execve in a sandbox, seen before it happens (seccomp user notification).

The agent installs a filter that hands each execve/execveat to corral (SECCOMP_RET_USER_NOTIF) and
passes the listener fd to the host. For each notification corral reads the path and argv from the
stopped process's memory, records a process event (attributed to its step by its cgroup), lets the
detector judge it, and only then answers: continue, or EPERM. Nothing is missed however short-lived,
and a known-bad binary never runs. If corral goes away, the listener closes and every exec in the
sandbox fails (ENOSYS): fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Callable

import pyseccomp as sc

from corral.events import Event
from corral.monitor.masquerade import SYSTEM_DIRS, renamed_from

NOTIF_RECV = 0xC0502100  # SECCOMP_IOCTL_NOTIF_RECV = _IOWR('!', 0, struct seccomp_notif)
NOTIF_SEND = 0xC0182101  # SECCOMP_IOCTL_NOTIF_SEND = _IOWR('!', 1, struct seccomp_notif_resp)
NOTIF_ID_VALID = 0x40082102  # SECCOMP_IOCTL_NOTIF_ID_VALID = _IOW('!', 2, __u64)
FLAG_CONTINUE = 1
# this machine's own numbers (a notification carries the native syscall number)
NR_EXECVEAT, NR_CONNECT, NR_SENDTO = (sc.resolve_syscall(sc.Arch.NATIVE, n) for n in ("execveat", "connect", "sendto"))
MAX_ARGS = 256
MAX_STR = 4096


@functools.cache
def exec_filter_bpf() -> bytes:
    """BPF for the agent: notify corral of execve/execveat, allow everything else."""
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.add_rule(sc.NOTIFY, "execve")
    f.add_rule(sc.NOTIFY, "execveat")
    # inet connects only (by address length), so a socket closed at once can still be traced to
    # the process and step that opened it
    f.add_rule(sc.NOTIFY, "connect", sc.Arg(2, sc.EQ, 16))
    f.add_rule(sc.NOTIFY, "connect", sc.Arg(2, sc.EQ, 28))
    # datagrams sent to an explicit inet address (UDP): they never leave, but the attempt is an event
    f.add_rule(sc.NOTIFY, "sendto", sc.Arg(5, sc.EQ, 16))
    f.add_rule(sc.NOTIFY, "sendto", sc.Arg(5, sc.EQ, 28))
    fd = os.memfd_create("corral-exec-filter", os.MFD_CLOEXEC)
    with open(fd, "w+b") as buf:
        f.export_bpf(buf)
        buf.seek(0)
        return buf.read()


class ExecWatch:
    """Serves one sandbox's listener fd on the event loop."""

    def __init__(self, fd: int, on_exec: Callable[[Event], bool], make_event: Callable[[int], Event],
                 on_connect: Callable[[int, str, int], None] | None = None,
                 on_datagram: Callable[[int, str, int, bool], None] | None = None) -> None:
        self.fd = fd
        # (host pid, dst ip, dst port, sent): sent for a sendto, not for a UDP socket's connect()
        self.on_datagram = on_datagram
        self.on_connect = on_connect  # (host pid, dst ip, dst port), before the SYN leaves
        self.on_exec = on_exec  # returns False to refuse the exec
        self.make_event = make_event  # an attributed PROCESS event for a host pid
        self.loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._ready)
        self.count = 0

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _ready(self) -> None:
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
        allow = True
        try:
            if nr in (NR_CONNECT, NR_SENDTO):
                self._network(nid, pid, nr, args)
            else:
                allow = self._exec(nid, pid, nr, args)
        except Exception:
            allow = True  # a monitoring bug must not wedge the sandbox
        finally:
            # answered whatever happened: an unanswered notification leaves the thread stopped for good
            self._respond(nid, allow)

    def _network(self, nid: int, pid: int, nr: int, args: tuple[int, ...]) -> None:
        ptr, length = (args[1], args[2]) if nr == NR_CONNECT else (args[4], args[5])
        dst = _read_sockaddr(pid, ptr, length)
        if dst is None:
            return
        # connect() on a UDP socket sends nothing yet, but names the destination of every later
        # send(): the only moment corral sees where such datagrams would go.
        datagram = nr == NR_SENDTO or _socket_protocol(pid, args[0]).startswith("UDP")
        if not self._valid(nid):  # the memory and descriptor we read belonged to this very call
            return
        if datagram:
            if self.on_datagram is not None:
                self.on_datagram(pid, *dst, nr == NR_SENDTO)
        elif self.on_connect is not None:
            self.on_connect(pid, *dst)

    def _exec(self, nid: int, pid: int, nr: int, args: tuple[int, ...]) -> bool:
        path_ptr, argv_ptr = (args[1], args[2]) if nr == NR_EXECVEAT else (args[0], args[1])
        path, argv = _read_exec_args(pid, path_ptr, argv_ptr)
        self.count += 1
        if not self._valid(nid):  # the memory we read must belong to this very exec
            return True
        ev = self.make_event(pid)
        ev.action = "exec"
        ev.exe = _resolve(pid, path)
        ev.argv = argv
        ev.data["comm"] = os.path.basename(path) if path else None
        if ev.exe and not ev.exe.startswith(SYSTEM_DIRS):
            # the file as the host sees it, through the process's own root
            source = renamed_from(f"/proc/{pid}/root{ev.exe}", os.path.basename(ev.exe))
            if source:
                ev.data["renamed_from"] = source
        return self.on_exec(ev)

    def _respond(self, nid: int, allow: bool) -> None:
        resp = struct.pack("=QqiI", nid, 0, 0 if allow else -errno.EPERM, FLAG_CONTINUE if allow else 0)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, NOTIF_SEND, bytearray(resp), True)

    def _valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.fd, NOTIF_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
            return True
        except OSError:
            return False


def _socket_protocol(tid: int, fd: int) -> str:
    """The protocol of socket `fd` of a thread stopped in a syscall ("TCP", "UDP", "UDPv6", ...),
    as sockfs names it; "" when it cannot be read (the thread died, or `fd` is not a socket). The
    thread's own /proc entry serves any thread, not only a process's main one, and the socket is
    only looked at, never opened by corral."""
    try:
        return os.getxattr(f"/proc/{tid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _read_exec_args(pid: int, path_ptr: int, argv_ptr: int) -> tuple[str, list[str]]:
    try:
        mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "", []
    try:
        path = _cstr(mem, path_ptr)
        argv: list[str] = []
        if argv_ptr:
            for i in range(MAX_ARGS):
                raw = os.pread(mem, 8, argv_ptr + 8 * i)
                if len(raw) < 8:
                    break
                ptr = struct.unpack("=Q", raw)[0]
                if not ptr:
                    break
                argv.append(_cstr(mem, ptr))
        return path, argv
    except OSError:
        return "", []
    finally:
        os.close(mem)


def _read_sockaddr(pid: int, ptr: int, length: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(ptr)
            raw = mem.read(min(length, 28))
    except (OSError, ValueError, OverflowError):
        return None
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None


def _cstr(mem: int, addr: int) -> str:
    if not addr:
        return ""
    # a string may end near the end of a mapping: read page-bounded pieces
    out = b""
    while len(out) < MAX_STR:
        chunk = min(4096 - (addr % 4096), MAX_STR - len(out))
        data = os.pread(mem, chunk, addr)
        if not data:
            break
        end = data.find(b"\0")
        if end >= 0:
            out += data[:end]
            break
        out += data
        addr += len(data)
    return out.decode("utf-8", errors="replace")


def _resolve(pid: int, path: str) -> str:
    if not path or path.startswith("/"):
        return path
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return path
    return os.path.normpath(os.path.join(cwd, path))
