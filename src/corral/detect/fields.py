"""The fields rules can name, each a function of one event."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

from corral.detect import codeshapes
from corral.detect.command import INTERPRETERS, SHELLS, peel, runs, split
from corral.detect.fetchrun import fetch_then_run
from corral.events import Event
from corral.protect import beside, command_cwds, normalize, touches


def _argv(e: Event) -> list[str]:
    return e.argv or []


# Multi-call binaries run the program their first argument names: `busybox nc ...` is nc.
MULTICALL = {"busybox", "toybox"}


def _applet(e: Event) -> int:
    """Where the program's own argv starts: 1 for `busybox APPLET ...`, else 0."""
    argv = _argv(e)
    return 1 if len(argv) > 1 and os.path.basename(argv[0]) in MULTICALL and not argv[1].startswith("-") else 0


def _cmdline(e: Event) -> str:
    """The process's command line; a shell's `-c` script as what it will run (cmd.runs): the text a
    script only prints or writes to a file is data, not the shell's command line."""
    argv = _argv(e)
    if os.path.basename(argv[0]) in SHELLS and "-c" in argv[1:-1]:
        i = argv.index("-c") + 1
        return " ".join([*argv[:i], runs(argv[i]), *argv[i + 1:]])
    return " ".join(argv)


def _code_else_cmdline(e: Event) -> str | None:
    """What the acting process runs: an interpreter or shell that reads its program from standard input
    (`python3 - <<EOF`, `node` fed by a pipe), or from a script the same step wrote (`cat > r.tcl <<EOF
    ... EOF; tclsh r.tcl`), runs code its command line does not show, so the step's text stands for it;
    any other process, its command line."""
    argv = _argv(e)
    if not argv:
        return runs(e.command) if e.command else None
    name = os.path.basename(argv[0])
    if e.command and (name in INTERPRETERS or name.startswith(("python", "perl", "ruby", "node", "tclsh", "php"))):
        args = [a for a in argv[1:] if not a.startswith("-")]
        code_on_line = any(a in ("-c", "-e", "-m", "-E", "--eval") for a in argv[1:])
        text = e.data.get("text") or e.command
        written_here = bool(args) and re.search(r"(>|\btee\s+(-a\s+)?)\s*[\x27\x22]?" + re.escape(args[0]), text)
        if not code_on_line and (not args or written_here):
            return _as_code(text)
    return _cmdline(e)


def _name(e: Event) -> str | None:
    if e.argv and _applet(e):
        return os.path.basename(e.argv[1])
    if e.data.get("comm"):
        return e.data["comm"]
    if e.argv:
        return os.path.basename(e.argv[0])
    return os.path.basename(e.exe) if e.exe else None


# Tools whose first non-option argument is a pattern or a program, not a file.
_PATTERN_FIRST = {"grep", "egrep", "fgrep", "rg", "ag", "ack", "sed", "awk", "gawk", "perl"}


def _file_args(e: Event) -> list[str]:
    """Arguments that name files: options dropped, and a grep/sed/awk pattern too."""
    argv = _argv(e)
    args = [a for a in argv[1:] if not a.startswith("-")]
    name = _name(e)
    if name in _PATTERN_FIRST and args and not any(a in ("-e", "-f", "--regexp", "--file") for a in argv[1:]):
        args = args[1:]
    return args


# Programs that put a file at their last argument (or at -t DIR), at every argument, or remove them.
_DEST_LAST = {"cp", "mv", "install", "ln", "rsync", "scp"}
_DEST_ALL = {"tee", "truncate", "touch", "mkfifo", "mknod"}
_REMOVERS = {"rm", "unlink", "rmdir", "shred"}
def _program(e: Event) -> tuple[str | None, list[str]]:
    """The program a command runs, and its arguments, wrappers peeled off."""
    argv = _argv(e)
    peeled = peel(argv)
    if not peeled:
        return None, []
    return (os.path.basename(peeled[0]) if peeled is not argv else _name(e)), peeled[1:]


def _write_words(e: Event) -> tuple[list[str], list[str]]:
    """(files the command writes, files it removes or moves away), as written on the command line:
    a pre-run check's output redirects, then what the program itself writes."""
    writes = list(e.data.get("writes", e.data.get("redirects")) or []) if str(e.kind) == "command" else []
    name, args = _program(e)
    if name == "git":  # git's own file commands: `git mv`, `git rm`, `git checkout REV -- f`, `git restore f`
        name, args = _git_command(args)
    files = [a for a in args if not a.startswith("-")]
    removed: list[str] = []
    if name in _DEST_ALL:
        writes += files
    elif name in _DEST_LAST:
        target = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-t", "--target-directory")), None)
        target = target or next((a.split("=", 1)[1] for a in args if a.startswith("--target-directory=")), None)
        sources = files if target else files[:-1]
        target = target or (files[-1] if files else None)
        if target:
            # the destination may be a directory: then each source lands inside it under its own name.
            # A plain `cp f DIR/` can only fill an existing directory, never make or replace it.
            into_only = name == "cp" and target.endswith("/") and not any(
                a in ("--recursive", "--archive") or (a[:1] == "-" and a[1:2] != "-" and set(a[1:]) & set("rRa"))
                for a in args)
            writes += ([] if into_only else [target]) + [
                f"{target.rstrip('/')}/{os.path.basename(s.rstrip('/'))}" for s in sources]
        if name in ("ln", "mv"):  # a link's target, a file moved away: both change what the path holds
            removed += files
    elif name == "dd":
        writes += [a[3:] for a in args if a.startswith("of=")]
    elif name in _REMOVERS:
        removed += files
    elif name == "sed" and any(a.startswith(("-i", "--in-place")) for a in args):
        writes += files[1:] if not any(a in ("-e", "-f", "--expression", "--file") for a in args) else files
    return writes, removed


# git's options that take the next word as their value, before its subcommand
_GIT_VALUE_OPTS = {"-C", "-c", "--git-dir", "--work-tree", "--namespace", "--exec-path", "--config-env"}
_HEAD = (None, "HEAD", "@")


def _git_command(args: list[str]) -> tuple[str | None, list[str]]:
    """A git command line as the file command it amounts to, for the paths it changes in the working
    tree: `git mv` (mv), `git rm` (rm; not with --cached), and `git checkout REV -- f` or `git restore
    --source=REV f` (tee: the files rewritten) when REV is another commit than HEAD (from HEAD or the
    index, a file is put back as committed)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in _GIT_VALUE_OPTS else 1
    if i >= len(args):
        return None, []
    sub, rest = args[i], args[i + 1:]
    opts = {a.split("=", 1)[0] for a in rest if a.startswith("-")}
    words = [a for j, a in enumerate(rest) if not a.startswith("-")
             and not (j and rest[j - 1] in ("-b", "-B", "--orphan", "-s", "--source", "-m", "--message"))]
    if sub == "mv":
        return "mv", words
    if sub == "rm":
        return (None, []) if "--cached" in opts else ("rm", words)
    if sub == "checkout":
        if "--" in rest:
            before = [a for a in rest[:rest.index("--")] if not a.startswith("-")]
            rev, paths = (before[0] if before else None), rest[rest.index("--") + 1:]
        else:
            rev, paths = (words[0], words[1:]) if len(words) > 1 else (None, [])
        return ("tee", paths) if rev not in _HEAD else (None, [])
    if sub == "restore":
        source = next((a.split("=", 1)[1] for a in rest if a.startswith("--source=")), None)
        source = source or next((rest[j + 1] for j, a in enumerate(rest[:-1]) if a in ("-s", "--source")), None)
        staged_only = opts & {"--staged", "-S"} and not opts & {"--worktree", "-W"}
        return ("tee", [w for w in words if w != source]) if source not in _HEAD and not staged_only else (None, [])
    return None, []


@functools.lru_cache(maxsize=8)
def _as_code(text: str) -> str:
    """Text with printf's and echo -e's line and tab escapes made what they print: code written with
    `printf 'import time\\ntime.x = ...'` reads as the lines it becomes (a `\\b` never sits after a
    literal `\\n`)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


DOCS = (".md", ".markdown", ".rst", ".txt", ".adoc", ".org")


def _writes_docs_only(e: Event) -> bool:
    """The whole command line writes files, and every one is a document (notes, a README): code quoted
    there is text for people, not a program anything imports."""
    if not e.command:
        return False
    written = []
    for simple in split(e.command):
        one = Event(kind=e.kind, action=e.action, sandbox_id=e.sandbox_id, argv=simple.argv,
                    data={"writes": simple.writes})
        written += _write_words(one)[0]
    return bool(written) and all(w.strip("'\"").lower().endswith(DOCS) for w in written)


def _cwds(e: Event) -> list[str]:
    return command_cwds(e.command, e.data.get("cwd") if str(e.kind) != "command" else None)


def _write_targets(e: Event) -> list[str]:
    writes, _ = _write_words(e)
    cwds = _cwds(e)
    return [p for w in writes for p in normalize(w, cwds)]


def _protected_targets(e: Event) -> list[str]:
    protected = e.data.get("protected") or ()
    if not protected:
        return []
    writes, removed = _write_words(e)
    return touches(writes + removed, protected, _cwds(e))


def _beside_protected(e: Event) -> list[str]:
    protected = e.data.get("protected") or ()
    if not protected:
        return []
    writes, _ = _write_words(e)  # removing the agent's own file beside the verifier's is nothing
    return beside(writes, protected, _cwds(e))


def _kill_targets(e: Event) -> list[str]:
    """The pids `kill` is asked to signal (its options and signal dropped): `kill -STOP 2` -> ['2']."""
    name, args = _program(e)
    if name != "kill":
        return []
    if args and args[0] in ("-s", "-n"):
        args = args[2:]
    elif args and args[0] in ("-l", "-L", "--list"):
        return []
    elif args and args[0].startswith("-") and args[0] != "--":
        args = args[1:]
    if args and args[0] == "--":
        args = args[1:]
    return args


FIELDS: dict[str, Callable[[Event], Any]] = {
    "evt.kind": lambda e: str(e.kind),
    "evt.action": lambda e: e.action,
    "evt.verdict": lambda e: str(e.verdict) if e.verdict else None,
    "evt.reason": lambda e: e.reason,
    "sandbox.id": lambda e: e.sandbox_id,
    "sandbox.gpu": lambda e: bool(e.data.get("gpu_granted")),
    "step": lambda e: e.step,
    # processes (exec events, and the process behind a connection or file change)
    "proc.pid": lambda e: e.pid,
    "proc.ppid": lambda e: e.ppid,
    "proc.name": _name,
    "proc.exe": lambda e: e.exe,
    "proc.exe_name": lambda e: os.path.basename(e.exe) if e.exe else None,
    "proc.argv0": lambda e: os.path.basename(_argv(e)[0]) if e.argv else None,
    "proc.args": lambda e: _argv(e)[1 + _applet(e):],
    "proc.argv": _argv,
    "proc.nargs": lambda e: len(_argv(e)),
    "proc.cmdline": lambda e: _cmdline(e) if e.argv else None,
    "proc.pname": lambda e: e.data.get("parent_name"),
    "proc.cwd": lambda e: e.data.get("cwd"),
    "proc.renamed_from": lambda e: e.data.get("renamed_from"),
    "proc.downloaded": lambda e: (e.data.get("downloaded") or {}).get("path"),  # run a file that was fetched
    "proc.downloaded_step": lambda e: (e.data.get("downloaded") or {}).get("step"),
    "proc.downloaded_by": lambda e: (e.data.get("downloaded") or {}).get("tool"),
    # how: downloader (a download tool), inline (an interpreter's one-liner), program (a script of the agent's)
    "proc.downloaded_via": lambda e: (e.data.get("downloaded") or {}).get("via"),
    "proc.file_args": lambda e: _file_args(e),
    "proc.comm": lambda e: e.data.get("task_comm"),  # the name it gives itself now (a CPU sample's)
    "proc.cpu_percent": lambda e: e.data.get("cpu_percent"),
    "proc.cpu_seconds": lambda e: e.data.get("cpu_seconds"),
    "proc.age": lambda e: e.data.get("age"),
    "proc.rss_mb": lambda e: e.data.get("rss_mb"),
    # a refused attempt's call (evt.action = syscall): mount, unshare, bpf, mknod_device, socket_packet, ...
    "proc.syscall": lambda e: e.data.get("syscall"),
    # a ptrace attach's target: its pid in the sandbox (1: corral's agent) and the program it runs
    "proc.ptrace_target": lambda e: e.data.get("target_pid"),
    "proc.ptrace_target_exe": lambda e: e.data.get("target_exe"),
    # a shell's exec: the TCP ports its parent (or it) listens on
    "proc.parent_listening": lambda e: e.data.get("parent_listening"),
    "proc.internal": lambda e: bool(e.data.get("internal")),  # an exec of corral's own commands (a task's setup)
    # an exec that is a protected task script's own file command, run as the task wrote it (taskfiles.py)
    "proc.task_step": lambda e: bool(e.data.get("task_script")),
    "proc.task_script": lambda e: e.data.get("task_script"),
    # the command lines writing the code a shell or interpreter reads through a pipe (codepipes.py)
    "proc.code_writers": lambda e: e.data.get("code_writers"),
    "proc.code_socket": lambda e: e.data.get("code_socket"),  # the peer a shell reads its code from
    "proc.feeds_code": lambda e: e.data.get("feeds_code"),  # on a connect or query: the shells it writes to
    # the command a step ran (the whole line as the agent gave it)
    "cmd.line": lambda e: e.command,
    # the whole line as typed, quoted data included, and any text the step gives it on standard input
    "cmd.text": lambda e: e.data.get("text") or e.command,
    "cmd.code": lambda e: _as_code(e.data.get("text") or e.command or ""),  # cmd.text, printf's \n as lines
    # what the shell will run: programs, arguments, real pipes and operators; not echo/printf's data,
    # here-documents written to files, or characters inside quoted words (detect/command.py)
    "cmd.runs": lambda e: runs(e.command) if e.command else None,
    # the acting process's command line where the event names one (a DNS query's, a connection's), else
    # what the step's command runs: a rule about what one process did, not its neighbours in the step
    "proc.cmdline_else_cmd": lambda e: _cmdline(e) if e.argv else (runs(e.command) if e.command else None),
    # the same, but for an interpreter reading its program from standard input or from a script the same
    # step wrote, the step's text (its code)
    "proc.code_else_cmd": _code_else_cmdline,
    # what that code does with a socket, read in linear time (detect/codeshapes.py)
    "proc.code_relay": lambda e: codeshapes.relay(_code_else_cmdline(e)),
    "proc.code_remote_shell": lambda e: codeshapes.remote_shell(_code_else_cmdline(e)),
    "cmd.redirects": lambda e: e.data.get("redirects") or [],
    "cmd.writes": lambda e: e.data.get("writes", e.data.get("redirects")) or [],  # output redirects only
    "cmd.writes_docs_only": _writes_docs_only,  # every file the whole line writes is a document
    # paths a download tool of the line fetches and a later command of it runs (detect/fetchrun.py)
    "cmd.fetch_then_run": lambda e: list(fetch_then_run(e.command)) if e.command else [],
    # files a command writes (its output redirects, tee's files, cp's destination, dd's of=), made
    # absolute (~ expanded, relative paths against its working directory)
    "proc.write_targets": _write_targets,
    # what a command writes, removes, moves or links that lies on a protected path of its sandbox
    "proc.protected_targets": _protected_targets,
    "proc.beside_protected": _beside_protected,  # new files beside the verifier's (protect.beside)
    "proc.kill_targets": _kill_targets,
    "sandbox.protected": lambda e: list(e.data.get("protected") or []),
    # network (connect events; dns events use dns.*)
    "net.dst_ip": lambda e: e.dst_ip,
    "net.dst_port": lambda e: e.dst_port,
    "net.name": lambda e: e.name,
    "net.protocol": lambda e: e.protocol,
    "net.method": lambda e: (e.data.get("sniff") or {}).get("method"),
    "net.http_path": lambda e: (e.data.get("sniff") or {}).get("path"),
    "net.user_agent": lambda e: (e.data.get("sniff") or {}).get("user_agent"),  # None: HTTP sent none
    "net.ja3": lambda e: (e.data.get("sniff") or {}).get("ja3"),  # a TLS client's JA3 fingerprint (md5)
    "net.bytes_up": lambda e: e.bytes_up,
    "net.resolved": lambda e: e.data.get("resolved") or [],
    "dns.name": lambda e: e.name if str(e.kind) == "dns" else None,
    "dns.qtype": lambda e: e.data.get("qtype"),
    # files
    "file.path": lambda e: e.data.get("path"),
    "file.op": lambda e: e.data.get("op"),
    "file.category": lambda e: e.data.get("category"),
    # a task script's own step removed a protected file, or wrote back what it held (monitor/taskfiles.py)
    "file.task_restore": lambda e: bool(e.data.get("task_restore")),
    # gpu
    "gpu.index": lambda e: e.data.get("gpu_index"),
    "gpu.util": lambda e: e.data.get("utilization"),
    "gpu.mem_mb": lambda e: e.data.get("used_memory_mb"),
    "gpu.in_granted_tree": lambda e: e.data.get("in_granted_tree"),
}

NAMES = set(FIELDS)


class _Values(dict):
    """An event's field values, each computed on first use (a hit is a plain dict lookup)."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __missing__(self, name: str) -> Any:
        value = self[name] = FIELDS[name](self.event)
        return value


def getter(e: Event) -> Callable[[str], Any]:
    return _Values(e).__getitem__
