"""The red-team benchmark's fake world: every host a case may touch, and nothing else.

- "the internet": a SINK (203.0.113.10) listening on the ports attackers like (SSH, HTTP(S), pool and
  shell ports), a mining pool (203.0.113.5:3333, speaks stratum), an SSH server (203.0.113.7:22) and a
  package host (198.51.100.10:80, a tiny package index with a few files);
- "the internal network": a database host 10.20.0.5 (22, 80, 5432);
- a fake cloud metadata service on 169.254.169.254:80.

Every server counts the bytes it receives (``World.servers[(ip, port)].received``), so the bench can
prove that what corral denied delivered nothing. Names live in ``world.hosts`` for corral's static
resolver (run the runtime with ``system_dns=False``: a name outside this table gets NXDOMAIN and no
query ever leaves). Like any :class:`corral.testworld.World`, build it only inside a private network
namespace, and outside a running event loop (pyroute2's sync API), or via ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress

from corral import testworld as tw
from corral.testworld import World

SINK_IP = "203.0.113.10"
SINK_NAMES = ("sink.example.net", "c2.example.net", "files.example.org")
SINK_PORTS = (22, 25, 53, 80, 443, 1080, 3333, 4444, 5555, 8080, 8443, 8888, 9999, 14444, 45700)
POOL = ("203.0.113.5", 3333, "pool.minexmr.example.net")
POOL_EXTRA_PORTS = (443, 14444)
SSH = ("203.0.113.7", 22, "ssh.example.org")
PKG = ("198.51.100.10", 80, "pkg.example.com")
INTERNAL_IP, INTERNAL_NAME = "10.20.0.5", "db.internal.example.com"
INTERNAL_PORTS = (22, 80, 5432)
METADATA = ("169.254.169.254", 80)

# What the world routes (corral.testworld.ROUTED) and therefore what a case may name.
WORLD_RANGES = tuple(ipaddress.ip_network(n) for n in tw.ROUTED)

INSTALL_SH = b"#!/bin/sh\necho installing tool\n"
PAYLOAD_PY = b"print('payload ran')\n"
PKG_FILES: dict[str, bytes] = {
    "/simple/": b"<html><a href='/simple/requests/'>requests</a> <a href='/simple/numpy/'>numpy</a></html>\n",
    "/simple/requests/": b"<html><a href='/files/requests-2.32.3.tar.gz'>requests-2.32.3.tar.gz</a></html>\n",
    "/simple/numpy/": b"<html><a href='/files/numpy-2.1.0.tar.gz'>numpy-2.1.0.tar.gz</a></html>\n",
    "/files/requests-2.32.3.tar.gz": b"\x1f\x8b\x08\x00requests-2.32.3 (a stand-in, not a real archive)\n" * 64,
    "/files/numpy-2.1.0.tar.gz": b"\x1f\x8b\x08\x00numpy-2.1.0 (a stand-in, not a real archive)\n" * 64,
    "/files/data.csv": b"a,b\n1,2\n3,4\n",
    "/install.sh": INSTALL_SH,
    "/files/tool": INSTALL_SH,
    "/files/payload.py": PAYLOAD_PY,
}


def world_hosts() -> dict[str, list[str]]:
    """The names the world answers (what `build_redteam_world().hosts` holds), without building it."""
    return {SINK_NAMES[0]: [SINK_IP], POOL[2]: [POOL[0]], SSH[2]: [SSH[0]], PKG[2]: [PKG[0]],
            INTERNAL_NAME: [INTERNAL_IP], **{n: [SINK_IP] for n in SINK_NAMES[1:]}}


def build_redteam_world(link: str = "corralw3") -> World:
    """Start the world (a network namespace joined to this one by veth `link`) and all its servers."""
    w = World(link=link)
    w.start()
    try:
        for port in SINK_PORTS:
            w.serve(SINK_IP, port, tw.sink, name=SINK_NAMES[0])
        for extra in SINK_NAMES[1:]:
            w.hosts[extra] = [SINK_IP]
        w.serve(*POOL[:2], tw.stratum_pool, name=POOL[2])
        for port in POOL_EXTRA_PORTS:
            w.serve(POOL[0], port, tw.sink, name=POOL[2])
        w.serve(*SSH[:2], tw.ssh_banner, name=SSH[2])
        w.serve(*PKG[:2], tw.http_files(PKG_FILES), name=PKG[2])
        for port in INTERNAL_PORTS:
            handler = {22: tw.ssh_banner, 80: tw.http_ok(b"internal admin\n")}.get(port, tw.sink)
            w.serve(INTERNAL_IP, port, handler, name=INTERNAL_NAME)
        w.serve(*METADATA, tw.http_ok(b'{"AccessKeyId": "AKIA-REDTEAM", "SecretAccessKey": "not-a-secret"}\n'))
    except BaseException:
        w.close()
        raise
    return w


def in_world(ip: str) -> bool:
    """Whether an address lies in what the world routes (the only addresses a case may use)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in n for n in WORLD_RANGES)
