"""Per-sandbox network namespace joined to corral's namespace by a veth pair.

All host-side veth ends share one address (HOST_IP) and route to their sandbox by a /32 peer route,
so a sandbox needs no subnet of its own and corral never enables forwarding: traffic from a sandbox
can only reach corral's own gateway and resolver (nftables enforces that), never beyond.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from corral.errors import IsolationUnavailable
from corral.net.sockdiag import SockDiag
from corral.nsutil import new_netns, socket_in

HOST_IP = "100.64.0.1"
SANDBOX_NET = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 shared space, never routed for us


def sandbox_ip(instance: int, seq: int) -> str:
    return str(SANDBOX_NET.network_address + (instance << 12) + seq)


def link_name(instance: int, seq: int) -> str:
    return f"corral{instance:03x}{seq:03x}"  # 12 chars; IFNAMSIZ is 15


@dataclass
class SandboxNet:
    netns_fd: int
    ip: str
    ifname: str
    diag: SockDiag | None = None  # exact socket lookups; None where the kernel lacks inet_diag

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
        with contextlib.suppress(OSError):
            os.close(self.netns_fd)


def create(host: IPRoute, instance: int, seq: int) -> SandboxNet:
    ip, ifname = sandbox_ip(instance, seq), link_name(instance, seq)
    fd = new_netns()
    try:
        with contextlib.suppress(NetlinkError):
            host.link("del", ifname=ifname)  # a leftover of a crashed run with our own instance id
        host.link("add", ifname=ifname, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
        idx = host.link_lookup(ifname=ifname)[0]
        host.addr("add", index=idx, address=HOST_IP, prefixlen=32)
        host.link("set", index=idx, state="up")
        host.route("add", dst=f"{ip}/32", oif=idx, prefsrc=HOST_IP)
        inner = IPRoute(use_socket=socket_in(fd, socket.AF_NETLINK, socket.SOCK_DGRAM, 0))
        try:
            eth = inner.link_lookup(ifname="eth0")[0]
            inner.addr("add", index=eth, address=ip, prefixlen=32)
            inner.link("set", index=eth, state="up")
            inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
            inner.route("add", dst=f"{HOST_IP}/32", oif=eth, scope=253)
            inner.route("add", dst="0.0.0.0/0", gateway=HOST_IP, oif=eth)
        finally:
            inner.close()
    except NetlinkError as e:
        os.close(fd)
        with contextlib.suppress(NetlinkError):
            host.link("del", ifname=ifname)
        raise IsolationUnavailable(
            f"cannot set up the sandbox network ({ifname}): {e}; corral needs CAP_NET_ADMIN (run as root)"
        ) from None
    try:
        diag: SockDiag | None = SockDiag(fd)
    except OSError:  # no CONFIG_INET_DIAG: attribution falls back to reading the socket table
        diag = None
    return SandboxNet(fd, ip, ifname, diag)
