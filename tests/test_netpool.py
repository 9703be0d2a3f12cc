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
