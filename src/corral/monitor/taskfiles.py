"""A task's own scripts, run as the task wrote them: what their file commands do to the task's
protected files is judged by its effect, not as the agent's tampering.

A verifier that resets its tests before it runs them (`rm -rf tests && git checkout -- tests`)
removes and rewrites every protected file. Judged as the agent's doing, that ended honest episodes
with reward -1. An exec is a *step of a task script* when all of these hold:
- its parent is a shell whose script (`bash .verifier/run.sh`, or the script's `#!` line) is a
  protected file that still holds what it held when the agent's first step began;
- that shell's environment has nothing that runs other code inside it (BASH_ENV, ENV, exported
  functions, PS4, a preloaded library);
- it runs a file tool (rm, git, cp, ...), never a shell or an interpreter, where code the agent
  wrote could run;
- (its environment is read whole: one longer than MAX_ENVIRON is foreign, since what lies past a read's
  limit would go unseen)
- its argv is, word for word, a simple command of that script, so no argument, variable or
  environment of the agent's choosing makes it another command;
- its program is the one the episode began with (on a read-only mount, or not changed since).
Such a step's removals are the script's own; what it writes onto a protected path must hold, byte
for byte, what that path held when the episode began. A test planted in git's index and checked
out by the script, or a forged file copied in, is still tampering.

The snapshot is bounded (MAX_FILES files, MAX_BYTES in all, MAX_FILE_BYTES each): a file past the
bounds is not in it, so its rewrite is judged as before (fail closed: flagged, not spared).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator

from corral.detect.command import SHELLS, split
from corral.protect import literal_dir
from corral.sandbox.procs import read_proc

MAX_FILES = 4096
MAX_FILE_BYTES = 4 << 20
MAX_BYTES = 64 << 20
MAX_ENTRIES = 20_000  # directory entries walked to find them
MAX_ENVIRON = 1 << 20  # bytes of a script shell's environment read; a longer one is not the task's
# programs that change files and run no code of the project's (git's hooks and filters run as
# processes of their own, not as the step)
FILE_TOOLS = frozenset({"rm", "rmdir", "unlink", "git", "cp", "mv", "mkdir", "install", "ln", "touch",
                        "chmod", "tar", "unzip", "rsync", "find"})
# what makes a shell run other code than its script's, or a program load other code than its own
_FOREIGN_ENV = (b"BASH_ENV=", b"ENV=", b"BASH_FUNC_", b"PS4=", b"PROMPT_COMMAND=", b"SHELLOPTS=",
                b"LD_PRELOAD=", b"LD_LIBRARY_PATH=", b"LD_AUDIT=", b"GIT_EXEC_PATH=")
_SHELL_OPTS = frozenset({"-e", "-u", "-x", "-v", "-eu", "-ue", "-ex", "-xe", "-eux", "-euo", "+x", "--", "-o"})


class Snapshot:
    """Digests of a task's protected files as they were when the agent's first step began, read
    from the sandbox's side (`root`: /proc/<agent>/root) through no symbolic link."""

    def __init__(self, root: str, protected: Iterable[str], is_protected: Callable[[str], bool]) -> None:
        self.root = root
        self.taken = time.time()
        self.digests: dict[str, bytes] = {}
        total, seen = 0, 0
        for path in self._candidates(protected):
            seen += 1
            if seen > MAX_ENTRIES or len(self.digests) >= MAX_FILES:
                break
            if path in self.digests or not is_protected(path):
                continue
            data = self.read(path)
            if data is None:
                continue
            total += len(data)
            if total > MAX_BYTES:
                break
            self.digests[path] = hashlib.sha256(data).digest()

    def _candidates(self, protected: Iterable[str]) -> Iterator[str]:
        walked: set[str] = set()
        for g in protected:
            if not g.startswith("/"):
                continue
            if not any(c in g for c in "*?["):
                yield g
                continue
            top = literal_dir(g)
            if top in walked:
                continue
            walked.add(top)
            if top.count("/") < 2:  # never all of /workspace or /tmp: only what a glob there names
                with contextlib.suppress(OSError):
                    for name in sorted(os.listdir(self.root + top)):
                        if fnmatch.fnmatchcase(f"{top.rstrip('/')}/{name}", g):
                            yield f"{top.rstrip('/')}/{name}"
                continue
            for d, _dirs, files in os.walk(self.root + top):  # links to directories are not followed
                for name in sorted(files):
                    yield f"{d[len(self.root):]}/{name}"

    def read(self, path: str) -> bytes | None:
        """A regular file's content, each component opened beneath the sandbox's root without following
        a link (an absolute link would resolve on the host's side); None if it is not one, or too big."""
        parts = [p for p in path.split("/") if p]
        if not parts or ".." in parts:
            return None
        try:
            fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            for p in parts[:-1]:
                nxt = os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
            f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            try:
                st = os.fstat(f)
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                    return None
                return read_proc(f"/proc/self/fd/{f}", MAX_FILE_BYTES + 1)
            finally:
                os.close(f)
        except OSError:
            return None
        finally:
            os.close(fd)

    def holds(self, path: str) -> bool:
        """Whether `path` holds now what it held when the episode began (a protected file's restore)."""
        want = self.digests.get(path)
        if want is None:
            return False
        data = self.read(path)
        return data is not None and hashlib.sha256(data).digest() == want


def script_step(snapshot: Snapshot | None, pid: int, ppid: int | None, argv: list[str], exe: str | None) -> str | None:
    """The protected script whose own command this exec is, or None (module docstring)."""
    if snapshot is None or not snapshot.digests or not argv or not ppid or not exe:
        return None
    if os.path.basename(argv[0]) not in FILE_TOOLS:
        return None
    try:
        script = _script_of([a.decode(errors="replace") for a in read_proc(f"/proc/{ppid}/cmdline").split(b"\0") if a])
        if script is None:
            return None
        # read whole: an entry past a read's limit would be unseen, so an environment longer is foreign
        env = read_proc(f"/proc/{ppid}/environ", MAX_ENVIRON + 1)
        cwd = os.readlink(f"/proc/{ppid}/cwd")
    except OSError:
        return None
    if len(env) > MAX_ENVIRON or any(e.startswith(_FOREIGN_ENV) for e in env.split(b"\0")):
        return None
    path = os.path.normpath(script if script.startswith("/") else os.path.join(cwd, script))
    text = snapshot.read(path)
    if text is None or hashlib.sha256(text).digest() != snapshot.digests.get(path):
        return None  # not protected, or no longer what the task wrote
    if not _literal(argv, text.decode(errors="replace")) or not _original_program(pid, exe, snapshot.taken):
        return None
    return path


def _script_of(argv: list[str]) -> str | None:
    """The script a shell runs as its program: `bash [-e ...] FILE [ARGS]`; None for `-c`, stdin, or a
    non-shell."""
    if not argv or os.path.basename(argv[0]) not in SHELLS:
        return None
    i = 1
    while i < len(argv) and argv[i] in _SHELL_OPTS:
        i += 2 if argv[i] == "-o" else 1
    return argv[i] if i < len(argv) and not argv[i].startswith(("-", "+")) else None


def _literal(argv: list[str], script: str) -> bool:
    """Whether argv is word for word one of the script's simple commands (the program by its name)."""
    want = [os.path.basename(argv[0]), *argv[1:]]
    return any(c.argv and [os.path.basename(c.argv[0]), *c.argv[1:]] == want for c in split(script))


def _original_program(pid: int, exe: str, since: float) -> bool:
    """The program file lies on a read-only mount, or has not changed since `since` (ctime, which its
    owner cannot set back)."""
    host = f"/proc/{pid}/root{exe}"
    try:
        if os.statvfs(host).f_flag & os.ST_RDONLY:
            return True
        return os.stat(host).st_ctime < since
    except OSError:
        return False
