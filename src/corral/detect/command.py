"""Split a shell command line into the simple commands it would run (bashlex), so rules can judge
each program and its arguments before anything runs. A first line of defence only: the exec watcher
sees what actually runs."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import bashlex


@dataclass
class SimpleCommand:
    argv: list[str]
    redirects: list[str] = field(default_factory=list)


SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}


def split(line: str, depth: int = 0) -> list[SimpleCommand]:
    try:
        trees = bashlex.parse(line)
    except Exception:  # bashlex does not know every bash construct: fall back to words
        return _fallback(line)
    out: list[SimpleCommand] = []

    class Visitor(bashlex.ast.nodevisitor):
        def visitcommand(self, node, parts):
            argv, redirects = [], []
            for p in parts:
                if p.kind == "word":
                    argv.append(p.word)
                elif p.kind == "redirect" and hasattr(p.output, "word"):
                    redirects.append(p.output.word)
            if argv or redirects:
                out.append(SimpleCommand(argv, redirects))

    for tree in trees:
        Visitor().visit(tree)
    nested: list[SimpleCommand] = []
    for c in out:  # `bash -c '...'` runs another command line: look inside it too
        if c.argv and c.argv[0].rsplit("/", 1)[-1] in SHELLS and "-c" in c.argv[1:-1] and depth < 3:
            nested.extend(split(c.argv[c.argv.index("-c") + 1], depth + 1))
    return (out + nested) or _fallback(line)


def _fallback(line: str) -> list[SimpleCommand]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    return [SimpleCommand(words)] if words else []
