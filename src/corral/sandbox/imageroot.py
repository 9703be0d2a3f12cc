"""The root filesystem of a sandbox running an OCI image: the image's files, as the image owns them,
under a writable layer of its own. See docs/design-images.md for the design and what was measured.

- Each image sandbox gets a range of 65536 uids and gids (a slot, claimed by flock in the runtime's
  lock_dir so that runtimes on one machine never share one): root inside is uid B on the host, the
  image's uid k is B+k. Inside, root may chown, add users and install packages, within that range;
  on the host all of it is no one's.
- The image's unpacked files (owned on disk by the image store's storage range, corral/images) are
  shown through an idmapped mount as the sandbox's range, read-only; a tmpfs of the sandbox's
  `limits.tmp_mb` holds the writable layer; overlayfs joins them. All of it is mounted by the mount
  helper (sandbox/mounthelper.py) in a mount namespace of its own, which bubblewrap joins: nothing is
  mounted on the host, and nothing survives corral.
- A reset builds a fresh root: the writable layer is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from corral.config import ID_RANGE, IMAGE_SLOTS, IMAGE_UID_BASE, STORAGE_UID_BASE
from corral.errors import IsolationUnavailable
from corral.sandbox.agentrt import public_dir

CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# what root inside an image sandbox may do, all of it only to files and processes of its own uid range
# (the capabilities are its user namespace's): own and change files, switch among its users
IMAGE_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETUID", "CAP_SETGID",
              "CAP_SETFCAP", "CAP_KILL")


class ImageRootError(IsolationUnavailable):
    """An image sandbox's root could not be built; the message says why."""


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ImageRoots:
    """One runtime's image roots: uid slots, the mount helper, and each sandbox's root."""

    def __init__(self, lock_dir: Path, base: Path) -> None:
        self.lock_dir = lock_dir
        self.base = base  # where roots are built (in the helper's namespace; the directory is the host's)
        self._slots: dict[int, int] = {}  # a claimed range's first uid -> its slot's lock fd
        self._helper: subprocess.Popen[str] | None = None
        self._mnt_fd = -1
        self._lock = asyncio.Lock()

    # -- uid slots ------------------------------------------------------------------------------
    def claim(self) -> int:
        """A free slot's first uid (B), held until release(B). A sandbox's root is named by it too: it
        stays the same when a pooled sandbox is renamed."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(IMAGE_SLOTS):
            fd = os.open(self.lock_dir / f"image-uids-{slot:05d}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            uid = IMAGE_UID_BASE + slot * ID_RANGE
            self._slots[uid] = fd
            return uid
        raise ImageRootError(f"all {IMAGE_SLOTS} uid ranges for image sandboxes are in use on this machine")

    def release(self, uid: int) -> None:
        fd = self._slots.pop(uid, None)
        if fd is not None:
            os.close(fd)

    # -- the mount helper -----------------------------------------------------------------------
    def _request(self, **req: object) -> dict:
        if self._helper is None or self._helper.poll() is not None:
            self._start_helper()
        assert self._helper is not None and self._helper.stdin is not None and self._helper.stdout is not None
        self._helper.stdin.write(json.dumps(req) + "\n")
        self._helper.stdin.flush()
        line = self._helper.stdout.readline()
        if not line:
            raise ImageRootError("corral's mount helper exited; see the runtime's log")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ImageRootError(f"cannot build the image root: {reply.get('error')}")
        return reply

    def _start_helper(self) -> None:
        if shutil.which("unshare") is None:
            raise ImageRootError("unshare (util-linux) is needed to run images: apt-get install util-linux")
        public_dir(self.base)
        helper = Path(__file__).with_name("mounthelper.py")
        self._helper = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-I", "-S", str(helper)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
        if self._mnt_fd >= 0:
            os.close(self._mnt_fd)
        self._mnt_fd = -1
        # it answers only once it runs in its own namespace
        assert self._helper.stdin is not None and self._helper.stdout is not None
        self._helper.stdin.write(json.dumps({"op": "drop", "dir": str(self.base / ".probe")}) + "\n")
        self._helper.stdin.flush()
        if not self._helper.stdout.readline():
            raise ImageRootError("corral's mount helper did not start (is this machine's unshare usable?)")
        self._mnt_fd = os.open(f"/proc/{self._helper.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def mnt_fd(self) -> int:
        """The mount namespace bubblewrap joins (before it drops its privileges)."""
        return self._mnt_fd

    async def build(self, lower: Path, uid: int, size: int, name: str | None = None) -> Path:
        """A fresh root for the sandbox of range `uid` (its old one of that name, if any, dropped): the
        merged directory. `name` tells apart two roots of one sandbox (a spare for reset)."""
        d = self.base / (name or str(uid))
        async with self._lock:
            await asyncio.to_thread(self._request, op="drop", dir=str(d))
            reply = await asyncio.to_thread(self._request, op="root", dir=str(d), lower=str(lower), size=size,
                                            uid=uid, storage=STORAGE_UID_BASE, range=ID_RANGE)
        return Path(reply["merged"])

    async def drop(self, uid: int, name: str | None = None) -> None:
        async with self._lock:
            if self._helper is not None and self._helper.poll() is None:
                with contextlib.suppress(ImageRootError):
                    await asyncio.to_thread(self._request, op="drop", dir=str(self.base / (name or str(uid))))

    def close(self) -> None:
        for uid in list(self._slots):
            self.release(uid)
        if self._helper is not None:
            with contextlib.suppress(OSError):
                assert self._helper.stdin is not None
                self._helper.stdin.close()  # EOF: it exits, and its namespace and mounts go with it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._helper.wait(5)
            if self._helper.poll() is None:
                self._helper.kill()
                self._helper.wait()
            self._helper = None
        if self._mnt_fd >= 0:
            os.close(self._mnt_fd)
            self._mnt_fd = -1
        shutil.rmtree(self.base, ignore_errors=True)


def user_namespace(uid: int) -> int:
    """A user namespace that maps 0..ID_RANGE-1 inside to uid..uid+ID_RANGE-1 on the host, owned by
    `uid` (so bubblewrap, running as it, may enter it); returns an fd that keeps it alive."""

    def become() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if _libc.unshare(CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")

    try:
        holder = subprocess.Popen(["sleep", "30"], preexec_fn=become, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise ImageRootError(f"cannot make the sandbox's user namespace (uid {uid}): {e}; corral must run as "
                             "root on a kernel that allows user namespaces (see corral doctor)") from None
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{name}", "w") as f:
                f.write(f"0 {uid} {ID_RANGE}\n")
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageRootError(f"cannot make the sandbox's user namespace: {e}") from None
    finally:
        holder.kill()
        holder.wait()
