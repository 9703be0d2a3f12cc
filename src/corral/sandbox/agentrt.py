"""corral's agent inside a root filesystem that is not the host's (an OCI image, say).

The agent is a Python script; an image may have no Python, another version, or another libc (musl).
So it brings its own: a copy of the host interpreter with the shared libraries it and its extension
modules link (their `ldd` closure, the dynamic loader included), mounted read-only at /.corral, with
the host's standard library bound beneath it. The agent is started through that loader by path
(`ld.so --library-path /.corral/lib /.corral/bin/python3`), so nothing of the image's loader, libc,
ld.so.cache or environment takes part; the image's /etc/ld.so.preload is masked as well (a loader
honours it whatever the library path). Commands the agent starts run with the image's own loader
and libraries: the library path is an argument, not an environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.errors import IsolationUnavailable

MOUNT = "/.corral"
_LDD_LINE = re.compile(r"=>\s+(\S+)\s+\(|^\s*(/\S+)\s+\(")


@dataclass(frozen=True)
class AgentRuntime:
    root: Path  # bin/python3, lib/ (the loader and the libraries), lib/pythonX.Y/ (the mount point)
    stdlib: Path  # the host's standard library, bound at MOUNT/lib/pythonX.Y
    version: str  # "3.11"
    loader: str  # the loader's file name in lib/

    def binds(self) -> list[str]:
        """bwrap arguments that mount the runtime (after the sandbox's root is in place)."""
        return ["--ro-bind", str(self.root), MOUNT,
                "--ro-bind", str(self.stdlib), f"{MOUNT}/lib/python{self.version}"]

    def command(self, script: str) -> list[str]:
        return [f"{MOUNT}/lib/{self.loader}", "--inhibit-cache", "--library-path", f"{MOUNT}/lib",
                f"{MOUNT}/bin/python3", "-I", "-S", script]


def public_dir(path: Path) -> Path:
    """Create `path` (and its missing parents) traversable by everyone: bubblewrap opens what it binds
    as the sandbox's user, who is no one on the host."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(mode=0o755, exist_ok=True)
        d.chmod(0o755)
    return path


def _ldd(path: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    libs = []
    for line in out.splitlines():
        m = _LDD_LINE.search(line)
        if m:
            libs.append(m.group(1) or m.group(2))
    return libs


def build(interpreter: str, cache: Path) -> AgentRuntime:
    """The runtime for `interpreter` (a host Python), built once into `cache` (keyed by the
    interpreter's identity, so an upgrade of it builds a new one)."""
    real = os.path.realpath(interpreter)
    probe = subprocess.run([real, "-I", "-S", "-c", "import sys, sysconfig; print(sys.version_info[0], "
                            "sys.version_info[1]); print(sysconfig.get_paths()['stdlib'])"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise IsolationUnavailable(f"cannot run {real} to build the agent's runtime: {probe.stderr.strip()}")
    major_minor, stdlib = probe.stdout.split("\n", 1)
    version = major_minor.replace(" ", ".")
    stdlib_dir = Path(stdlib.strip())
    st = os.stat(real)
    key = hashlib.sha256(f"{real}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:16]
    root = cache / f"agentrt-{version}-{key}"
    if not (root / ".complete").exists():
        public_dir(cache)
        tmp = cache / f".{root.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "bin").mkdir(parents=True)
        (tmp / "lib" / f"python{version}").mkdir(parents=True)
        shutil.copy2(real, tmp / "bin" / "python3")
        libs: dict[str, str] = {}
        dynload = stdlib_dir / "lib-dynload"
        for binary in [real, *(str(p) for p in sorted(dynload.glob("*.so")))]:
            for lib in _ldd(binary):
                libs.setdefault(os.path.basename(lib), os.path.realpath(lib))
        for name, src in libs.items():
            shutil.copy2(src, tmp / "lib" / name)
        for d in (tmp, *tmp.rglob("*")):  # world-usable: the sandbox's user is no one on the host
            with contextlib.suppress(OSError):
                d.chmod(0o755)
        (tmp / ".complete").write_text(real)
        try:
            os.replace(tmp, root)
        except OSError:  # built meanwhile by another runtime: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    loader = next((n for n in os.listdir(root / "lib") if n.startswith("ld-linux")), None)
    if loader is None:
        raise IsolationUnavailable(f"no dynamic loader among the libraries of {real} (is it a static build?)")
    return AgentRuntime(root, stdlib_dir, version, loader)


CACHE = Path("/var/cache/corral")  # reachable by sandboxes' users (see public_dir)


@functools.cache
def agent_runtime(interpreter: str) -> AgentRuntime:
    """The runtime for this process's agent interpreter, built on first use."""
    return build(interpreter, CACHE)
