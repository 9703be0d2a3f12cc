"""The sandbox's view of the host filesystem (the deployment side of the deployment/runtime seam).

A sandbox's / is a tmpfs holding only what a toolchain needs, each bound read-only from the host
(or from an image's root filesystem): /usr, /etc, /bin, /sbin and /lib* (symlinks stay symlinks),
the CPU list of /sys, plus whatever the operator names in ``SandboxConfig.host_paths``. /home,
/root, /srv, /opt, /var, /run, /mnt, /media, the rest of /sys (the cgroup tree names every sandbox)
and any other host directory are simply absent.

Over that view two kinds of masks are laid, whatever the masked files' modes:

- secrets of /etc (password hashes, sudoers, SSH host keys, TLS private keys, ...);
- corral's own paths: every live runtime's state directory, store file, token and config files,
  and the instance lock directory. Each runtime registers them in the shared lock directory when
  it starts (``instance-XXX.hidden``), so a sandbox of one runtime never sees another's either.

A hidden path is masked wherever a bind would show it, at its place inside the sandbox; a bind
whose source lies inside a hidden path is dropped. A hidden directory becomes an empty read-only
tmpfs, a hidden file of corral's an empty read-only /dev/null, and a secret file of /etc an empty
read-only regular file of the sandbox's own (EMPTY_FILE, made by the deployment): a file the
credential watch can mark by inode, so whatever opens /etc/shadow is seen, whichever program it is
and however the path was spelled (monitor/files.py).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import stat
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from corral.config import SANDBOX_OWN_MOUNTS, SandboxConfig
from corral.errors import IsolationUnavailable

# top-level entries of the host root a toolchain needs; everything else stays out
SYSTEM_ENTRIES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc")
# what tools read of /sys (glibc's CPU count, nproc, os.cpu_count); the cgroup tree is left out
SYS_DEFAULT = ("/sys/devices/system/cpu",)
# what CUDA and NVML read of /sys on a GPU sandbox (PCI topology, NUMA nodes, the driver's module);
# not /sys/devices/virtual or /sys/class/net, which name the host's links, other sandboxes' among them
SYS_GPU = ("/sys/bus/pci", "/sys/devices/pci*", "/sys/devices/system", "/sys/module/nvidia*", "/sys/class/drm")
# secrets of /etc, masked in the sandbox even when their modes would let it read them
ETC_SECRETS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
    "/etc/ssh/ssh_host_*", "/etc/ssl/private", "/etc/pki/tls/private", "/etc/security/opasswd",
    "/etc/krb5.keytab", "/etc/ipsec.secrets", "/etc/ppp/*-secrets", "/etc/wireguard",
    "/etc/NetworkManager/system-connections", "/etc/letsencrypt", "/etc/docker", "/etc/corral",
)
# the source of a secret file's mask in root_mounts' argv: the deployment binds a fresh empty file of
# the sandbox's own there (--ro-bind-data), one inode per mask and sandbox
EMPTY_FILE = "corral:empty-file"
# files the sandbox writes its own content over (sandbox.py binds data onto them)
DATA_FILES = ("/etc/resolv.conf", "/etc/hosts")


def root_mounts(config: SandboxConfig, hidden: Iterable[str], interpreter: str | None) -> list[str]:
    """bwrap arguments for the sandbox's read-only view of the host: a tmpfs / with the system
    entries of the host root (or every entry of `config.rootfs`), the operator's host_paths, the
    agent's `interpreter` when it lies outside (None: the native agent needs none), then the masks.
    `hidden`: host paths no sandbox may see (Runtime.masked_paths())."""
    binds: list[tuple[str, str]] = []  # (real host source, destination in the sandbox)
    argv = ["--tmpfs", "/"]
    base = Path(config.rootfs) if config.rootfs is not None else Path("/")
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        dest = "/" + entry.name
        if dest in SANDBOX_OWN_MOUNTS or entry.name == "lost+found":
            continue
        if config.rootfs is None and entry.name not in SYSTEM_ENTRIES:
            continue
        if entry.is_symlink():
            argv += ["--symlink", os.readlink(entry.path), dest]
        elif entry.is_dir() or entry.is_file():
            binds.append((os.path.realpath(entry.path), dest))
    if config.rootfs is None:
        sys_dirs = [*SYS_DEFAULT, *(p for g in SYS_GPU for p in sorted(glob.glob(g)))] if config.gpu else SYS_DEFAULT
        binds += [(p, p) for p in sys_dirs if os.path.isdir(p) and not any(_within(p, o) for o in sys_dirs if o != p)]
        if interpreter is not None and not _visible(interpreter, binds):
            # corral's own interpreter, outside the system directories: its executable and stdlib only
            prefix = Path(interpreter).parent.parent
            binds += [(interpreter, interpreter), *((str(d), str(d)) for d in (prefix / "lib",) if d.is_dir())]
    binds += [(os.path.realpath(p), os.path.normpath(p)) for p in config.host_paths]

    hide = _real_paths(hidden)
    for src, dest in binds:
        if _hidden_by(src, hide):
            continue  # a source inside a hidden path is never shown, not even masked
        argv += ["--ro-bind", src, dest]
    secrets = _real_paths(_etc_secrets(binds))
    argv += _masks(binds, hide | secrets, secrets)
    argv += _symlinked_data_files(binds)
    return argv


def _masks(binds: list[tuple[str, str]], hide: set[str], secrets: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Mask each hidden host path at every place a bind shows it inside the sandbox (a file among
    `secrets` by an EMPTY_FILE)."""
    out: list[str] = []
    done: set[str] = set()
    # a path inside another hidden directory is gone with it (and its mount point could not be made)
    outer = [h for h in hide if not _hidden_by(os.path.dirname(h), hide)]
    shown = [(src, dest) for src, dest in binds if not _hidden_by(src, hide)]
    for h in sorted(outer):
        for src, dest in shown:
            if h == src or not _within(h, src):
                continue
            target = os.path.join(dest, os.path.relpath(h, src))
            if target in done or not os.path.lexists(h):
                continue
            done.add(target)
            if os.path.isdir(h) and not os.path.islink(h):
                out += ["--tmpfs", target, "--remount-ro", target]
            elif not os.path.islink(h):
                out += ["--ro-bind", EMPTY_FILE if h in secrets else "/dev/null", target]
    return out


def _etc_secrets(binds: list[tuple[str, str]]) -> list[str]:
    """Host paths of the /etc secrets that the sandbox's /etc would show."""
    etc = next((src for src, dest in binds if dest == "/etc"), None)
    if etc is None:
        return []
    out = []
    for pattern in ETC_SECRETS:
        out += glob.glob(os.path.join(etc, os.path.relpath(pattern, "/etc")))
    return out


def _symlinked_data_files(binds: list[tuple[str, str]]) -> list[str]:
    """/etc/resolv.conf is often a link into /run, which the sandbox has not: make the directory its
    target needs on the sandbox's own root, so the sandbox's resolver file can be bound there."""
    out: list[str] = []
    etc = next((src for src, dest in binds if dest == "/etc"), None)
    for f in DATA_FILES:
        host = os.path.join(etc, os.path.relpath(f, "/etc")) if etc else None
        if host is None or not os.path.islink(host):
            continue
        target = os.path.normpath(os.path.join("/etc", os.readlink(host)))
        if not any(_within(target, dest) for _, dest in binds) and os.path.dirname(target) != "/":
            out += ["--dir", os.path.dirname(target)]
    return out


def _visible(path: str, binds: list[tuple[str, str]]) -> bool:
    return any(_within(path, src) and src == dest for src, dest in binds)


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hidden_by(path: str, hide: set[str]) -> bool:
    """Whether `path` or a directory above it is in `hide`: a walk up its few parents, not a scan of
    every hidden path (every live runtime's, hundreds on a busy machine, checked at every launch)."""
    while path not in ("/", ""):
        if path in hide:
            return True
        path = os.path.dirname(path)
    return False


def _real_paths(paths: Iterable[str]) -> set[str]:
    """realpath of each, resolving each directory once: the hidden paths (every live runtime's state
    dir, store and its -wal/-shm/-journal files) share most of their directories, and realpath alone
    would lstat every component of every path again."""
    memo: dict[str, str] = {}

    def real(p: str) -> str:
        if p in memo:
            return memo[p]
        parent, name = os.path.split(p)
        if not name:
            return p
        full = os.path.join(real(parent), name)
        try:
            r = os.path.realpath(full) if stat.S_ISLNK(os.lstat(full).st_mode) else full
        except OSError:  # not there (yet): kept as named, as realpath keeps what it cannot resolve
            r = full
        memo[p] = r
        return r

    out = set()
    for p in paths:
        # ".." must be resolved after the links before it, as realpath does: left to realpath
        real_p = os.path.realpath(p) if ".." in p.split("/") else real(os.path.abspath(p))
        if real_p != "/":
            out.add(real_p)
    return out


# -- the registry of every live runtime's hidden paths ---------------------------------------------
def _registry_file(lock_dir: Path, instance: int) -> Path:
    return lock_dir / f"instance-{instance:03x}.hidden"


def register(lock_dir: Path, instance: int, paths: Iterable[str]) -> None:
    """Publish a runtime's own paths (state, store, tokens, config) so every runtime hides them."""
    path = _registry_file(lock_dir, instance)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(sorted({os.path.realpath(p) for p in paths})))
    os.replace(tmp, path)  # readers see the old list or the new one, never half of one


def unregister(lock_dir: Path, instance: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        _registry_file(lock_dir, instance).unlink()


_registered: dict[str, tuple[tuple[int, int], frozenset[str]]] = {}


def registered(lock_dir: Path) -> set[str]:
    """Every path some runtime sharing `lock_dir` registered. A crashed runtime's list stays until
    its instance number is taken again: hiding a little too much is the safe side. Read again only
    when the directory changed: lists are replaced by rename and removed by unlink, both of which
    change its mtime, and every sandbox launch asks. A file system stamps times from a coarse clock
    (two changes a few milliseconds apart can share one), so a directory changed in the last second
    is always read."""
    try:
        st = os.stat(lock_dir)
    except FileNotFoundError:
        return set()
    stamp = (st.st_ino, st.st_mtime_ns)
    cached = _registered.get(str(lock_dir))
    if cached is not None and cached[0] == stamp:
        return set(cached[1])
    out = _read_registered(lock_dir)
    if time.time_ns() - st.st_mtime_ns > 1_000_000_000:
        _registered[str(lock_dir)] = (stamp, frozenset(out))
    return out


def _read_registered(lock_dir: Path) -> set[str]:
    out: set[str] = set()
    try:
        names = os.listdir(lock_dir)
    except FileNotFoundError:
        return out
    for name in names:
        if not (name.startswith("instance-") and name.endswith(".hidden")):
            continue
        try:
            items = json.loads((lock_dir / name).read_text())
        except FileNotFoundError:
            continue  # its runtime closed between listdir and read
        except (OSError, ValueError) as e:
            # fail closed: a registry we cannot read could name what must stay hidden
            raise IsolationUnavailable(
                f"cannot read {lock_dir / name} ({e}); remove it if no corral runtime uses it") from None
        out.update(str(p) for p in items if isinstance(p, str))
    return out


def store_files(database: str) -> list[str]:
    """A SQLite store and its journal files."""
    return [database, *(database + suffix for suffix in ("-wal", "-shm", "-journal"))]


# -- the interpreter that runs corral's agent inside the sandbox -----------------------------------
def _world_usable(path: str) -> bool:
    """Whether an unprivileged uid can reach and execute path (every directory o+x, file o+rx)."""
    p = Path(path)
    try:
        if p.stat().st_mode & 0o005 != 0o005:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in p.parents)
    except OSError:
        return False


@functools.cache
def agent_interpreter() -> str:
    """A Python >= 3.9 the sandbox user can run: corral's own if reachable, else the system's. The
    agent runs it with -I -S, so only the executable and its standard library enter the sandbox."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(candidate)
        if _world_usable(real) and _world_usable(str(Path(real).parent.parent / "lib")):
            return real
    raise IsolationUnavailable(
        f"no Python interpreter usable by an unprivileged user was found ({sys.executable} is not "
        "reachable by other users); install python3 (apt-get install python3-minimal)"
    )
