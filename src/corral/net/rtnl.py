"""The few rtnetlink requests that wire a sandbox's network, encoded here and sent as batches.

pyroute2 spends ~0.7 ms of Python encoding each request (measured: 9 requests, 6.2 ms of CPU), more than
the kernel takes to carry them out; a sandbox network needs nine, on the path of every start. These are
fixed shapes (a veth pair whose peer is born in the sandbox's namespace, one /32 address each side,
links up, two routes), so they are packed with struct and each batch goes out in one send, its
acknowledgements read back in one go; a leftover link is deleted the same way. Nothing on a sandbox's
way in or out uses pyroute2 (gc.py and the test world still do).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 17, 18, 20, 24
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST = 254, 4, 1
SCOPE_UNIVERSE, SCOPE_LINK = 0, 253
LOOPBACK_INDEX = 1  # in every network namespace
PEER_INDEX = 2  # asked for: the first index after lo in the sandbox's fresh namespace

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NEW = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


class RtnlError(OSError):
    """A request the kernel refused: errno and the request's name."""


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _ip(addr: str) -> bytes:
    return ipaddress.IPv4Address(addr).packed


def veth_into(ifname: str, netns_fd: int) -> tuple[int, int, bytes]:
    """A veth pair `ifname` here, its peer `eth0` (index PEER_INDEX) created inside `netns_fd`."""
    peer = _IFINFO.pack(socket.AF_UNSPEC, 0, PEER_INDEX, 0, 0) + _attr(IFLA_IFNAME, b"eth0\0") + _attr(
        IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
    info = _attr(IFLA_INFO_KIND, b"veth\0") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer))
    body = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, ifname.encode() + b"\0")
            + _attr(IFLA_LINKINFO, info))
    return RTM_NEWLINK, _NEW, body


def get_link(ifname: str) -> tuple[int, int, bytes]:
    return RTM_GETLINK, NLM_F_REQUEST, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(
        IFLA_IFNAME, ifname.encode() + b"\0")


def del_link(ifname: str) -> tuple[int, int, bytes]:
    return RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(
        IFLA_IFNAME, ifname.encode() + b"\0")


def link_up(index: int) -> tuple[int, int, bytes]:
    return RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)


def address(index: int, addr: str) -> tuple[int, int, bytes]:
    """`addr`/32 on link `index`."""
    return RTM_NEWADDR, _NEW, (_IFADDR.pack(socket.AF_INET, 32, 0, SCOPE_UNIVERSE, index)
                               + _attr(IFA_LOCAL, _ip(addr)) + _attr(IFA_ADDRESS, _ip(addr)))


def route(oif: int, dst: str | None, *, scope: int = SCOPE_UNIVERSE, gateway: str | None = None,
          prefsrc: str | None = None) -> tuple[int, int, bytes]:
    """A main-table route to `dst` (an address: /32; None: the default route) out of link `oif`."""
    attrs = _attr(RTA_OIF, struct.pack("=I", oif))
    if dst is not None:
        attrs += _attr(RTA_DST, _ip(dst))
    if gateway is not None:
        attrs += _attr(RTA_GATEWAY, _ip(gateway))
    if prefsrc is not None:
        attrs += _attr(RTA_PREFSRC, _ip(prefsrc))
    head = _RTMSG.pack(socket.AF_INET, 0 if dst is None else 32, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope,
                       RTN_UNICAST, 0)
    return RTM_NEWROUTE, _NEW, head + attrs


def socket_for(netns_fd: int | None = None) -> socket.socket:
    """A route netlink socket, in this process's namespace or, through nsutil, in `netns_fd`'s."""
    if netns_fd is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    else:
        from corral.nsutil import socket_in
        sock = socket_in(netns_fd, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


_SEQ = itertools.count(1)  # next() is atomic: the network pool's threads never share a number


def request(sock: socket.socket, *msgs: tuple[int, int, bytes]) -> list[bytes]:
    """Send `msgs` in one batch and wait for each one's answer, in order. Returns the payload of each
    data reply (a GETLINK's link); raises RtnlError for the first request the kernel refused, after
    every answer has been read (the socket stays usable)."""
    out = bytearray()
    seqs = []
    for kind, flags, body in msgs:
        seq = next(_SEQ) & 0x7FFFFFFF
        seqs.append(seq)
        out += _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body
    sock.send(bytes(out))
    pending, replies, failure = set(seqs), [], None
    while pending:
        buf = sock.recv(1 << 16)
        off = 0
        while off + _HDR.size <= len(buf):
            n, kind, _flags, seq, _pid = _HDR.unpack_from(buf, off)
            if n < _HDR.size:
                raise RtnlError(0, "a malformed netlink reply")
            if seq in pending:
                if kind == NLMSG_ERROR:
                    err = struct.unpack_from("=i", buf, off + _HDR.size)[0]
                    if err and failure is None:
                        failure = RtnlError(-err, f"{os.strerror(-err)} (netlink request {seqs.index(seq) + 1} "
                                                  f"of {len(seqs)})")
                    pending.discard(seq)
                elif kind != NLMSG_DONE:
                    replies.append(bytes(buf[off + _HDR.size : off + n]))
                    pending.discard(seq)  # a GETLINK answers with its link, no acknowledgement
            off += (n + 3) & ~3
    if failure is not None:
        raise failure
    return replies


def link_index(reply: bytes) -> int:
    return _IFINFO.unpack_from(reply)[2]
