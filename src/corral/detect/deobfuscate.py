"""Words the shell computes from literals, written out before a command line is parsed for rules.

`$(printf '\\143\\165\\162\\154') -s URL | $(printf '\\163\\150')` runs `curl -s URL | sh`, and
`$'\\x63url'` is `curl`: escapes hide a program's name from every rule that reads the command
line, while the shell, given nothing but literals, computes the same words every time. So those
words are computed here as the shell would, and the command line is read with them in place:

- ANSI-C quoting, `$'...'`;
- a command substitution (`$(...)` or backquotes) whose command is `printf` with a literal format and
  no conversion, or `echo` of literal words (escapes read only with `-e`, as bash's echo does).

Only a substitution that stands as a whole word is replaced, so word splitting is kept: its output
becomes one quoted word, or plain words when it holds spaces between safe characters. Anything
else (a variable, a conversion, a quote or control character in the output) is left as written.
"""

from __future__ import annotations

import re

# a literal argument: single-quoted, double-quoted with nothing the shell would expand, or bare
_ARG = r"""(?:'[^']*'|"[^"\\$`]*(?:\\[^"\\$`][^"\\$`]*)*"|[^\s'"$`()|;&<>\\]+(?:\\[^\s][^\s'"$`()|;&<>\\]*)*)"""
_LITERAL_CALL = re.compile(rf"""(?x)
    (?P<pre>^|(?<=[\s;&|(]))
    (?:\$\(\s*(?P<cmd1>printf(?:\s+--)?|echo(?:\s+-[neE]+)*)\s+(?P<args1>{_ARG}(?:\s+{_ARG})*)\s*\)
      |`\s*(?P<cmd2>printf(?:\s+--)?|echo(?:\s+-[neE]+)*)\s+(?P<args2>{_ARG}(?:\s+{_ARG})*)\s*`)
    (?=$|[\s;&|)])""")
_ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'")
_ARGS = re.compile(_ARG)
_SAFE = re.compile(r"^[\w./:=@%+,~ -]+$")
_SIMPLE = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
           "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


def deobfuscate(line: str) -> str:
    """`line` with the words the shell computes from literals written out."""
    if "$'" not in line and "printf" not in line and "echo" not in line:
        return line
    line = _ANSI_C.sub(_ansi_c, line)
    return _LITERAL_CALL.sub(_literal_call, line)


def _ansi_c(m: re.Match[str]) -> str:
    text = _escapes(m.group(1), "ansi")
    return m.group(0) if text is None or "'" in text else f"'{text}'"


def _literal_call(m: re.Match[str]) -> str:
    cmd = m.group("cmd1") or m.group("cmd2")
    args = [_unquote(a) for a in _ARGS.findall(m.group("args1") or m.group("args2"))]
    if cmd.startswith("printf"):
        fmt = args[0]
        if len(args) != 1 or "%" in fmt.replace("%%", ""):
            return m.group(0)
        out = _escapes(fmt.replace("%%", "%"), "printf")
    else:
        out = " ".join(args)
        flags = "".join(re.findall(r"-([neE]+)", cmd))
        if flags.rfind("e") > flags.rfind("E"):  # -e reads escapes, a later -E stops that again
            out = _escapes(out, "echo")
    if out is None:
        return m.group(0)
    out = out.rstrip("\n")  # a substitution drops its output's trailing newlines
    if not out or "'" in out or any(c < " " for c in out):
        return m.group(0)
    if " " in out:
        return out if _SAFE.match(out) else m.group(0)
    return f"'{out}'"


def _unquote(arg: str) -> str:
    if arg[:1] == "'":
        return arg[1:-1]
    if arg[:1] == '"':
        return re.sub(r'\\([\\"$`])', r"\1", arg[1:-1])
    return re.sub(r"\\(.)", r"\1", arg)


def _escapes(text: str, mode: str) -> str | None:
    """Backslash escapes read as bash's printf (format), echo -e or $'...' reads them; None when
    the text holds one that is not understood here."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\" or i + 1 == len(text):
            out.append(c)
            i += 1
            continue
        n = text[i + 1]
        if n in "01234567" and (mode != "echo" or n == "0"):
            start = i + 2 if (mode == "echo") else i + 1
            digits = re.match(r"[0-7]{0,3}" if mode == "echo" else r"[0-7]{1,3}", text[start:]).group(0)
            out.append(chr(int(digits or "0", 8) & 0xFF))
            i = start + len(digits)
        elif n == "x":
            digits = re.match(r"[0-9a-fA-F]{1,2}", text[i + 2:])
            if digits is None:
                return None
            out.append(chr(int(digits.group(0), 16)))
            i += 2 + len(digits.group(0))
        elif n in "uU" and mode != "echo":
            digits = re.match(r"[0-9a-fA-F]{1,4}" if n == "u" else r"[0-9a-fA-F]{1,8}", text[i + 2:])
            if digits is None:
                return None
            out.append(chr(int(digits.group(0), 16)))
            i += 2 + len(digits.group(0))
        elif n in _SIMPLE and not (n in "'?" and mode == "echo"):
            out.append(_SIMPLE[n])
            i += 2
        else:
            return None  # \c, \N in echo, and what else bash reads its own way
    return "".join(out)
