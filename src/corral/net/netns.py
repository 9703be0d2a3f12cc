"""Per-sandbox network namespace joined to corral's namespace by a veth pair.

All host-side veth ends share one address (HOST_IP) and route to their sandbox by a /32 peer route,
so a sandbox needs no subnet of its own and corral never enables forwarding: traffic from a sandbox
can only reach corral's own gateway and resolver (nftables enforces that), never beyond.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
from dataclasses import dataclass

from corral.errors import IsolationUnavailable
from corral.net import rtnl
from corral.net.sockdiag import SockDiag
from corral.nsutil import new_netns

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


def _wire(fd: int, ifname: str, ip: str) -> None:
    """The veth pair, its peer born inside the namespace, addresses, links up and routes: three batches
    (rtnl.py), not nine pyroute2 calls."""
    with rtnl.socket_for() as host:
        rtnl.request(host, rtnl.veth_into(ifname, fd))
        idx = rtnl.link_index(rtnl.request(host, rtnl.get_link(ifname))[0])
        rtnl.request(host, rtnl.address(idx, HOST_IP), rtnl.link_up(idx), rtnl.route(idx, ip, prefsrc=HOST_IP))
    with rtnl.socket_for(fd) as inner:
        eth = rtnl.PEER_INDEX
        rtnl.request(inner, rtnl.address(eth, ip), rtnl.link_up(eth), rtnl.link_up(rtnl.LOOPBACK_INDEX),
                     rtnl.route(eth, HOST_IP, scope=rtnl.SCOPE_LINK), rtnl.route(eth, None, gateway=HOST_IP))


def _delete_link(ifname: str) -> None:
    with contextlib.suppress(OSError), rtnl.socket_for() as host:  # RtnlError is an OSError: gone already
        rtnl.request(host, rtnl.del_link(ifname))


def create(instance: int, seq: int) -> SandboxNet:
    """The sandbox's network: raw rtnetlink only, so that the network pool's threads never share a
    netlink client (a pyroute2 object used by one thread while another closed it hung its thread in its
    own event loop, and the interpreter's exit with it)."""
    ip, ifname = sandbox_ip(instance, seq), link_name(instance, seq)
    fd = new_netns()
    try:
        try:
            _wire(fd, ifname, ip)
        except rtnl.RtnlError as e:
            if e.errno != errno.EEXIST:
                raise
            # a leftover with our own instance id: a crashed run's, or a namespace the kernel is still tearing down
            _delete_link(ifname)
            _wire(fd, ifname, ip)
    except OSError as e:
        os.close(fd)
        _delete_link(ifname)
        raise IsolationUnavailable(
            f"cannot set up the sandbox network ({ifname}): {e}; corral needs CAP_NET_ADMIN (run as root)"
        ) from None
    try:
        diag: SockDiag | None = SockDiag(fd)
    except OSError:  # no CONFIG_INET_DIAG: attribution falls back to reading the socket table
        diag = None
    return SandboxNet(fd, ip, ifname, diag)
