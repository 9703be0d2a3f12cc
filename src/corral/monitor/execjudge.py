"""What an exec will really run, read from a thread stopped at execve/execveat (seccomp user notification).

The exec watcher hands each notification here to learn, before the kernel does:
- the program: a path resolved against the thread's cwd or `execveat`'s directory descriptor, or the
  descriptor itself (`execveat(fd, "", AT_EMPTY_PATH)`, a memfd included: its name is what is judged);
- the whole argv, up to a cap (MAX_ARGC arguments, MAX_ARGV_BYTES bytes): above it the exec is refused,
  so no argument ever goes unjudged behind padding;
- what the kernel will map in its place: the interpreter a `#!` line names (the kernel's own parsing,
  up to its nesting depth), judged as an exec of its own; and a program run through the dynamic loader
  (`ld-linux-x86-64.so.2 [options] /tmp/prog ...`), where the target is judged as the exec.
Anything it cannot read (memory that /proc/<pid>/mem refuses, a descriptor that is gone) raises
ExecUnreadable, and the caller refuses the exec: fail closed.

Best-effort, and why (the kernel's own words: seccomp user notification "is not a security policy"):
- corral reads the arguments from the process's memory, and the kernel reads them again once told to
  continue. Another thread can rewrite them in between. So the exec is checked again after it happened
  (`ExecCheck`): the image that really runs (/proc/<pid>/exe, by device and inode) must be the one
  judged, and the argv it really got (/proc/<pid>/cmdline) is judged again when it differs. A process
  whose image is not the judged one is killed. The check runs moments after the exec; a program that
  rewrites its own argv area in that moment, or one that does its harm in the first milliseconds, is
  not undone by it.
- Paths are resolved inside the sandbox's root (openat2 RESOLVE_IN_ROOT), but a file can be replaced
  between this look and the kernel's: the image check above is what catches that.
- The dynamic loader resolves a target without a slash through its own search; corral judges it
  relative to the cwd. The check above still sees the loader's image, not the target's.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import os
import re
import stat
import struct
from dataclasses import dataclass, field

from corral.sandbox.procs import read_proc

MAX_ARGC = 4096
MAX_ARGV_BYTES = 256 << 10
MAX_PATH = 4096
MAX_STR_PREFETCH = 4096  # read past the last argument's start, to cover its end
PREFETCH_ARGC = 64  # below this many arguments, page-by-page reads cost less than one span read
SHEBANG_BYTES = 256  # BINPRM_BUF_SIZE: the kernel reads no more of a #! line
SHEBANG_DEPTH = 4  # the kernel's binfmt recursion limit
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
PAGE = 4096
NR_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10
# ld.so, ld-linux-x86-64.so.2, ld-linux-aarch64.so.1, ld-2.31.so, ld-musl-x86_64.so.1, ld64.so.2
LOADER = re.compile(r"^ld(64|[-.][^/]*)?\.so(\.[0-9]+)*$")
# loader options that take a value (glibc's rtld.c and musl's ldso)
LOADER_MAX_BYTES = 4 << 20  # a loader is ~200 KB-1 MB; bigger files are never hashed as one
LOADER_VALUE_OPTS = {"--library-path", "--inhibit-rpath", "--audit", "--preload", "--argv0",
                     "--glibc-hwcaps-prepend", "--glibc-hwcaps-mask"}


class ExecUnreadable(Exception):
    """The exec's path, argv or program cannot be read whole: it is refused, never let through."""


class ExecTooLarge(ExecUnreadable):
    """argv is above the cap: judged in full or not run at all."""


@dataclass
class ExecTarget:
    """One program to judge for an exec: the one named, an interpreter, or a loader's target."""

    exe: str
    argv: list[str]
    comm: str
    data: dict = field(default_factory=dict)


@dataclass
class ExecCall:
    """Everything read from one exec notification."""

    tid: int
    path: str  # as passed
    argv: list[str]
    targets: list[ExecTarget]  # the named program first, then what the kernel or loader runs for it
    image: tuple[int, int] | None  # (dev, inode) of the file the kernel will map, when it could be opened
    script: bool = False  # the kernel builds argv anew for a #! script: only argv[1:] survives
    # no image to expect: a path through the process's own /proc or /dev/fd that corral does not
    # follow. Otherwise an image of None means the program could not be opened, and an exec that
    # succeeds all the same ran something corral never saw.
    unverifiable: bool = False


class _Mem:
    """Reads of a stopped thread's memory, a page at a time, each page read once."""

    def __init__(self, pid: int) -> None:
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ExecUnreadable(f"cannot open /proc/{pid}/mem: {e.strerror}") from None
        self.pages: dict[int, bytes] = {}

    def close(self) -> None:
        os.close(self.fd)

    def _page(self, base: int) -> bytes:
        page = self.pages.get(base)
        if page is None:
            try:
                page = os.pread(self.fd, PAGE, base)
            except (OSError, OverflowError) as e:
                raise ExecUnreadable(f"memory at {base:#x} is unreadable ({e})") from None
            if len(page) < PAGE:
                raise ExecUnreadable(f"memory at {base:#x} is unreadable (short read)")
            self.pages[base] = page
        return page

    def prefetch(self, lo: int, hi: int) -> None:
        """Read the pages of [lo, hi) in one go where they are mapped (a hole ends it: the rest is
        read page by page, and an unreadable page is then an error where it is needed)."""
        base = lo - lo % PAGE
        size = min(hi - base, MAX_ARGV_BYTES + 2 * PAGE)
        size += -size % PAGE
        try:
            data = os.pread(self.fd, size, base)
        except (OSError, OverflowError):
            return
        for off in range(0, len(data) - len(data) % PAGE, PAGE):
            self.pages.setdefault(base + off, data[off: off + PAGE])

    def read(self, addr: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            base = addr - addr % PAGE
            chunk = self._page(base)[addr - base: addr - base + n - len(out)]
            out += chunk
            addr += len(chunk)
        return bytes(out)

    def cstr(self, addr: int, limit: int) -> bytes:
        """The NUL-terminated string at addr; ExecTooLarge when it runs past `limit` bytes."""
        out = bytearray()
        while True:
            base = addr - addr % PAGE
            chunk = self._page(base)[addr - base:]
            end = chunk.find(b"\0")
            out += chunk if end < 0 else chunk[:end]
            if len(out) > limit:
                raise ExecTooLarge(f"a string of over {limit} bytes")
            if end >= 0:
                return bytes(out)
            addr = base + PAGE


def read_call(tid: int, execveat: bool, args: tuple[int, ...]) -> ExecCall:
    """Read and resolve one exec from the notifying thread `tid` (raises ExecUnreadable)."""
    if execveat:
        dirfd, path_ptr, argv_ptr, flags = int_arg(args[0]), args[1], args[2], args[4]
    else:
        dirfd, path_ptr, argv_ptr, flags = AT_FDCWD, args[0], args[1], 0
    mem = _Mem(tid)
    try:
        if not path_ptr:
            raise ExecUnreadable("no path (NULL)")
        raw_path = mem.cstr(path_ptr, MAX_PATH)
        argv = _read_argv(mem, argv_ptr)
    finally:
        mem.close()
    path = raw_path.decode("utf-8", errors="replace")
    exe, fd_link, host = _resolve(tid, path, dirfd, flags)
    comm = _memfd_name(fd_link) if fd_link else os.path.basename(exe)
    first = ExecTarget(exe, argv, comm or os.path.basename(exe))
    if fd_link is not None:
        first.data["exec_fd"] = fd_link
    call = ExecCall(tid, path, argv, [first], None)
    # other paths through /proc (another process's root, say) are not followed: nothing to expect
    call.unverifiable = host is None and exe.startswith("/proc/")
    opened = _open_program(tid, exe, host)
    _follow(call, opened)
    return call


def _read_argv(mem: _Mem, argv_ptr: int) -> list[str]:
    if not argv_ptr:
        return []
    ptrs = _pointers(mem, argv_ptr)
    if len(ptrs) > PREFETCH_ARGC and max(ptrs) - min(ptrs) <= MAX_ARGV_BYTES:
        # many strings, usually side by side: one read of their span instead of one per page
        mem.prefetch(min(ptrs), max(ptrs) + MAX_STR_PREFETCH)
    argv: list[str] = []
    total = 0
    for ptr in ptrs:
        try:
            s = mem.cstr(ptr, MAX_ARGV_BYTES - total)
        except ExecTooLarge:
            s = b"\0" * (MAX_ARGV_BYTES + 1)
        total += len(s) + 1
        if total > MAX_ARGV_BYTES:
            raise ExecTooLarge(f"more than {MAX_ARGV_BYTES} bytes of arguments (corral judges every argument "
                               "and runs nothing above its cap; split the command, e.g. with xargs)")
        argv.append(s.decode("utf-8", errors="replace"))
    return argv


def _pointers(mem: _Mem, addr: int) -> list[int]:
    """argv's pointers up to its NULL, a page of them at a time; ExecTooLarge above MAX_ARGC."""
    ptrs: list[int] = []
    while True:
        base = addr - addr % PAGE
        off = addr - base
        n = (PAGE - off) // 8
        chunk = mem.read(addr, 8) if n == 0 else mem._page(base)[off: off + 8 * n]
        for (ptr,) in struct.iter_unpack("=Q", chunk):
            if not ptr:
                return ptrs
            if len(ptrs) >= MAX_ARGC:
                raise ExecTooLarge(f"more than {MAX_ARGC} arguments (corral judges every argument and runs "
                                   "nothing above its cap; split the command, e.g. with xargs)")
            ptrs.append(ptr)
        addr += len(chunk)


def int_arg(v: int) -> int:
    """A syscall's int argument (the low 32 bits, signed) from its 64-bit register."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _fd_link(tid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{tid}/fd/{fd}")
    except OSError as e:
        raise ExecUnreadable(f"descriptor {fd} of the exec cannot be read: {e.strerror}") from None


def _resolve(tid: int, path: str, dirfd: int, flags: int) -> tuple[str, str | None, str | None]:
    """The program's path as the sandbox sees it; for an exec of a descriptor (execveat's
    AT_EMPTY_PATH, or a path such as /proc/self/fd/N), the link it names and where the host opens it."""
    if path == "" and flags & AT_EMPTY_PATH:
        link = _fd_link(tid, dirfd)
        return link.removesuffix(" (deleted)"), link, f"/proc/{tid}/fd/{dirfd}"
    if path.startswith("/"):
        exe = os.path.normpath(path)
    else:
        base = _fd_link(tid, dirfd) if dirfd != AT_FDCWD else _cwd(tid)
        exe = os.path.normpath(os.path.join(base, path))
    host = _magic(tid, exe)
    if host is not None:  # /proc/self/fd/3 is a memfd's or a file's other name: judged by what it is
        try:
            link = os.readlink(host)
        except OSError as e:
            raise ExecUnreadable(f"{exe} cannot be read: {e.strerror}") from None
        return link.removesuffix(" (deleted)"), link, host
    return exe, None, None


def _cwd(tid: int) -> str:
    try:
        return os.readlink(f"/proc/{tid}/cwd")
    except OSError as e:
        raise ExecUnreadable(f"the exec's working directory cannot be read: {e.strerror}") from None


def _memfd_name(link: str) -> str:
    # "/memfd:xmrig (deleted)" -> "xmrig": the name its creator gave it is the only name it has
    name = link.removesuffix(" (deleted)")
    name = os.path.basename(name)
    return name.removeprefix("memfd:")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_in_root(pid: int, path: str) -> int | None:
    """Open `path` read-only as process `pid` would see it: inside its root, absolute links
    included (RESOLVE_IN_ROOT), never blocking on a FIFO. None when it cannot be opened."""
    try:
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, 0,
                       RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = _libc().syscall(NR_OPENAT2, root, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        return fd if fd >= 0 else None
    finally:
        os.close(root)


_OWN = re.compile(r"^/(?:dev/fd|proc/(?:self|thread-self)/fd)/(\d+)$")
_OWN_EXE = ("/proc/self/exe", "/proc/thread-self/exe")
_OTHER = re.compile(r"^/proc/(\d+)/(fd/\d+|exe)$")


def _magic(tid: int, exe: str) -> str | None:
    """For a path that names a descriptor or a running program through /proc or /dev/fd (magic
    links: no path to the file), where the host reaches the same thing. /proc/self is the caller's,
    never corral's; /proc/<pid> is a pid of the sandbox, reached through the sandbox's own /proc."""
    own = _OWN.match(exe)
    if own is not None:
        return f"/proc/{tid}/fd/{own.group(1)}"
    if exe in _OWN_EXE:
        return f"/proc/{tid}/exe"
    if _OTHER.match(exe):
        return f"/proc/{tid}/root{exe}"
    return None


def _open_program(tid: int, exe: str, host: str | None) -> int | None:
    host = host or _magic(tid, exe)
    if host is not None:  # a descriptor or a running program (a memfd has no path to open)
        try:
            return os.open(host, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
    return open_in_root(tid, exe) if exe.startswith("/") else None


def _follow(call: ExecCall, fd: int | None) -> None:
    """Walk what the kernel will run: #! interpreters (each judged as an exec), then a loader's
    target. call.image ends as the identity of the file the kernel maps."""
    target = call.targets[0]
    loader = False
    for _ in range(SHEBANG_DEPTH + 1):
        if fd is None:
            call.image, loader = None, False
            break
        try:
            st = os.fstat(fd)
            head = os.pread(fd, SHEBANG_BYTES, 0) if stat.S_ISREG(st.st_mode) else b""
            loader = _is_loader(target.exe, fd, st)
        except OSError:
            st, head = None, b""
        finally:
            os.close(fd)
        call.image = (st.st_dev, st.st_ino) if st is not None else None
        fd = None
        line = _shebang(head)
        if line is None:
            break
        interp, arg = line
        if not interp.startswith("/"):
            interp = os.path.normpath(os.path.join(_cwd(call.tid), interp))
        # the argv the kernel gives the interpreter: its own name, the #! argument, the script, the rest
        argv = [interp, *([arg] if arg else []), target.exe, *target.argv[1:]]
        target = ExecTarget(interp, argv, os.path.basename(interp), {"script": target.exe, "judged_as": "interpreter"})
        call.targets.append(target)
        call.script = True
        call.unverifiable = call.unverifiable or (interp.startswith("/proc/") and _magic(call.tid, interp) is None)
        fd = _open_program(call.tid, interp, None)
    if loader or LOADER.match(os.path.basename(target.exe)):
        launched = _loader_target(call.tid, target)
        if launched is not None:
            call.targets.append(launched)


@functools.cache
def _known_loaders() -> tuple[frozenset[tuple[int, int]], dict[int, set[str]]]:
    """The host's dynamic loaders (the sandbox sees the same files): by (dev, inode), so a link to
    one under another name is known, and by size and hash, so a copy is."""
    ids: set[tuple[int, int]] = set()
    hashes: dict[int, set[str]] = {}
    for pattern in ("/lib*/ld*.so*", "/lib/*/ld*.so*", "/usr/lib*/ld*.so*", "/usr/lib/*/ld*.so*"):
        for path in glob.glob(pattern):
            if not LOADER.match(os.path.basename(path)):
                continue
            try:
                st = os.stat(path)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read(LOADER_MAX_BYTES + 1)).hexdigest()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= LOADER_MAX_BYTES:
                ids.add((st.st_dev, st.st_ino))
                hashes.setdefault(st.st_size, set()).add(digest)
    return frozenset(ids), hashes


def _is_loader(path: str, fd: int, st: os.stat_result) -> bool:
    if LOADER.match(os.path.basename(path)):
        return True
    ids, hashes = _known_loaders()
    if (st.st_dev, st.st_ino) in ids:
        return True
    if st.st_size not in hashes:  # the common case: one fstat, no read
        return False
    return hashlib.sha256(os.pread(fd, LOADER_MAX_BYTES + 1, 0)).hexdigest() in hashes[st.st_size]


def _shebang(head: bytes) -> tuple[str, str] | None:
    """(interpreter, optional argument) of a #! line, split as the kernel splits it (binfmt_script)."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        return None
    parts = re.split(rb"[ \t]+", line, maxsplit=1)
    interp = parts[0].decode("utf-8", errors="replace")
    arg = parts[1].strip(b" \t").decode("utf-8", errors="replace") if len(parts) > 1 else ""
    return interp, arg


def _loader_target(tid: int, loader: ExecTarget) -> ExecTarget | None:
    """The program `ld.so [options] prog args...` runs, judged as the exec (None: the loader runs
    nothing, as with --help or --list of nothing)."""
    argv = loader.argv
    i, argv0 = 1, None
    while i < len(argv) and argv[i].startswith("--"):
        if argv[i] == "--":
            i += 1
            break
        if argv[i] in LOADER_VALUE_OPTS:
            if argv[i] == "--argv0" and i + 1 < len(argv):
                argv0 = argv[i + 1]
            i += 2
        else:
            i += 1
    if i >= len(argv):
        return None
    prog = argv[i]
    exe = os.path.normpath(prog if prog.startswith("/") else os.path.join(_cwd(tid), prog))
    args = [argv0 if argv0 is not None else prog, *argv[i + 1:]]
    return ExecTarget(exe, args, os.path.basename(exe), {"launcher": {"exe": loader.exe, "argv": argv},
                                                          "judged_as": "loader-target"})


def image_of(pid: int) -> tuple[int, int] | None:
    """(dev, inode) of the program process `pid` runs now; None when it is gone."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def cmdline_of(pid: int) -> list[str] | None:
    try:
        raw = read_proc(f"/proc/{pid}/cmdline", MAX_ARGV_BYTES + 1)
    except OSError:
        return None
    return [a.decode("utf-8", errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def tgid_of(tid: int) -> int | None:
    """The process a thread belongs to: after an exec the thread that made it takes this pid."""
    with contextlib.suppress(OSError):
        if os.stat(f"/proc/{tid}/task").st_nlink == 3:  # ".", ".." and one thread: the process itself
            return tid
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{tid}/status") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    return None
