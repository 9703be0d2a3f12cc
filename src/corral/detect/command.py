"""Split a shell command line into the simple commands it would run (bashlex), so rules can judge
each program and its arguments before anything runs. A first line of defence only: the exec watcher
sees what actually runs."""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass, field

import bashlex


@dataclass
class SimpleCommand:
    argv: list[str]
    redirects: list[str] = field(default_factory=list)  # every redirect's file, read or written
    writes: list[str] = field(default_factory=list)  # the files it opens for writing (>, >>, &>, <>)


# redirect operators that open their file for writing; `>&` only when its word is a file, not a fd
_WRITE_OPS = {">", ">>", ">|", "&>", "&>>", "<>", ">&"}


SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}


def split(line: str) -> list[SimpleCommand]:
    """The simple commands of a command line, fresh objects each call. An agent repeats its command
    lines (`ls`, `pytest -q`, `git status`): their parse is kept (bounded), and copied out."""
    if len(line) > 4096:  # the cache holds short lines only: 1024 of them stay small
        return _split(line)
    return [SimpleCommand(list(c.argv), list(c.redirects), list(c.writes)) for c in _split_cached(line)]


@functools.lru_cache(maxsize=1024)
def _split_cached(line: str) -> tuple[SimpleCommand, ...]:
    return tuple(_split(line))


def _split(line: str, depth: int = 0) -> list[SimpleCommand]:
    try:
        trees = bashlex.parse(line)
    except Exception:  # bashlex does not know every bash construct: fall back to words
        return _fallback(line)
    out: list[SimpleCommand] = []

    class Visitor(bashlex.ast.nodevisitor):
        def visitcommand(self, node, parts):
            argv, redirects, writes = [], [], []
            for p in parts:
                if p.kind == "word":
                    argv.append(p.word)
                elif p.kind == "redirect" and hasattr(p.output, "word"):
                    redirects.append(p.output.word)
                    if p.type in _WRITE_OPS and not (p.type == ">&" and p.output.word.lstrip("-").isdigit()):
                        writes.append(p.output.word)
            if argv or redirects:
                out.append(SimpleCommand(argv, redirects, writes))

    for tree in trees:
        Visitor().visit(tree)
    nested: list[SimpleCommand] = []
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
