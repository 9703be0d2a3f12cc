"""Code that arrives through a pipe or a socket: who writes what a shell or interpreter runs.

`curl ... | sh` can be spelled so that no reader of the command line sees it (variables, `${V,,}`,
a decoded string fed to `sh`, a wrapper script); the kernel cannot be fooled that way. At every exec
corral notes the pipes (and FIFOs) on the program's standard input and output, and whether the program
reads its *code* from one: a shell or interpreter given no script (`sh`, `python3 -`, `bash -s`), or
given a pipe as its script (`bash <(...)`, `sh /dev/fd/3`, a FIFO). When a code reader's pipe has a
writer, directly or through a few filters (`curl | tee x | sh`), the writers' command lines become the
exec's `proc.code_writers`, on whichever end's exec is judged second: rules then ask whether a
downloader or a decoder wrote code that runs.

Pipes are keyed by (device, inode) as the kernel reports them for the descriptor, so an anonymous pipe
and a named FIFO are the same kind of thing. The tables are bounded, oldest first, and each command line
kept is cut to its first CMDLINE_CHARS characters (the program's own name comes first).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass

from corral.monitor.netcalls import peer_of

SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "hush", "rbash"})
STDIN_PATHS = {"/dev/stdin": 0}
FD_PREFIXES = ("/dev/fd/", "/proc/self/fd/", "/proc/thread-self/fd/")
DEPTH = 4  # filters followed between a writer and the code reader
MAX_ENDS = 4096  # pipes remembered per sandbox, each way
CMDLINE_CHARS = 256
PER_PIPE = 64  # ends remembered per pipe, the newest

Key = tuple[int, int]


def _base(word: str) -> str:
    return word.rsplit("/", 1)[-1]


def _interpreter(name: str) -> str | None:
    """The interpreter family of a program name (python3.11 -> python), or None."""
    for family in ("python", "perl", "ruby", "node", "nodejs", "php", "lua", "tclsh", "jshell"):
        if name == family or (name.startswith(family) and name[len(family):].replace(".", "").isdigit()):
            return "node" if family == "nodejs" else family
    return None


# options that take the next word as their value, per family (a value never names the script)
_VALUED = {
    "shell": {"-o", "+o", "-O", "+O", "--rcfile", "--init-file"},
    "ruby": {"--require"},
    "node": {"-r", "--require", "--import", "--loader", "--experimental-loader", "-C", "--conditions",
             "--input-type", "--title", "--env-file", "--inspect-port", "--stack-size"},
    "php": {"-d", "-c", "-z"},
    "lua": {"-l"},
    "tclsh": {"-encoding"},
    "jshell": {"--class-path", "-cp", "--module-path", "-R", "-J", "--startup", "--feedback"},
}
# option letters that put the code on the command line (or name a module): nothing is read as a script
_INLINE = {"python": "cm", "perl": "eE", "ruby": "e", "php": "rBRE", "lua": "e", "node": "ep", "shell": "c"}
# option letters whose value is the rest of the word, or the next word when nothing follows them
_NEXT = {"python": "WX", "perl": "IMm", "ruby": "rIC", "shell": "oO"}
# option letters whose value can only be the rest of the word
_REST = {"perl": "CdDilx0F", "ruby": "EFKTWx0"}
_LONG_INLINE = {"--eval", "--print", "--command"}


# code on the command line that runs what comes on standard input: exec(sys.stdin.read()),
# eval "$(cat)", source /dev/stdin, perl's eval <STDIN>, node's eval(readFileSync(0))
_EVALS_STDIN = re.compile(
    r"(?s)(\b(exec|eval|compile|Function|source|instance_eval|run_path)\b|\bdo\s*[\x27\x22(])[^\n]{0,200}?"
    r"(sys\.stdin|/dev/stdin|/dev/fd/0|/proc/self/fd/0|<STDIN>|<>|\$stdin|STDIN\.read|ARGF|readFileSync\(\s*0"
    r"|\$\(\s*cat\s*-?\s*\)|`\s*cat\s*-?\s*`|\binput\s*\(\s*\))"
    r"|(^|[;&|\s])(source|\.)\s+(/dev/stdin|/dev/fd/0|/proc/self/fd/0)\b")


def _inline(args: list[str]) -> int | None:
    """Code given on the command line: it reads its code from standard input only when that code runs
    what it reads there."""
    return 0 if _EVALS_STDIN.search(" ".join(args)) else None


def program_fd(argv: list[str]) -> int | str | None:
    """Where a program reads the code it runs, when that could be a pipe: a descriptor number (0 for its
    standard input), a path (its script, a FIFO perhaps), or None (not a shell or interpreter, or the
    code is on its command line: `sh -c`, `python3 -c/-m`, `perl -e`, `node -e`). Where an option's
    form is in doubt, the reading that makes it a reader of code wins: it only matters when a
    downloader or a decoder writes into that pipe."""
    if not argv:
        return None
    name, args = _base(argv[0]), list(argv[1:])
    if name == "busybox" and args and _base(args[0]) in SHELLS:
        name, args = _base(args[0]), args[1:]
    family = "shell" if name in SHELLS else _interpreter(name)
    if family is None:
        return None
    valued, inline = _VALUED.get(family, set()), _INLINE.get(family, "")
    nxt, rest_only = _NEXT.get(family, ""), _REST.get(family, "")
    forced_stdin = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a == "-" or not a or a[0] not in "-+" or (a[0] == "+" and family != "shell"):
            break
        i += 1
        if a in valued:
            i += 1
            continue
        if a.startswith("--"):
            if a.split("=", 1)[0] in _LONG_INLINE:
                return _inline(args)
            continue
        letters = a[1:]
        for k, ch in enumerate(letters):
            if ch in inline and a[0] == "-":
                return _inline(args)
            if family == "shell" and ch == "s":
                forced_stdin = True
            if ch in nxt:
                i += k == len(letters) - 1  # nothing attached: its value is the next word
                break
            if ch in rest_only:
                break
    rest = args[i:]
    if forced_stdin or not rest or rest[0] == "-":
        return 0
    script = rest[0]
    if script in STDIN_PATHS:
        return STDIN_PATHS[script]
    for prefix in FD_PREFIXES:
        if script.startswith(prefix) and script[len(prefix):].isdigit():
            return int(script[len(prefix):])
    return script


def _key(path: str) -> Key | None:
    """The pipe or FIFO a /proc descriptor link (or a path) leads to, or None (not one, or gone)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISFIFO(st.st_mode) else None


def _pipes(pid: int) -> tuple[Key | None, tuple[Key, ...], dict[int, Key]]:
    """The pipe or FIFO on `pid`'s standard input, those it holds open for writing (its standard output
    and error, or any descriptor: `curl -o /dev/fd/3 3>&1 >/dev/null`), and every pipe descriptor's
    key. Every descriptor is looked at (a cap would let a writer hide behind as many dummy ones): the
    sandbox's open-files limit bounds them, and its share of corral's loop paces what its execs cost.
    A /proc fd link's own mode says how it is open (the owner's w bit), read where it is in doubt:
    stdout and stderr are taken as written, as they nearly always are."""
    fds = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(fds)
    except OSError:
        return None, (), {}
    keys: dict[int, Key] = {}
    written: list[Key] = []
    for name in names:
        key = _key(fds + name)
        if key is None:
            continue
        fd = int(name)
        keys[fd] = key
        if key in written:
            continue
        try:
            if fd in (1, 2) or os.lstat(fds + name).st_mode & stat.S_IWUSR:
                written.append(key)
        except OSError:
            continue
    return keys.get(0), tuple(written), keys


def socket_peer(pid: int, fd: int) -> str | None:
    """The remote end ("ip:port") of the inet socket on descriptor `fd` of `pid`, when it is connected to
    an address off loopback; else None (a unix socket, a listener, loopback, not a socket)."""
    try:
        if not stat.S_ISSOCK(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
            return None
    except OSError:
        return None
    peer = peer_of(pid, fd)
    if peer is None:
        return None
    ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_loopback or ip.is_unspecified:
        return None
    return f"{ip}:{peer[1]}"


@dataclass
class _End:
    cmdline: str
    code: bool = False  # a reader that runs what it reads


class CodePipes:
    """One sandbox's pipe ends, as its execs left them (host pids)."""

    def __init__(self) -> None:
        self._writers: dict[Key, dict[int, _End]] = {}  # what writes into each pipe (any descriptor)
        self._readers: dict[Key, dict[int, _End]] = {}  # what reads each pipe (stdin, or its code)
        self._noted: dict[int, tuple[Key | None, tuple[Key, ...], Key | None]] = {}  # pid -> (stdin, written, code)

    def exec(self, pid: int, argv: list[str], program: str | None = None) -> tuple[list[str], str | None]:
        """Note the exec of `pid` with `argv` (about to happen: its descriptors are set). Returns the
        command lines of the programs writing code that a shell or interpreter reads through a pipe, when
        this exec is one end of such a pipe (empty otherwise), and the remote address the program reads
        its code from when that is a network socket (a shell wired to a connection: a reverse or bind
        shell, however it was spelled). `program`: what the file really is when it is a renamed copy of
        a known program (its command line then starts with that name)."""
        cmdline = " ".join([program, *argv[1:]] if program else argv)[:CMDLINE_CHARS]
        in_key, out_keys, keys = _pipes(pid)
        where = program_fd(argv)
        code_key: Key | None = None
        if isinstance(where, int):
            code_key = keys.get(where)
        elif isinstance(where, str):  # a script by path: a FIFO, perhaps, that a writer fills
            code_key = _key(f"/proc/{pid}/root{where}" if where.startswith("/") else f"/proc/{pid}/cwd/{where}")
        self._forget(pid)
        if in_key is not None:
            self._add(self._readers, in_key, pid, _End(cmdline, code_key == in_key))
        if code_key is not None and code_key != in_key:
            self._add(self._readers, code_key, pid, _End(cmdline, True))
        for key in out_keys:
            self._add(self._writers, key, pid, _End(cmdline))
        if in_key or out_keys or code_key:
            self._noted[pid] = (in_key, out_keys, code_key)
            while len(self._noted) > MAX_ENDS:
                self._forget(next(iter(self._noted)))
        found: list[str] = []
        if code_key is not None:
            found += self._upstream(code_key, DEPTH, {pid})
        if any(self._code_readers(key, DEPTH, {pid}) for key in out_keys):
            found += [cmdline, *(self._upstream(in_key, DEPTH - 1, {pid}) if in_key else [])]
        peer = socket_peer(pid, where) if isinstance(where, int) and code_key is None else None
        return found, peer

    def _upstream(self, key: Key, depth: int, seen: set[int]) -> list[str]:
        out: list[str] = []
        for wpid, end in list(self._writers.get(key, {}).items()):
            if wpid in seen:
                continue
            seen.add(wpid)
            out.append(end.cmdline)
            up = self._noted.get(wpid, (None,))[0]
            if depth > 1 and up is not None:
                out += self._upstream(up, depth - 1, seen)
        return out

    def feeds(self, pid: int) -> list[str]:
        """The command lines of the shells and interpreters that run what `pid` writes (through pipes,
        as its last exec left them): a writer of code that then connects out, or asks for a name,
        fetches code (`python3 fetch.py | sh`)."""
        seen = {pid}
        return [c for key in self._noted.get(pid, (None, ()))[1] for c in self._code_readers(key, DEPTH, seen)]

    def _code_readers(self, key: Key, depth: int, seen: set[int]) -> list[str]:
        found: list[str] = []
        for rpid, end in list(self._readers.get(key, {}).items()):
            if rpid in seen:
                continue
            seen.add(rpid)
            if end.code:
                found.append(end.cmdline)
                continue
            downs = self._noted.get(rpid, (None, ()))[1]
            if depth > 1:
                for down in downs:
                    found += self._code_readers(down, depth - 1, seen)
        return found

    def _add(self, table: dict[Key, dict[int, _End]], key: Key, pid: int, end: _End) -> None:
        ends = table.pop(key, {})
        ends.pop(pid, None)
        ends[pid] = end
        if len(ends) > PER_PIPE:  # every command of a session shares its stdin and the capture pipes
            del ends[next(iter(ends))]
        table[key] = ends  # the newest last: the oldest go first when the table is full
        while len(table) > MAX_ENDS:
            del table[next(iter(table))]

    def _forget(self, pid: int) -> None:
        """An exec replaces the program: what `pid` was noted as before no longer writes or reads."""
        in_key, out_keys, code_key = self._noted.pop(pid, (None, (), None))
        for table, key in ((self._readers, in_key), *((self._writers, k) for k in out_keys), (self._readers, code_key)):
            if key is not None and key in table:
                table[key].pop(pid, None)
