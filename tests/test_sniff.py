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
    assert s.detail == {"method": "POST", "path": "/upload"}


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
