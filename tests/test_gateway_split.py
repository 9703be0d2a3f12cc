"""The gateway cannot be split or flooded: a client-first unit is judged whole (split across sends,
records or its first byte, sent late), every request on an HTTP connection is judged, a mining or SSH
line later in an allowed stream is caught, and one sandbox's connections cannot exhaust the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from corral import EgressPolicy, SandboxConfig
from tests.conftest import POOL, SSH, TLS, eventually, py

pytestmark = pytest.mark.asyncio

ECHO = ("198.51.100.30", 7, "echo.example.com")
SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer-opt/3.8"]}\n'


def policy(*rules: str, **kw) -> SandboxConfig:
    return SandboxConfig(egress=EgressPolicy(allow=rules, **kw))


def sender(host: str, port: int, *parts: bytes, pause: float = 0.4, first_pause: float = 0.0) -> str:
    """A client that sends `parts` with a pause between them (after `first_pause` of silence), then reads."""
    return py(
        "import socket,sys,time\n"
        f"s=socket.create_connection(({host!r},{port}),timeout=5)\n"
        f"time.sleep({first_pause})\n"
        # hex: the payload must not be in the command line, where the exec rules would judge it first
        f"parts=[bytes.fromhex(h) for h in {[p.hex() for p in parts]!r}]\n"
        "try:\n"
        "    for i,p in enumerate(parts):\n"
        f"        if i: time.sleep({pause})\n"
        "        s.sendall(p)\n"
        "    data=s.recv(65536); print('RECV', len(data))\n"
        "except OSError as e:\n"
        "    print('ERR', type(e).__name__)\n"
    )


def connects(runtime, sb, **match):
    evs = runtime.store.events(sandbox_id=sb.id, kind="connect")
    return [e for e in evs if e.action == "connect" and all(getattr(e, k) == v for k, v in match.items())]


def rule_ids(runtime, sb) -> set[str]:
    return {f.rule_id for f in runtime.store.findings(sandbox_id=sb.id)}


def received(world, addr) -> int:
    return world.servers[addr[:2]].received


# -- 1. a client-first unit is judged whole ---------------------------------------------------------
@pytest.mark.parametrize("how", ["split", "late", "first-byte"])
async def test_split_stratum_to_allowed_pool_is_caught_with_zero_bytes(sb_factory, runtime, world, how):
    sb = await sb_factory(policy(POOL[2]))
    before = received(world, POOL)
    cut = 1 if how == "first-byte" else 14
    cmd = sender(POOL[2], POOL[1], SUBSCRIBE[:cut], SUBSCRIBE[cut:], first_pause=0.6 if how == "late" else 0.0)
    r = await sb.exec(cmd)
    assert "RECV" not in r.stdout or "RECV 0" in r.stdout, r.stdout
    ev = (await eventually(lambda: connects(runtime, sb, protocol="stratum"), "a stratum connect event"))[-1]
    assert ev.verdict == "deny" and ev.step == r.step and "python3" in ev.exe
    assert "stratum-protocol" in rule_ids(runtime, sb)
    assert received(world, POOL) == before  # not one byte of the line reached the pool


async def test_unfinished_unit_on_a_domain_rule_is_denied_at_its_deadline(sb_factory, runtime, world):
    sb = await sb_factory(policy(POOL[2], unit_timeout=0.5))
    before = received(world, POOL)
    # the line's end comes after the deadline: judged on what came, never let through as "unknown"
    r = await sb.exec(sender(POOL[2], POOL[1], b'{"id": 1, "meth', b'od": "x"}\n', pause=1.5))
    assert "RECV" not in r.stdout or "RECV 0" in r.stdout, r.stdout
    ev = connects(runtime, sb, dst_ip=POOL[0])[-1]
    assert ev.verdict == "deny" and "unfinished" in ev.reason and ev.data["incomplete"]
    assert "egress-denied" in rule_ids(runtime, sb)
    assert received(world, POOL) == before


async def test_split_ssh_banner_is_caught(sb_factory, runtime, world):
    sb = await sb_factory(policy(SSH[2]))
    before = received(world, SSH)
    r = await sb.exec(sender(SSH[2], SSH[1], b"SS", b"H-2.0-OpenSSH_9.2p1\r\n"))
    ev = connects(runtime, sb, dst_ip=SSH[0])[-1]
    assert ev.protocol == "ssh" and ev.verdict == "deny" and ev.step == r.step
    assert "ssh-egress" in rule_ids(runtime, sb)
    assert received(world, SSH) == before


async def test_http_host_split_across_segments_is_judged(sb_factory, runtime, world):
    sb = await sb_factory(policy("pkg.example.com"))
    before = received(world, ("198.51.100.10", 80))
    await sb.exec(sender("pkg.example.com", 80, b"GET / HTTP/1.1\r\nHo", b"st: evil.example.net\r\n\r\n"))
    ev = connects(runtime, sb, dst_ip="198.51.100.10")[-1]
    assert ev.verdict == "deny" and ev.name == "evil.example.net" and "does not match" in ev.reason
    assert received(world, ("198.51.100.10", 80)) == before


TLS_SPLIT = """\
import socket,ssl,sys,time
ctx=ssl.create_default_context()
inc,outb=ssl.MemoryBIO(),ssl.MemoryBIO()
obj=ctx.wrap_bio(inc,outb,server_hostname='evil.example.net')
try: obj.do_handshake()
except ssl.SSLWantReadError: pass
hello=outb.read()
body=hello[5:]
if sys.argv[1]=='records':  # the ClientHello message carried by two TLS records
    rec=lambda b: b'\\x16\\x03\\x01'+len(b).to_bytes(2,'big')+b
    parts=[rec(body[:10]), rec(body[10:])]
else:  # one record, sent after its first byte
    parts=[hello[:1], hello[1:]]
s=socket.create_connection((sys.argv[2],443),timeout=5)
try:
    for i,p in enumerate(parts):
        if i: time.sleep(0.4)
        s.sendall(p)
    print('RECV', len(s.recv(100)))
except OSError as e: print('ERR', type(e).__name__)
"""


@pytest.mark.parametrize("how", ["records", "first-byte"])
async def test_split_client_hello_sni_is_read(sb_factory, runtime, world, how):
    sb = await sb_factory(policy(TLS[2]))
    before = received(world, TLS)
    import shlex

    await sb.exec(f"python3 -c {shlex.quote(TLS_SPLIT)} {how} {TLS[2]}")
    ev = connects(runtime, sb, dst_ip=TLS[0])[-1]
    assert ev.protocol == "tls" and ev.name == "evil.example.net"
    assert ev.verdict == "deny" and "does not match" in ev.reason
    assert received(world, TLS) == before


# -- 2. every request on an HTTP connection ----------------------------------------------------------
KEEPALIVE = """\
import socket,sys
reqs=[bytes.fromhex(r) for r in sys.argv[2:]]
s=socket.create_connection((sys.argv[1],7),timeout=5)
for r in reqs:
    try:
        s.sendall(r)
        got=s.recv(65536)
        print('ECHO' if got else 'EOF', len(got), flush=True)
    except OSError as e:
        print('ERR', type(e).__name__, flush=True)
"""


def keepalive(host: str, *requests: str) -> str:
    import shlex

    # hex: the payload must not be in the command line, where the exec rules would judge it first
    return f"python3 -c {shlex.quote(KEEPALIVE)} {host} " + " ".join(
        r.replace("|", "\r\n").encode().hex() for r in requests)


@pytest.mark.parametrize("second", [
    "GET / HTTP/1.1|Host: evil.example.net||",
    "GET http://denied.example/ HTTP/1.1|Host: echo.example.com||",
    "CONNECT denied.example:443 HTTP/1.1|Host: echo.example.com||",
])
async def test_second_request_on_keepalive_connection_is_judged(sb_factory, runtime, world, second):
    sb = await sb_factory(policy(ECHO[2]))
    first = "GET / HTTP/1.1|Host: echo.example.com||"
    before = received(world, ECHO)
    r = await sb.exec(keepalive(ECHO[2], first, second))
    lines = r.stdout.split("\n")
    assert lines[0].startswith("ECHO"), r.stdout + r.stderr
    assert not lines[1].startswith("ECHO"), r.stdout
    # the first request went through; the second never reached the host
    assert received(world, ECHO) - before == len(first.replace("|", "\r\n"))
    denied = [e for e in connects(runtime, sb, dst_ip=ECHO[0]) if e.verdict == "deny"]
    assert denied and denied[-1].data["stage"] == "request" and denied[-1].step == r.step
    assert "egress-denied" in rule_ids(runtime, sb)


async def test_allowed_keepalive_requests_all_go_through(sb_factory, runtime, world):
    """No false refusal: pipelined and keep-alive requests, a chunked body, a Content-Length body that
    looks like a request, all naming the allowed host, are each delivered whole."""
    sb = await sb_factory(policy(ECHO[2]))
    reqs = ["GET /a HTTP/1.1|Host: echo.example.com||GET /b HTTP/1.1|Host: echo.example.com||",
            "POST /c HTTP/1.1|Host: echo.example.com|Transfer-Encoding: chunked||3|abc|0||",
            "POST /d HTTP/1.1|Host: echo.example.com|Content-Length: 22||GET / HTTP/1.1|X: y|"]
    before = received(world, ECHO)
    r = await sb.exec(keepalive(ECHO[2], *reqs))
    assert r.stdout.count("ECHO") == 3, r.stdout + r.stderr
    assert received(world, ECHO) - before == sum(len(x.replace("|", "\r\n")) for x in reqs)
    assert not [e for e in connects(runtime, sb) if e.verdict == "deny"]
    assert not runtime.store.findings(sandbox_id=sb.id)


async def test_connect_and_absolute_targets_judged_on_a_cidr_flow(sb_factory, runtime, world):
    sb = await sb_factory(policy("198.51.100.0/24"))
    before = received(world, ECHO)
    r = await sb.exec(keepalive(ECHO[0], "CONNECT evil.example.net:443 HTTP/1.1|Host: evil.example.net:443||"))
    assert not r.stdout.startswith("ECHO"), r.stdout
    r = await sb.exec(keepalive(ECHO[0], "GET http://evil.example.net/x HTTP/1.1|Host: x||"))
    assert not r.stdout.startswith("ECHO"), r.stdout
    assert received(world, ECHO) == before
    reasons = [e.reason for e in connects(runtime, sb, dst_ip=ECHO[0])]
    assert sum("evil.example.net" in x for x in reasons) == 2, reasons


# -- 3. classification beyond the first unit -------------------------------------------------------
@pytest.mark.parametrize("later,rule", [
    ([SUBSCRIBE[:20], SUBSCRIBE[20:]], "stratum-protocol"),
    ([b"SSH-2.0-OpenSSH_9.2p1\r\n"], "ssh-egress"),
])
async def test_mining_or_ssh_later_in_an_allowed_cidr_stream(sb_factory, runtime, world, later, rule):
    sb = await sb_factory(policy("198.51.100.0/24"))
    before = received(world, ECHO)
    r = await sb.exec(keepalive(ECHO[0], "hello|", *(p.decode().replace("\r\n", "|") for p in later)))
    assert r.stdout.startswith("ECHO"), r.stdout + r.stderr
    assert r.stdout.count("ECHO") == len(later), r.stdout  # the last part got no echo: the connection ended
    late = await eventually(lambda: [e for e in connects(runtime, sb, dst_ip=ECHO[0])
                                     if e.data.get("stage") == "stream"], "a later-unit event")
    assert late[-1].verdict == "deny" and late[-1].step == r.step
    assert rule in rule_ids(runtime, sb)
    # what went through: the harmless line, and at most the first part of a split line, never its end
    assert received(world, ECHO) - before == len(b"hello\r\n") + sum(len(p) for p in later[:-1])


# -- 4. bounded per sandbox ----------------------------------------------------------------------------
HOLD = """\
import socket,time,os
conns=[]
for _ in range(20):
    try:
        conns.append(socket.create_connection(('198.51.100.30',7),timeout=5))
    except OSError:  # refused over the cap: the reset can land before connect() returns
        pass
time.sleep(1.0)
ok=0
for c in conns:
    try:
        c.sendall(b'ping|'); ok += c.recv(10) == b'ping|'
    except OSError:
        pass
open('/workspace/held','w').write(str(ok))
while not os.path.exists('/workspace/done'):
    time.sleep(0.05)
"""


async def test_idle_connections_over_the_cap_are_refused_and_others_still_connect(sb_factory, runtime, world):
    flood = await sb_factory(policy("198.51.100.0/24", max_connections=8))
    quiet = await sb_factory(policy("198.51.100.0/24"))
    s = await flood.create_session("hold")
    import shlex

    await s.run(f"python3 -c {shlex.quote(HOLD)} >/workspace/hold.log 2>&1 &")
    held = await _wait_file(flood, "/workspace/held")
    try:
        assert int(held) == 8  # eight connections relayed, twelve refused
        r = await quiet.exec(keepalive(ECHO[0], "hi|"))  # while the eight are still held
        assert r.stdout.startswith("ECHO"), r.stdout + r.stderr
        refused = [e for e in connects(runtime, flood) if "cap of 8" in (e.reason or "")]
        assert refused and refused[0].verdict == "deny" and refused[0].data["refused"] >= 1
    finally:
        await flood.exec("touch /workspace/done")


async def _wait_file(sb, path: str) -> str:
    import asyncio

    for _ in range(400):
        r = await sb.exec(f"cat {path} 2>/dev/null")
        if r.stdout:
            return r.stdout
        await asyncio.sleep(0.05)
    log = (await sb.exec("cat /workspace/*.log 2>/dev/null")).stdout
    raise AssertionError(f"{path} never appeared in {sb.id}: {log}")


EMFILE_PROG = """\
import asyncio, json, os, resource, socket
from corral.net.gateway import Gateway
from corral.net.tenants import Tenants

async def main():
    events = []
    gw = Gateway(Tenants(), events.append, frozenset())
    port = await gw.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = {"raised": soft == hard}
    clients = [socket.socket() for _ in range(2)]
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    clients[0].connect(("127.0.0.1", port))  # the kernel completes it; accept() then has no descriptor
    for _ in range(200):
        await asyncio.sleep(0.02)
        if any(e.action == "degraded" for e in events):
            break
    out["degraded"] = [e.reason for e in events if e.action == "degraded"]
    for fd in filler:
        os.close(fd)
    clients[1].connect(("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    for c in clients:  # an unknown source: the gateway accepts, then closes it
        c.setblocking(False)
        out.setdefault("closed", []).append(await asyncio.wait_for(loop.sock_recv(c, 10), 10) == b"")
    out["accepting"] = gw.accepting
    out["recovered"] = any(e.action == "recovered" for e in events)
    gw.kill()
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_accept_loop_survives_running_out_of_descriptors():
    """Real EMFILE, in a process of its own (a gateway with no tenants): the loop backs off, records
    a degraded event, and accepts again once descriptors are free. The limit was raised at start."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(EMFILE_PROG)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["raised"]
    assert out["degraded"] and "EMFILE" in out["degraded"][0]
    assert out["closed"] == [True, True] and out["accepting"] and out["recovered"]


# -- the inspector's framing, on bytes ------------------------------------------------------------------
def _inspect(chunks: list[bytes], deny_names: tuple[str, ...] = ("evil",)) -> tuple[bytes, list]:
    from corral.net.inspect import Denied, Inspector

    seen: list = []

    def judge(u) -> bool:
        seen.append(u)
        names = [u.sniff.name or "", u.head.named[0] if u.head and u.head.named else ""]
        bad = u.sniff.protocol in ("stratum", "ssh") or u.incomplete is not None
        return not bad and not any(d in n for d in deny_names for n in names)

    insp, out = Inspector(judge, 65536), b""
    try:
        for c in chunks:
            out += insp.feed(c, 0.0)
    except Denied:
        seen.append("denied")
    return out, seen


async def test_inspector_frames_bodies_so_a_hidden_request_is_found():
    # a chunked body, then a pipelined request naming a denied host in absolute form
    body = b"5\r\nhello\r\n0\r\n\r\n"
    first = b"POST /u HTTP/1.1\r\nHost: ok.example\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    out, seen = _inspect([first + b"GET http://evil.example/ HTTP/1.1\r\nHost: ok.example\r\n\r\n"])
    assert out == b"" and seen[-1] == "denied"  # judged before anything of that write went on
    assert [u.stage for u in seen[:-1]] == ["first", "request"]
    # a Content-Length body is not mistaken for a request, and both framings cannot be combined
    out, seen = _inspect([b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nGET /", b"GET / HTTP/1.1\r\n\r\n"])
    assert out.endswith(b"GET /GET / HTTP/1.1\r\n\r\n") and "denied" not in seen
    out, seen = _inspect([b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"])
    assert seen[0].head.problems


async def test_request_targets_parsers_could_disagree_on_are_refused():
    from corral.net.http1 import parse_head

    for target in (b"http://pkg.example.com@evil.example/", b"http://evil.example#@pkg.example.com/",
                   b"http://evil.example\\@pkg.example.com/"):
        head = parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: pkg.example.com\r\n\r\n")
        assert head is not None and head.problems and head.named is None, target
    head = parse_head(b"GET http://Pkg.Example.COM.:8080/x?y HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert head.named == ("pkg.example.com", 8080) and head.problems == ["more than one Host header"]


async def test_json_units_neither_stall_nor_hide_a_mining_call():
    from corral.net.reassemble import first_unit
    from corral.net.sniff import classify

    assert first_unit(b'{"a": 1}').done  # a whole JSON document with no newline is a unit: no stall
    assert not first_unit(b'{"id": 1, "meth').done
    # a strict parser rejects this line; a streaming one still reads the call in it
    assert classify(b'{}{"id": 1, "method": "mining.subscribe"}\n').protocol == "stratum"
    out, seen = _inspect([b"hello\n", b'{}{"id": 1, "method": "mining.au', b'thorize"}\n'])
    assert seen[-1] == "denied" and seen[-2].sniff.protocol == "stratum" and seen[-2].stage == "stream"
    assert out == b'hello\n{}{"id": 1, "method": "mining.au'  # the line's end never went on


async def test_a_request_line_a_lenient_server_accepts_is_judged_as_a_request():
    for head in (b"GET  /  HTTP/1.1\r\nHost: evil.example\r\n\r\n", b"GET\t/ HTTP/1.1 \r\nHost: evil.example\r\n\r\n"):
        out, seen = _inspect([head[:3], head[3:]])
        assert out == b"" and seen[0].sniff.protocol == "http" and seen[-1] == "denied", head


def _tls_hello(sni: str, pad: int) -> bytes:
    """A ClientHello naming `sni`, with `pad` bytes of padding extension."""
    import struct

    name = sni.encode()
    sni_ext = struct.pack(">HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    pad_ext = struct.pack(">HH", 21, pad) + bytes(pad)
    exts = sni_ext + pad_ext
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack(">H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    # in records of at most 2^14 bytes, as TLS requires
    return b"".join(b"\x16\x03\x01" + struct.pack(">H", len(hs[i:i + 16384])) + hs[i:i + 16384]
                    for i in range(0, len(hs), 16384))


async def test_a_unit_trickled_a_byte_at_a_time_is_parsed_a_bounded_number_of_times(monkeypatch):
    """A held unit is re-parsed only when new bytes could complete it: trickling a 40 KiB request head
    or a 20 KiB ClientHello one byte per chunk costs a few dozen parses, not one per byte (which would be
    quadratic work on the loop every sandbox shares), and each is still judged the moment it completes."""
    from corral.net import inspect, reassemble

    calls = {"n": 0}
    real = reassemble.first_unit

    def counting(buf):
        calls["n"] += 1
        return real(buf)

    monkeypatch.setattr(inspect, "first_unit", counting)
    head = b"GET / HTTP/1.1\r\nHost: ok.example\r\n" + b"X-Pad: " + b"a" * 40000 + b"\r\n\r\n"
    out, seen = _inspect([head[i:i + 1] for i in range(len(head))])
    assert out == head and len(seen) == 1 and seen[0].sniff.name == "ok.example", seen
    assert calls["n"] < 4200 + 40, calls  # every byte up to 4 KiB, then only at line ends and doublings

    calls["n"] = 0
    hello = _tls_hello("evil.example", 20000)
    out, seen = _inspect([hello[i:i + 1] for i in range(len(hello))])
    assert out == b"" and seen[0].sniff.name == "evil.example" and seen[-1] == "denied"
    assert calls["n"] < 4200 + 40, calls
    calls["n"] = 0
    out, seen = _inspect([hello[i:i + 1] for i in range(len(hello))], deny_names=("nothing",))
    assert out == hello and seen[0].sniff.protocol == "tls"  # judged and sent at its very last byte
