"""Networks made ahead (net/netpool.py): a create takes one, the pool makes the next, each is used once,
and nothing is left behind when the runtime closes."""

from __future__ import annotations

import subprocess

import pytest

from corral import Runtime, RuntimeConfig
from tests.conftest import PKG, allow, eventually

pytestmark = pytest.mark.asyncio


def _links(instance: int) -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if f"corral{instance:03x}" in line}


async def test_a_create_takes_a_network_made_ahead_and_the_pool_refills(world, tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False, net_pool=2))
    await rt.start()
    try:
        pool = rt._nets
        assert pool is not None
        await eventually(lambda: len(pool._ready) == 2, "two networks made ahead")
        ahead = {seq for seq, _ in pool._ready}
        a = await rt.create(allow(f"{PKG[2]}:{PKG[1]}"))
        assert a._seq in ahead  # taken, not made
        b = await rt.create()
        assert a.net.ip != b.net.ip
        # a network made ahead is a working one: policy, gateway and resolver as for any other
        r = await a.exec(f"curl -s -m 5 http://{PKG[2]}:{PKG[1]}/")
        assert r.exit_code == 0 and "package index" in r.stdout
        denied = await b.exec(f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{PKG[2]}:{PKG[1]}/")
        assert denied.stdout != "200"
        await eventually(lambda: len(pool._ready) == 2, "the pool refilled")
        assert not {seq for seq, _ in pool._ready} & {a._seq, b._seq}
        # each network is used once: a closed sandbox's goes with it (its veth too)
        link = a.net.ifname
        await a.close()
        await eventually(lambda: link not in _links(rt.instance), "the closed sandbox's veth gone")
        assert a._seq not in {seq for seq, _ in pool._ready}
        await b.close()
        instance = rt.instance
        assert _links(instance)  # the pool's own networks are still there while the runtime runs
    finally:
        await rt.close()
    # the kernel tears a namespace down in the background once its last reference is closed
    await eventually(lambda: _links(instance) == set(), "every veth of the runtime gone with it, the pool's too")


async def test_no_pool_makes_each_network_on_demand(world, tmp_path):
    async with Runtime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False, net_pool=0)) as rt:
        sb = await rt.create()
        assert (await sb.exec("echo ok")).stdout == "ok\n"
        assert rt._nets is not None and rt._nets._ready == []


async def test_a_sandbox_network_is_wired_as_routed_and_a_leftover_link_is_replaced(monkeypatch):
    """The veth pair, addresses and routes that net/rtnl.py sends as raw batches, read back with `ip`:
    the peer is eth0 inside the sandbox's namespace with its /32 and a default route through corral's
    address; a leftover link of the same name (a crashed run with this instance id) is replaced; a
    request the kernel refuses raises, naming its errno, and leaves nothing behind."""
    import asyncio

    def wire_and_check() -> None:
        import errno
        import os

        from corral.errors import IsolationUnavailable
        from corral.net import netns, rtnl

        instance, seq = 0xFED, 7
        ifname = netns.link_name(instance, seq)
        subprocess.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"], check=True)

        def exists() -> bool:
            return subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode == 0

        net = netns.create(instance, seq)
        try:
            link = subprocess.run(["ip", "-d", "link", "show", ifname], capture_output=True, text=True).stdout
            assert "veth" in link and "UP" in link, link
            routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
            assert f"{net.ip} dev {ifname}" in routes, routes
            inside = subprocess.run(["nsenter", f"--net=/proc/{os.getpid()}/fd/{net.netns_fd}", "sh", "-c",
                                     "ip -o addr show eth0; ip route; ip -o link show lo"],
                                    capture_output=True, text=True).stdout
            assert f"inet {net.ip}/32" in inside and f"default via {netns.HOST_IP} dev eth0" in inside, inside
            assert f"{netns.HOST_IP} dev eth0" in inside and "UP" in inside.splitlines()[-1], inside
            # refused: a second address the same is EEXIST, raised after every answer was read
            with rtnl.socket_for(net.netns_fd) as sock:
                with pytest.raises(rtnl.RtnlError) as e:
                    rtnl.request(sock, rtnl.link_up(rtnl.PEER_INDEX), rtnl.address(rtnl.PEER_INDEX, net.ip))
                assert e.value.errno == errno.EEXIST and "request 2 of 2" in str(e.value)
                rtnl.request(sock, rtnl.link_up(rtnl.PEER_INDEX))  # the socket is still in step
        finally:
            with rtnl.socket_for() as host:
                rtnl.request(host, rtnl.del_link(ifname))
            net.close()
        assert not exists()
        # a descriptor that is no namespace: the veth cannot be made there; nothing is left behind
        monkeypatch.setattr(netns, "new_netns", lambda: os.open("/dev/null", os.O_RDONLY))
        with pytest.raises(IsolationUnavailable, match="cannot set up the sandbox network"):
            netns.create(instance, seq)
        assert not exists()

    await asyncio.to_thread(wire_and_check)
