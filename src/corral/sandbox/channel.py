"""The host's end of one agent's socket: requests out in order, replies in with the kernel's word on
who sent them.

A SEQPACKET socket pair, one message a request or reply (protocol.py). Each reply carries the
sender's host pid as SCM_CREDENTIALS, which the kernel fills in: a child's pid is never taken from
what the agent says. Descriptors the agent passes (its exec filter's notification fd, with `ready`)
ride as SCM_RIGHTS, and so does the one descriptor a request may carry to the agent (a staged child's
cgroup to join: placement.py). Sending never blocks the event loop: what the socket cannot take now
waits in an outbox, flushed when it has room.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import Callable

from corral.errors import SandboxClosed
from corral.sandbox.protocol import ProtocolError, Reply, Request, decode, encode

_UCRED = "iII"
RCVBUF = 4 << 20


class AgentChannel:
    """`on_reply(reply, hostpid, fds)` gets each reply (fds it does not keep, it closes);
    `on_gone(why)` once, when the socket closes or the agent breaks the protocol."""

    def __init__(self, sock: socket.socket, on_reply: Callable[[Reply, int | None, list[int]], None],
                 on_gone: Callable[[str], None], name: str) -> None:
        self.sock: socket.socket | None = sock
        self.name = name
        self._on_reply = on_reply
        self._on_gone = on_gone
        self._outbox: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._writing = False
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        """(host end, child end): the child end is passed to bwrap and closed here once it ran."""
        host, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        return host, child

    @property
    def open(self) -> bool:
        return self.sock is not None

    def send(self, msg: Request, fd: int | None = None) -> None:
        """Queue a request, in order; flushed now or as soon as the socket has room. `fd`, if given,
        is this channel's from now on: closed once sent (the agent holds its copy), or dropped."""
        if self.sock is None:
            if fd is not None:
                os.close(fd)
            raise SandboxClosed(f"sandbox {self.name} is not running")
        self._outbox.append((encode(msg), fd))
        if len(self._outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            while self._outbox:
                data, fd = self._outbox[0]
                if fd is None:
                    sock.send(data)
                else:
                    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
                    os.close(fd)
                self._outbox.popleft()
        except BlockingIOError:
            if not self._writing:
                asyncio.get_running_loop().add_writer(sock.fileno(), self._flush)
                self._writing = True
            return
        except (BrokenPipeError, ConnectionResetError):
            self._drop_outbox()
            raise SandboxClosed(f"sandbox {self.name}: its agent died; close it and create a new one") from None
        if self._writing:
            asyncio.get_running_loop().remove_writer(sock.fileno())
            self._writing = False

    def _on_readable(self) -> None:
        for _ in range(64):  # then let other sandboxes' readers run
            sock = self.sock
            if sock is None:
                return
            try:
                data, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(_cred_size()) + socket.CMSG_SPACE(16))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            fds: list[int] = []
            hostpid = None
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                    hostpid = array.array("i", payload[:4])[0]
                elif level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data:
                self._gone("its socket closed")
                return
            try:
                reply = decode(data)
            except ProtocolError as e:
                for fd in fds:
                    os.close(fd)
                self._gone(str(e))
                return
            self._on_reply(reply, hostpid, fds)

    def _gone(self, why: str) -> None:
        self.close()
        self._on_gone(why)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock.fileno())
            if self._writing:
                loop.remove_writer(sock.fileno())
        self._writing = False
        self._drop_outbox()
        sock.close()

    def _drop_outbox(self) -> None:
        for _, fd in self._outbox:
            if fd is not None:
                os.close(fd)
        self._outbox.clear()


def _cred_size() -> int:
    import struct

    return struct.calcsize(_UCRED)
