"""The native in-sandbox agent (agent.c): built once, on first use, into a cache every sandbox can read.

A Python interpreter per sandbox was most of an idle sandbox's memory (6-7 MiB PSS) and of its cold
start. agent.c is the same agent in C, linked statically: it needs nothing of the sandbox's root (an
image without Python, with musl, or with an /etc/ld.so.preload runs it as it is), and every sandbox
binds the same file, so its code pages are shared. The binary is named by a hash of its source and of
the compiler, so an upgrade of either builds a new one and a stale one is never run.

`RuntimeConfig.agent` chooses: "auto" (native where a C compiler is, else agent.py), "native" (an
error without one), "python".
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from corral.errors import IsolationUnavailable
from corral.sandbox.agentrt import CACHE, public_dir

SOURCE = Path(__file__).with_name("agent.c")
FLAGS = ("-O2", "-static", "-pthread", "-Wall", "-Wextra", "-Werror")
log = logging.getLogger(__name__)


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def build(cache: Path = CACHE) -> Path:
    """The agent's binary in `cache`, compiled when missing; IsolationUnavailable when it cannot be."""
    cc = _compiler()
    if cc is None:
        raise IsolationUnavailable("no C compiler to build corral's native agent (apt-get install gcc libc6-dev), "
                                   "or set agent: python")
    key = _key(cc)
    path = cache / f"agent-{key}"
    public_dir(cache)
    _trusted(cache)
    if path.exists():
        _trusted(path)
        return path
    tmp = cache / f".{path.name}.{os.getpid()}"
    proc = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise IsolationUnavailable(f"building corral's native agent with {cc} failed (a static libc is needed: "
                                   f"apt-get install libc6-dev): {proc.stderr.strip()[-2000:]}")
    tmp.chmod(0o755)  # world-usable: the sandbox's user is no one on the host
    os.replace(tmp, path)  # atomic: a runtime building it at the same time gets the same file
    return path


def _key(cc: str) -> str:
    """The binary's name: a hash of the source, the compiler's version and the flags. Asked on every
    launch, so computed once per version of the compiler's file and of the source (running the
    compiler is a fork and an exec: milliseconds a cold create would wait)."""
    exe = shutil.which(cc) or cc
    try:
        st, src = os.stat(exe), SOURCE.stat()
    except OSError as e:
        raise IsolationUnavailable(f"cannot run the C compiler {cc}: {e}") from e
    return _key_of(exe, st.st_ino, st.st_mtime_ns, src.st_ino, src.st_mtime_ns, src.st_size)


@functools.lru_cache(maxsize=8)
def _key_of(exe: str, *stamps: int) -> str:
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IsolationUnavailable(f"cannot run the C compiler {exe}: {e}") from e
    return hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]


def _trusted(p: Path) -> None:
    """The agent runs as every sandbox's PID 1 and hands corral its exec listener: a binary, or a folder
    holding it, that anyone but corral's user could have written is refused (fail closed), never run."""
    st = p.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise IsolationUnavailable(f"{p} is owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:o}: corral runs "
                                   "its agent only from a file and folder that only its own user can write; "
                                   f"remove it (or chmod go-w and chown it to uid {os.geteuid()})")


@functools.cache
def native_agent(choice: str = "auto") -> Path | None:
    """The binary to run as the agent, or None for agent.py ("python", or "auto" without a compiler)."""
    if choice == "python":
        return None
    try:
        return build()
    except IsolationUnavailable as e:
        if choice == "native":
            raise
        log.warning("using the Python agent: %s", e)
        return None


__all__ = ["SOURCE", "build", "native_agent"]
