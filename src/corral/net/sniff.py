"""Classify a connection by its first client bytes. Pure functions over bytes: easy to test.

Knows: mining JSON-RPC (stratum mining.subscribe/authorize/submit, xmrig-style login with agent),
SSH version banner, TLS ClientHello (with SNI and its JA3 fingerprint), HTTP/1.x requests (method, Host,
path, User-Agent), else unknown.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from corral.net.http1 import parse_head

STRATUM_METHODS = {
    "mining.subscribe", "mining.authorize", "mining.submit", "mining.extranonce.subscribe",
    "mining.configure", "mining.notify", "eth_submitLogin", "eth_getWork", "eth_submitWork",
}
# a stratum method name as a JSON string, wherever it sits in a JSON-looking line
MINING_METHOD_RE = re.compile(
    rb'"(mining\.(?:subscribe|authorize|submit|configure|extranonce\.subscribe|notify)'
    rb'|eth_submitLogin|eth_getWork|eth_submitWork)"')
_HTTP_RE = re.compile(
    rb"^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE)[ \t]+(\S+)[ \t]+HTTP/\d\.\d[ \t]*\r?\n")


@dataclass(frozen=True)
class Sniff:
    protocol: str  # stratum | xmrig | ssh | tls | http | unknown | none
    name: str | None = None  # SNI or Host
    detail: dict | None = None


def classify(data: bytes) -> Sniff:
    if not data:
        return Sniff("none")
    if data.startswith(b"SSH-"):
        banner = data.split(b"\n", 1)[0].strip().decode("latin-1")
        return Sniff("ssh", detail={"banner": banner[:200]})
    if data[0] == 0x16 and len(data) >= 6 and data[1] == 0x03 and data[5] == 0x01:
        return Sniff("tls", name=tls_sni(data), detail=ja3_detail(data[5:]))
    m = _HTTP_RE.match(data)
    if m:
        head = parse_head(data)
        host = head.host if head else None
        return Sniff("http", name=host, detail={"method": m.group(1).decode(), "path": m.group(2).decode()[:300],
                                                "user_agent": head.user_agent if head else None})
    mining = _json_rpc_mining(data)
    if mining:
        return mining
    if data.lstrip()[:1] in (b"{", b"[") and (m := MINING_METHOD_RE.search(data)):
        # JSON a strict parser rejects ('{}{"method": ...}') that a streaming one would still read
        return Sniff("stratum", detail={"method": m.group(1).decode(), "parsed": False})
    return Sniff("unknown", detail={"head": data[:32].hex()})


def _json_rpc_mining(data: bytes) -> Sniff | None:
    stripped = data.lstrip()
    if not stripped.startswith((b"{", b"[")):
        return None
    for line in stripped.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(msg, list):  # a JSON-RPC batch: judged by its first call
            msg = msg[0] if msg else None
        if not isinstance(msg, dict):
            return None
        method = msg.get("method")
        if method in STRATUM_METHODS:
            return Sniff("stratum", detail={"method": method})
        params = msg.get("params")
        if method == "login" and isinstance(params, dict) and ("agent" in params or "pass" in params):
            return Sniff("xmrig", detail={"method": "login", "agent": str(params.get("agent", ""))[:100]})
        if method in {"submit", "getjob", "keepalived"} and isinstance(params, dict):
            return Sniff("xmrig", detail={"method": method})
        return None
    return None


def tls_sni(data: bytes) -> str | None:
    """server_name from a TLS ClientHello record, or None if absent or truncated."""
    return client_hello_sni(data[5:])


def client_hello_sni(hello: bytes) -> str | None:
    """server_name from a ClientHello handshake message (reassembled from however many records)."""
    data = hello
    try:
        pos = 4  # handshake header
        pos += 2 + 32  # client version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + int.from_bytes(data[pos : pos + 2], "big")  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end and pos + 4 <= len(data):
            ext_type = int.from_bytes(data[pos : pos + 2], "big")
            ext_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
            body = data[pos + 4 : pos + 4 + ext_len]
            if ext_type == 0 and len(body) >= 5:
                name_len = int.from_bytes(body[3:5], "big")
                return body[5 : 5 + name_len].decode("idna").lower() or None
            pos += 4 + ext_len
    except (IndexError, UnicodeError):
        return None
    return None


def _grease(v: int) -> bool:
    """RFC 8701 GREASE values (0x?a?a), which JA3 leaves out: they change from one hello to the next."""
    return v & 0x0F0F == 0x0A0A and v >> 8 == v & 0xFF


def client_hello_ja3(hello: bytes) -> tuple[str, str] | None:
    """The JA3 fingerprint of a ClientHello handshake message: (its string, md5 of it), or None when
    truncated. Version, ciphers, extensions, curves and point formats, GREASE left out (Salesforce's
    JA3): the same client program sends the same one, whatever it connects to."""
    try:
        version = int.from_bytes(hello[4:6], "big")
        pos = 4 + 2 + 32
        pos += 1 + hello[pos]
        n = int.from_bytes(hello[pos:pos + 2], "big")
        ciphers = [int.from_bytes(hello[i:i + 2], "big") for i in range(pos + 2, pos + 2 + n, 2)]
        pos += 2 + n
        pos += 1 + hello[pos]
        end = pos + 2 + int.from_bytes(hello[pos:pos + 2], "big")
        pos += 2
        exts, curves, formats = [], [], []
        while pos + 4 <= end and pos + 4 <= len(hello):
            t = int.from_bytes(hello[pos:pos + 2], "big")
            ln = int.from_bytes(hello[pos + 2:pos + 4], "big")
            body = hello[pos + 4:pos + 4 + ln]
            if not _grease(t):
                exts.append(t)
            if t == 10 and len(body) >= 2:  # supported_groups
                size = int.from_bytes(body[:2], "big")
                curves = [int.from_bytes(body[i:i + 2], "big") for i in range(2, 2 + size, 2)]
            elif t == 11 and body:  # ec_point_formats
                formats = list(body[1:1 + body[0]])
            pos += 4 + ln
        if len(hello) < 4 + 2 + 32 or not ciphers:
            return None
    except IndexError:
        return None
    text = ",".join([str(version), "-".join(str(c) for c in ciphers if not _grease(c)), "-".join(map(str, exts)),
                     "-".join(str(c) for c in curves if not _grease(c)), "-".join(map(str, formats))])
    return text, hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def ja3_detail(hello: bytes) -> dict | None:
    ja3 = client_hello_ja3(hello)
    return {"ja3": ja3[1], "ja3_string": ja3[0][:500]} if ja3 else None
