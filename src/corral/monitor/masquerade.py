"""Is this executable a renamed copy of a system program (ATT&CK T1036.003)?

Miners and implants are often a system binary or interpreter copied under an innocent name
(`cp $(command -v python3) /tmp/.sysupdate`). corral indexes the host's system binaries by size once,
and for an exec outside the system directories compares size, then the first 64 KiB, then the
content hash, with the programs of that size. A match under another name is reported in the exec
event as `renamed_from`.

Hashing costs what the file weighs (a 57 MB copy of a large system binary, made anew before each
exec, is 57 MB read per exec), so it never runs on the event loop: `check()` answers at once from
the caches (keyed by (dev, inode, mtime_ns, size, ctime_ns), so a rewritten file is hashed again) or says the
answer is `pending`, to be awaited (the hashing runs in a small pool of corral's own threads) while
the exec stays stopped. Each sandbox may have `Budgets.hash_bytes` hashed per window. Past that, the
copy's identity cannot be known, and the decision that depends on it fails closed: the exec is
refused (EPERM, recorded as a denial with the reason, no finding: a program that cannot be checked
does not run, and nothing is concluded about it).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/libexec")
MAX_BYTES = 64 << 20  # larger files are not compared (no system binary of that size is indexed)
HEAD = 64 << 10  # a copy agrees with its original here first; most same-size files do not
CACHE_ENTRIES = 4096
_VERSION = re.compile(r"[0-9.\-_]+$")

# (dev, inode, mtime_ns, size, ctime_ns): mtime can be set back by the file's owner (utime), ctime cannot,
# so a file rewritten in place and given its old mtime is still a new version
Key = tuple[int, int, int, int, int]


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


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def _stem(name: str) -> str:
    return _VERSION.sub("", name.lstrip("."))


class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, k: Any) -> Any:
        with self._lock:
            v = self._d.get(k)
            if v is not None:
                self._d.move_to_end(k)
            return v

    def put(self, k: Any, v: Any) -> None:
        with self._lock:
            self._d[k] = v
            self._d.move_to_end(k)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


@dataclass
class Check:
    """The answer for one exec: `source` (the system program it copies, or None), or `refused` (why
    the identity could not be known: the exec must be refused), or `pending` (await `resolve()`)."""

    source: str | None = None
    refused: str | None = None
    pending: bool = False


class Masquerade:
    """Identity checks of executables, with caches shared by all sandboxes and a hashing budget each."""

    def __init__(self, budget_bytes: int = 256 << 20, window_s: float = 1.0, workers: int = 2) -> None:
        self.budget_bytes = budget_bytes
        self.window_s = window_s
        self._heads = _LRU(CACHE_ENTRIES)  # key -> sha256 of the first HEAD bytes
        self._full = _LRU(CACHE_ENTRIES)  # key -> sha256 of the whole file
        self._spent: dict[str, list[float]] = {}  # sandbox id -> [window start, bytes hashed]
        self._lock = threading.Lock()
        # corral's own threads: a flood of hashing never takes the default executor from anything else
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="corral-hash")
        self.hashed_bytes = 0  # bytes read for hashing, all sandboxes (for tests and benchmarks)

    def configure(self, budget_bytes: int, window_s: float) -> None:
        self.budget_bytes, self.window_s = budget_bytes, window_s

    # -- the event loop's side: no file content is read here ------------------------------------------
    def check(self, host_path: str, name: str, sandbox_id: str) -> Check:
        """From the caches only. `pending` when content must be read first (call resolve())."""
        plan = self._plan(host_path)
        if plan is None:
            return Check()
        st, candidates = plan
        head = self._heads.get(_key(st))
        if head is None:
            return Check(pending=True)
        return self._compare(st, head, candidates, name) or Check(pending=True)

    async def resolve(self, host_path: str, name: str, sandbox_id: str) -> Check:
        """The answer, hashing what is not cached in corral's hash threads, within the sandbox's budget."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._resolve_sync, host_path, name, sandbox_id)

    def renamed_from(self, host_path: str, name: str, sandbox_id: str = "") -> str | None:
        """Synchronous form (tools and tests; never on the event loop)."""
        return self._resolve_sync(host_path, name, sandbox_id).source

    # -- hashing threads ----------------------------------------------------------------------------
    def _plan(self, host_path: str) -> tuple[os.stat_result, list[str]] | None:
        try:
            st = os.stat(host_path)
        except OSError:
            return None
        if st.st_size == 0 or st.st_size > MAX_BYTES:
            return None
        candidates = _index().get(st.st_size)
        return (st, candidates) if candidates else None

    def _resolve_sync(self, host_path: str, name: str, sandbox_id: str) -> Check:
        plan = self._plan(host_path)
        if plan is None:
            return Check()
        st, candidates = plan
        try:
            head = self._head(host_path, st, sandbox_id)
            same = []
            for c in candidates:
                try:
                    cst = os.stat(c)
                    if self._head(c, cst, None) == head:
                        same.append((c, cst))
                except OSError:
                    continue
            if not same:
                return Check()  # same size, different start: 64 KiB read, not the whole file
            full = self._digest(host_path, st, sandbox_id)
            for c, cst in same:
                if self._digest(c, cst, None) == full:
                    return Check(source=self._named(c, name))
            return Check()
        except _OverBudget as e:
            return Check(refused=str(e))
        except OSError:
            return Check()  # gone or unreadable: the exec itself will fail the same way

    def _compare(self, st: os.stat_result, head: str, candidates: list[str], name: str) -> Check | None:
        """An answer from heads (and cached full digests) alone, or None when a full hash is needed."""
        same_head = []
        for c in candidates:
            try:
                cst = os.stat(c)
            except OSError:
                continue
            ch = self._heads.get(_key(cst))
            if ch is None:
                return None  # a candidate not seen yet: read it in a hashing thread
            if ch == head:
                same_head.append((c, cst))
        if not same_head:
            return Check()  # same size, different start: not a copy, and nothing more was read
        mine = self._full.get(_key(st))
        if mine is None:
            return None
        for c, cst in same_head:
            theirs = self._full.get(_key(cst))
            if theirs is None:
                return None
            if theirs == mine:
                return Check(source=self._named(c, name))
        return Check()

    @staticmethod
    def _named(c: str, name: str) -> str | None:
        # python3 -> python3.11, a venv's copied interpreter: the same program, not a disguise
        real = os.path.basename(os.path.realpath(c))
        return None if _stem(name) in (_stem(os.path.basename(c)), _stem(real)) else c

    def _head(self, path: str, st: os.stat_result, sandbox_id: str | None) -> str:
        k = _key(st)
        got = self._heads.get(k)
        if got is None:
            self._charge(sandbox_id, min(HEAD, st.st_size), path)
            with open(path, "rb") as f:
                got = hashlib.sha256(f.read(HEAD)).hexdigest()
            self._heads.put(k, got)
        return got

    def _digest(self, path: str, st: os.stat_result, sandbox_id: str | None) -> str:
        k = _key(st)
        got = self._full.get(k)
        if got is None:
            self._charge(sandbox_id, st.st_size, path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            got = h.hexdigest()
            self._full.put(k, got)
        return got

    def _charge(self, sandbox_id: str | None, n: int, path: str) -> None:
        """Count `n` bytes against the sandbox's window (system files, sandbox None, are read once for all)."""
        with self._lock:
            self.hashed_bytes += n
            if not sandbox_id:
                return
            now = time.monotonic()
            w = self._spent.get(sandbox_id)
            if w is None or now - w[0] >= self.window_s:
                if len(self._spent) > 4096:
                    self._spent = {k: v for k, v in self._spent.items() if now - v[0] < self.window_s}
                w = self._spent[sandbox_id] = [now, 0]
            if w[1] + n > self.budget_bytes:
                raise _OverBudget(
                    f"the identity of {path.split('/root', 1)[-1]} ({n} bytes) could not be checked: this sandbox "
                    f"used its hashing budget ({self.budget_bytes} bytes per {self.window_s:g} s); the exec is "
                    "refused rather than run unchecked")
            w[1] += n

    def clear(self) -> None:
        self._heads.clear()
        self._full.clear()
        self._spent.clear()


class _OverBudget(Exception):
    pass


DEFAULT = Masquerade()


def renamed_from(host_path: str, name: str) -> str | None:
    """The system program `host_path` is a byte-identical copy of, when its name differs (synchronous:
    reads the file; callers on the event loop use DEFAULT.check() and DEFAULT.resolve())."""
    return DEFAULT.renamed_from(host_path, name)
