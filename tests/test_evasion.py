"""Evasions of corral's exec and connect monitoring (issue 10), each tried as the adversary would in a
real sandbox: the attack is refused or killed, and what corral recorded names the right step."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import py

pytestmark = pytest.mark.asyncio

AF_VSOCK, AF_PACKET, AF_NETLINK = 40, 17, 16


async def findings_for(runtime, sb, rule=None, wait=10.0):
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        got = [f for f in runtime.store.findings(sandbox_id=sb.id) if rule is None or f.rule_id == rule]
        if got or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.05)


def syscall_cmd(nr: int, *args: int) -> str:
    """Python in the sandbox calling syscall `nr` directly; prints 'rc errno'."""
    return py("import ctypes\nlibc=ctypes.CDLL(None,use_errno=True)\n"
              f"rc=libc.syscall({nr},{','.join(map(str, args))})\nprint(rc, ctypes.get_errno())")


# --- seccomp: socket families and memfd_secret ----------------------------------------------------
@pytest.mark.parametrize("family,proto", [(AF_VSOCK, 0), (AF_PACKET, 0), (38, 0),  # AF_ALG
                                          (AF_NETLINK, 9),  # NETLINK_AUDIT
                                          (AF_VSOCK | (1 << 32), 0)])  # upper bits the kernel drops
async def test_socket_families_outside_the_allow_list_are_refused(sb_factory, family, proto):
    """socket() of a family outside AF_UNIX/INET/INET6 (and netlink route/diag) fails with
    EAFNOSUPPORT from the filter: no socket ever exists, so no vsock can be opened or connected."""
    sb = await sb_factory()
    r = await sb.exec(syscall_cmd(41, family, 1 if family != AF_NETLINK else 3, proto))  # SOCK_STREAM/RAW
    rc, err = r.stdout.split()
    assert rc == "-1" and int(err) == 97, r.stdout + r.stderr  # EAFNOSUPPORT
    r = await sb.exec(syscall_cmd(53, family, 1, proto, 0))  # socketpair, same family
    assert r.stdout.split()[0] == "-1" and int(r.stdout.split()[1]) == 97, r.stdout + r.stderr


async def test_common_socket_families_still_work(sb_factory):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import socket\n"
        "for fam, typ, proto in ((socket.AF_UNIX, socket.SOCK_STREAM, 0), (socket.AF_INET, socket.SOCK_DGRAM, 0),\n"
        "                        (socket.AF_INET6, socket.SOCK_STREAM, 0), (socket.AF_NETLINK, socket.SOCK_RAW, 0),\n"
        "                        (socket.AF_NETLINK, socket.SOCK_RAW, 4)):\n"
        "    socket.socket(fam, typ, proto).close()\n"
        "print('ok', socket.getaddrinfo('localhost', 80, flags=socket.AI_ADDRCONFIG) is not None)"))
    assert r.stdout.strip() == "ok True", r.stderr
    r = await sb.exec("ip -o addr show lo")
    assert r.exit_code == 0 and "127.0.0.1" in r.stdout, r.stderr


async def test_memfd_secret_is_refused(sb_factory):
    """memfd_secret memory cannot be read through /proc/<pid>/mem: an exec path kept there would blind
    the exec monitor, so the call does not exist in a sandbox."""
    sb = await sb_factory()
    r = await sb.exec(syscall_cmd(447, 0))
    rc, err = r.stdout.split()
    assert rc == "-1" and int(err) == 38, r.stdout + r.stderr  # ENOSYS
