"""Which socket is this connection? One exact sock_diag lookup in a sandbox's network namespace.

The gateway knows a connection's 4-tuple as the sandbox sees it (sandbox address and source port,
original destination). The kernel's inet_diag answers "the socket with this 4-tuple" with a hash
lookup, O(1) whatever else the sandbox has open; reading /proc/<pid>/net/tcp instead costs a line per
socket, TIME_WAIT ones included, and a sandbox that floods connections makes that table (and every
attribution, for every tenant on the same event loop) as long as it likes.

pyroute2's DiagSocket only dumps whole tables, so the one request this needs (SOCK_DIAG_BY_FAMILY
without NLM_F_DUMP, which the kernel serves with inet_diag_find_one_icsk) is packed here."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading

from corral.nsutil import socket_in

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
ALL_STATES = 0xFFFFFFFF
NO_COOKIE = 0xFFFFFFFF
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2: family, protocol, ext, pad, states
_ID = struct.Struct(">HH16s16s")  # inet_diag_sockid: sport, dport, src, dst (network order) ...
_ID_TAIL = struct.Struct("=III")  # ... then if, cookie[2] (host order)
_MSG = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans, then sockid, ...
_MSG_INODE = 4 + _ID.size + _ID_TAIL.size + 16  # ... expires, rqueue, wqueue, uid, then inode


def _addr16(ip: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    return (socket.AF_INET6, a.packed) if a.version == 6 else (socket.AF_INET, a.packed + bytes(12))


class SockDiag:
    """An exact TCP socket lookup in one network namespace. Thread-safe; one request at a time."""

    def __init__(self, netns_fd: int) -> None:
        self._sock = socket_in(netns_fd, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self._sock.settimeout(1.0)
        self._lock = threading.Lock()
        self._seq = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def tcp_inode(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> int | None:
        """Inode of the TCP socket src→dst in this namespace; None if there is none (closed, or in
        TIME_WAIT, which has no inode). A socket of an AF_INET6 dual-stack client connected to an IPv4
        address is asked for under its v4-mapped addresses."""
        fam, src = _addr16(src_ip)
        _, dst = _addr16(dst_ip)
        ino = self._get(fam, src, src_port, dst, dst_port)
        if ino is None and fam == socket.AF_INET:
            mapped = b"\0" * 10 + b"\xff\xff"
            ino = self._get(socket.AF_INET6, mapped + src[:4], src_port, mapped + dst[:4], dst_port)
        return ino

    def _get(self, fam: int, src: bytes, sport: int, dst: bytes, dport: int) -> int | None:
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            body = (_REQ.pack(fam, socket.IPPROTO_TCP, 0, ALL_STATES) + _ID.pack(sport, dport, src, dst)
                    + _ID_TAIL.pack(0, NO_COOKIE, NO_COOKIE))
            self._sock.send(_HDR.pack(_HDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0)
                            + body)
            while True:
                data = self._sock.recv(8192)
                size, kind, _, seq, _ = _HDR.unpack_from(data)
                if seq == self._seq:
                    break  # an answer to an earlier request that timed out is skipped
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, _HDR.size)[0]
            if code in (errno.ENOENT, 0):
                return None
            raise OSError(code, f"sock_diag: {os.strerror(code)}")
        if kind != SOCK_DIAG_BY_FAMILY or size < _HDR.size + _MSG_INODE + 4:
            return None
        ino = struct.unpack_from("=I", data, _HDR.size + _MSG_INODE)[0]
        return ino or None
