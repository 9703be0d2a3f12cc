"""Is this executable a renamed copy of a system program (ATT&CK T1036.003)?

Miners and implants are often a system binary or interpreter copied under an innocent name
(`cp $(command -v python3) /tmp/.sysupdate`). corral indexes the host's system binaries by size once,
and for an exec outside the system directories compares size, then content hash, with the programs
of that size. A match under another name is reported in the exec event as `renamed_from`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading

SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/libexec")
MAX_BYTES = 64 << 20  # larger files are not compared (hashing them per exec would cost too much)
_VERSION = re.compile(r"[0-9.\-_]+$")
_lock = threading.Lock()
_hash_cache: dict[tuple[int, int, int], str] = {}  # (dev, inode, mtime_ns) -> sha256


@functools.cache
def _index() -> dict[int, list[str]]:
    by_size: dict[int, list[str]] = {}
    seen: set[tuple[int, int]] = set()
    for d in SYSTEM_DIRS:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat()  # follows links: the program itself
            except OSError:
                continue
            if not e.is_file() or not st.st_mode & 0o111 or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            by_size.setdefault(st.st_size, []).append(e.path)
    return by_size


def _sha256(path: str) -> str | None:
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        with _lock:
            if key in _hash_cache:
                return _hash_cache[key]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        digest = h.hexdigest()
        with _lock:
            _hash_cache[key] = digest
        return digest
    except OSError:
        return None


def _stem(name: str) -> str:
    return _VERSION.sub("", name.lstrip("."))


def renamed_from(host_path: str, name: str) -> str | None:
    """The system program `host_path` is a byte-identical copy of, when its name differs."""
    try:
        size = os.stat(host_path).st_size
    except OSError:
        return None
    if size == 0 or size > MAX_BYTES:
        return None
    candidates = _index().get(size)
    if not candidates:
        return None
    digest = _sha256(host_path)
    if digest is None:
        return None
    for c in candidates:
        if _sha256(c) == digest:
            # python3 -> python3.11, a venv's copied interpreter: the same program, not a disguise
            real = os.path.basename(os.path.realpath(c))
            if _stem(name) in (_stem(os.path.basename(c)), _stem(real)):
                return None
            return c
    return None
