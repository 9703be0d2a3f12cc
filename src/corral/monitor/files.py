"""Writes to protected paths inside a sandbox, with the writing process (fanotify).

corral marks the sandbox's writable mounts (HOME always; /workspace or /tmp when a protected path
lies there) for close-after-write events. Each event carries the writer's pid, so the write is
attributed to its step by lineage like everything else. Only writes to protected paths become
events: persistence locations (shell rc files, authorized_keys, cron, systemd user units) and the
paths a task protects (its verifier and tests).

Not seen: renames into a protected path and deletions (fanotify reports those only in its
file-handle mode); the pre-run command check covers `mv`/`cp`/`ln` into such paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import os
import struct
from collections.abc import Callable

from corral.events import Event, EventKind

FAN_CLOEXEC, FAN_NONBLOCK, FAN_CLASS_NOTIF = 0x1, 0x2, 0x0
FAN_MARK_ADD, FAN_MARK_MOUNT = 0x1, 0x10
FAN_CLOSE_WRITE = 0x8
AT_FDCWD = -100
_META = struct.Struct("=IBBHQii")

PERSISTENCE = ("/root/.bashrc", "/root/.bash_profile", "/root/.profile", "/root/.bash_login", "/root/.zshrc",
               "/root/.bash_logout", "/root/.ssh/*", "/root/.config/systemd/*", "/root/.config/autostart/*",
               "/root/.local/share/systemd/*", "*/crontabs/*", "/root/.pam_environment")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


class FileWatch:
    def __init__(self, agent_pid: int, protected: tuple[str, ...], make_event: Callable[[int], Event],
                 emit: Callable[[Event], object]) -> None:
        self.persistence = PERSISTENCE
        self.protected = tuple(protected)
        self.make_event = make_event
        self.emit = emit
        self.fd = _libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY | os.O_LARGEFILE)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init failed (needs CAP_SYS_ADMIN)")
        mounts = {"/root"} | {m for m in ("/workspace", "/tmp") if any(p.startswith(m + "/") for p in protected)}
        for mount in sorted(mounts):
            path = f"/proc/{agent_pid}/root{mount}".encode()
            if _libc.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_CLOSE_WRITE, AT_FDCWD, path) != 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, f"fanotify_mark on {mount} failed: {os.strerror(err)}")
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._ready)

    def category(self, path: str) -> str | None:
        if any(fnmatch.fnmatchcase(path, g) for g in self.protected):
            return "protected"
        if any(fnmatch.fnmatchcase(path, g) for g in self.persistence):
            return "persistence"
        return None

    def _ready(self) -> None:
        try:
            buf = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        off = 0
        while off + _META.size <= len(buf):
            length, _vers, _res, _mlen, _mask, efd, pid = _META.unpack_from(buf, off)
            off += max(length, _META.size)
            if efd < 0:
                continue
            try:
                path = os.readlink(f"/proc/self/fd/{efd}")
            except OSError:
                path = ""
            finally:
                os.close(efd)
            cat = self.category(path)
            if cat is None:
                continue
            ev = self.make_event(pid)
            if not ev.step:
                continue  # corral's own file transfer (write_file, upload, the task's files): step 0
            ev.kind, ev.action = EventKind.FILE, "write"
            ev.data.update({"path": path, "op": "close_write", "category": cat})
            self.emit(ev)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
