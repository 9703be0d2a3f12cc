"""A sandbox config with its image resolved: the image's root, Env, WorkingDir and User, and a shell
the image has."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from corral.config import ID_RANGE, SandboxConfig
from corral.errors import ConfigError
from corral.images.store import ImageError, ImageStore


async def resolve_image(config: SandboxConfig, store: ImageStore) -> SandboxConfig:
    """`config` on its image (pulled into `store` when missing); as it is without one."""
    if config.image is None or config.rootfs is not None:
        return config
    if config.host_paths:
        raise ConfigError("host_paths cannot be combined with an image: an image sandbox sees only its "
                          "image; copy what it needs in with upload() or a workspace_template")
    img = await store.ensure(config.image)
    shell = config.shell
    if not os.path.lexists(img.rootfs / shell.lstrip("/")):
        shell = "/bin/sh"  # an image without bash (busybox, alpine)
    env = {**dict(img.env), **dict(config.env)}  # the image's Env, then the caller's
    workdir = img.workdir if img.workdir and config.workdir == "/workspace" else config.workdir
    run_as = config.run_as
    if run_as is None and img.user:
        run_as, home = resolve_user(img.rootfs, img.user)
        if home and "HOME" not in dict(config.env):
            env["HOME"] = home
    return config.model_copy(update={"rootfs": img.rootfs, "env": tuple(sorted(env.items())), "shell": shell,
                                     "workdir": workdir, "run_as": run_as})


def resolve_user(rootfs: Path, user: str) -> tuple[str | None, str | None]:
    """An image's User ("name", "uid", "name:group", "uid:gid") as ("uid:gid", home) by the image's
    /etc/passwd and /etc/group; (None, None) for root. An unknown name is an ImageError."""
    name, _, group = user.partition(":")

    def table(path: str) -> list[list[str]]:
        with contextlib.suppress(OSError):
            return [line.split(":") for line in (rootfs / path).read_text(errors="replace").splitlines()
                    if line and not line.startswith("#")]
        return []

    passwd = table("etc/passwd")
    entry = next((e for e in passwd if len(e) > 5 and (e[0] == name or e[2] == name)), None)
    if name.isdigit():
        uid, gid, home = int(name), int(entry[3]) if entry else int(name), entry[5] if entry else None
    elif entry is not None:
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    else:
        raise ImageError(f"the image's User {user!r} is not in its /etc/passwd; give a uid, or run as root")
    if group:
        g = next((e for e in table("etc/group") if len(e) > 2 and (e[0] == group or e[2] == group)), None)
        if g is None and not group.isdigit():
            raise ImageError(f"the image's User {user!r} names a group that is not in its /etc/group")
        gid = int(g[2]) if g is not None else int(group)
    if uid == 0:
        return None, None
    if not (0 < uid < ID_RANGE and 0 <= gid < ID_RANGE):
        raise ImageError(f"the image's User {user!r} is outside the {ID_RANGE} ids a sandbox maps")
    return f"{uid}:{gid}", home
