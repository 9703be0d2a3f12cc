"""The fake sandbox's programs and files (fake.py): what handlers see and return, an in-memory
filesystem, and a small interpreter of shell command lines (bashlex's parse). Nothing here runs a
real program or touches a real file."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import io
import ipaddress
import posixpath
import re
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bashlex

from corral.events import Event
from corral.sandbox.sandbox import OutputChunk

if TYPE_CHECKING:
    from corral.sandbox.fake import FakeSandbox


WRITABLE = ("/workspace", "/tmp", "/root")
BASE_DIRS = ("/", "/bin", "/dev", "/etc", "/root", "/tmp", "/usr", "/usr/bin", "/workspace")
SHELL_BUILTINS = {"echo", "printf", "true", "false", ":", "pwd", "cd", "export", "exit", "test", "["}
_ALIASES = {"false": "true", ":": "true", "[": "test", "sh": "bash"}
_PARAM = re.compile(r"\{(\w+)\}|(\w+|\?)")
Write = Callable[[int, bytes], None]


class _Exit(Exception):
    """`exit N`: unwinds the interpreter to the shell that ran the command (a session's shell dies)."""

    def __init__(self, code: int) -> None:
        self.code = code


class _Out:
    """A command's output, capped per stream as corral's agent caps it; an interactive session merges stderr."""

    def __init__(self, limit: int, on_output: Callable[[OutputChunk], None] | None, merge: bool) -> None:
        self.limit, self.on_output, self.merge = limit, on_output, merge
        self.buf, self.dropped = {1: bytearray(), 2: bytearray()}, [0, 0]

    def write(self, fd: int, data: bytes) -> None:
        fd = 1 if self.merge else fd
        room = max(self.limit - len(self.buf[fd]), 0)
        self.dropped[fd - 1] += max(len(data) - room, 0)
        self.buf[fd] += data[:room]
        if self.on_output is not None and data:
            self.on_output(OutputChunk("stdout" if fd == 1 else "stderr", data))


# -- what handlers see and return -----------------------------------------------------------------------------
@dataclass
class Exec:
    """Effect: a program runs (a `process/exec` event, judged before it runs)."""

    argv: list[str]
    exe: str | None = None  # default: the path argv[0] names, else /usr/bin/<argv[0]>
    background: bool = False  # alive after the command returns, until killed


@dataclass
class Connect:
    """Effect: a TCP connection to `host` (an IP, or a name to resolve) whose client sends `data` first."""

    host: str
    port: int
    data: bytes = b""
    response: bytes = b""  # what the server sends back (bytes received), when allowed


@dataclass
class Reply:
    exit_code: int = 0
    stdout: bytes | str = b""
    stderr: bytes | str = b""
    effects: list[Exec | Connect | Event] = field(default_factory=list)  # in order; a refusal ends the command


@dataclass(eq=False)
class FakeProcess:
    pid: int
    step: int | None
    argv: list[str]
    exe: str
    ppid: int | None = None
    alive: bool = True


HandlerResult = Reply | int | str | bytes | tuple | None  # an int: exit code; text: stdout; a tuple: Reply(*it)
Handler = Callable[["Call"], HandlerResult | Awaitable[HandlerResult]]


@dataclass
class Call:
    """One simple command a handler answers, with the sandbox state it may read and change."""

    argv: list[str]
    line: str  # the whole command line it is part of
    stdin: bytes
    env: dict[str, str]
    cwd: str
    sandbox: FakeSandbox
    step: int
    process: FakeProcess | None = None

    @property
    def fs(self) -> FakeFS:
        return self.sandbox.fs

    def path(self, p: str) -> str:
        return self.fs.norm(p, self.cwd)

    def cause(self, effect: Exec | Connect | Event) -> bool:
        """Make an effect happen now, from this command's process; False when corral refused it."""
        return self.sandbox._cause(effect, self.process, self.step, self.cwd)


class Script:
    """Handlers, first match wins: `on(match, handler)` or `@on(match)`. A string is a glob over the
    command's words joined by spaces ("xmrig*"), a compiled regex is searched there, a callable gets argv."""

    def __init__(self) -> None:
        self.handlers: list[tuple[Callable[[list[str]], bool], Handler]] = []

    def on(self, match: str | re.Pattern | Callable[[list[str]], bool], handler: Handler | None = None) -> Any:
        if isinstance(match, str):
            test = lambda argv, g=match: fnmatch.fnmatchcase(" ".join(argv), g)  # noqa: E731
        elif isinstance(match, re.Pattern):
            test = lambda argv, r=match: r.search(" ".join(argv)) is not None  # noqa: E731
        else:
            test = match
        if handler is None:
            return lambda fn: self.on(match, fn)
        self.handlers.append((test, handler))
        return handler

    def find(self, argv: list[str]) -> Handler | None:
        return next((h for test, h in self.handlers if test(argv)), None)


# -- the filesystem ---------------------------------------------------------------------------------------------
class FsError(Exception):
    """A file operation failed; the message is what the program prints after its name."""


class FakeFS:
    """Files (path -> bytes) and directories: absolute normalised paths, no links, no modes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.dirs: set[str] = set(BASE_DIRS)

    @staticmethod
    def norm(path: str, cwd: str = "/") -> str:
        return "/" + posixpath.normpath(posixpath.join(cwd, path)).lstrip("/")

    def is_dir(self, p: str) -> bool:
        return p in self.dirs

    def is_file(self, p: str) -> bool:
        return p in self.files or p == "/dev/null"

    def read(self, p: str) -> bytes:
        if p in self.dirs or not self.is_file(p):
            raise FsError(f"{p}: {'Is a directory' if p in self.dirs else 'No such file or directory'}")
        return self.files.get(p, b"")

    def _writable(self, p: str) -> None:
        if not any(p == w or p.startswith(w + "/") for w in WRITABLE):
            raise FsError(f"{p}: Read-only file system")
        if posixpath.dirname(p) not in self.dirs:
            raise FsError(f"{p}: No such file or directory")

    def write(self, p: str, data: bytes, append: bool = False) -> None:
        if p != "/dev/null":
            if p in self.dirs:
                raise FsError(f"{p}: Is a directory")
            self._writable(p)
            self.files[p] = (self.files.get(p, b"") if append else b"") + data

    def mkdir(self, p: str, parents: bool = False) -> None:
        if p in self.dirs and parents:
            return
        if p in self.dirs or p in self.files:
            raise FsError(f"cannot create directory '{p}': File exists")
        if parents and posixpath.dirname(p) not in self.dirs:
            self.mkdir(posixpath.dirname(p), parents=True)
        self._writable(p)
        self.dirs.add(p)

    def remove(self, p: str, recursive: bool = False) -> None:
        if p not in self.files and (p not in self.dirs or not recursive):
            raise FsError(f"cannot remove '{p}': {'Is a directory' if p in self.dirs else 'No such file or directory'}")
        self._writable(p)
        self.files = {q: b for q, b in self.files.items() if q != p and not q.startswith(p + "/")}
        self.dirs = {d for d in self.dirs if d != p and not d.startswith(p + "/")}

    def listdir(self, p: str) -> list[str]:
        if p in self.files:
            return [p]
        if p not in self.dirs:
            raise FsError(f"cannot access '{p}': No such file or directory")
        return sorted({rel.split("/")[0] for rel, _ in self.tree(p)})

    def tree(self, root: str) -> list[tuple[str, bytes | None]]:
        """(path relative to root, data; None for a directory), sorted, so parents come first."""
        pre = root.rstrip("/") + "/"
        found: list[tuple[str, bytes | None]] = [(d, None) for d in self.dirs if d.startswith(pre)]
        found += [(f, b) for f, b in self.files.items() if f.startswith(pre)]
        return sorted((q[len(pre):], b) for q, b in found)  # type: ignore[type-var]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- the interpreter ------------------------------------------------------------------------------------------
class _Shell:
    """Interprets one command line (bashlex's tree); `state` is the shell's env and cwd (a session's
    persists across its commands)."""

    def __init__(self, sb: FakeSandbox, state: dict[str, Any], out: _Out, step: int, line: str,
                 internal: bool) -> None:
        self.sb, self.state, self.out, self.step, self.line, self.internal = sb, state, out, step, line, internal
        self.status, self.background = 0, False
        self.foreground: set[int] = set()  # this command's programs: they end with it

    async def top(self, line: str, stdin: bytes, session: bool) -> tuple[int | None, str | None]:
        try:
            return await self.run(line, stdin, self.out.write), None
        except _Exit as e:
            return (None, f"session shell exited with status {e.code}") if session else (e.code, None)

    async def run(self, line: str, stdin: bytes, write: Write) -> int:
        try:
            trees = bashlex.parse(line) if line.strip() else []
        except Exception as e:  # bashlex's ParsingError, or a construct it does not know
            write(2, f"bash: -c: line 1: syntax error: {e}\n".encode())
            return 2
        for tree in trees:
            self.status = await self.node(tree, line, stdin, write)
        return self.status

    async def node(self, n: Any, line: str, stdin: bytes, write: Write) -> int:
        if n.kind == "command":
            return await self.simple(n, line, stdin, write)
        if n.kind == "list":
            for i, part in enumerate(n.parts):
                prev = n.parts[i - 1].op if i and part.kind != "operator" else ";"
                if part.kind == "operator" or (prev == "&&" and self.status) or (prev == "||" and not self.status):
                    continue
                nxt = n.parts[i + 1] if i + 1 < len(n.parts) else None
                was, self.background = self.background, self.background or getattr(nxt, "op", None) == "&"
                self.status = await self.node(part, line, stdin, write)
                self.status, self.background = (0 if self.background and not was else self.status), was
            return self.status
        if n.kind == "pipeline":
            cmds = [p for p in n.parts if p.kind not in ("pipe", "reservedword")]
            for i, c in enumerate(cmds):
                piped = bytearray()
                last = i == len(cmds) - 1
                self.status = await self.node(c, line, stdin, write if last else (
                    lambda fd, b, piped=piped: piped.extend(b) if fd == 1 else write(fd, b)))
                stdin = bytes(piped)
            return int(self.status == 0) if n.parts[0].kind == "reservedword" else self.status  # `! cmd`
        if n.kind == "compound" and n.list[0].kind == "reservedword":  # ( list ) or { list; }
            saved, sub = (dict(self.state["env"]), self.state["cwd"]), n.list[0].word == "("
            try:
                for p in n.list[1:-1]:
                    self.status = await self.node(p, line, stdin, write)
            except _Exit as e:
                if not sub:
                    raise
                self.status = e.code
            if sub:
                self.state["env"], self.state["cwd"] = saved
            return self.status
        if n.kind == "compound":  # for, while, until, if
            return await self.node(n.list[0], line, stdin, write)
        write(2, f"fake sandbox: '{n.kind}' is not interpreted (no loops, conditionals or functions); "
                 "script the command with on()\n".encode())
        return 2

    async def expand(self, raw: str) -> str:
        """Quote removal; ~, $VAR, ${VAR}, $? and $(...); no globbing or word splitting."""
        out, i, dq = [], 0, False
        if raw == "~" or raw.startswith("~/"):
            raw = self.state["env"].get("HOME", "/root") + raw[1:]
        while i < len(raw):
            c = raw[i]
            if c == "'" and not dq:
                j = raw.find("'", i + 1) % (len(raw) + 1)
                out.append(raw[i + 1:j])
                i = j + 1
            elif c == '"':
                dq, i = not dq, i + 1
            elif c == "\\" and i + 1 < len(raw):
                out.append(raw[i:i + 2] if dq and raw[i + 1] not in '$`"\\' else raw[i + 1])
                i += 2
            elif c == "$" and raw[i + 1:i + 2] == "(":
                depth, j = 0, i + 1
                while j < len(raw) and (depth := depth + {"(": 1, ")": -1}.get(raw[j], 0)):
                    j += 1
                buf = bytearray()
                await self.run(raw[i + 2:j], b"", lambda fd, b, buf=buf: buf.extend(b) if fd == 1 else
                               self.out.write(fd, b))
                out.append(buf.decode(errors="replace").rstrip("\n"))
                i = j + 1
            elif c == "$" and (m := _PARAM.match(raw, i + 1)):
                name = m.group(1) or m.group(2)
                out.append(str(self.status) if name == "?" else self.state["env"].get(name, ""))
                i = m.end()
            else:
                out.append(c)
                i += 1
        return "".join(out)

    async def simple(self, n: Any, line: str, stdin: bytes, write: Write) -> int:
        argv, assigns, fs = [], {}, self.sb.fs
        for p in n.parts:
            if p.kind == "word":
                argv.append(await self.expand(line[p.pos[0]:p.pos[1]]))
            elif p.kind == "assignment":
                k, _, v = line[p.pos[0]:p.pos[1]].partition("=")
                assigns[k] = await self.expand(v)
        # where fd 1 and 2 end: an fd of `write`, "null", or (path, append)
        targets: dict[int, Any] = {1: 1, 2: 2}
        try:
            for r in (p for p in n.parts if p.kind == "redirect"):
                src = r.input if isinstance(r.input, int) else (0 if r.type == "<" else 1)
                if isinstance(r.output, int):  # 2>&1, >&2
                    targets[src] = targets[r.output]
                    continue
                path = fs.norm(await self.expand(line[r.output.pos[0]:r.output.pos[1]]), self.state["cwd"])
                if r.type == "<":
                    stdin = fs.read(path)
                    continue
                append = r.type in (">>", "&>>")
                if not append:
                    fs.write(path, b"")  # truncated on open, written to or not
                for fd in (1, 2) if r.type.startswith("&") or r.type == ">&" else (src,):
                    targets[fd] = "null" if path == "/dev/null" else (path, append)
        except FsError as e:
            write(2, f"bash: line 1: {e}\n".encode())
            return 1
        if not argv:
            self.state["env"].update(assigns)
            return 0
        reply = await self.program(argv, {**self.state["env"], **assigns}, stdin)
        for fd, data in ((1, reply.stdout), (2, reply.stderr)):
            t, data = targets[fd], _bytes(data)
            if isinstance(t, tuple):
                with contextlib.suppress(FsError):
                    fs.write(t[0], data, append=True)
            elif t != "null" and data:
                write(t, data)
        return reply.exit_code

    async def program(self, argv: list[str], env: dict[str, str], stdin: bytes) -> Reply:
        sb, name, cwd = self.sb, argv[0], self.state["cwd"]
        handler = sb.script.find(argv) or (sb._runtime.script.find(argv) if sb._runtime is not None else None)
        builtin = None if handler else getattr(self, "b_" + _ALIASES.get(name, name), None)
        if handler is None and builtin is None and ("/" not in name or not sb.fs.is_file(sb.fs.norm(name, cwd))):
            why = "No such file or directory" if "/" in name else "command not found"
            return Reply(127, b"", f"bash: line 1: {name}: {why}\n")
        proc = None
        if handler is not None or name not in SHELL_BUILTINS:
            if (proc := sb._spawn(argv, None, self.step, None, cwd, self.internal)) is None:
                return Reply(126, b"", f"bash: line 1: {name}: Operation not permitted\n")
            if not self.background:
                self.foreground.add(proc.pid)
        if handler is None and builtin is None:  # a file of the workspace: not executable (no modes here)
            return Reply(126, b"", f"bash: line 1: {name}: Permission denied\n")
        call = Call(argv, self.line, stdin, env, cwd, sb, self.step, proc)
        if builtin is not None:
            try:
                return _reply(await builtin(call))
            except FsError as e:
                return Reply(1, b"", f"{name}: {e}\n")
        reply = _reply(await r if isinstance(r := handler(call), Awaitable) else r)  # type: ignore[misc]
        for effect in reply.effects:
            if isinstance(effect, Exec) and self.background:
                effect.background = True
            if not call.cause(effect):
                what = "Operation not permitted" if isinstance(effect, Exec) else "Connection reset by peer"
                err = _bytes(reply.stderr) + f"{name}: {what}\n".encode()
                return Reply(126 if isinstance(effect, Exec) else 1, reply.stdout, err)
        return reply

    # built-ins: (call) -> what a handler returns; an FsError becomes "<name>: <message>", exit 1
    async def b_echo(self, c: Call) -> str:
        nl = c.argv[1:2] != ["-n"]
        return " ".join(c.argv[1 if nl else 2:]) + ("\n" if nl else "")

    async def b_printf(self, c: Call) -> str:
        args = list(c.argv[2:])
        fmt = (c.argv[1:2] or [""])[0].replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")
        return re.sub(r"%[sdi%]", lambda m: "%" if m.group() == "%%" else (args.pop(0) if args else ""), fmt)

    async def b_true(self, c: Call) -> int:
        return int(c.argv[0] == "false")

    async def b_pwd(self, c: Call) -> str:
        return self.state["cwd"] + "\n"

    async def b_cd(self, c: Call) -> Reply:
        p = c.path(c.argv[1] if len(c.argv) > 1 else c.env.get("HOME", "/root"))
        if not self.sb.fs.is_dir(p):
            return Reply(1, b"", f"bash: line 1: cd: {c.argv[1]}: No such file or directory\n")
        self.state["cwd"] = p
        return Reply()

    async def b_export(self, c: Call) -> int:
        self.state["env"].update(a.split("=", 1) for a in c.argv[1:] if "=" in a)  # type: ignore[misc]
        return 0

    async def b_exit(self, c: Call) -> int:
        raise _Exit(int(c.argv[1]) if c.argv[1:] and c.argv[1].lstrip("-").isdigit() else self.status)

    async def b_test(self, c: Call) -> int:
        a = c.argv[1:-1] if c.argv[0] == "[" else c.argv[1:]
        neg, fs = a[:1] == ["!"], self.sb.fs
        a = a[1:] if neg else a
        if len(a) == 2 and a[0] in ("-f", "-d", "-e", "-s", "-L", "-n", "-z"):
            p = c.path(a[1])
            ok = {"-f": fs.is_file(p), "-d": fs.is_dir(p), "-e": fs.is_file(p) or fs.is_dir(p),
                  "-s": bool(fs.files.get(p)), "-L": False, "-n": a[1] != "", "-z": a[1] == ""}[a[0]]
        elif len(a) == 3 and a[1] in ("=", "==", "!="):
            ok = (a[0] == a[2]) != (a[1] == "!=")
        elif len(a) <= 1:
            ok = bool(a and a[0])
        else:
            return 2
        return int(ok == neg)

    async def b_cat(self, c: Call) -> Reply:
        out, err = bytearray(), bytearray()
        for a in [a for a in c.argv[1:] if a != "--"] or ["-"]:
            try:
                out += c.stdin if a == "-" else self.sb.fs.read(c.path(a))
            except FsError as e:
                err += f"cat: {a}: {str(e).split(': ', 1)[1]}\n".encode()
        return Reply(int(bool(err)), bytes(out), bytes(err))

    async def b_ls(self, c: Call) -> Reply:
        hidden = any(a.startswith("-") and "a" in a.lower() for a in c.argv[1:])
        try:
            names = [a if n == c.path(a) else n for a in [a for a in c.argv[1:] if not a.startswith("-")] or ["."]
                     for n in self.sb.fs.listdir(c.path(a)) if hidden or not n.startswith(".")]
        except FsError as e:
            return Reply(2, b"", f"ls: {e}\n")
        return Reply(0, "".join(n + "\n" for n in names))

    async def b_mkdir(self, c: Call) -> int:
        for a in (a for a in c.argv[1:] if not a.startswith("-")):
            self.sb.fs.mkdir(c.path(a), parents="-p" in c.argv)
        return 0

    async def b_rm(self, c: Call) -> int:
        flags = "".join(a for a in c.argv[1:] if a.startswith("-"))
        for a in (a for a in c.argv[1:] if not a.startswith("-")):
            with contextlib.suppress(*((FsError,) if "f" in flags else ())):
                self.sb.fs.remove(c.path(a), recursive="r" in flags.lower())
        return 0

    async def b_head(self, c: Call) -> bytes:
        data = self.sb.fs.read(c.path(c.argv[-1])) if len(c.argv) in (2, 4) else c.stdin
        if "-c" in c.argv:
            return data[:int(c.argv[c.argv.index("-c") + 1])]
        n = int(c.argv[c.argv.index("-n") + 1]) if "-n" in c.argv else 10
        return b"".join(data.splitlines(keepends=True)[:n])

    async def b_dirname(self, c: Call) -> str:
        return (posixpath.dirname(c.argv[-1].rstrip("/")) or ".") + "\n"

    async def b_chmod(self, c: Call) -> int:
        self.sb.fs.read(c.path(c.argv[-1]))  # modes are not modelled: the file only has to exist
        return 0

    async def b_sleep(self, c: Call) -> int:
        if not self.background:  # a background sleep is left alive, not waited for
            await asyncio.sleep(float(c.argv[1]) if len(c.argv) > 1 else 0)
        return 0

    async def b_dd(self, c: Call) -> bytes:
        src = next((a[3:] for a in c.argv if a.startswith("if=")), None)
        return self.sb.fs.read(c.path(src)) if src else c.stdin

    async def b_nohup(self, c: Call) -> Reply:
        if c.process is not None:
            c.process.alive = False  # it execs the program it runs: one process, not two
        return await self.program(c.argv[1:], c.env, c.stdin)

    async def b_tar(self, c: Call) -> Reply:
        """`tar -c -C DIR .` writes a tar of DIR; `tar -x -C DIR` unpacks stdin's (files and directories)."""
        root, fs = c.path(c.argv[c.argv.index("-C") + 1]) if "-C" in c.argv else c.cwd, self.sb.fs
        if not any(a.startswith("-") and not a.startswith("--") and "c" in a for a in c.argv[1:]):
            with tarfile.open(fileobj=io.BytesIO(c.stdin)) as tar:
                for m in tar:
                    p = fs.norm(m.name, root)
                    fs.mkdir(p if m.isdir() else posixpath.dirname(p), parents=True)
                    if m.isfile():
                        fs.write(p, tar.extractfile(m).read())  # type: ignore[union-attr]
            return Reply()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for rel, data in [(".", None), *[("./" + r, d) for r, d in fs.tree(root)]]:
                info = tarfile.TarInfo(rel)
                info.type, info.mode = (tarfile.DIRTYPE, 0o755) if data is None else (tarfile.REGTYPE, 0o644)
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return Reply(0, buf.getvalue())

    async def b_bash(self, c: Call) -> Reply:
        """bash -c LINE, bash FILE or bash < script: run in a subshell of this one."""
        text = (c.argv[c.argv.index("-c") + 1] if "-c" in c.argv else
                self.sb.fs.read(c.path(c.argv[1])).decode() if len(c.argv) > 1 else c.stdin.decode())
        sub = _Shell(self.sb, {"env": dict(c.env), "cwd": c.cwd}, self.out, self.step, text, self.internal)
        sub.background, sub.foreground = self.background, self.foreground
        bufs: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        try:
            code = await sub.run(text, c.stdin, lambda fd, b: bufs[fd].extend(b))
        except _Exit as e:
            code = e.code
        return Reply(code, bytes(bufs[1]), bytes(bufs[2]))


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _reply(v: HandlerResult) -> Reply:
    if isinstance(v, Reply):
        return v
    if v is None or isinstance(v, int):
        return Reply(v or 0)
    return Reply(0, v) if isinstance(v, str | bytes) else Reply(*v)
