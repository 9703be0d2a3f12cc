"""Files in and out of a sandbox: through the agent, as the sandbox's user, so that no host-side
path trick (a symlink the agent planted) can apply."""

from __future__ import annotations

import asyncio
import io
import shlex
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from corral.errors import FileAccessError
from corral.sandbox import transfer

if TYPE_CHECKING:
    from corral.sandbox.sandbox import Sandbox


class Files:
    """Mixed into Sandbox (whose state it uses); kept apart because it is one job."""

    # -- files (through the agent, as the sandbox user: host symlink tricks cannot apply) -----------
    async def write_file(self: Sandbox, path: str, data: bytes | str, *, mode: int | None = None, as_step: bool = False,
                         tool_call_id: str | None = None) -> None:
        """Write a file inside the sandbox. `as_step=True` makes it one of the agent's steps (judged,
        attributed, its writes watched) rather than corral's own work.

        corral's own write (the default) is made by corral's agent itself: no component of `path`
        is followed through a symbolic link (FileAccessError instead), missing directories are
        created, and the file is written under a temporary name and renamed into place, so a link
        at `path` is replaced, never written through. An existing file keeps its mode unless `mode`
        is given (new files: 0644)."""
        if isinstance(data, str):
            data = data.encode()
        if not as_step:
            await transfer.put(self, [transfer.Entry(path, "file", data, mode)])
            return
        q = shlex.quote(path)
        chmod = f" && chmod {mode:o} -- {q}" if mode is not None else ""
        r = await self.exec(f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q}{chmod}", stdin=data,
                            _internal=not as_step, tool_call_id=tool_call_id)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot write {path} in sandbox {self.id}: {r.error or r.stderr.strip()}")

    async def read_file(self: Sandbox, path: str, *, max_bytes: int = 64 << 20, as_step: bool = False,
                        tool_call_id: str | None = None) -> bytes:
        r = await self.exec(f"cat -- {shlex.quote(path)}", max_output=max_bytes + 1, _internal=not as_step,
                            tool_call_id=tool_call_id)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot read {path} in sandbox {self.id}: {r.error or r.stderr.strip()}")
        if len(r.stdout_bytes) > max_bytes or r.stdout_truncated:
            raise FileAccessError(f"{path} is larger than max_bytes={max_bytes}; use download() or raise it")
        return r.stdout_bytes

    async def upload(self: Sandbox, src: str | Path, dest: str) -> None:
        """Copy a host file or directory into the sandbox (dest is a directory for directories),
        written by corral's agent as write_file() writes: links inside the sandbox are never
        followed; links in `src` are copied as links; modes are kept."""
        src = Path(src)
        if not src.exists():
            raise FileAccessError(f"{src} does not exist on the host")
        if src.is_file():
            await self.write_file(dest, src.read_bytes(), mode=src.stat().st_mode & 0o777)
            return
        await transfer.put(self, await asyncio.to_thread(transfer.tree, src, dest))

    async def download(self: Sandbox, src: str, dest: str | Path, *, max_bytes: int = 256 << 20) -> list[str]:
        """Copy a sandbox file or directory to the host. Members that would escape dest (absolute or
        outward symlinks, device nodes) are skipped and their names returned."""
        dest = Path(dest)
        q = shlex.quote(src)
        r = await self.exec(f"if [ -d {q} ]; then tar -c -C {q} .; else cat -- {q}; fi",
                            max_output=max_bytes + 1, _internal=True)
        if r.exit_code != 0:
            raise FileAccessError(f"cannot download {src}: {r.stderr.strip()}")
        if r.stdout_truncated:
            raise FileAccessError(f"{src} is larger than max_bytes={max_bytes}")
        data = r.stdout_bytes
        skipped: list[str] = []
        if tarfile.is_tarfile(io.BytesIO(data)) and len(data) % 512 == 0:
            dest.mkdir(parents=True, exist_ok=True)

            def safe(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                try:
                    return tarfile.data_filter(member, path)
                except tarfile.FilterError:
                    skipped.append(member.name)  # absolute/escaping links, devices: never extracted
                    return None

            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(dest, filter=safe)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return skipped
