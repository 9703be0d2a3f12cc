"""corral's own writes into a sandbox (write_file, upload), done by the in-sandbox agent itself.

The writer of such a file is the agent's own pid, so the file watcher knows the write is corral's
positively, and never has to guess from a process that has already gone. The agent walks each path
without following any symbolic link and renames a finished file into place, so a link the agent's
commands planted is replaced, never written through.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corral.errors import FileAccessError

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox

CHUNK = 48 * 1024  # a SEQPACKET message must fit the socket buffer


@dataclass
class Entry:
    path: str
    kind: str = "file"  # file | dir | symlink
    data: bytes = b""
    mode: int | None = None
    target: str | None = None


def tree(src: Path, dest: str) -> list[Entry]:
    """A host directory as entries under dest: directories first (top down), then files and links.
    Links are copied as links, never followed; other file types are left out."""
    dirs, rest = [Entry(dest, "dir")], []
    for root, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(root, src)
        base = dest.rstrip("/") + ("" if rel == "." else "/" + rel)
        for name in sorted(dirnames + filenames):
            host = os.path.join(root, name)
            path = f"{base}/{name}"
            st = os.lstat(host)
            if os.path.islink(host):
                rest.append(Entry(path, "symlink", target=os.readlink(host)))
            elif os.path.isdir(host):
                dirs.append(Entry(path, "dir", mode=st.st_mode & 0o777))
            elif os.path.isfile(host):
                rest.append(Entry(path, "file", Path(host).read_bytes(), st.st_mode & 0o777))
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(root, d))]
    return dirs + rest


async def put(sb: Sandbox, entries: list[Entry], timeout: float | None = None) -> None:
    """Write entries in order, all sent at once and awaited together; the first failure is raised
    as FileAccessError naming the path and the reason."""
    sb._check_open()
    cmds = []
    try:
        for e in entries:
            c = sb._register(0, 0, None)
            cmds.append((e, c))
            pieces = [e.data[i : i + CHUNK] for i in range(0, len(e.data), CHUNK)] or [b""]
            sb._send(op="put", id=c.id, path=e.path, kind=e.kind, mode=e.mode, target=e.target,
                     data=base64.b64encode(pieces[0]).decode(), eof=len(pieces) == 1)
            for i, piece in enumerate(pieces[1:], start=2):
                sb._send(op="put_data", id=c.id, data=base64.b64encode(piece).decode(), eof=i == len(pieces))
        limit = timeout if timeout is not None else sb.config.limits.timeout
        results = await asyncio.wait_for(asyncio.gather(*(asyncio.shield(c.future) for _, c in cmds)), limit)
    except TimeoutError:
        raise FileAccessError(f"writing {len(entries)} file(s) into sandbox {sb.id} did not finish in "
                              f"{limit:g}s") from None
    finally:
        for _, c in cmds:
            sb._cmds.pop(c.id, None)
    for (e, _), (code, error) in zip(cmds, results, strict=True):
        if code != 0:
            raise FileAccessError(f"cannot write {e.path} in sandbox {sb.id}: {error}")
