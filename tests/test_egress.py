"""Default-deny egress through corral's gateway: every connection seen, only allowed ones pass,
denied ones deliver zero bytes, raw-IP and SNI/Host tricks do not open a domain rule."""

from __future__ import annotations

import pytest

from corral import SandboxConfig
from tests.conftest import (
    INTERNAL,
    METADATA,
    OTHER,
    PKG,
    POOL,
    SSH,
    TLS,
    allow,
    connect_cmd,
    eventually,
    findings_for,
    py,
)

pytestmark = pytest.mark.asyncio

HTTP_GET = py(
    "import urllib.request,sys\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode(), end='')\n"
    "except Exception as e:\n"
    "    print('FAIL', type(e).__name__, e); sys.exit(1)\n"
) + " {url}"


def connects(runtime, sb, **match):
    evs = runtime.store.events(sandbox_id=sb.id, kind="connect")
    return [e for e in evs if e.action != "close" and all(getattr(e, k) == v for k, v in match.items())]


async def test_default_deny_blocks_internet_host_with_zero_bytes(sb_factory, runtime, world):
    srv = world.servers[PKG[:2]]
    before = (srv.received, srv.connections)
    sb = await sb_factory()
    r = await sb.exec(connect_cmd(PKG[0], PKG[1], b"GET / HTTP/1.0\r\nHost: pkg.example.com\r\n\r\n"))
    assert r.exit_code != 0
    assert (srv.received, srv.connections) == before  # nothing reached the host, not even a SYN
    ev = connects(runtime, sb, dst_ip=PKG[0])[-1]
    assert ev.verdict == "deny" and ev.bytes_up == 0
    assert ev.protocol == "http" and ev.name == "pkg.example.com"
    assert ev.exe and "python3" in ev.exe and ev.step == r.step and ev.command.startswith("python3 -c")


async def test_allowed_domain_reachable_by_name_with_attribution(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com"))
    r = await sb.exec(HTTP_GET.format(url="http://pkg.example.com/"))
    assert r.stdout == "package index\n", r.stdout + r.stderr
    dns = runtime.store.events(sandbox_id=sb.id, kind="dns")
    q = next(e for e in dns if e.name == "pkg.example.com" and e.verdict == "allow")
    # the lookup is the python process's, known from the resolver socket it sent the query from
    assert q.pid and q.step == r.step and q.argv[0] == "python3" and q.data["attribution"] == "socket", q
    ev = connects(runtime, sb, dst_ip=PKG[0])[-1]
    assert ev.verdict == "allow" and ev.protocol == "http" and ev.name == "pkg.example.com"
    assert ev.pid and ev.argv[0] == "python3" and ev.step == r.step
    # the relay reports its close when both directions have ended, possibly after exec() returned
    close = await eventually(lambda: [e for e in runtime.store.events(sandbox_id=sb.id, kind="connect")
                                      if e.action == "close"], "the relay's close event")
    assert close[-1].bytes_up > 0 and close[-1].bytes_down > 0


async def test_denied_name_gets_nxdomain_and_event(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com"))
    r = await sb.exec(HTTP_GET.format(url="http://other.example.com/"))
    assert r.exit_code == 1 and "FAIL" in r.stdout
    dns = [e for e in runtime.store.events(sandbox_id=sb.id, kind="dns") if e.name == "other.example.com"]
    assert dns and dns[0].verdict == "deny" and dns[0].step == r.step


async def test_raw_ip_of_allowed_domain_not_resolved_via_corral_is_denied(sb_factory, runtime, world):
    srv = world.servers[PKG[:2]]
    sb = await sb_factory(allow("pkg.example.com"))
    before = srv.received
    r = await sb.exec(HTTP_GET.format(url=f"http://{PKG[0]}/"))
    assert r.exit_code == 1
    assert srv.received == before
    ev = connects(runtime, sb, dst_ip=PKG[0])[-1]
    assert ev.verdict == "deny" and "not resolved through corral DNS" in ev.reason
    # once resolved through corral, the same IP is fine
    r = await sb.exec("getent hosts pkg.example.com && " + HTTP_GET.format(url=f"http://{PKG[0]}/"))
    assert "package index" in r.stdout


async def test_host_header_must_match_resolved_name(sb_factory, runtime, world):
    sb = await sb_factory(allow("pkg.example.com", "other.example.com"))
    await sb.exec("getent hosts pkg.example.com")
    before = world.servers[PKG[:2]].received
    r = await sb.exec(connect_cmd("pkg.example.com", 80, b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n"))
    assert "RECV" not in r.stdout or "RECV 0" in r.stdout
    assert world.servers[PKG[:2]].received == before
    ev = connects(runtime, sb, dst_ip=PKG[0])[-1]
    assert ev.verdict == "deny" and "does not match" in ev.reason


async def test_port_rule_restricts_ports(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com:443"))
    r = await sb.exec(HTTP_GET.format(url="http://pkg.example.com/"))
    assert r.exit_code == 1
    ev = connects(runtime, sb, dst_ip=PKG[0])[-1]
    assert ev.verdict == "deny" and "port 80" in ev.reason


async def test_cidr_rule_allows_raw_ip(sb_factory, runtime):
    sb = await sb_factory(allow("198.51.100.0/24:80"))
    r = await sb.exec(HTTP_GET.format(url=f"http://{OTHER[0]}/"))
    assert r.stdout == "other\n"


async def test_wildcard_domain_never_opens_private_or_metadata(sb_factory, runtime, world):
    before = (world.servers[INTERNAL[:2]].received, world.servers[METADATA[:2]].received)
    sb = await sb_factory(allow("*.example.com"))
    r = await sb.exec(HTTP_GET.format(url="http://internal.example.com/"))
    assert r.exit_code == 1
    r2 = await sb.exec(HTTP_GET.format(url=f"http://{METADATA[0]}/latest/meta-data/"))
    assert r2.exit_code == 1
    assert (world.servers[INTERNAL[:2]].received, world.servers[METADATA[:2]].received) == before
    reasons = {e.dst_ip: e.reason for e in connects(runtime, sb)}
    assert "private" in reasons[INTERNAL[0]]
    assert "metadata" in reasons[METADATA[0]]


async def test_explicit_cidr_opens_internal_host(sb_factory):
    sb = await sb_factory(allow("10.20.0.0/16"))
    r = await sb.exec(HTTP_GET.format(url=f"http://{INTERNAL[0]}/"))
    assert r.stdout == "internal secrets\n"


async def test_udp_and_icmp_go_nowhere(sb_factory, world):
    sb = await sb_factory(allow("198.51.100.0/24"))
    r = await sb.exec(py(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.sendto(b'x'*100,('198.51.100.30',7))\ns.settimeout(1)\n"
        "try:\n    s.recv(10); print('GOT')\nexcept OSError as e: print('none', e)"
    ))
    assert "GOT" not in r.stdout
    r = await sb.exec("ping -c 1 -W 1 198.51.100.30; echo rc=$?")
    assert "rc=0" not in r.stdout


async def test_dns_to_any_server_is_answered_by_corral(sb_factory, runtime):
    sb = await sb_factory(allow("pkg.example.com"))
    # ask a "foreign" resolver directly: the query still lands at corral's resolver
    r = await sb.exec(py(
        "import socket,struct\nq=struct.pack('>HHHHHH',7,0x0100,1,0,0,0)+b'\\x03pkg\\x07example\\x03com\\x00'+"
        "struct.pack('>HH',1,1)\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\n"
        "s.sendto(q,('203.0.113.53',53))\nd=s.recv(512)\nprint(socket.inet_ntoa(d[-4:]))"
    ))
    assert r.stdout.strip() == PKG[0]


async def test_gateway_down_means_no_egress(world, tmp_path):
    """Fail closed: with the gateway gone, nothing leaves, even to an allowed host."""
    from corral import Runtime, RuntimeConfig

    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False))
    await rt.start()
    try:
        sb = await rt.create(allow("pkg.example.com", "198.51.100.0/24"))
        assert (await sb.exec(HTTP_GET.format(url="http://pkg.example.com/"))).stdout == "package index\n"
        srv = world.servers[PKG[:2]]
        before = (srv.received, srv.connections)
        rt.gateway.kill()
        r = await sb.exec(HTTP_GET.format(url=f"http://{PKG[0]}/"))
        assert r.exit_code == 1 and "FAIL" in r.stdout
        assert (srv.received, srv.connections) == before
        r = await sb.exec(connect_cmd(PKG[0], 80, b"x"))
        assert r.exit_code != 0
    finally:
        await rt.close()


# -- first-bytes classification from real clients ------------------------------------------------
async def test_stratum_client_classified_and_blocked(sb_factory, runtime, world):
    sb = await sb_factory()
    line = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer-opt/3.8"]}\n'
    r = await sb.exec(connect_cmd(POOL[0], POOL[1], line))
    assert "RECV" not in r.stdout or "RECV 0" in r.stdout
    assert world.servers[POOL[:2]].received == 0
    ev = connects(runtime, sb, dst_ip=POOL[0])[-1]
    assert ev.protocol == "stratum" and ev.data["sniff"]["method"] == "mining.subscribe"
    assert ev.verdict == "deny" and ev.bytes_up == 0


async def test_xmrig_login_classified(sb_factory, runtime):
    sb = await sb_factory()
    login = b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"4Ab","pass":"x","agent":"XMRig/6.21.0"}}\n'
    await sb.exec(connect_cmd(POOL[0], POOL[1], login))
    ev = connects(runtime, sb, dst_ip=POOL[0])[-1]
    assert ev.protocol == "xmrig" and "XMRig" in ev.data["sniff"]["agent"]


async def test_ssh_client_classified(sb_factory, runtime, world):
    sb = await sb_factory()
    await sb.exec(f"ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 "
                  f"tunnel@{SSH[0]} true", timeout=15)
    ev = connects(runtime, sb, dst_ip=SSH[0])[-1]
    assert ev.protocol == "ssh" and ev.data["sniff"]["banner"].startswith("SSH-2.0-OpenSSH")
    assert ev.verdict == "deny" and ev.exe.endswith("/ssh")
    assert world.servers[SSH[:2]].received == 0


async def test_tls_client_sni_classified(sb_factory, runtime):
    sb = await sb_factory()
    await sb.exec(f"echo | openssl s_client -connect {TLS[0]}:{TLS[1]} -servername {TLS[2]}", timeout=15)
    ev = connects(runtime, sb, dst_ip=TLS[0])[-1]
    assert ev.protocol == "tls" and ev.name == TLS[2]
    sb2 = await sb_factory()
    await sb2.exec(py(
        "import socket,ssl\nctx=ssl.create_default_context()\n"
        f"s=socket.create_connection(({TLS[0]!r},{TLS[1]}),timeout=3)\n"
        "try:\n    ctx.wrap_socket(s, server_hostname='python.example.org')\nexcept Exception: pass"
    ))
    ev = connects(runtime, sb2, dst_ip=TLS[0])[-1]
    assert ev.protocol == "tls" and ev.name == "python.example.org"


async def test_tls_sni_mismatch_denied(sb_factory, runtime, world):
    sb = await sb_factory(allow("secure.example.org"))
    await sb.exec("getent hosts secure.example.org")
    await sb.exec(f"echo | openssl s_client -connect {TLS[0]}:{TLS[1]} -servername evil.example.net", timeout=15)
    ev = connects(runtime, sb, dst_ip=TLS[0])[-1]
    assert ev.verdict == "deny" and ev.name == "evil.example.net"
    assert world.servers[TLS[:2]].received == 0


async def test_background_process_connection_attributed_to_its_step(sb_factory, runtime):
    sb = await sb_factory()
    s = await sb.create_session("main")
    start = await s.run("(sleep 0.5; " + connect_cmd(POOL[0], POOL[1], b'{"id":1,"method":"mining.authorize"}\n')
                        + ") > /dev/null 2>&1 &")
    await s.run("echo unrelated step")
    await s.run("ls /workspace")
    evs = await eventually(lambda: connects(runtime, sb, dst_ip=POOL[0]), "the background connection")
    ev = evs[-1]
    assert ev.step == start.step
    assert ev.command.startswith("(sleep 0.5;")
    assert ev.protocol == "stratum"


async def test_many_connections_each_recorded(sb_factory, runtime):
    sb = await sb_factory(SandboxConfig())
    await sb.exec(py(
        "import socket\nfor i in range(30):\n"
        "    try:\n        socket.create_connection(('198.51.100.30',7),timeout=2).close()\n"
        "    except OSError: pass"
    ))
    await eventually(lambda: len(connects(runtime, sb, dst_ip="198.51.100.30")) >= 30, "30 connection events")
    await runtime.drain()
    assert len(connects(runtime, sb, dst_ip="198.51.100.30")) == 30


async def test_udp_datagram_attempt_is_an_attributed_denied_event(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                         "for _ in range(5): s.sendto(b'secret', ('203.0.113.10', 9999))"))
    evs = [e for e in runtime.store.events(sandbox_id=sb.id, kind="connect") if e.protocol == "udp"]
    assert len(evs) == 1  # five datagrams, one event (rate-limited per process and destination)
    ev = evs[0]
    assert (ev.dst_ip, ev.dst_port, ev.verdict) == ("203.0.113.10", 9999, "deny") and ev.step == r.step
    assert "python3" in ev.exe
    assert any(f.rule_id == "egress-denied" and f.step == r.step for f in runtime.store.findings(sandbox_id=sb.id))


async def test_connected_udp_sockets_aimed_at_a_service_list_are_a_port_sweep(sb_factory, runtime):
    """A UDP scan through connected sockets sends with plain send(): its connect() calls are all corral
    sees. Eight or more ports in one step is a sweep (udp-port-sweep); the routing idiom's one or two
    connects are not (the test below)."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import socket\n"
        "for p in (53, 67, 69, 123, 137, 161, 500, 514, 1900):\n"
        "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.connect(('10.20.0.5',p))\n"
        "    try: s.send(b'\\0')\n"
        "    except OSError: pass\n"
        "    s.close()"))
    found = await findings_for(runtime, sb, "udp-port-sweep")
    assert found and found[0].step == r.step and found[0].severity == "high", r.stderr


async def test_connected_udp_socket_is_recorded_and_loopback_is_not(sb_factory, runtime):
    """connect() on a UDP socket names the destination of every later send(): corral records it,
    attributed, as `udp-connect`. It sends nothing (a common idiom uses it only to learn which
    interface routes somewhere), so the default rules make no finding of it; a sendto does. Datagrams
    over the sandbox's own loopback are not egress and make no event."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import socket\n"
        "echo=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); echo.bind(('127.0.0.1',5300))\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.connect(('127.0.0.1',5300)); s.send(b'hi')\n"
        "print(echo.recv(10).decode())\n"
        "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.connect(('203.0.113.10',9998))\n"
        "for _ in range(3):\n"
        "    try: u.send(b'secret')\n"
        "    except OSError: pass\n"
        "import threading\n"  # from a thread that is not the process's main one, too
        "t=threading.Thread(target=lambda: socket.socket(socket.AF_INET,socket.SOCK_DGRAM)"
        ".connect(('203.0.113.11',9997))); t.start(); t.join()"))
    assert r.stdout == "hi\n", r.stderr
    evs = [e for e in runtime.store.events(sandbox_id=sb.id, kind="connect") if e.protocol == "udp"]
    assert sorted((e.action, e.dst_ip, e.dst_port, e.verdict, e.step) for e in evs) == [
        ("udp-connect", "203.0.113.10", 9998, "deny", r.step), ("udp-connect", "203.0.113.11", 9997, "deny", r.step)]
    assert all("python3" in e.exe for e in evs)
    assert not runtime.store.findings(sandbox_id=sb.id)
