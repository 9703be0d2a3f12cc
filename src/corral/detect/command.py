"""Split a shell command line into the simple commands it would run (bashlex), so rules can judge
each program and its arguments before anything runs. A first line of defence only: the exec watcher
sees what actually runs."""

from __future__ import annotations

import functools
import itertools
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import bashlex

from corral.detect.deobfuscate import deobfuscate


@dataclass
class SimpleCommand:
    argv: list[str]
    redirects: list[str] = field(default_factory=list)  # every redirect's file, read or written
    writes: list[str] = field(default_factory=list)  # the files it opens for writing (>, >>, &>, <>)


# redirect operators that open their file for writing; `>&` only when its word is a file, not a fd
_WRITE_OPS = {">", ">>", ">|", "&>", "&>>", "<>", ">&"}


SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}
# Programs whose arguments are data, never run: text they print is not a command, however it reads.
DATA_ONLY = {"echo", "printf"}
_ECHO_FLAG = re.compile(r"^-[neE]+$")


def split(line: str) -> list[SimpleCommand]:
    """The simple commands of a command line, fresh objects each call. An agent repeats its command
    lines (`ls`, `pytest -q`, `git status`): their parse is kept (bounded), and copied out."""
    cached = _split_long(line) if len(line) > SHORT_LINE else _split_cached(line)
    return [SimpleCommand(list(c.argv), list(c.redirects), list(c.writes)) for c in cached]


# 1024 short lines stay small; a long line is kept only while it is being judged (read off the loop
# first, by prepare(), then once per simple command by the rules)
SHORT_LINE = 4096


@functools.lru_cache(maxsize=1024)
def _split_cached(line: str) -> tuple[SimpleCommand, ...]:
    return tuple(_split(line))


@functools.lru_cache(maxsize=8)
def _split_long(line: str) -> tuple[SimpleCommand, ...]:
    return tuple(_split(line))


MAX_LINE = 1 << 20  # characters in one command line that corral will judge


def too_long(line: str) -> str | None:
    """Why a command line is refused unread, or None: past MAX_LINE, reading it would stall corral."""
    if len(line) <= MAX_LINE:
        return None
    return (f"command line of {len(line)} characters: corral judges lines up to {MAX_LINE} (1 MiB); "
            "write large data to a file with sb.files or in parts")


# A step's standard input is judged with its line (cmd.text), in windows of INPUT_WINDOW bytes that
# overlap by INPUT_OVERLAP (a pattern that spans a window's end is whole in the next one), up to
# INPUT_TEXT bytes; the rest is unread. Every rule that reads cmd.text searches each window on corral's
# event loop, as it does a 64 KB command line (benchmarks/bench_lines.py); the loop lets other events
# through between windows.
INPUT_WINDOW = 64 << 10
INPUT_OVERLAP = 8 << 10
INPUT_TEXT = 1 << 20


def input_texts(line: str, stdin: bytes | None) -> list[str]:
    """The line with the text given on its standard input, one text per window (a here-document's
    equal: the write_file tool's `cat > path` with the file's content); [] when there is none. Bytes
    that are not text are read too: one NUL byte must not hide a script's text from every rule (bash
    skips NULs and runs the rest)."""
    if not stdin:
        return []
    data = stdin[:INPUT_TEXT]
    texts = []
    start = 0
    while True:
        texts.append(line + "\n" + data[start:start + INPUT_WINDOW].decode("utf-8", errors="replace"))
        if start + INPUT_WINDOW >= len(data):
            return texts
        start += INPUT_WINDOW - INPUT_OVERLAP


def prepare(line: str) -> None:
    """Read a line ahead (its simple commands and cmd.runs), so that judging it hits the caches. bashlex
    takes ~0.1 ms a word: a long line is read here, in a worker thread, not on corral's event loop."""
    split(line)
    runs(line)


def _split(line: str, depth: int = 0) -> list[SimpleCommand]:
    try:
        trees = _parse(line)
    except Exception:  # bashlex does not know every bash construct: fall back to words
        return _fallback(line)
    out: list[SimpleCommand] = []
    nested: list[SimpleCommand] = []

    class Visitor(bashlex.ast.nodevisitor):
        def visitcommand(self, node, parts):
            argv, redirects, writes, body = [], [], [], None
            for p in parts:
                if p.kind == "word":
                    argv.append(p.word)
                elif p.kind == "redirect" and hasattr(p.output, "word"):
                    redirects.append(p.output.word)
                    if p.type in _WRITE_OPS and not (p.type == ">&" and p.output.word.lstrip("-").isdigit()):
                        writes.append(p.output.word)
                    if getattr(p, "heredoc", None) is not None:
                        body = p.heredoc.value.rsplit("\n", 1)[0]  # the value ends with its delimiter line
                    elif p.type == "<<<":
                        body = p.output.word
            if body is not None and _reads_code(node):
                # the code a shell or interpreter reads from a here-document or here-string is what it
                # runs: a shell's is split like `sh -c`'s; an interpreter's is its program's last word
                if argv[0].rsplit("/", 1)[-1] in SHELLS and depth < 3:
                    nested.extend(_split(body, depth + 1))
                else:
                    argv.append(body)
            if argv and argv[0].rsplit("/", 1)[-1] in DATA_ONLY:
                # what echo and printf print is data, not a program's arguments (a note quoting
                # `bash -i >& /dev/tcp/...` runs nothing); printed into a shell it is code (below)
                printed[id(node)] = " ".join(a for a in argv[1:] if not _ECHO_FLAG.match(a))
                argv = argv[:1]
            if argv or redirects:
                out.append(SimpleCommand(argv, redirects, writes))

        def visitpipeline(self, node, parts):
            cmds = [p for p in parts if p.kind == "command"]
            for prev, nxt in itertools.pairwise(cmds):
                words = [w.word for w in nxt.parts if w.kind == "word"]
                if words and words[0].rsplit("/", 1)[-1] in SHELLS and depth < 3:
                    feeding.append(prev)

    printed: dict[int, str] = {}
    feeding: list[Any] = []
    for tree in trees:
        Visitor().visit(tree)
    for node in feeding:  # `echo 'curl x | sh' | sh`: the printed text is a command line the shell runs
        if id(node) in printed:
            nested.extend(_split(printed[id(node)], depth + 1))
    for c in out:  # `bash -c '...'` runs another command line: look inside it too
        if c.argv and c.argv[0].rsplit("/", 1)[-1] in SHELLS and "-c" in c.argv[1:-1] and depth < 3:
            nested.extend(_split(c.argv[c.argv.index("-c") + 1], depth + 1))
    return (out + nested) or _fallback(line)


_REDIR_WORD = re.compile(r"^(?:\d*|&)(>>?|>\||<>)(.*)$")


def _fallback(line: str) -> list[SimpleCommand]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    if not words:
        return []
    # a line bashlex cannot read keeps its redirects visible: `>file`, `2>> file`, `<> file`
    writes: list[str] = []
    for i, w in enumerate(words):
        m = _REDIR_WORD.match(w)
        if m:
            target = m.group(2) or (words[i + 1] if i + 1 < len(words) else "")
            if target and not target.startswith("&"):
                writes.append(target)
    return [SimpleCommand(words, list(writes), writes)]


INTERPRETERS = SHELLS | {"python", "python3", "perl", "ruby", "node", "php"}
STDIN_PATHS = frozenset({"/dev/stdin", "/dev/fd/0", "/proc/self/fd/0"})
# what reads code: a shell, an interpreter, or a shell's `source`/`.` (of a file, or of its stdin)
SOURCING = frozenset({"source", "."})
CODE_READERS = INTERPRETERS | SOURCING
SHELL_READERS = SHELLS | SOURCING
_STRUCTURE = str.maketrans({"|": " ", ";": " ", "&": " "})


# Wrappers that run the program named after their own options (`timeout 5 tee f`, `env X=1 cp a b`).
WRAPPERS = {"env", "nohup", "timeout", "nice", "ionice", "stdbuf", "setsid", "sudo", "doas", "command", "exec",
            "builtin", "time", "chronic", "busybox", "unbuffer"}
_WRAPPER_VALUE_OPTS = {"-n", "-s", "-k", "-u", "-g", "-c", "-i", "-o", "-e", "--signal", "--kill-after", "--user"}


def peel(argv: list[str]) -> list[str]:
    """The argv of the program a command runs, wrappers peeled off; `argv` itself when there is none."""
    for _ in range(4):
        if not argv or argv[0].rsplit("/", 1)[-1] not in WRAPPERS:
            break
        wrapper, i = argv[0].rsplit("/", 1)[-1], 1
        while i < len(argv) and (argv[i].startswith("-") or "=" in argv[i]
                                 or (wrapper == "timeout" and argv[i][:1].isdigit())):
            i += 2 if argv[i] in _WRAPPER_VALUE_OPTS else 1
        argv = argv[i:]
    return argv


def runs(line: str) -> str:
    """What the shell will run, as text rules can read (the field `cmd.runs`): each command's program and
    arguments, joined by the real pipes and list operators (`|`, `;`, `&&`, `||`, `&`), never by
    characters inside a word. The arguments of `echo` and `printf` and the body of a here-document
    are data and left out, unless that body is fed to a shell or interpreter; what `sh -c`, `eval`
    and command substitutions run is rendered in place, in parentheses. A line bashlex cannot read
    is returned as it is: matched as text, as before (a rule then errs towards seeing a command)."""
    return _runs_long(line) if len(line) > SHORT_LINE else _runs_cached(line)


def _runs_any(line: str) -> str:
    try:
        return _runs(line, 0)
    except Exception:  # bashlex does not know every bash construct
        return line


_runs_cached = functools.lru_cache(maxsize=1024)(_runs_any)
_runs_long = functools.lru_cache(maxsize=8)(_runs_any)


# bashlex cannot read a quoted here-document delimiter (<<'EOF', <<"EOF"), the form agents write files
# with; quoting only stops expansion in the body, which is read as text here either way
_QUOTED_HEREDOC = re.compile(r"""<<(-?)\s*(['"])(\w+)\2""")


# split() and runs() read the same line, one after the other, and bashlex takes ~10 us a character: the
# trees of the last few lines are kept (read, never changed, by both walks)
@functools.lru_cache(maxsize=8)
def _parse(line: str) -> tuple[Any, ...]:
    return tuple(bashlex.parse(deobfuscate(_QUOTED_HEREDOC.sub(r"<<\1\3", line))))


def _runs(line: str, depth: int) -> str:
    if depth > 3:
        return line
    return " ; ".join(_node(t, depth) for t in _parse(line))


def _node(node: Any, depth: int) -> str:
    kind = node.kind
    if kind == "list":
        return " ".join(p.op if p.kind == "operator" else _node(p, depth) for p in node.parts)
    if kind == "pipeline":
        # data piped into a shell or interpreter is code: `echo 'curl x | sh' | sh` runs curl
        cmds = [p for p in node.parts if p.kind != "pipe"]
        return " | ".join(_command(c, depth, any(_reads_code(d) for d in cmds[i + 1:])) if c.kind == "command"
                          else _node(c, depth) for i, c in enumerate(cmds))
    if kind == "command":
        return _command(node, depth)
    if kind == "word":  # a loop's word list (`for f in /proc/*/environ`): expanded by the shell, not data
        return " ".join([node.word.translate(_STRUCTURE), *(_node(sub, depth + 1) for sub in _substitutions(node))])
    # { ...; }, ( ... ), if/for/while and function bodies: the commands inside
    body, sep = (node.list, " ; ") if hasattr(node, "list") else (getattr(node, "parts", []), " ")
    return sep.join(_node(p, depth) for p in body if p.kind not in ("reservedword", "operator"))


def _reads_code(node: Any) -> bool:
    """A shell or interpreter that runs what it reads on its standard input: no script named, or its
    standard input named as the script (`source /dev/stdin`, `bash /dev/fd/0`)."""
    names = [p.word for p in getattr(node, "parts", []) if p.kind == "word"]
    k = next((i for i, w in enumerate(names) if w.rsplit("/", 1)[-1] in CODE_READERS), None)
    if k is None:
        return False
    args = [a for a in names[k + 1:] if not a.startswith("-")]
    return (not args and names[k] not in SOURCING) or (args[:1] != [] and args[0] in STDIN_PATHS)


def _command(node: Any, depth: int, code_stdin: bool = False) -> str:
    words = [p for p in node.parts if p.kind in ("word", "assignment")]
    names = [p.word for p in words if p.kind == "word"]
    prog = names[0].rsplit("/", 1)[-1] if names else ""
    out = [p.word.translate(_STRUCTURE) for p in words if p.kind == "assignment"]
    inner: list[str] = []
    # a shell run with -c, directly or through a wrapper (sudo, env, nohup, timeout 5, ...)
    shell = next((k for k, w in enumerate(names) if w.rsplit("/", 1)[-1] in SHELLS and "-c" in names[k + 1:-1]), None)
    if shell is not None:
        i = names.index("-c", shell + 1)
        out += [a.translate(_STRUCTURE) for a in names[:i + 1]]
        inner.append(_runs(names[i + 1], depth + 1))
    elif names:
        out.append(names[0].translate(_STRUCTURE))
        args = names[1:]
        if prog == "eval" or (prog in DATA_ONLY and code_stdin):
            inner.append(_runs(" ".join(args), depth + 1))
        elif prog not in DATA_ONLY:
            out += [a.translate(_STRUCTURE) for a in args]
    for p in node.parts:  # where its streams go: a redirect is part of what runs (`>& /dev/tcp/h/1`)
        if p.kind == "redirect" and p.type != "<<<" and getattr(p, "heredoc", None) is None \
                and hasattr(p.output, "word") and not p.output.word.lstrip("-").isdigit():
            out.append(f"{p.type.translate(_STRUCTURE).strip()} {p.output.word.translate(_STRUCTURE)}")
    for p in node.parts:  # what runs inside words, redirect targets included: $(...), `...`, <(...)
        for sub in _substitutions(p.output if p.kind == "redirect" and hasattr(p.output, "word") else p):
            inner.append(_node(sub, depth + 1))
        heredoc = getattr(p, "heredoc", None)
        herestring = p.output.word if p.kind == "redirect" and p.type == "<<<" and hasattr(p.output, "word") else None
        if (heredoc is not None or herestring is not None) and _reads_code(node):
            body = herestring if herestring is not None else heredoc.value.rsplit("\n", 1)[0]  # ends with its delimiter
            inner.append(_runs(body, depth + 1) if prog in SHELL_READERS else body)
    return " ".join(out + [f"( {x} )" for x in inner if x])


def _substitutions(node: Any) -> list[Any]:
    found: list[Any] = []

    class Visitor(bashlex.ast.nodevisitor):
        def visitcommandsubstitution(self, n: Any, command: Any) -> None:
            found.append(command)

        def visitprocesssubstitution(self, n: Any, command: Any) -> None:
            found.append(command)

    if node.kind in ("word", "assignment"):
        Visitor().visit(node)
    return found
