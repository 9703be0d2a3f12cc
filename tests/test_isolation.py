"""The sandbox is a cage: no host processes, no writes outside its own space, no privileges,
no dangerous syscalls, no GPU, and on the host it is never root."""

from __future__ import annotations

import os

import pytest

from corral import SandboxConfig
from tests.conftest import connect_cmd, py

pytestmark = pytest.mark.asyncio


async def test_sees_no_host_processes(sb_factory):
    sb = await sb_factory()
    r = await sb.exec(f"ls /proc | grep -E '^[0-9]+$' | wc -l; kill -0 {os.getpid()}; echo rc=$?")
    lines = r.stdout.split()
    assert int(lines[0]) < 10  # the agent (PID 1), its staged child, this shell and its children only
    assert "rc=1" in r.stdout  # our pid does not exist in there


async def test_cannot_write_outside_workspace(sb_factory):
    sb = await sb_factory()
    for path in ("/etc/corral-test", "/usr/corral-test", "/corral-test", "/usr/local/corral-test"):  # no /var
        r = await sb.exec(f"echo x > {path}")
        assert r.exit_code != 0, path
        assert "Read-only file system" in r.stderr or "Permission denied" in r.stderr
    assert not os.path.exists("/etc/corral-test")
    r = await sb.exec("echo data > /workspace/f && echo t > /tmp/t && echo h > ~/h && cat /workspace/f")
    assert r.ok and r.stdout == "data\n"


async def test_host_sees_unprivileged_uid_inside_sees_root(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("id -u; grep -E 'CapEff|NoNewPrivs|Seccomp:' /proc/self/status")
    assert r.stdout.splitlines()[0] == "0"
    assert "CapEff:\t0000000000000000" in r.stdout
    assert "NoNewPrivs:\t1" in r.stdout
    assert "Seccomp:\t2" in r.stdout
    for pid in sb.pids():
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert all(int(u) == sb.uid for u in uids), (pid, uids)
        assert sb.uid >= 65536


SYSCALLS = {  # x86-64 numbers
    "mount": (165, "0,0,0,0,0"),
    "ptrace": (101, "0,0,0,0"),  # PTRACE_TRACEME
    "bpf": (321, "0,0,0"),
    "kexec_load": (246, "0,0,0,0"),
    "init_module": (175, "0,0,0"),
    "keyctl": (250, "0,0,0,0,0"),
    "perf_event_open": (298, "0,0,0,0,0"),
    "io_uring_setup": (425, "1,0"),
    "unshare": (272, "0x10000000"),
    "setns": (308, "0,0"),
}


@pytest.mark.parametrize("name", sorted(SYSCALLS))
async def test_seccomp_refuses(sb_factory, name):
    sb = await sb_factory()
    nr, args = SYSCALLS[name]
    r = await sb.exec(py(
        "import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\n"
        f"rc=libc.syscall({nr},{args})\nprint(rc, ctypes.get_errno())"
    ))
    rc, err = r.stdout.split()
    assert rc == "-1" and int(err) == 1, f"{name}: {r.stdout} {r.stderr}"  # EPERM


async def test_new_namespaces_refused(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("unshare -r true; echo rc=$?")
    assert "rc=0" not in r.stdout


async def test_no_gpu_devices_without_grant(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("ls /dev")
    assert "nvidia" not in r.stdout
    assert set(r.stdout.split()) <= {"core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
                                     "stdin", "stdout", "tty", "urandom", "zero", "mqueue"}


async def test_cannot_reach_host_loopback_service(sb_factory, host_server):
    host, port = host_server
    sb = await sb_factory()
    r = await sb.exec(connect_cmd(host, port, b"hello"))
    assert r.exit_code != 0
    assert "RECV" not in r.stdout


async def test_cannot_reach_host_address(sb_factory):
    from corral.net.netns import HOST_IP

    sb = await sb_factory()
    r = await sb.exec(connect_cmd(HOST_IP, 22, b"x"))
    assert r.exit_code != 0


async def test_cannot_reach_other_sandbox(sb_factory, runtime):
    a = await sb_factory()
    b = await sb_factory()
    await b.exec(py(
        "import socket,os\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',8080));s.listen(5)\n"
        "if os.fork(): os._exit(0)\n"
        "c,_=s.accept();open('/workspace/got','w').write('connected')"
    ))
    r = await a.exec(connect_cmd(b.net.ip, 8080, b"hi"))
    assert r.exit_code != 0
    got = await b.exec("cat /workspace/got 2>/dev/null || echo nothing")
    assert got.stdout.strip() == "nothing"
    deny = [e for e in runtime.store.events(sandbox_id=a.id, kind="connect") if e.dst_ip == b.net.ip]
    assert deny and deny[0].verdict == "deny"


async def test_bad_rootfs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        SandboxConfig(rootfs=tmp_path / "missing")
