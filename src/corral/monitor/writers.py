"""Which process last wrote each file the agent can write, for provenance (monitor/provenance.py).

A file about to run was fetched if its last writer received bytes through the gateway as it wrote
it, whatever the client: curl, a perl one-liner, node, Tcl. So every close-after-write on the
sandbox's writable mounts is noted: the file, by its handle (a rename or a hard link keeps it), and
the writer's host pid.

A build or an install writes thousands of files, and each write is an event here. So this group
reports file handles (FAN_REPORT_FID), not open descriptors: the kernel opens nothing per event,
and corral reads a handle's bytes and files them, nothing more (an fd-reporting group costs an
open, a readlink and a close per event, several times the rest). Nothing here is judged: a write
that is itself an act to judge (persistence, the task's verifier) is the file watch's
(monitor/files.py).

What is remembered is bounded (CACHE files at least, the newest kept): a command that writes more
files than that between a download and its run leaves the download unknown. So does a queue that
overflows (the kernel drops new events): everything known is forgotten then, since a rewrite of a
fetched file may be among what was dropped, and a miss is better than an episode ended wrongly.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
import time

from corral.monitor.execjudge import open_in_root
from corral.monitor.files import (
    AT_FDCWD,
    FAN_CLASS_NOTIF,
    FAN_CLOEXEC,
    FAN_CLOSE_WRITE,
    FAN_MARK_ADD,
    FAN_MARK_MOUNT,
    FAN_NONBLOCK,
    INFO_HEADER,
    MAX_HANDLE_SZ,
    META,
    close_later,
    libc,
    statfs_of,
)

WRITABLE = ("/root", "/tmp", "/workspace", "/dev/shm")
CACHE = 4096  # files remembered at least (up to twice as many, the newest)
DRAIN_S = 1.0
FAN_Q_OVERFLOW = 0x4000
FAN_REPORT_FID = 0x200
AT_EMPTY_PATH, AT_HANDLE_FID = 0x1000, 0x200
_HANDLE = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


class WriterWatch:
    def __init__(self, agent_pid: int) -> None:
        """Marks the sandbox's writable mounts; OSError when the kernel cannot (no provenance then
        for files that no download tool was told to write)."""
        fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID,
                                 os.O_RDONLY | os.O_LARGEFILE)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init with file handles failed: {os.strerror(err)}")
        marked = [m for m in WRITABLE if libc.fanotify_mark(
            fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_CLOSE_WRITE, AT_FDCWD, f"/proc/{agent_pid}/root{m}".encode()) == 0]
        if not marked:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"fanotify_mark on the writable mounts failed: {os.strerror(err)}")
        self.fd: int | None = fd
        # fsid + struct file_handle of a file -> (host pid of its last writer, when corral read the
        # write); oldest first, so that the oldest go when it is pruned
        self.written: dict[bytes, tuple[int, float]] = {}
        # Read when an exec needs it, and every DRAIN_S besides, so that the kernel's queue stays
        # short; never per event: a build's thousands of writes would wake the loop thousands of times.
        self.loop = asyncio.get_running_loop()
        self._timer = self.loop.call_later(DRAIN_S, self._tick)

    def _tick(self) -> None:
        self.drain()
        if self.fd is not None:
            self._timer = self.loop.call_later(DRAIN_S, self._tick)

    def _read(self) -> bool:
        """One read of the queue; False once it is empty (or the group is gone)."""
        if self.fd is None:
            return False
        try:
            buf = os.read(self.fd, 256 * 1024)
        except BlockingIOError:
            return False
        except OSError:
            self.close()
            return False
        now = time.time()
        written = self.written
        off = 0
        while off + META.size <= len(buf):
            length, _vers, _res, mlen, mask, _fd, pid = META.unpack_from(buf, off)
            if mask & FAN_Q_OVERFLOW:
                # writes were lost, a rewrite of a fetched file among them maybe: forget rather than misjudge
                written.clear()
            elif length > mlen + INFO_HEADER.size:
                # FAN_REPORT_FID alone: one record, its fsid and file handle after the record's header
                start = off + mlen + INFO_HEADER.size
                key = buf[start : start + 8 + _HANDLE.size + _HANDLE.unpack_from(buf, start + 8)[0]]
                written.pop(key, None)
                written[key] = (pid, now)
            off += max(length, META.size)
        if len(written) > 2 * CACHE:
            self.written = dict(list(written.items())[-CACHE:])
        return True

    def drain(self) -> None:
        """Read what is queued now: a write closed just before an exec is known to that exec."""
        for _ in range(64):  # bounded: a writer cannot keep corral here
            if not self._read():
                return

    def writer(self, pid: int, path: str) -> tuple[int, float] | None:
        """(host pid, when) of the last write of the file at `path` as process `pid` sees it, or None
        if no write of it was seen."""
        if self.fd is None:
            return None
        self.drain()
        key = file_key(pid, path)
        return self.written.get(key) if key is not None else None

    def close(self) -> None:
        self._timer.cancel()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            close_later([fd])  # a fanotify group's release waits out an RCU grace period: off the loop


def file_key(pid: int, path: str) -> bytes | None:
    """The file's filesystem id and handle, encoded as fanotify reports them; None if it is gone.
    Opened inside the process's root (open_in_root), so that a link the agent made resolves there,
    as its exec did, and never to a file of the host."""
    fd = open_in_root(pid, path)
    if fd is None:
        return None
    try:
        fs = statfs_of(fd)
        if fs is None:
            return None
        buf = ctypes.create_string_buffer(_HANDLE.pack(MAX_HANDLE_SZ, 0) + b"\0" * MAX_HANDLE_SZ)
        mount_id = ctypes.c_int()
        # AT_HANDLE_FID (Linux 6.5+) asks for the encoding fanotify uses; older kernels have one encoding
        for flags in (AT_EMPTY_PATH | AT_HANDLE_FID, AT_EMPTY_PATH):
            if libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), flags) == 0:
                hbytes = _HANDLE.unpack_from(buf.raw)[0]
                return bytes(fs.f_fsid) + buf.raw[: _HANDLE.size + hbytes]
            if ctypes.get_errno() != errno.EINVAL:
                return None
        return None
    finally:
        os.close(fd)
