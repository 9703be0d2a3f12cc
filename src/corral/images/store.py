"""A local store of OCI images, pulled and unpacked with the container ecosystem's own tools.

skopeo copies an image (from a registry, an OCI layout directory or a `docker save` archive) into one
shared OCI layout, which keeps each blob once however many images or names use it; umoci unpacks an
image's layers, whiteouts honoured, into a root filesystem kept per image id (the manifest digest),
unpacked once and shared by every name that points at it. Names map to ids in `refs.json`.

    <root>/oci/              the OCI layout (blobs, index.json); one tag per image id
    <root>/rootfs/<id>/      the unpacked root filesystem of an image, owned as in the image
    <root>/refs.json         name -> {id, config (Env, WorkingDir, User, ...), pulled}
    <root>/lock              flock: one pull, rm or prune at a time per store

See docs/design-images.md for how sandboxes are to run on these roots (a writable layer, uid ranges).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.config import ID_RANGE, STORAGE_UID_BASE, RuntimeConfig
from corral.errors import CorralError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

_TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:", "dir:")


class ImageError(CorralError):
    """An image could not be pulled, found or removed; the message says why and what to do."""


@dataclass(frozen=True)
class Image:
    name: str  # as the user named it
    id: str  # the manifest digest, sha256:...
    rootfs: Path
    env: tuple[tuple[str, str], ...]
    workdir: str | None
    user: str | None
    pulled: float

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]


def source_of(name: str) -> str:
    """skopeo's source for a name: one with a transport is taken as it is (oci:DIR[:TAG],
    docker-archive:PATH, docker://...); anything else is a registry reference (`python:3.11`,
    `registry:5000/ns/name:tag`, `name@sha256:...`)."""
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise ImageError(f"image name {name!r} is not a reference; write e.g. python:3.11 or "
                         "registry.example:5000/team/env:1")
    return name if name.startswith(_TRANSPORTS) else f"docker://{name}"


def _defuse(rootfs: Path) -> None:
    """What a root unpack would make the host's: device nodes (a sandbox gets its own /dev, and image
    roots are mounted nodev) and file capabilities (umoci writes them in the form the host honours, so
    a program of the image's would gain them on the host; inside a sandbox they would be no one's)."""
    for dirpath, dirs, files in os.walk(rootfs):
        for name in (*files, *dirs):
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(p).st_mode
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    os.unlink(p)
                elif stat.S_ISREG(mode) and "security.capability" in os.listxattr(p, follow_symlinks=False):
                    os.removexattr(p, "security.capability", follow_symlinks=False)


def is_local_source(name: str) -> bool:
    """Whether a name points at this machine's files (an OCI layout, an archive) rather than a registry."""
    return name.strip().startswith(_TRANSPORTS[1:])


def _registry_of(source: str) -> str | None:
    if not source.startswith("docker://"):
        return None
    first = source[len("docker://"):].split("/", 1)
    return first[0] if len(first) == 2 and ("." in first[0] or ":" in first[0] or first[0] == "localhost") else None


class ImageStore:
    def __init__(self, root: Path, *, auth_file: Path | None = None,
                 insecure_registries: tuple[str, ...] = ()) -> None:
        """`auth_file`: a docker config.json for registry logins; `insecure_registries`: host:port of
        registries reached over plain HTTP (a local test registry, say)."""
        self.root = Path(root)
        self.auth_file = auth_file
        self.insecure = set(insecure_registries)

    # -- paths and bookkeeping ------------------------------------------------------------------
    @property
    def layout(self) -> Path:
        return self.root / "oci"

    def _rootfs(self, image_id: str) -> Path:
        return self.root / "rootfs" / image_id.replace(":", "-")

    @staticmethod
    def _tag(image_id: str) -> str:
        return image_id.replace(":", "-")  # an OCI layout tag may not hold ':'

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # root's alone: only corral's mount helper (root) reads an image's files, through an idmapped
        # mount; a host user who could reach them could run an image's file-capability or setuid program
        for d in (self.root, self.root / "rootfs"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.chmod(0o700)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _refs(self) -> dict[str, dict]:
        try:
            return json.loads((self.root / "refs.json").read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ImageError(f"{self.root / 'refs.json'} is unreadable ({e}); remove it and pull again") from None

    def _save_refs(self, refs: dict[str, dict]) -> None:
        tmp = self.root / "refs.json.tmp"
        tmp.write_text(json.dumps(refs, indent=1, sort_keys=True))
        os.replace(tmp, self.root / "refs.json")

    def _image(self, name: str, rec: dict) -> Image:
        cfg = rec.get("config") or {}
        env = tuple(tuple(e.split("=", 1)) for e in cfg.get("Env") or [] if "=" in e)
        return Image(name, rec["id"], self._rootfs(rec["id"]), env,  # type: ignore[arg-type]
                     cfg.get("WorkingDir") or None, cfg.get("User") or None, rec.get("pulled", 0.0))

    # -- the tools ------------------------------------------------------------------------------
    def _run(self, argv: list[str], what: str, on_line: Callable[[str], None] | None = None) -> str:
        if shutil.which(argv[0]) is None:
            raise ImageError(f"{argv[0]} is not installed; it is needed to {what} (apt-get install {argv[0]}, "
                             "or run `make deps`)")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:  # skopeo's progress ("Copying blob ...") comes line by line
            out.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        err = proc.stderr.read()
        if proc.wait() != 0:
            reason = " ".join(err.strip().splitlines()[-1:]) or f"{argv[0]} exited with {proc.returncode}"
            reason = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", reason)
            raise ImageError(f"cannot {what}: {reason}")
        return "".join(out)

    def _skopeo_src_opts(self, source: str) -> list[str]:
        opts = []
        registry = _registry_of(source)
        if registry is not None and registry in self.insecure:
            opts.append("--src-tls-verify=false")
        if self.auth_file is not None and source.startswith("docker://"):
            opts += ["--src-authfile", str(self.auth_file)]
        return opts

    # -- operations -----------------------------------------------------------------------------
    def pull(self, name: str, on_line: Callable[[str], None] | None = None) -> Image:
        """Copy the image into the store and unpack it (once per image id); `name` then points at it."""
        source = source_of(name)
        with self._locked():
            self.layout.parent.mkdir(parents=True, exist_ok=True)
            staging = f"pull-{os.getpid()}-{time.monotonic_ns()}"
            digest_file = self.root / f"{staging}.digest"
            try:
                self._run(["skopeo", "copy", *(["--quiet"] if on_line is None else []),
                           *self._skopeo_src_opts(source), "--digestfile", str(digest_file), source,
                           f"oci:{self.layout}:{staging}"], f"pull {name}", on_line)
                image_id = digest_file.read_text().strip()
                if not _DIGEST.match(image_id):
                    raise ImageError(f"cannot pull {name}: skopeo reported no manifest digest ({image_id!r})")
                tag = self._tag(image_id)
                self._run(["skopeo", "copy", "--quiet", f"oci:{self.layout}:{staging}", f"oci:{self.layout}:{tag}"],
                          f"store {name}")
                config = json.loads(self._run(["skopeo", "inspect", "--config", f"oci:{self.layout}:{tag}"],
                                              f"read the configuration of {name}")).get("config") or {}
                rootfs = self._rootfs(image_id)
                if not rootfs.is_dir():
                    tmp = rootfs.with_name(rootfs.name + f".{staging}")
                    # owners shifted into corral's storage range: nothing of an image belongs to a host
                    # user, so an image's setuid-root program is no one's on the host
                    ids = f"0:{STORAGE_UID_BASE}:{ID_RANGE}"
                    self._run(["umoci", "raw", "unpack", "--uid-map", ids, "--gid-map", ids,
                               "--image", f"{self.layout}:{tag}", str(tmp)], f"unpack {name}")
                    _defuse(tmp)
                    os.replace(tmp, rootfs)
            finally:
                digest_file.unlink(missing_ok=True)
                with contextlib.suppress(ImageError):
                    self._run(["umoci", "rm", "--image", f"{self.layout}:{staging}"], "drop the staging tag")
            refs = self._refs()
            refs[name] = {"id": image_id, "source": source, "pulled": time.time(),
                          "config": {k: config.get(k) for k in ("Env", "WorkingDir", "User", "Cmd", "Entrypoint")}}
            self._save_refs(refs)
            return self._image(name, refs[name])

    def get(self, name: str) -> Image | None:
        rec = self._refs().get(name)
        if rec is None or not self._rootfs(rec["id"]).is_dir():
            return None
        return self._image(name, rec)

    async def ensure(self, name: str) -> Image:
        """The image by this name, pulled now if the store does not have it."""
        return self.get(name) or await asyncio.to_thread(self.pull, name)

    def ls(self) -> list[Image]:
        return sorted((self._image(n, r) for n, r in self._refs().items()), key=lambda i: i.name)

    def rm(self, name: str) -> Image:
        """Forget a name (its image's files go at the next prune, once no name points at them)."""
        with self._locked():
            refs = self._refs()
            rec = refs.pop(name, None)
            if rec is None:
                raise ImageError(f"no image named {name!r} in {self.root}; see `corral images ls`")
            self._save_refs(refs)
            return self._image(name, rec)

    def prune(self) -> list[str]:
        """Remove every image no name points at (its unpacked root and its blobs); returns their ids."""
        with self._locked():
            live = {r["id"] for r in self._refs().values()}
            gone = []
            base = self.root / "rootfs"
            for d in sorted(base.iterdir()) if base.is_dir() else []:
                image_id = d.name.replace("-", ":", 1)
                if image_id in live and _DIGEST.match(image_id):
                    continue
                if _DIGEST.match(image_id) and self.layout.is_dir():
                    with contextlib.suppress(ImageError):  # a tag already gone
                        self._run(["umoci", "rm", "--image", f"{self.layout}:{self._tag(image_id)}"], "untag")
                shutil.rmtree(d, ignore_errors=True)
                gone.append(image_id if _DIGEST.match(image_id) else d.name)
            if self.layout.is_dir():
                self._run(["umoci", "gc", "--layout", str(self.layout)], "remove unused blobs")
            return gone

    def size(self, image: Image) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(image.rootfs):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total


def store_for(config: RuntimeConfig) -> ImageStore:
    """The image store a runtime's configuration names."""
    return ImageStore(config.image_dir, auth_file=config.registry_auth_file,
                      insecure_registries=config.insecure_registries)

