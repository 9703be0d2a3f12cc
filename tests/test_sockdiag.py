"""The exact socket lookup the gateway's attribution rests on: real sockets, in a namespace of the test's own."""

from __future__ import annotations

import os
import socket

from corral.net.sockdiag import SockDiag
from corral.nsutil import in_thread, new_netns, setns


def _in(ns: int, fn):
    def run():
        setns(ns)
        return fn()

    return in_thread(run)


def test_finds_the_socket_of_a_connection_by_its_four_tuple_and_nothing_else():
    ns = new_netns()
    diag = SockDiag(ns)
    try:
        def setup():
            os.system("ip link set lo up")
            lst = socket.socket()
            lst.bind(("127.0.0.1", 0))
            lst.listen()
            c4 = socket.create_connection(lst.getsockname())
            c6 = socket.socket(socket.AF_INET6)  # a dual-stack client to an IPv4 address
            c6.connect(("::ffff:127.0.0.1", lst.getsockname()[1]))
            return lst, c4, c6

        lst, c4, c6 = _in(ns, setup)
        port = lst.getsockname()[1]
        for c in (c4, c6):
            assert diag.tcp_inode("127.0.0.1", c.getsockname()[1], "127.0.0.1", port) == os.fstat(c.fileno()).st_ino
        assert diag.tcp_inode("127.0.0.1", c4.getsockname()[1], "127.0.0.1", port + 1) is None  # another 4-tuple
        sport = c4.getsockname()[1]
        c4.close()  # TIME_WAIT or gone: no socket, no inode
        assert diag.tcp_inode("127.0.0.1", sport, "127.0.0.1", port) is None
        # asked in another namespace (the test's own), the same 4-tuple names nothing
        assert SockDiag(os.open("/proc/self/ns/net", os.O_RDONLY)).tcp_inode(
            "127.0.0.1", c6.getsockname()[1], "127.0.0.1", port) is None
        c6.close()
        lst.close()
    finally:
        diag.close()
        os.close(ns)
