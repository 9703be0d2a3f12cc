"""Protocol knowledge in small functions: first bytes in, classification out."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

from corral.net.sniff import classify, tls_sni


def test_stratum_methods():
    for method in ("mining.subscribe", "mining.authorize", "mining.submit", "eth_submitLogin"):
        s = classify(b'{"id":1,"method":"%s","params":[]}\n' % method.encode())
        assert s.protocol == "stratum" and s.detail["method"] == method


def test_xmrig_login_with_agent():
    s = classify(b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"w","pass":"x","agent":"XMRig/6"}}\n')
    assert s.protocol == "xmrig" and s.detail["agent"] == "XMRig/6"


def test_benign_json_is_not_mining():
    assert classify(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}\n').protocol == "unknown"
    assert classify(b'{"method": "login", "params": ["user"]}\n').protocol == "unknown"
    assert classify(b"[1,2,3]").protocol == "unknown"


def test_ssh_banner():
    s = classify(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    assert s.protocol == "ssh" and s.detail["banner"] == "SSH-2.0-OpenSSH_9.2p1 Debian-2"


def test_http_request():
    s = classify(b"POST /upload HTTP/1.1\r\nHost: Files.Example.com:8080\r\nContent-Length: 3\r\n\r\nabc")
    assert s.protocol == "http" and s.name == "files.example.com"
    assert s.detail == {"method": "POST", "path": "/upload", "user_agent": None}
    s = classify(b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/8.5.0\r\n\r\n")
    assert s.detail["user_agent"] == "curl/8.5.0"


def test_ja3_leaves_grease_out_and_hashes_the_standard_string():
    from corral.net.sniff import client_hello_ja3

    def ext(t: int, body: bytes) -> bytes:
        return t.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    ciphers = b"".join(c.to_bytes(2, "big") for c in (0x0A0A, 4865, 49195))
    exts = ext(0x1A1A, b"") + ext(0, b"") + ext(10, b"\x00\x04\x2a\x2a\x00\x1d") + ext(11, b"\x01\x00")
    body = (b"\x03\x03" + b"\x00" * 32 + b"\x00" + len(ciphers).to_bytes(2, "big") + ciphers + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    text, digest = client_hello_ja3(hello)
    assert text == "771,4865-49195,0-10-11,29,0"
    import hashlib
    assert digest == hashlib.md5(text.encode()).hexdigest()
    assert client_hello_ja3(hello[:20]) is None


def test_empty_and_garbage():
    assert classify(b"").protocol == "none"
    assert classify(b"\x00\x01binary").protocol == "unknown"
    assert classify(b"\x16\x03\x01\x00").protocol == "unknown"  # truncated TLS header


def _real_client_hello(server_name: str) -> bytes:
    """Capture the ClientHello Python's real TLS stack sends."""
    a, b = socket.socketpair()
    ctx = ssl.create_default_context()

    def client() -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            ctx.wrap_socket(a, server_hostname=server_name)

    t = threading.Thread(target=client)
    t.start()
    data = b.recv(65536)
    b.close()
    t.join()
    a.close()
    return data


def test_tls_sni_from_real_client_hello():
    hello = _real_client_hello("api.example.org")
    s = classify(hello)
    assert s.protocol == "tls" and s.name == "api.example.org"
    assert tls_sni(hello[:20]) is None  # truncated: no crash, no guess
