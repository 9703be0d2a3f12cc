"""Small Linux namespace helpers (Python 3.11 has no os.setns/os.unshare)."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare failed: {os.strerror(err)}")


def in_thread(fn: Callable[[], T]) -> T:
    """Run fn in a throwaway thread: setns/unshare of the network namespace affect only the calling
    thread, so the caller's namespace is never changed."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:
            box["e"] = e

    t = threading.Thread(target=target, name="corral-ns")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    return box["v"]  # type: ignore[return-value]


def new_netns() -> int:
    """Create a network namespace; returns an O_RDONLY fd that keeps it alive."""

    def make() -> int:
        unshare(CLONE_NEWNET)
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    return in_thread(make)


def socket_in(netns_fd: int, family: int, type_: int, proto: int = 0):
    """A socket that lives in another network namespace."""
    import socket

    def make():
        setns(netns_fd)
        return socket.socket(family, type_, proto)

    return in_thread(make)
