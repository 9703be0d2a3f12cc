"""corral's mount helper: a root process in a mount namespace of its own (started under
`unshare --mount --propagation private`), where the roots of image sandboxes are built. Nothing it
mounts is seen on the host, and all of it goes when it exits (with corral: it reads its requests from
a pipe, and ends at EOF). Run as a script; one JSON request per line in, one JSON reply per line out.

    {"op": "root", "dir": D, "lower": L, "size": BYTES, "uid": B, "storage": S, "range": N}
        the image's files (L, owned S..S+N-1 on disk) seen as B..B+N-1 through an idmapped mount at
        D/lower, a tmpfs of BYTES at D/rw for the writable layer, and overlayfs at D/merged
    {"op": "drop", "dir": D}        unmounts all three and removes D
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 0x1000, 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NODEV, MOUNT_ATTR_IDMAP = 0x1, 0x4, 0x00100000
MS_NODEV, MNT_DETACH = 0x4, 0x2
CLONE_NEWUSER = 0x10000000


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(r: int, what: str) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


def mount(src: str, dst: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    _check(libc.mount(src.encode(), dst.encode(), fstype.encode(), ctypes.c_ulong(flags),
                      data.encode() if data else None), f"mount {fstype} at {dst}")


def _mapping_userns(inside: int, outside: int, count: int) -> tuple[int, int]:
    """A user namespace that maps `inside` -> `outside` (count ids): the idmapping of a mount."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper is single-threaded: forking is safe
        try:
            os.close(r)
            _check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
            os.write(w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        if os.read(r, 1) != b"x":
            raise OSError("the user namespace for the idmapping could not be made")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"{inside} {outside} {count}\n")
        return pid, os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(r)


def idmapped_bind(src: str, dst: str, inside: int, outside: int, count: int) -> None:
    pid, ns = _mapping_userns(inside, outside, count)
    try:
        fd = _check(libc.syscall(SYS_OPEN_TREE, -100, src.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
                    f"open_tree {src}")
        try:
            attr = MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV, 0, 0, ns)
            _check(libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                                ctypes.sizeof(attr)), "mount_setattr (idmapped mounts need Linux 5.12+)")
            _check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", -100, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                   f"move_mount to {dst}")
        finally:
            os.close(fd)
    finally:
        os.close(ns)
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def root(d: str, lower: str, size: int, uid: int, storage: int, count: int) -> dict:
    for sub in ("lower", "rw", "merged"):
        os.makedirs(f"{d}/{sub}", mode=0o755, exist_ok=True)
    os.chmod(d, 0o755)
    idmapped_bind(lower, f"{d}/lower", storage, uid, count)
    mount("tmpfs", f"{d}/rw", "tmpfs", MS_NODEV, f"size={size},mode=0755")
    for sub in ("upper", "work"):
        os.mkdir(f"{d}/rw/{sub}", 0o755)
    # the merged root takes its owner and mode from the upper dir: the image's root is the sandbox's
    st = os.stat(f"{d}/lower")
    os.chown(f"{d}/rw/upper", st.st_uid, st.st_gid)
    os.chmod(f"{d}/rw/upper", st.st_mode & 0o7777)
    mount("overlay", f"{d}/merged", "overlay", MS_NODEV,
          f"lowerdir={d}/lower,upperdir={d}/rw/upper,workdir={d}/rw/work")
    _real_mount_points(f"{d}/merged", uid)
    return {"merged": f"{d}/merged"}


# where bubblewrap mounts over the image's root: (path, is a directory); the last two are
# deployment.NATIVE_PATH and AGENT_PATH
# (this script runs on its own, without corral's modules)
MOUNT_POINTS = (("etc", True), ("etc/resolv.conf", False), ("etc/hosts", False), ("dev", True), ("proc", True),
                ("workspace", True), (".corral", True), (".corral-agent", False), (".corral-agent.py", False))


def _real_mount_points(root: str, uid: int) -> None:
    """bubblewrap follows a symlink where it mounts: an image whose /etc or /workspace is a link to
    /oldroot/... would have it create files on the host. Each mount point becomes a real directory or
    file in the writable layer (the image's link replaced), never followed."""
    for rel, is_dir in MOUNT_POINTS:
        p = f"{root}/{rel}"
        if os.path.islink(p) or (os.path.lexists(p) and os.path.isdir(p) != is_dir):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        if not os.path.lexists(p):
            if is_dir:
                os.mkdir(p, 0o755)
            else:
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
            os.lchown(p, uid, uid)  # the sandbox's root's, as if the image had it


def drop(d: str) -> dict:
    for sub in ("merged", "rw", "lower"):
        libc.umount2(f"{d}/{sub}".encode(), MNT_DETACH)  # one already gone is no error
    shutil.rmtree(d, ignore_errors=True)
    return {}


def main() -> int:
    for line in sys.stdin:
        try:
            req = json.loads(line)
            op = req.pop("op")
            if op == "root":
                out = root(req["dir"], req["lower"], int(req["size"]), int(req["uid"]), int(req["storage"]),
                           int(req["range"]))
            elif op == "drop":
                out = drop(req["dir"])
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **out}
        except Exception as e:  # the reply names it; corral refuses the sandbox's start
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
