"""What a sandbox can see of the host: a minimal root of system directories, nothing of corral's
(state, stores, tokens, config, /run/corral, cgroups) whatever its file modes, and no host unix
socket, abstract or on a path.

Host-side fixtures live under /var/tmp (a real host directory outside every sandbox mount), made
world-readable on purpose: hiding must not depend on file modes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Runtime, RuntimeConfig, SandboxConfig
from corral.errors import ConfigError, IsolationUnavailable
from corral.sandbox import rootfs
from corral.server.config import ServeConfig, ServeConfigError
from tests.conftest import py
from tests.test_cli import corral

PROBE = r"""
import json, os, sys
out = {}
for p in sys.argv[1:]:
    info = {"exists": os.path.lexists(p)}
    try:
        if os.path.isdir(p):
            info["list"] = sorted(os.listdir(p))
        elif info["exists"]:
            with open(p, "rb") as f:
                info["read"] = f.read(200).decode(errors="replace")
    except OSError as e:
        info["error"] = e.strerror
    out[p] = info
print(json.dumps(out))
"""


async def probe(sb, *paths: str) -> dict[str, dict]:
    await sb.write_file("/tmp/probe.py", PROBE)
    r = await sb.exec("python3 /tmp/probe.py " + " ".join(paths))
    assert r.ok, r.stderr
    return json.loads(r.stdout)


def seen(info: dict) -> bool:
    """Whether the sandbox learnt anything of a path's host content."""
    return bool(info.get("list") or info.get("read"))


@pytest.fixture
def hostdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="corral-hostview-", dir="/var/tmp"))
    d.chmod(0o755)
    (d / "visible.txt").write_text("operator data\n")
    (d / "visible.txt").chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def world_readable(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666)


def private_mount_ns() -> bool:
    """`make test` runs the suite in a mount namespace of its own, private (no propagation to the
    host): a mount made here dies with it. True when an ancestor sits in another mount namespace
    and our root mount propagates nowhere."""
    try:
        mine, pid = os.readlink("/proc/self/ns/mnt"), os.getppid()
        while pid > 1 and os.readlink(f"/proc/{pid}/ns/mnt") == mine:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
        root = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4] == "/")
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return "shared:" not in root.split(" - ")[0]


# -- the default root ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_default_root_is_minimal(sb_factory):
    sb = await sb_factory()
    r = await sb.exec("ls -A /")
    assert r.ok, r.stderr
    top = set(r.stdout.split())
    for gone in ("home", "srv", "opt", "var", "mnt", "media", "run", "boot", "work"):
        assert gone not in top, f"/{gone} is visible: {sorted(top)}"
    assert {"usr", "etc", "bin", "proc", "dev", "tmp", "workspace", "root"} <= top
    # /root is the sandbox's own empty tmpfs, not the host's
    listing = await probe(sb, "/root", "/home", "/var/lib", "/opt")
    assert listing["/root"]["list"] == []
    assert not any(listing[p]["exists"] for p in ("/home", "/var/lib", "/opt"))


@pytest.mark.asyncio
async def test_toolchain_still_works(sb_factory):
    sb = await sb_factory()
    r = await sb.exec(
        "set -e; python3 -c 'import json, ssl, sqlite3, venv; print(\"py ok\")'; bash -c 'echo bash ok';"
        " ls /usr/bin >/dev/null; seq 3 | sort -r | head -1; nproc >/dev/null;"
        " git --version >/dev/null; ssh -V 2>&1 | grep -q OpenSSH; curl --version >/dev/null;"
        " cd /workspace && git init -q r && cd r && git -c user.email=a@b -c user.name=a commit -q"
        " --allow-empty -m m && git log --oneline | wc -l")
    assert r.ok, r.stderr
    assert r.stdout.split() == ["py", "ok", "bash", "ok", "3", "1"]


@pytest.mark.asyncio
async def test_system_pytest_still_works(sb_factory):
    host = subprocess.run(["/usr/bin/python3", "-c", "import pytest"], capture_output=True)
    if host.returncode != 0:
        pytest.skip("the host's system python has no pytest")
    sb = await sb_factory()
    await sb.write_file("/workspace/test_a.py", "def test_a():\n    assert 1 + 1 == 2\n")
    r = await sb.exec("cd /workspace && python3 -m pytest -q -p no:cacheprovider test_a.py")
    assert r.ok and "1 passed" in r.stdout, r.stdout + r.stderr


@pytest.mark.asyncio
async def test_etc_secrets_are_masked(sb_factory):
    sb = await sb_factory()
    present = [p for p in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers") if os.path.lexists(p)]
    assert present, "this host has none of /etc/shadow, /etc/gshadow, /etc/sudoers"
    r = await sb.exec(py(
        "import json, os, stat, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    st = os.stat(p)\n"
        "    try:\n"
        "        got = len(open(p, 'rb').read()) if not stat.S_ISDIR(st.st_mode) else len(os.listdir(p))\n"
        "    except OSError as e:\n"
        "        got = e.strerror\n"
        "    out[p] = [stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), st.st_size, got]\n"
        "print(json.dumps(out))\n") + " " + " ".join(present))
    assert r.ok, r.stderr
    for path, (masked, size, got) in json.loads(r.stdout).items():
        # an empty file of the sandbox's own or an empty directory in its place, never the host's file
        # (whose size is not 0)
        assert masked and size == 0 and got in (0, "Permission denied"), (path, masked, size, got)
        assert os.stat(path).st_size > 0 or os.path.isdir(path)
    assert await sb.exec("grep -q '^root:' /etc/passwd")  # what the toolchain needs stays


@pytest.mark.asyncio
async def test_ssh_host_keys_are_masked_whatever_their_mode(sb_factory):
    if not private_mount_ns():
        pytest.skip("needs the private mount namespace 'make test' runs in")
    if not Path("/etc/ssh").is_dir():
        pytest.skip("no /etc/ssh to stand a host key in")
    fake = Path(tempfile.mkdtemp(prefix="corral-hostview-ssh-", dir="/var/tmp"))
    try:
        shutil.copytree("/etc/ssh", fake, dirs_exist_ok=True, symlinks=True)
        (fake / "ssh_host_ed25519_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
        (fake / "ssh_host_ed25519_key").chmod(0o644)
        (fake / "ssh_config").write_text("Host *\n    BatchMode yes\n")
        subprocess.run(["mount", "--bind", str(fake), "/etc/ssh"], check=True)
        try:
            sb = await sb_factory()
            got = await probe(sb, "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_config")
        finally:
            subprocess.run(["umount", "/etc/ssh"], check=True)
    finally:
        shutil.rmtree(fake, ignore_errors=True)
    assert not seen(got["/etc/ssh/ssh_host_ed25519_key"]), got
    assert "BatchMode" in got["/etc/ssh/ssh_config"]["read"]  # the client's config stays


# -- corral's own state ----------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_no_cgroups_of_any_sandbox_are_visible(sb_factory, runtime):
    a, b = await sb_factory(), await sb_factory()
    assert runtime.cgroups is not None
    # the host's cgroup tree names every sandbox: corral-<instance>/corral-<sandbox id>
    assert any(b.id in str(p) for p in b.cgroup.join_files())
    r = await a.exec("find /sys -name 'corral-*' 2>/dev/null | head -5; cat /proc/self/cgroup")
    assert "corral-" not in r.stdout and b.id not in r.stdout, r.stdout
    listing = await probe(a, "/sys/fs/cgroup", "/sys/fs")
    assert not listing["/sys/fs/cgroup"]["exists"], listing
    assert await a.exec("nproc")  # what tools read of /sys (the CPU list) is still there


@pytest.mark.asyncio
async def test_gpu_sandbox_sees_devices_of_sys_but_no_cgroups(sb_factory):
    """CUDA and NVML read PCI devices and the driver's module of /sys: a GPU sandbox gets those,
    read-only, and still no cgroup tree nor the host's network links (other sandboxes' among them)."""
    sb = await sb_factory(SandboxConfig(gpu=True))
    got = await probe(sb, "/sys/fs/cgroup", "/sys/fs", "/sys/class/net", "/sys/devices/virtual",
                      "/sys/bus/pci", "/sys/devices/system/cpu")
    for gone in ("/sys/fs/cgroup", "/sys/fs", "/sys/class/net", "/sys/devices/virtual"):
        assert not got[gone]["exists"], got
    assert seen(got["/sys/devices/system/cpu"])
    assert seen(got["/sys/bus/pci"]) == os.path.isdir("/sys/bus/pci/devices")
    r = await sb.exec("find /sys -name 'corral*' 2>/dev/null | head -3; touch /sys/devices/system/x")
    assert "corral" not in r.stdout and r.exit_code != 0, r.stdout


@pytest.mark.asyncio
async def test_run_corral_is_invisible(sb_factory, runtime):
    lock_dir = runtime.config.lock_dir
    assert any(lock_dir.glob("instance-*.lock"))
    sb = await sb_factory()
    got = await probe(sb, str(lock_dir), "/run", "/var/run")
    assert not any(seen(v) for v in got.values()), got


@pytest.mark.asyncio
@pytest.mark.parametrize("exposed", [False, True], ids=["default-root", "operator-exposes-parent"])
async def test_state_dirs_and_stores_of_every_runtime_are_invisible(world, runtime, hostdir, exposed):
    """A second runtime's state_dir and store file (a URL path outside its state_dir) sit in a host
    directory, world-readable. Neither that runtime's sandboxes nor another runtime's see them, even
    when an operator makes the directory they sit in visible."""
    state, store = hostdir / "state-b", hostdir / "stores" / "b.db"
    store.parent.mkdir()
    other = Runtime(RuntimeConfig(state_dir=state, store_url=str(store), hosts=world.hosts, system_dns=False))
    await other.start()
    try:
        (state / "secret.txt").write_text("other runtime's trace\n")
        world_readable(hostdir)
        cfg = SandboxConfig(host_paths=(hostdir,)) if exposed else SandboxConfig()
        targets = [str(state), str(state / "secret.txt"), str(store), f"{store}-wal"]
        for rt in (runtime, other):
            sb = await rt.create(cfg)
            try:
                got = await probe(sb, *targets, str(hostdir / "visible.txt"))
            finally:
                await sb.close()
            for t in targets:
                assert not seen(got[t]), (rt.config.state_dir, t, got[t])
            assert seen(got[str(hostdir / "visible.txt")]) == exposed  # the control: the directory is there
    finally:
        await other.close()


@pytest.mark.asyncio
async def test_a_closed_runtime_no_longer_registers_its_paths(world, hostdir):
    rt = Runtime(RuntimeConfig(state_dir=hostdir / "state-c", hosts=world.hosts, system_dns=False))
    await rt.start()
    try:
        assert str((hostdir / "state-c").resolve()) in rootfs.registered(rt.config.lock_dir)
    finally:
        await rt.close()
    assert str((hostdir / "state-c").resolve()) not in rootfs.registered(rt.config.lock_dir)


def test_an_unreadable_registry_fails_closed(tmp_path):
    """A registry entry corral cannot read could name what must stay hidden: no sandbox starts."""
    (tmp_path / "instance-00a.hidden").write_text('["/srv/state"')
    with pytest.raises(IsolationUnavailable, match=r"instance-00a\.hidden"):
        rootfs.registered(tmp_path)
    (tmp_path / "instance-00a.hidden").write_text('["/srv/state"]')
    assert rootfs.registered(tmp_path) == {"/srv/state"}


def test_the_registry_is_read_again_whenever_it_changed(tmp_path):
    """Read once per change of the directory, not per launch; never a list older than the directory,
    even for changes closer together than the file system's clock (which would share one mtime)."""
    rootfs.register(tmp_path, 1, ["/srv/a"])
    assert rootfs.registered(tmp_path) == {"/srv/a"}
    rootfs.register(tmp_path, 2, ["/srv/b"])  # at once: the same coarse mtime as the first, maybe
    assert rootfs.registered(tmp_path) == {"/srv/a", "/srv/b"}
    old = time.time() - 10
    os.utime(tmp_path, (old, old))
    assert rootfs.registered(tmp_path) == {"/srv/a", "/srv/b"}  # now kept: the directory is settled
    rootfs.unregister(tmp_path, 1)
    assert rootfs.registered(tmp_path) == {"/srv/b"}


# -- tokens and config files of `corral serve` -----------------------------------------------------
def write_tokens(path: Path, mode: int) -> Path:
    path.write_text("a-long-enough-token-0123456789\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_serve_refuses_a_token_file_others_can_read(tmp_path, mode):
    f = write_tokens(tmp_path / "tokens", mode)
    with pytest.raises(ServeConfigError) as e:
        ServeConfig(token_file=f).tokens()
    assert str(f) in str(e.value) and f"chmod 600 {f}" in str(e.value)
    f.chmod(0o600)
    assert ServeConfig(token_file=f).tokens() == ["a-long-enough-token-0123456789"]


def test_corral_serve_command_refuses_a_readable_token_file(tmp_path):
    f = write_tokens(tmp_path / "tokens", 0o644)
    p = corral(tmp_path, "serve", "--token-file", str(f), "--port", "0", timeout=60)
    assert p.returncode != 0
    assert f"chmod 600 {f}" in p.stdout + p.stderr


@pytest.mark.asyncio
async def test_token_and_config_files_are_invisible(world, hostdir):
    tokens = write_tokens(hostdir / "tokens", 0o600)
    conf = hostdir / "serve.yaml"
    conf.write_text(f"token_file: {tokens}\nruntime: {{state_dir: {hostdir / 'state-s'}}}\n")
    rules = hostdir / "rules.yaml"
    rules.write_text("[]\n")
    scfg = ServeConfig.from_file(conf)
    scfg = scfg.model_copy(update={"runtime": scfg.runtime.model_copy(update={
        "hosts": world.hosts, "system_dns": False, "rule_files": (rules,)})})
    rt = Runtime(scfg.runtime_config())
    await rt.start()
    try:
        os.chmod(tokens, 0o666)  # modes do not matter: the sandbox never sees the file
        conf.chmod(0o666)
        sb = await rt.create(SandboxConfig(host_paths=(hostdir,)))
        try:
            got = await probe(sb, str(tokens), str(conf), str(rules), str(hostdir / "visible.txt"))
        finally:
            await sb.close()
    finally:
        await rt.close()
    assert not seen(got[str(tokens)]) and not seen(got[str(conf)]) and not seen(got[str(rules)]), got
    assert seen(got[str(hostdir / "visible.txt")])


# -- operator-added paths --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_operator_paths_are_visible_read_only(sb_factory, hostdir):
    sb = await sb_factory(SandboxConfig(host_paths=(hostdir,)))
    r = await sb.exec(f"cat {hostdir}/visible.txt && echo x > {hostdir}/new.txt")
    assert r.stdout == "operator data\n"
    assert r.exit_code != 0 and "Read-only file system" in r.stderr
    assert not (hostdir / "new.txt").exists()


@pytest.mark.parametrize("bad, needle", [
    ("relative/dir", "absolute"),
    ("/does/not/exist-corral", "does not exist"),
    ("/", "whole host root"),
    ("/proc", "sandbox's own"),
    ("/tmp", "sandbox's own"),
    ("/workspace", "sandbox's own"),
    ("/run", "/run"),
    ("/var/run", "/run"),
    ("/sys", "/sys"),
])
def test_bad_host_paths_are_a_clear_error(tmp_path, bad, needle):
    f = tmp_path / "sandbox.yaml"
    f.write_text(f"host_paths: [{bad}]\n")
    with pytest.raises(ConfigError) as e:
        SandboxConfig.from_file(f)
    assert "host_paths" in str(e.value) and needle in str(e.value), str(e.value)


def test_host_path_that_is_a_socket_is_refused(hostdir):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(hostdir / "op.sock"))
        with pytest.raises(ValueError, match="socket"):
            SandboxConfig(host_paths=(hostdir / "op.sock",))
    finally:
        s.close()


def test_interpreter_outside_the_view_is_bound_alone(hostdir):
    """corral's interpreter, when the agent needs one that lives outside the system directories,
    is bound read-only on its own: its executable and its lib directory, not its tree."""
    exe = hostdir / "py" / "bin" / "python3.11"
    exe.parent.mkdir(parents=True)
    (hostdir / "py" / "lib").mkdir()
    (hostdir / "py" / "secret").mkdir()
    exe.write_text("")
    argv = rootfs.root_mounts(SandboxConfig(), [], str(exe))
    binds = {(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == "--ro-bind"}
    assert (str(exe), str(exe)) in binds and (str(hostdir / "py" / "lib"),) * 2 in binds
    assert not any(src.startswith(str(hostdir / "py" / "secret")) or src == str(hostdir) for src, _ in binds)


# -- host unix sockets -----------------------------------------------------------------------------
@contextlib.contextmanager
def listening_unix(address: str | bytes) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(address)
    if isinstance(address, str):
        os.chmod(address, 0o777)  # any uid may connect: only visibility stands in the way
    s.listen(4)
    try:
        yield s
    finally:
        s.close()


CONNECT = ("import socket, sys\n"
           "a = sys.argv[1]\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "try:\n"
           "    s.connect(b'\\0' + a[1:].encode() if a.startswith('@') else a)\n"
           "    print('CONNECTED')\n"
           "except OSError as e:\n"
           "    print('REFUSED', e.strerror)\n")


@pytest.mark.asyncio
async def test_host_abstract_unix_socket_is_unreachable(sb_factory):
    name = f"corral-test-{uuid.uuid4().hex}"
    with listening_unix(b"\0" + name.encode()):
        control = socket.socket(socket.AF_UNIX)
        control.connect(b"\0" + name.encode())  # reachable from the host's network namespace
        control.close()
        sb = await sb_factory()
        r = await sb.exec(py(CONNECT) + f" @{name}")
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr


@pytest.mark.asyncio
@pytest.mark.parametrize("parent", ["/run", "/var/run", "/tmp", "/var/tmp"])
async def test_host_path_unix_sockets_are_unreachable(sb_factory, parent):
    d = Path(tempfile.mkdtemp(prefix="corral-test-sock-", dir=parent))
    try:
        d.chmod(0o755)
        path = str(d / "s")
        with listening_unix(path):
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            sb = await sb_factory()
            r = await sb.exec(py(CONNECT) + f" {path}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr


def test_the_masks_are_those_of_a_scan_of_every_hidden_path(tmp_path):
    """root_mounts walks up a path's parents instead of scanning every hidden path (hundreds, with many
    runtimes), and resolves each directory once: the bwrap arguments are the same as the plain scan's,
    with links, nested hidden paths, paths that do not exist and '..' among them."""
    from corral import SandboxConfig
    from corral.sandbox import rootfs

    (tmp_path / "state" / "sub").mkdir(parents=True)
    (tmp_path / "state" / "corral.db").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "state")
    hidden = [str(tmp_path / "state"), str(tmp_path / "state" / "corral.db"), str(tmp_path / "link" / "sub"),
              str(tmp_path / "missing" / "x"), str(tmp_path / "state" / ".." / "state" / "sub"), "/etc/hostname",
              "/usr/share/doc", "/usr/share/doc/bash", "/run/corral"]

    def scan_hidden(paths: list[str]) -> set[str]:
        return {os.path.realpath(p) for p in paths} - {"/"}

    def scan_masks(binds: list[tuple[str, str]], hide: set[str]) -> list[str]:  # the algorithm it replaced
        out: list[str] = []
        done: set[str] = set()
        outer = [h for h in hide if not any(o != h and rootfs._within(h, o) for o in hide)]
        for h in sorted(outer):
            for src, dest in binds:
                if h == src or not rootfs._within(h, src) or any(rootfs._within(src, o) for o in hide):
                    continue
                target = os.path.join(dest, os.path.relpath(h, src))
                if target in done or not os.path.lexists(h):
                    continue
                done.add(target)
                if os.path.isdir(h) and not os.path.islink(h):
                    out += ["--tmpfs", target, "--remount-ro", target]
                elif not os.path.islink(h):
                    out += ["--ro-bind", "/dev/null", target]
        return out

    assert rootfs._real_paths(hidden) == scan_hidden(hidden)
    binds = [(os.path.realpath(p), p) for p in ("/usr", "/etc", str(tmp_path))]
    hide = scan_hidden(hidden)
    assert rootfs._masks(binds, hide) == scan_masks(binds, hide)
    argv = rootfs.root_mounts(SandboxConfig(), hidden, None)
    at = argv.index("/usr/share/doc")
    assert argv[at - 1: at + 3] == ["--tmpfs", "/usr/share/doc", "--remount-ro", "/usr/share/doc"]
    assert "/usr/share/doc/bash" not in argv  # inside a hidden directory: gone with it
