"""What a process's code does with a socket, read in linear time: rules run these over a step's whole
text (a here-document fed to an interpreter, up to a MiB), on an event a sandbox can cause at will (a
refused name), so a pattern that backtracks (`a.{0,4000}?b.{0,4000}?c`) would hold corral's loop for
seconds per event. Each shape is a few independent searches, each one pass over the text."""

from __future__ import annotations

import itertools
import re

_SELECT = re.compile(r"\bselect\.(select|poll|epoll)\b")
_CONNECT = re.compile(r"create_connection|\.connect\s*\(")
_ACCEPT = re.compile(r"\.accept\s*\(")
_PIPE = re.compile(r"\b(\w+)\.pipe\(\s*(\w+)\s*\)")
_GO_COPY = re.compile(r"\bio\.Copy\(")
_NET = re.compile(r"\b(socket|net\.(connect|createConnection|Socket)|WebSocket|wss?://)\b")
_SHELL = re.compile(
    r"\bexecSync\s*\(|\bchild_process\b[^\n]{0,400}?\bexec\s*\(|\bos\.(system|popen)\s*\("
    r"|\bsubprocess\.(getoutput|getstatusoutput)\s*\(|\bsubprocess\.\w+\s*\([^)]{0,300}\bshell\s*=\s*True"
    r"|\bdup2\s*\(|\bpty\.spawn\s*\(|\bstdin\s*=\s*\w+[^)]{0,200}?\bstdout\s*="
    r"|[\x27\x22](/bin/)?(ba|da|z)?sh[\x27\x22]\s*,\s*[\x27\x22]-i[\x27\x22]|\bcode\.interact\b")


def _at_least(rx: re.Pattern[str], text: str, n: int) -> bool:
    return sum(1 for _ in itertools.islice(rx.finditer(text), n)) >= n


def relay(text: str | None) -> bool:
    """Code that joins two connections and copies between them: a select loop with a second connection
    opened (or one accepted), Tcl's fcopy between sockets, node's a.pipe(b) and b.pipe(a), Go's two
    io.Copy, perl's IO::Select over IO::Socket::INET."""
    if not text:
        return False
    if _SELECT.search(text) and (_at_least(_CONNECT, text, 2) or (_CONNECT.search(text) and _ACCEPT.search(text))):
        return True
    if re.search(r"\bsocket\s", text) and re.search(r"\bfcopy\s", text):
        return True
    if "IO::Select" in text and "IO::Socket::INET" in text:
        return True
    if _at_least(_GO_COPY, text, 2):
        return True
    pairs = {(m.group(1), m.group(2)) for m in _PIPE.finditer(text)}
    return any((b, a) in pairs for a, b in pairs)


def remote_shell(text: str | None) -> bool:
    """Code that gives a shell or an interpreter's prompt a socket (dup2 of it, pty.spawn, a shell
    spawned with it as its standard streams, `sh -i`, code.interact), or runs what arrives on a
    connection through a shell (execSync, os.system, subprocess with shell=True): a command loop."""
    return bool(text) and bool(_NET.search(text)) and bool(_SHELL.search(text))
