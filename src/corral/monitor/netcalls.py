"""Reading a network syscall a sandbox thread is stopped in (seccomp user notification): the
destinations it names and the socket it acts on, from the host side of /proc. Every read is of a
stopped thread's memory or descriptors; the caller checks the notification is still valid after."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator

from corral.monitor.execjudge import _libc, tgid_of

SOCKADDR_MAX = 28  # sockaddr_in6; a longer addrlen (sockaddr_storage is 128) carries nothing more for inet
NR_PIDFD_GETFD = 438  # the same number on every architecture
TCP_CLOSE = 7
MMSG_SIZE, MMSG_MAX = 64, 1024  # sizeof(struct mmsghdr) on 64-bit; UIO_MAXIOV, the kernel's own cap


def socket_inode(tid: int, fd: int) -> int | None:
    """The inode of socket `fd` of a stopped thread ('socket:[123]'): the socket's identity."""
    try:
        link = os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError:
        return None
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def listening_ports(*pids: int) -> list[int]:
    """The TCP ports these processes hold listening sockets on: each socket descriptor of theirs asked
    through a duplicate (pidfd_getfd, O(1) a socket). Not /proc/<pid>/net/tcp: reading it walks the
    kernel's whole TCP hash table, every namespace's, which took ~10 ms a read on this machine."""
    ports: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError, ValueError):
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:["):
                        continue
                    with _borrowed(pid, int(fd)) as s:
                        if (s is not None and s.family in (socket.AF_INET, socket.AF_INET6)
                                and s.type == socket.SOCK_STREAM
                                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                            ports.add(s.getsockname()[1])
    return sorted(ports)


def peer_of(tid: int, fd: int) -> tuple[str, int] | None:
    """The address inet socket `fd` of thread `tid` is connected to (its peer), or None (not an inet
    socket, not connected, gone): asked of a duplicate (pidfd_getfd), O(1), never the namespace's
    tables (see listening_ports)."""
    with contextlib.suppress(OSError), _borrowed(tid, fd) as s:
        if s is not None and s.family in (socket.AF_INET, socket.AF_INET6):
            host, port = s.getpeername()[:2]
            return host, port
    return None


def tcp_connect_fails(tid: int, fd: int, inode: int) -> bool:
    """Will connect() on TCP socket `fd` fail at once? Only a socket in state CLOSE can connect; one
    listening, connecting or connected answers EISCONN, EALREADY or EINVAL. The state is read from a
    duplicate of the socket (pidfd_getfd, held for two syscalls, O(1)); where that is refused, from
    the namespace's TCP tables, where a fresh socket (bound or not) is not listed."""
    state = tcp_state(tid, fd)
    if state is not None:
        return state != TCP_CLOSE
    want = str(inode)
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{tid}/net/{name}") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 9 and parts[9] == want:
                    return True
    return False


def tcp_state(tid: int, fd: int) -> int | None:
    with _borrowed(tid, fd) as s:
        if s is None:
            return None
        try:
            return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return None


@contextlib.contextmanager
def _borrowed(tid: int, fd: int) -> Iterator[socket.socket | None]:
    """Socket `fd` of thread `tid`'s process, duplicated into corral (pidfd_getfd) for as long as the
    block runs; None where it cannot be (gone, not a socket, refused)."""
    try:
        pidfd = os.pidfd_open(tid)
    except OSError:  # a thread that is not its process's leader: its process's descriptors are the same
        tgid = tgid_of(tid)
        try:
            pidfd = os.pidfd_open(tgid) if tgid else -1
        except OSError:
            pidfd = -1
    if pidfd < 0:
        yield None
        return
    try:
        dup = _libc().syscall(NR_PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if dup < 0:
        yield None
        return
    try:
        try:
            s = socket.socket(fileno=os.dup(dup))
        except OSError:
            yield None
            return
        with s:
            yield s
    finally:
        os.close(dup)


def msg_name(tid: int, msghdr: int) -> tuple[str, int] | None:
    """The destination a struct msghdr names (msg_name, msg_namelen), if any."""
    raw = read_mem(tid, msghdr, 12)
    if raw is None or len(raw) < 12:
        raise OSError(errno.EFAULT, f"the message header at {msghdr:#x} cannot be read")
    name, namelen = struct.unpack("=QI", raw)
    return read_sockaddr(tid, name, namelen) if name and namelen else None


def mmsg_names(tid: int, base: int, n: int) -> list[tuple[str, int] | None]:
    """The destinations of sendmmsg's `n` messages: the array read at once, each distinct address
    once (a flood of 1024-message calls must not cost the event loop 2048 reads each)."""
    if not n:
        return []
    raw = read_mem(tid, base, n * MMSG_SIZE)
    if raw is None or len(raw) < n * MMSG_SIZE:
        raise OSError(errno.EFAULT, f"the message headers at {base:#x} cannot be read")
    names = {struct.unpack_from("=QI", raw, i * MMSG_SIZE) for i in range(n)}
    names = {(name, namelen) for name, namelen in names if name and namelen}
    if not names:
        return []
    try:
        mem = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(errno.EFAULT, f"the sender's memory cannot be read: {e.strerror}") from None
    try:
        out = []
        for name, namelen in names:
            try:
                sa = os.pread(mem, min(namelen & 0xFFFFFFFF, SOCKADDR_MAX), name)
            except (OSError, OverflowError):
                raise OSError(errno.EFAULT, f"the destination address at {name:#x} cannot be read") from None
            out.append(parse_sockaddr(sa))
        return out
    finally:
        os.close(mem)


def read_mem(tid: int, addr: int, n: int) -> bytes | None:
    try:
        with open(f"/proc/{tid}/mem", "rb", buffering=0) as mem:
            mem.seek(addr)
            return mem.read(n)
    except (OSError, ValueError, OverflowError):
        return None


def socket_protocol(tid: int, fd: int) -> str:
    """The protocol of socket `fd` of a thread stopped in a syscall ("TCP", "UDP", "UDPv6", ...),
    as sockfs names it; "" when it cannot be read (the thread died, or `fd` is not a socket). The
    thread's own /proc entry serves any thread, not only a process's main one, and the socket is
    only looked at, never opened by corral."""
    try:
        return os.getxattr(f"/proc/{tid}/fd/{fd}", "system.sockprotoname").rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        return ""


def read_sockaddr(pid: int, ptr: int, length: int) -> tuple[str, int] | None:
    if not ptr or not length:
        return None
    raw = read_mem(pid, ptr, min(length & 0xFFFFFFFF, SOCKADDR_MAX))
    if raw is None:
        raise OSError(errno.EFAULT, f"the destination address at {ptr:#x} cannot be read")
    return parse_sockaddr(raw)


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    if len(raw) < 8:
        return None
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None
