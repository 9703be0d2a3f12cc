"""Relaying an allowed connection on the event loop: no thread per connection.

server -> client: the kernel moves the bytes (splice(2) through a pipe), driven by the loop's
readiness callbacks, so a download never passes through Python. client -> server: every byte goes
through the connection's Inspector first (each request, each new unit, is judged before it is
delivered), then out with sock_sendall. An idle connection costs four descriptors (two sockets, one
pipe) and no thread, so one sandbox's thousand idle connections cannot starve the process of
threads, and its per-sandbox cap bounds its descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct

from corral.net.inspect import Denied, Inspector

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
READ_SIZE = 1 << 20
_NB = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class SplicePump:
    """src -> dst through a pipe; `done` resolves when src ends (None) or either side fails (the error)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket) -> None:
        self.loop = loop
        self.src, self.dst = src.fileno(), dst.fileno()
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.count = 0
        self.eof = False
        self.reading = self.writing = False
        self.done: asyncio.Future[OSError | None] = loop.create_future()

    def start(self) -> None:
        self._read(True)

    def _read(self, on: bool) -> None:
        if on != self.reading:
            (self.loop.add_reader(self.src, self._readable) if on else self.loop.remove_reader(self.src))
            self.reading = on

    def _write(self, on: bool) -> None:
        if on != self.writing:
            (self.loop.add_writer(self.dst, self._flush) if on else self.loop.remove_writer(self.dst))
            self.writing = on

    def _readable(self) -> None:
        try:
            n = os.splice(self.src, self.w, PIPE_SIZE, flags=_NB)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(e)
            return
        if n == 0:
            self.eof = True
            self._read(False)
        self.in_pipe += n
        self.count += n
        self._flush()

    def _flush(self) -> None:
        while self.in_pipe:
            try:
                self.in_pipe -= os.splice(self.r, self.dst, self.in_pipe, flags=_NB)
            except BlockingIOError:
                # the client reads slower than the server sends: stop reading until it catches up
                self._read(False)
                self._write(True)
                return
            except OSError as e:
                self._finish(e)
                return
        self._write(False)
        if self.eof:
            self._finish(None)
        elif not self.done.done():
            self._read(True)

    def _finish(self, err: OSError | None) -> None:
        self.stop()
        if not self.done.done():
            self.done.set_result(err)

    def stop(self) -> None:
        self._read(False)
        self._write(False)
        if self.r >= 0:
            os.close(self.r)
            os.close(self.w)
            self.r = self.w = -1


async def relay(client: socket.socket, upstream: socket.socket, insp: Inspector, first: bytes,
                unit_timeout: float, client_done: bool) -> tuple[int, int, Denied | None]:
    """Relay until both directions end or a unit is denied; returns (bytes up, bytes down, denial)."""
    loop = asyncio.get_running_loop()
    try:
        pump = SplicePump(loop, upstream, client)
    except OSError:  # no descriptor left for the pipe: end this connection, not the gateway
        reset(client)
        upstream.close()
        raise
    sent = [0]
    up = asyncio.ensure_future(_client_to_server(loop, client, upstream, insp, first, unit_timeout,
                                                 client_done, sent))
    pump.start()
    denied: Denied | None = None
    try:
        await asyncio.wait({up, pump.done}, return_when=asyncio.FIRST_COMPLETED)
        if pump.done.done():
            if pump.done.result() is not None:
                up.cancel()
            else:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)  # the server finished; the client may still send
        await asyncio.wait({up})
        outcome = None if up.cancelled() else up.result()
        if isinstance(outcome, Denied):
            denied = outcome
        elif outcome is None and not up.cancelled():
            # the client finished cleanly: the server's answer may still be coming
            await pump.done
        return sent[0], pump.count, denied
    finally:
        pump.stop()
        if not up.done():
            up.cancel()
            # let the cancelled read unregister its descriptor before the socket (and its number) goes
            await asyncio.wait({up})
        if denied is not None:
            reset(client)
        for s in (client, upstream):
            s.close()


async def _client_to_server(loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: socket.socket,
                            insp: Inspector, first: bytes, unit_timeout: float, client_done: bool,
                            sent: list[int]) -> BaseException | None:
    async def send(data: bytes) -> None:
        if data:
            await loop.sock_sendall(upstream, data)
            sent[0] += len(data)

    try:
        await send(first)
        while not client_done:
            if insp.pending_since is None:
                data = await loop.sock_recv(client, READ_SIZE)
            else:
                left = insp.pending_since + unit_timeout - loop.time()
                try:
                    data = await asyncio.wait_for(loop.sock_recv(client, READ_SIZE), max(left, 0))
                except TimeoutError:
                    await send(insp.expire(f"unfinished after {unit_timeout:g} s"))
                    continue
            if not data:
                await send(insp.expire("the client stopped sending before the unit ended"))
                break
            await send(insp.feed(data, loop.time()))
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)
        return None
    except (Denied, OSError) as e:
        return e


def reset(sock: socket.socket) -> None:
    # SO_LINGER 0: the client sees ECONNRESET at once, not a slow orderly close.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
