"""A small, fake world for tests, benchmarks and the demo: never the real network.

It is one network namespace ("the world") joined to corral's namespace by a veth pair. In it live:

- "the internet": hosts on documentation addresses (198.51.100.0/24, 203.0.113.0/24);
- "the internal network": hosts on a private range (10.20.0.0/16);
- a fake cloud metadata service on 169.254.169.254.

Each host is a real TCP server (a thread per connection) that counts every byte it receives, so a
test can prove that a denied connection delivered nothing. corral's namespace gets routes to exactly
these ranges and nothing else: anything outside fails with "network unreachable".

Run it only inside a private namespace of your own (the test suite and the demo run under
`unshare --net --mount`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from corral.nsutil import in_thread, new_netns, socket_in

LINK_HOST, LINK_WORLD = "192.0.2.1", "192.0.2.2"  # TEST-NET-1 for the link itself
ROUTED = ("198.51.100.0/24", "203.0.113.0/24", "10.20.0.0/16", "169.254.169.254/32")
Handler = Callable[[socket.socket, "Server"], None]


@dataclass
class Server:
    ip: str
    port: int
    name: str
    handler: Handler
    sock: socket.socket
    received: int = 0  # payload bytes received over all connections
    connections: int = 0
    first_bytes: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def recv(self, conn: socket.socket, n: int = 65536) -> bytes:
        data = conn.recv(n)
        with self.lock:
            self.received += len(data)
        return data


class World:
    def __init__(self, link: str = "corralw0") -> None:
        self.link = link
        self.netns_fd = -1
        self.servers: dict[tuple[str, int], Server] = {}
        self.hosts: dict[str, list[str]] = {}
        self._stop = threading.Event()

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> World:
        self.netns_fd = new_netns()
        with IPRoute() as ipr:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", ifname=self.link)
            ipr.link("add", ifname=self.link, kind="veth", peer={"ifname": "wan0", "net_ns_fd": self.netns_fd})
            idx = ipr.link_lookup(ifname=self.link)[0]
            ipr.addr("add", index=idx, address=LINK_HOST, prefixlen=30)
            ipr.link("set", index=idx, state="up")
            for net in ROUTED:
                ipr.route("add", dst=net, gateway=LINK_WORLD)
        inner = IPRoute(use_socket=socket_in(self.netns_fd, socket.AF_NETLINK, socket.SOCK_DGRAM, 0))
        try:
            wan = inner.link_lookup(ifname="wan0")[0]
            lo = inner.link_lookup(ifname="lo")[0]
            inner.addr("add", index=wan, address=LINK_WORLD, prefixlen=30)
            inner.link("set", index=wan, state="up")
            inner.link("set", index=lo, state="up")
            inner.route("add", dst="0.0.0.0/0", gateway=LINK_HOST)
        finally:
            inner.close()
        return self

    def _add_address(self, ip: str) -> None:
        def add() -> None:
            from corral.nsutil import setns

            setns(self.netns_fd)
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                with contextlib.suppress(NetlinkError):  # already there
                    ipr.addr("add", index=lo, address=ip, prefixlen=32)

        in_thread(add)

    def serve(self, ip: str, port: int, handler: Handler, name: str | None = None) -> Server:
        """Run a TCP server at ip:port in the world; `name` also becomes a DNS name for ip."""
        self._add_address(ip)
        sock = socket_in(self.netns_fd, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(128)
        srv = Server(ip, port, name or ip, handler, sock)
        self.servers[(ip, port)] = srv
        if name:
            self.hosts.setdefault(name, [])
            if ip not in self.hosts[name]:
                self.hosts[name].append(ip)
        threading.Thread(target=self._accept, args=(srv,), daemon=True, name=f"world-{ip}:{port}").start()
        return srv

    def _accept(self, srv: Server) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = srv.sock.accept()
            except OSError:
                return
            with srv.lock:
                srv.connections += 1
            threading.Thread(target=self._run, args=(srv, conn), daemon=True).start()

    @staticmethod
    def _run(srv: Server, conn: socket.socket) -> None:
        conn.settimeout(10)
        with contextlib.suppress(OSError), conn:
            srv.handler(conn, srv)

    def close(self) -> None:
        self._stop.set()
        for srv in self.servers.values():
            srv.sock.close()
        with IPRoute() as ipr, contextlib.suppress(NetlinkError):
            ipr.link("del", ifname=self.link)
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1


# -- handlers: each speaks just enough of a real protocol --------------------------------------------
def echo(conn: socket.socket, srv: Server) -> None:
    while data := srv.recv(conn):
        _note_first(srv, data)
        conn.sendall(data)


def _read_request(conn: socket.socket, srv: Server) -> bytes | None:
    """An HTTP request's head (and whatever came with it), or None if the client went away."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = srv.recv(conn)
        if not chunk:
            return None
        data += chunk
    _note_first(srv, data)
    return data


def http_ok(body: bytes = b"ok\n") -> Handler:
    def handle(conn: socket.socket, srv: Server) -> None:
        if _read_request(conn, srv) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    return handle


def http_files(files: dict[str, bytes], content_type: str = "application/octet-stream") -> Handler:
    """A small static web server: GET path -> bytes, 404 otherwise (a package index, a data host)."""

    def handle(conn: socket.socket, srv: Server) -> None:
        data = _read_request(conn, srv)
        if data is None:
            return
        parts = data.split(b"\r\n", 1)[0].split()
        path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) > 1 else "/"
        body = files.get(path)
        if body is None:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        conn.sendall(head + body)

    return handle


def ssh_banner(conn: socket.socket, srv: Server) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 corral-testworld\r\n")
    data = srv.recv(conn)
    _note_first(srv, data)
    while srv.recv(conn):
        pass


def stratum_pool(conn: socket.socket, srv: Server) -> None:
    buf = b""
    while chunk := srv.recv(conn):
        _note_first(srv, chunk)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
            except ValueError:
                return
            reply = {"id": req.get("id"), "result": True, "error": None}
            if req.get("method") == "mining.subscribe":
                reply["result"] = [[["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]], "08000002", 4]
            conn.sendall(json.dumps(reply).encode() + b"\n")


def sink(conn: socket.socket, srv: Server) -> None:
    while data := srv.recv(conn):
        _note_first(srv, data)


def bulk(size: int) -> Handler:
    """Receive a request line, then send `size` bytes (throughput benchmarks)."""

    def handle(conn: socket.socket, srv: Server) -> None:
        srv.recv(conn, 64)
        chunk = b"\0" * (1 << 20)
        left = size
        while left > 0:
            n = conn.send(chunk[: min(left, len(chunk))])
            left -= n

    return handle


def _note_first(srv: Server, data: bytes) -> None:
    with srv.lock:
        if len(srv.first_bytes) < 64:
            srv.first_bytes.append(data[:256])
