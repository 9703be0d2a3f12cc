"""HTTP/1.x request heads as the gateway judges them: pure functions over bytes.

A head is judged by every host it names: the Host header, an absolute-form target
(``GET http://host/ HTTP/1.1``) and a CONNECT authority (``CONNECT host:443 HTTP/1.1``). Anything
that would let the gateway and the server read a different request out of the same bytes (two Host
headers, Content-Length with Transfer-Encoding, an unknown transfer coding) is a problem: the caller
denies it rather than guess how the server will frame the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
# Lenient on purpose (runs of spaces or tabs, any one-digit version): a request line some server would
# still accept must be judged as a request, not waved through as "unknown".
REQUEST_LINE = re.compile(
    rb"^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE)[ \t]+(\S+)[ \t]+HTTP/(\d\.\d)[ \t]*\r?$")
_WORD = re.compile(rb"[A-Z]*")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CHUNK_LINE = re.compile(rb"^([0-9a-fA-F]{1,16})[ \t]*(;[^\r\n]*)?\r?\n$")
_HOST_CHARS = re.compile(r"^[a-z0-9._:\-]+$")  # a name or an IP literal: anything else is not judged, it is refused
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass
class Head:
    method: str
    target: str
    version: str  # "1.0" | "1.1" (as written)
    host: str | None = None  # the Host header, port removed, lower case
    named: tuple[str, int] | None = None  # host and port an absolute-form or CONNECT target names
    content_length: int = 0
    chunked: bool = False
    upgrade: bool = False  # the stream stops being HTTP after this request (Upgrade / CONNECT)
    user_agent: str | None = None  # the client's fingerprint, as it gives it (None: it sent none)
    problems: list[str] = field(default_factory=list)


def method_prefix(data: bytes) -> bool:
    """Could `data` (not empty) be the start of an HTTP/1 request line?"""
    word = _WORD.match(data).group(0)  # type: ignore[union-attr]
    if len(word) < len(data):  # something follows the word: it must be a method and a space or tab
        return word in METHODS and data[len(word)] in b" \t"
    return len(word) <= 7 and any(m.startswith(word) for m in METHODS)


def head_end(buf: bytes, start: int = 0) -> int:
    """Index just past the blank line ending a head that starts at `start`, or -1 if not there yet.
    A bare LF counts: lenient servers accept it, so the gateway must too, or the head it judges is
    not the head the server reads."""
    m = _HEAD_END.search(buf, start)
    return m.end() if m else -1


def request_line_ok(line: bytes) -> bool:
    return REQUEST_LINE.match(line.rstrip(b"\n")) is not None


def split_host(text: str) -> tuple[str, int | None]:
    """'Example.COM.:8080' -> ('example.com', 8080); '[::1]:80' -> ('::1', 80)."""
    text = text.strip()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end if end > 0 else None], text[end + 1:] if end > 0 else ""
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        host, sep, p = text.rpartition(":")
        if not sep or not p.isdigit():
            host = text
        else:
            port = int(p)
    return host.lower().rstrip("."), port


def parse_head(head: bytes) -> Head | None:
    """A request head (request line to blank line); None if the first line is not an HTTP/1 request."""
    lines = [ln.rstrip(b"\r") for ln in head.split(b"\n")]
    m = REQUEST_LINE.match(lines[0])
    if m is None:
        return None
    method, target = m.group(1).decode(), m.group(2).decode("latin-1")
    h = Head(method=method, target=target[:300], version=m.group(3).decode())
    hosts: list[str] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for raw in lines[1:]:
        if not raw:
            break
        name, sep, value = raw.partition(b":")
        if not sep or name != name.strip() or not name:
            # "Host : x" or a folded line: servers disagree on these; the gateway will not guess
            h.problems.append(f"malformed header line {raw[:60]!r}")
            continue
        key, value = name.lower(), value.strip()
        if key == b"host":
            hosts.append(value.decode("latin-1"))
        elif key == b"content-length":
            lengths.append(value)
        elif key == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.split(b","))
        elif key == b"upgrade":
            h.upgrade = True
        elif key == b"user-agent":
            h.user_agent = value.decode("latin-1")[:300]
    if len(hosts) > 1:
        h.problems.append("more than one Host header")
    if hosts:
        h.host = split_host(hosts[0])[0] or None
    if codings:
        if lengths:
            h.problems.append("both Content-Length and Transfer-Encoding")
        if codings[-1:] != [b"chunked"] or codings.count(b"chunked") != 1:
            h.problems.append(f"transfer coding {b', '.join(codings).decode('latin-1')!r} is not plain chunked")
        h.chunked = True
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            h.problems.append(f"unusable Content-Length {b', '.join(lengths).decode('latin-1')!r}")
        else:
            h.content_length = int(lengths[0])
    if method == "CONNECT":
        host, port = split_host(target)
        if not host or port is None or not _HOST_CHARS.match(host):
            h.problems.append(f"CONNECT target {target[:100]!r} is not host:port")
        else:
            h.named = (host, port)
        h.upgrade = True
    elif "://" in target:
        scheme, _, rest = target.partition("://")
        authority = re.split(r"[/?]", rest, maxsplit=1)[0]
        host, port = split_host(authority)
        default = DEFAULT_PORTS.get(scheme.lower())
        # userinfo, a fragment or a backslash in the authority: parsers disagree on the host, so refuse
        if not host or (port is None and default is None) or not _HOST_CHARS.match(host):
            h.problems.append(f"absolute target {target[:100]!r} names no usable host")
        else:
            h.named = (host, port if port is not None else default or 80)
    return h


def chunk_size(line: bytes) -> int | None:
    """The size a chunk-size line (with its LF) announces; None if it is not one."""
    m = _CHUNK_LINE.match(line)
    return int(m.group(1), 16) if m else None
