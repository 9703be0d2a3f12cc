"""One connection's client-to-server bytes, judged unit by unit before they go on.

The gateway feeds every byte the client sends through an Inspector; it returns only the bytes that may
be forwarded. Three things are judged, by a `judge(unit) -> bool` callback (False ends the connection):

- the first unit (reassemble.first_unit), held until it is whole;
- on an HTTP connection, every request head (keep-alive and pipelined ones too), held until whole;
  bodies are framed by Content-Length or chunked coding so the next head is found where the server
  will find it; after CONNECT the tunnel's first unit is judged again against the CONNECT target;
- any other stream is scanned line by line, and at the start of each burst, for a stratum/JSON-RPC
  mining line or an SSH banner, so a protocol switched to later in a stream is still caught. The
  scan looks before it forwards: the chunk completing such a line is never delivered.

A unit still unfinished at its deadline or size bound is judged as incomplete (the judge denies it,
except a CIDR flow's first unit, which then goes on and is scanned). The Inspector is pure: no
sockets, no clock of its own, so every framing rule is testable on bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from corral.net import http1
from corral.net.reassemble import WS, Progress, first_unit, sniff_partial, sniff_unit
from corral.net.sniff import MINING_METHOD_RE, Sniff, classify

FLAGGED = ("stratum", "xmrig", "ssh")
MAX_LINE = 1 << 16
MAX_CHUNK_LINE = 1024
ALWAYS_REPARSE = 4096  # a held unit this small is re-parsed on every chunk (cheap); see _worth_retry
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CANDIDATE = re.compile(rb"\n[ \t\r\n]*(?=[S{\[])")
_LONG_MINING = MINING_METHOD_RE


class Denied(Exception):
    """The judge refused a unit: the connection ends and the unit's bytes never go on."""


@dataclass
class Unit:
    index: int  # 0: the connection's first unit
    stage: str  # first | request | stream
    sniff: Sniff
    head: http1.Head | None = None
    incomplete: str | None = None  # why it is judged unfinished (deadline, bound, broken framing)
    tunnel: tuple[str, int] | None = None  # inside an allowed CONNECT: the target it travels to
    size: int = 0


Judge = Callable[[Unit], bool]


class Inspector:
    def __init__(self, judge: Judge, max_unit: int) -> None:
        self.judge = judge
        self.max_unit = max_unit
        self.state = "first"
        self.buf = bytearray()
        self.pending_since: float | None = None
        self.units = 0
        self.left = 0  # bytes left in a body or a chunk
        self.after_body = "head"
        self.tunnel: tuple[str, int] | None = None
        self.scanner = Scanner()
        self.flagged: set[str] = set()
        self._checked = 0  # length of the held unit when it was last found unfinished (0: not held)
        self._progress: Progress | None = None  # what the first unit looked like then

    # -- the relay's interface -------------------------------------------------------------------
    def feed(self, data: bytes, now: float) -> bytes:
        """Bytes the client sent -> bytes that may go to the server now (raises Denied)."""
        if not self.buf:  # fast paths for bulk uploads: no copies
            if self.state == "scan":
                self._look(data)
                return data
            if self.state in ("body", "chunkdata") and len(data) < self.left:
                self.left -= len(data)
                return data
        self.buf += data
        if self._checked and not self._worth_retry():
            return b""  # nothing that arrived can complete the held unit: it stays held, its deadline runs
        out = bytearray()
        judged = self.units
        self._run(out)
        # held after this attempt: the next one waits for bytes that could complete it (see _worth_retry)
        self._checked = len(self.buf) if self.buf and self.state in ("first", "head") else 0
        if self.units != judged or not self.buf:
            self.pending_since = None  # a unit ended: what is held now is the next one, timed afresh
        if self.buf and self.pending_since is None:
            self.pending_since = now
        return bytes(out)

    def expire(self, why: str) -> bytes:
        """The held unit ran past its deadline (or the client closed): judge it as it is."""
        if not self.buf:
            return b""
        stage = "first" if self.state == "first" else "request"
        self._verdict(Unit(self.units, stage, sniff_partial(bytes(self.buf)), incomplete=why,
                           tunnel=self.tunnel, size=len(self.buf)))
        # allowed unfinished (a CIDR flow's first unit): it goes on, and the stream is scanned from here
        out = bytes(self.buf)
        self.buf.clear()
        self.pending_since = None
        self._checked = 0
        self.state = "scan"
        self._look(out)
        return out

    # -- states ------------------------------------------------------------------------------------
    def _run(self, out: bytearray) -> None:
        while self.buf:
            step = getattr(self, "_" + self.state)
            if not step(out):
                return

    def _worth_retry(self) -> bool:
        """Could the bytes that arrived since the held unit was last found unfinished complete it (or
        break its bound)? Re-parsing the whole held unit on every chunk would cost its length per chunk:
        a client trickling a 64 KiB unit a byte at a time would make that quadratic, on the loop every
        sandbox shares. Small units are always re-parsed; past that, only a line end (a blank line for
        HTTP), the byte count a TLS record announced, the size bound or a doubling of the unit."""
        n = len(self.buf)
        p = self._progress if self.state == "first" else None
        if n <= ALWAYS_REPARSE or n > self.max_unit or n >= 2 * self._checked or (p is not None and 0 < p.more <= n):
            return True
        if p is not None and p.kind == "tls":
            return False
        region = bytes(self.buf[max(0, self._checked - 3):])
        if self.state == "head" or (p is not None and p.kind == "http"):
            return _BLANK_LINE.search(region) is not None
        return b"\n" in region

    def _verdict(self, unit: Unit) -> None:
        self.units += 1
        if not self.judge(unit):
            raise Denied(unit.incomplete or unit.sniff.protocol)

    def _over(self, limit: int) -> bool:
        return len(self.buf) > limit

    def _first(self, out: bytearray) -> bool:
        p = self._progress = first_unit(bytes(self.buf))
        if not p.done:
            why = p.bad or (f"no complete {p.kind} unit within {self.max_unit} bytes"
                            if self._over(self.max_unit) else None)
            if why:
                out += self.expire(why)
            return False
        unit = bytes(self.buf[:p.length])
        head = http1.parse_head(unit.lstrip(WS)) if p.kind == "http" else None
        self._verdict(Unit(self.units, "first", sniff_unit(unit, p), head, tunnel=self.tunnel, size=len(unit)))
        self._forward(out, p.length)
        if head is not None:
            self._after_head(head)
        else:
            self.state = "scan"
        return True

    def _after_head(self, head: http1.Head) -> None:
        if head.method == "CONNECT":
            self.tunnel, self.state = head.named, "first"  # the tunnel's own first unit is judged next
            return
        self.after_body = "scan" if head.upgrade else "head"
        if head.chunked:
            self.state = "chunk"
        elif head.content_length:
            self.state, self.left = "body", head.content_length
        else:
            self.state = self.after_body

    def _head(self, out: bytearray) -> bool:
        blank = len(self.buf) - len(self.buf.lstrip(b"\r\n"))
        if blank:
            self._forward(out, blank)  # empty lines between requests are allowed (RFC 9112 2.2)
            return True
        nl = self.buf.find(b"\n")
        if nl < 0:
            if not http1.method_prefix(bytes(self.buf[:8])):
                return self._violation("bytes that are not an HTTP request on an HTTP connection")
            if self._over(self.max_unit):
                return self._violation(f"no complete request head within {self.max_unit} bytes")
            return False
        if not http1.request_line_ok(bytes(self.buf[:nl + 1])):
            return self._violation("bytes that are not an HTTP request on an HTTP connection")
        end = http1.head_end(bytes(self.buf))
        if end < 0:
            if self._over(self.max_unit):
                return self._violation(f"no complete request head within {self.max_unit} bytes")
            return False
        raw = bytes(self.buf[:end])
        head = http1.parse_head(raw)
        assert head is not None  # the request line matched
        self._verdict(Unit(self.units, "request", classify(raw), head, tunnel=self.tunnel, size=end))
        self._forward(out, end)
        self._after_head(head)
        return True

    def _body(self, out: bytearray) -> bool:
        n = min(self.left, len(self.buf))
        self._forward(out, n)
        self.left -= n
        if not self.left:
            self.state = self.after_body if self.state == "body" else "chunkend"
        return True

    _chunkdata = _body

    def _chunk(self, out: bytearray) -> bool:
        nl = self.buf.find(b"\n")
        if nl < 0:
            return False if not self._over(MAX_CHUNK_LINE) else self._violation("a chunk-size line too long")
        size = http1.chunk_size(bytes(self.buf[:nl + 1]))
        if size is None:
            return self._violation(f"a broken chunk-size line {bytes(self.buf[:40])!r}")
        self._forward(out, nl + 1)
        self.state, self.left = ("chunkdata", size) if size else ("trailer", 0)
        return True

    def _chunkend(self, out: bytearray) -> bool:
        if self.buf.startswith(b"\n") or self.buf.startswith(b"\r\n"):
            self._forward(out, 1 if self.buf[0] == 0x0A else 2)
            self.state = "chunk"
            return True
        if self.buf == b"\r":
            return False
        return self._violation("chunk data not followed by CRLF")

    def _trailer(self, out: bytearray) -> bool:
        nl = self.buf.find(b"\n")
        if nl < 0:
            return False if not self._over(self.max_unit) else self._violation("a trailer line too long")
        line = bytes(self.buf[:nl + 1])
        self._forward(out, nl + 1)
        if not line.strip(b"\r\n"):
            self.state = self.after_body
        return True

    def _look(self, data: bytes) -> None:
        for s in self.scanner.scan(data):
            if s.protocol not in self.flagged:
                self.flagged.add(s.protocol)
                self._verdict(Unit(self.units, "stream", s, tunnel=self.tunnel, size=len(data)))

    def _violation(self, why: str) -> bool:
        self._verdict(Unit(self.units, "request", classify(bytes(self.buf[:4096])), incomplete=why,
                           tunnel=self.tunnel, size=len(self.buf)))
        raise Denied(why)  # a judge that lets broken framing through still gets no bytes past here

    def _forward(self, out: bytearray, n: int) -> None:
        out += self.buf[:n]
        del self.buf[:n]

    def _scan(self, out: bytearray) -> bool:
        # every byte goes on, looked at first
        data = bytes(self.buf)
        self._look(data)
        self.buf.clear()
        out += data
        return False


class Scanner:
    """Finds a mining JSON-RPC line or an SSH banner at a line start or a burst start in a stream."""

    def __init__(self) -> None:
        self.line: bytearray | None = None  # a candidate line still open at the end of the last chunk
        self.tail = b""  # its last bytes: a method name split across two chunks is still found

    def scan(self, data: bytes) -> list[Sniff]:
        found: list[Sniff] = []
        if self.line is not None:
            nl = data.find(b"\n")
            piece = data if nl < 0 else data[:nl + 1]
            json_line = self.line.lstrip(WS)[:1] in (b"{", b"[")
            if json_line and _LONG_MINING.search(self.tail + piece):
                found.append(Sniff("stratum", detail={"method": "(in a long line)"}))
            if len(self.line) < MAX_LINE:
                self.line += piece[:MAX_LINE - len(self.line)]
            self.tail = (self.tail + piece)[-64:]
            if nl < 0:
                if self.line.startswith(b"SSH-"):
                    found += _check(bytes(self.line))
                return found  # still inside one line: no other line starts in this chunk
            found += _check(bytes(self.line))
            self.line = None
        starts = [0, *(m.end() for m in _CANDIDATE.finditer(data))]
        for i, p in enumerate(starts):
            q = len(data) - len(data.lstrip(WS)) if i == 0 else p
            if q >= len(data) or data[q] not in b"S{[":
                continue
            nl = data.find(b"\n", q)
            if nl < 0:
                self.line = bytearray(data[q:q + MAX_LINE])
                self.tail = data[-64:]
                if self.line.startswith(b"SSH-"):
                    found += _check(bytes(self.line))
                if self.line[:1] in (b"{", b"[") and _LONG_MINING.search(data, q):
                    found.append(Sniff("stratum", detail={"method": "(in a long line)"}))
                break
            found += _check(data[q:nl + 1])
        return found


def _check(line: bytes) -> list[Sniff]:
    if len(line) >= MAX_LINE:
        return []  # judged by the long-line search instead
    s = classify(line)
    return [s] if s.protocol in FLAGGED else []
