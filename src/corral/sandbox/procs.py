"""Read a sandbox's processes from the host side of /proc: who owns a socket, what a pid is."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass
class ProcInfo:
    pid: int  # host pid
    ppid: int | None
    exe: str | None
    argv: list[str]
    cwd: str | None


def socket_inode(netns_pid: int, proto: str, local_port: int) -> int | None:
    """Inode of the socket bound to local_port in the network namespace of netns_pid."""
    files = ("tcp", "tcp6") if proto == "tcp" else ("udp", "udp6")
    want = f":{local_port:04X}"
    for name in files:
        try:
            with open(f"/proc/{netns_pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[1].endswith(want):
                        inode = int(parts[9])
                        if inode:
                            return inode
        except OSError:
            continue
    return None


def owner_of_inode(inode: int, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def read_proc(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """A kernel file (/proc, a cgroup's) whole, or its first `limit` bytes, in binary through a
    descriptor: read on every command and exec judged, where a buffered text-mode open costs several
    times the read itself. A short read is its end (these files fill each read they can)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        got = 0
        while limit is None or got < limit:
            want = 65536 if limit is None else min(65536, limit - got)
            chunk = os.read(fd, want)
            chunks.append(chunk)
            got += len(chunk)
            if len(chunk) < want:
                break
        return b"".join(chunks)
    finally:
        os.close(fd)


def argv_of(pid: int) -> list[str] | None:
    try:
        raw = read_proc(f"/proc/{pid}/cmdline")
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def info(pid: int) -> ProcInfo | None:
    argv = argv_of(pid)
    if argv is None:
        return None
    try:
        stat = read_proc(f"/proc/{pid}/stat")
    except OSError:
        return None
    ppid = None
    with contextlib.suppress(ValueError, IndexError):
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
    exe = cwd = None
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError):
        cwd = os.readlink(f"/proc/{pid}/cwd")
    return ProcInfo(pid, ppid, exe, argv, cwd)


def ns_pid(pid: int) -> int | None:
    """pid as seen inside its innermost pid namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def descendants(root: int) -> list[int]:
    """root and all its descendants (fallback when no cgroup lists them)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out
