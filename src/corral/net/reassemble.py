"""Where a client-first protocol's first unit ends: pure functions over the bytes buffered so far.

A unit is what the server acts on first, so what the gateway must see whole before it judges: a TLS
ClientHello (reassembled from however many records carry it), an HTTP request head (to its blank
line), an SSH banner line, a JSON-RPC/stratum line. Bytes that cannot begin any of these are a unit of
their own ("unknown") at once: they need no waiting. Bytes that could still become one of them are
held until the unit completes; the caller bounds that wait in time and size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from corral.net import http1
from corral.net.sniff import Sniff, classify, client_hello_sni, ja3_detail

WS = b" \t\r\n"
MAX_TLS_RECORD = (1 << 14) + 2048


@dataclass(frozen=True)
class Progress:
    done: bool
    length: int = 0  # bytes of the buffer that make up the unit, when done
    kind: str = "blank"  # what it is or looks like so far: tls | http | ssh | json | unknown | blank
    hello: bytes | None = None  # the reassembled ClientHello handshake message
    bad: str | None = None  # it began as a known protocol and broke its framing: judged as incomplete
    more: int = 0  # not done: the buffer cannot complete the unit before it holds this many bytes (TLS)


def first_unit(buf: bytes) -> Progress:
    rest = buf.lstrip(WS)
    skipped = len(buf) - len(rest)
    if not rest:
        return Progress(False)
    if rest[0] == 0x16 and skipped == 0:
        return _tls(buf)
    if b"SSH-".startswith(rest[:4]):
        return _line(buf, skipped, "ssh")
    if rest[0] in b"{[":
        return _line(buf, skipped, "json")
    if http1.method_prefix(rest[:8]):
        return _http(buf, skipped)
    return Progress(True, len(buf), "unknown")


def _line(buf: bytes, start: int, kind: str) -> Progress:
    nl = buf.find(b"\n", start)
    if nl >= 0:
        return Progress(True, nl + 1, kind)
    if kind == "json" and _whole_json(buf[start:]):
        # a JSON-over-TCP client that frames without a newline waits for the answer: do not stall it
        return Progress(True, len(buf), kind)
    return Progress(False, kind=kind)


def _whole_json(data: bytes) -> bool:
    if not data.rstrip().endswith((b"}", b"]")):
        return False
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _http(buf: bytes, start: int) -> Progress:
    nl = buf.find(b"\n", start)
    if nl < 0:
        return Progress(False, kind="http")
    if not http1.request_line_ok(buf[start:nl + 1]):
        return Progress(True, len(buf), "unknown")  # e.g. "GET /x" (HTTP/0.9): no host, no head
    end = http1.head_end(buf, start)
    return Progress(True, end, "http") if end >= 0 else Progress(False, kind="http")


def _tls(buf: bytes) -> Progress:
    if len(buf) >= 2 and buf[1] != 0x03:
        return Progress(True, len(buf), "unknown")
    hs = bytearray()
    pos = 0
    while True:
        if len(buf) - pos < 5:
            return Progress(False, kind="tls", more=pos + 5)
        ctype, major, rlen = buf[pos], buf[pos + 1], int.from_bytes(buf[pos + 3:pos + 5], "big")
        if ctype != 0x16 or major != 0x03 or not 0 < rlen <= MAX_TLS_RECORD:
            if pos == 0:
                return Progress(True, len(buf), "unknown")
            return Progress(False, kind="tls", bad="a TLS record that is not a handshake before the ClientHello ended")
        if len(buf) < pos + 5 + rlen:
            return Progress(False, kind="tls", more=pos + 5 + rlen)
        hs += buf[pos + 5:pos + 5 + rlen]
        pos += 5 + rlen
        if len(hs) >= 4:
            if hs[0] != 0x01:
                return Progress(False, kind="tls", bad="the first TLS handshake message is not a ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if len(hs) >= need:
                return Progress(True, pos, "tls", hello=bytes(hs[:need]))


def sniff_unit(unit: bytes, p: Progress) -> Sniff:
    """Classify a completed unit (the ClientHello's SNI read from the reassembled message)."""
    if p.kind == "tls":
        return Sniff("tls", name=client_hello_sni(p.hello or b""), detail=ja3_detail(p.hello or b""))
    return classify(unit.lstrip(WS) if p.kind in ("http", "json", "ssh") else unit)


def sniff_partial(buf: bytes) -> Sniff:
    """What an unfinished unit is evidence of: an SSH banner's first bytes are still SSH."""
    s = classify(buf.lstrip(WS))
    if s.protocol == "tls":
        return Sniff("tls", detail={"partial": True})
    return s
