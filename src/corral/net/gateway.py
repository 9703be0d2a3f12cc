"""The transparent egress gateway: every TCP connection a sandbox makes ends here first.

For each connection: recover the original destination (SO_ORIGINAL_DST), read the client's first
bytes (briefly), classify them, decide by policy, record an event, and only then, if allowed, connect
upstream and splice. A denied connection never opens an upstream socket, so zero bytes leave.

Allowed connections are spliced by the kernel (splice(2) through a pipe) in two small threads, so
payload never passes through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

from corral.events import Event, EventKind, Verdict
from corral.inflight import InFlight
from corral.net.policy import decide
from corral.net.sniff import classify
from corral.net.tenants import Tenants

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
FIRST_BYTES = 4096
CONNECT_TIMEOUT = 10.0


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class Gateway:
    def __init__(self, tenants: Tenants, emit: Callable[[Event], object], host_addresses: frozenset[str]):
        self.tenants = tenants
        self.emit = emit
        self.host_addresses = host_addresses
        self.listener: socket.socket | None = None
        self.port = 0
        self._task: asyncio.Task | None = None
        self._conns: set[socket.socket] = set()
        self._handlers = InFlight()
        self._lock = threading.Lock()

    async def start(self, port: int = 0) -> int:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(1024)
        s.setblocking(False)
        self.listener = s
        self.port = s.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(), name="corral-gateway")
        return self.port

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except (OSError, asyncio.CancelledError):
                return
            self._handlers.start(self._handle(conn, addr))

    async def drain(self) -> None:
        """Let connection handlers still deciding finish, so their events are recorded."""
        await self._handlers.drain()

    def kill(self) -> None:
        """Stop abruptly, as a crash would: the listener goes; in-flight relays are cut."""
        if self._task:
            self._task.cancel()
        if self.listener:
            self.listener.close()
            self.listener = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    close = kill

    async def _handle(self, client: socket.socket, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        tenant = self.tenants.get(addr[0])
        if tenant is None:
            client.close()
            return
        try:
            dst_ip, dst_port = original_dst(client)
        except OSError:
            client.close()
            return
        ev = Event(kind=EventKind.CONNECT, action="connect", sandbox_id=tenant.sandbox_id,
                   dst_ip=dst_ip, dst_port=dst_port, data={"src_port": addr[1]})
        # Attribute while the client socket surely still exists (before we read or decide).
        tenant.attribute(ev, ("tcp", addr[1]))
        first = b""
        with contextlib.suppress(TimeoutError, OSError):
            first = await asyncio.wait_for(loop.sock_recv(client, FIRST_BYTES), tenant.policy.first_bytes_timeout)
        sniff = classify(first)
        names = tenant.resolved.get(dst_ip, set())
        d = decide(tenant.policy, dst_ip, dst_port, names, sniff.name, self.host_addresses)
        ev.protocol = sniff.protocol
        ev.name = sniff.name or d.name or (sorted(names)[0] if names else None)
        ev.verdict = Verdict.ALLOW if d.allow else Verdict.DENY
        ev.reason = d.reason
        ev.data.update({"first_bytes": len(first), "resolved": sorted(names)})
        if sniff.name:
            ev.data["claimed_name"] = sniff.name
        if sniff.detail:
            ev.data["sniff"] = sniff.detail
        if not d.allow:
            ev.bytes_up, ev.bytes_down = 0, 0
        self.emit(ev)  # the rules may turn an allowed connection into a denied one
        if ev.verdict == Verdict.DENY:
            ev.bytes_up, ev.bytes_down = 0, 0
            _reset(client)
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, (dst_ip, dst_port)), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as e:
            self.emit(Event(kind=EventKind.CONNECT, action="connect_failed", sandbox_id=tenant.sandbox_id,
                            episode_id=ev.episode_id, step=ev.step, command=ev.command, pid=ev.pid,
                            dst_ip=dst_ip, dst_port=dst_port, name=ev.name, protocol=ev.protocol,
                            verdict=Verdict.ALLOW, bytes_up=0, bytes_down=0,
                            reason=f"upstream unreachable: {_errtext(e)}", data={"connect_event": ev.id}))
            upstream.close()
            _reset(client)
            return
        relay = _Relay(self, client, upstream, first)
        relay.start()
        up, down = await relay.done
        self.emit(Event(kind=EventKind.CONNECT, action="close", sandbox_id=tenant.sandbox_id,
                        episode_id=ev.episode_id, step=ev.step, command=ev.command, pid=ev.pid,
                        exe=ev.exe, argv=ev.argv, dst_ip=dst_ip, dst_port=dst_port, name=ev.name,
                        protocol=ev.protocol, verdict=Verdict.ALLOW, bytes_up=up, bytes_down=down,
                        data={"connect_event": ev.id, "src_port": addr[1]}))


class _Relay:
    """Two splice threads, one per direction; `done` resolves to (bytes_up, bytes_down)."""

    def __init__(self, gw: Gateway, client: socket.socket, upstream: socket.socket, first: bytes):
        self.gw = gw
        self.client = client
        self.upstream = upstream
        self.first = first
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[tuple[int, int]] = self.loop.create_future()
        self.counts = [0, 0]
        self.left = 2

    def start(self) -> None:
        for s in (self.client, self.upstream):
            s.setblocking(True)
        with self.gw._lock:
            self.gw._conns.update((self.client, self.upstream))
        threading.Thread(target=self._pump, args=(self.client, self.upstream, 0), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.upstream, self.client, 1), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, idx: int) -> None:
        try:
            if idx == 0 and self.first:
                dst.sendall(self.first)
                self.counts[0] += len(self.first)
            _splice_all(src, dst, self.counts, idx)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            self.loop.call_soon_threadsafe(self._one_done)

    def _one_done(self) -> None:
        self.left -= 1
        if self.left == 0:
            with self.gw._lock:
                self.gw._conns.difference_update((self.client, self.upstream))
            self.client.close()
            self.upstream.close()
            self.done.set_result((self.counts[0], self.counts[1]))
        # with one direction done the other goes on (a half-closed connection), until it ends too


def _splice_all(src: socket.socket, dst: socket.socket, counts: list[int], idx: int) -> None:
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            n = os.splice(sfd, w, PIPE_SIZE, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return
            counts[idx] += n
            while n:
                n -= os.splice(r, dfd, n, flags=os.SPLICE_F_MOVE)
    finally:
        os.close(r)
        os.close(w)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER 0: the client sees ECONNRESET at once, not a slow orderly close.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _errtext(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno)) + f" ({e.strerror})"
    return str(e)


def host_addresses() -> frozenset[str]:
    """Every address of the namespace corral runs in: a sandbox must not reach host services."""
    out = set()
    with contextlib.suppress(OSError):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for a in ipr.get_addr():
                ip = a.get_attr("IFA_ADDRESS")
                if ip:
                    out.add(str(ipaddress.ip_address(ip)))
    return frozenset(out)
