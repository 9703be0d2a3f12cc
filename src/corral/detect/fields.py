"""The fields rules can name, each a function of one event."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from corral.events import Event


def _argv(e: Event) -> list[str]:
    return e.argv or []


def _name(e: Event) -> str | None:
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
    "proc.args": lambda e: _argv(e)[1:],
    "proc.argv": _argv,
    "proc.nargs": lambda e: len(_argv(e)),
    "proc.cmdline": lambda e: " ".join(_argv(e)) if e.argv else None,
    "proc.pname": lambda e: e.data.get("parent_name"),
    "proc.cwd": lambda e: e.data.get("cwd"),
    "proc.renamed_from": lambda e: e.data.get("renamed_from"),
    "proc.downloaded": lambda e: (e.data.get("downloaded") or {}).get("path"),  # run a file curl/wget wrote
    "proc.downloaded_step": lambda e: (e.data.get("downloaded") or {}).get("step"),
    "proc.file_args": lambda e: _file_args(e),
    "proc.cpu_percent": lambda e: e.data.get("cpu_percent"),
    "proc.cpu_seconds": lambda e: e.data.get("cpu_seconds"),
    "proc.age": lambda e: e.data.get("age"),
    "proc.rss_mb": lambda e: e.data.get("rss_mb"),
    # the command a step ran (the whole line as the agent gave it)
    "cmd.line": lambda e: e.command,
    "cmd.redirects": lambda e: e.data.get("redirects") or [],
    # network (connect events; dns events use dns.*)
    "net.dst_ip": lambda e: e.dst_ip,
    "net.dst_port": lambda e: e.dst_port,
    "net.name": lambda e: e.name,
    "net.protocol": lambda e: e.protocol,
    "net.method": lambda e: (e.data.get("sniff") or {}).get("method"),
    "net.http_path": lambda e: (e.data.get("sniff") or {}).get("path"),
    "net.bytes_up": lambda e: e.bytes_up,
    "net.resolved": lambda e: e.data.get("resolved") or [],
    "dns.name": lambda e: e.name if str(e.kind) == "dns" else None,
    "dns.qtype": lambda e: e.data.get("qtype"),
    # files
    "file.path": lambda e: e.data.get("path"),
    "file.op": lambda e: e.data.get("op"),
    "file.category": lambda e: e.data.get("category"),
    # gpu
    "gpu.index": lambda e: e.data.get("gpu_index"),
    "gpu.util": lambda e: e.data.get("utilization"),
    "gpu.mem_mb": lambda e: e.data.get("used_memory_mb"),
    "gpu.in_granted_tree": lambda e: e.data.get("in_granted_tree"),
}

NAMES = set(FIELDS)


def getter(e: Event) -> Callable[[str], Any]:
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = FIELDS[name](e)
        return cache[name]

    return get
