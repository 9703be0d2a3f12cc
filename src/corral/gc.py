"""`corral gc`: remove what crashed corral runtimes left behind.

A runtime instance i holds an exclusive flock on ``{lock_dir}/instance-{i:03x}.lock`` for as long
as it lives; the kernel drops the lock when the process dies, however it dies. So "the lock of i
can be taken" means "no live runtime owns instance i", and only then are its leftovers removed:

- the nftables table ``inet corral_{i:03x}`` (of this network namespace);
- host-side veth links ``corral{i:03x}{seq:03x}`` (of this network namespace);
- cgroup directories ``corral-{i:03x}`` beneath the cgroup gc itself runs in (any process still in
  them is one corral started and is killed);
- its list of paths every sandbox hides, ``{lock_dir}/instance-{i:03x}.hidden`` (a dead runtime's
  paths need no hiding, and every launch reads every list).

A runtime that takes instance i clears these same leftovers of i itself (it holds the lock); gc is
for the instances nobody takes again. gc holds the instance lock while it removes, so a runtime
starting meanwhile cannot pick the same instance and have its fresh table deleted under it. Nothing
without the corral prefix is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from corral.net import nft
from corral.sandbox import cgroups

LOCK_DIR = Path("/run/corral")
_TABLE_RE = re.compile(r"^corral_([0-9a-f]{3})$")
_LINK_RE = re.compile(r"^corral([0-9a-f]{3})[0-9a-f]{3}$")  # netns.link_name: exactly 12 chars
_CGROUP_RE = re.compile(r"^corral-([0-9a-f]{3})$")


@contextlib.contextmanager
def _instance_free(lock_dir: Path, instance: int, create: bool) -> Iterator[bool]:
    """Yield whether no live runtime owns `instance`; while True, we hold its lock."""
    path = lock_dir / f"instance-{instance:03x}.lock"
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        if create:
            lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        # Dry run without a lock file: no runtime can hold a lock on a file that does not exist.
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _tables() -> dict[int, list[str]]:
    if shutil.which("nft") is None:
        return {}  # no nftables: no table can have been left behind
    out: dict[int, list[str]] = {}
    for name in nft.corral_tables():
        m = _TABLE_RE.match(name)
        if m:
            out.setdefault(int(m.group(1), 16), []).append(name)
    return out


def _links() -> dict[int, list[str]]:
    from pyroute2 import IPRoute

    out: dict[int, list[str]] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            m = _LINK_RE.match(name)
            if m:
                out.setdefault(int(m.group(1), 16), []).append(name)
    return out


def _cgroup_dirs() -> dict[int, list[Path]]:
    # discover() returns <own cgroup>/corral-<instance> per hierarchy; the parent is where every
    # runtime started from this cgroup made its corral-XXX directory.
    h = cgroups.discover("gc")
    out: dict[int, list[Path]] = {}
    for base in sorted({root.parent for root in h.roots.values()}):
        try:
            children = sorted(base.iterdir())
        except OSError:
            continue
        for child in children:
            m = _CGROUP_RE.match(child.name)
            if m and child.is_dir():
                out.setdefault(int(m.group(1), 16), []).append(child)
    return out


def _delete_link(name: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        # By name, not index: an index can be reused by an unrelated link between listing and now.
        # Gone already is fine: deleting one veth end (or its namespace dying) removes the pair.
        ipr.link("del", ifname=name)


def _root_dirs(image_dir: Path) -> dict[int, list[Path]]:
    """Directories where a runtime built image roots (sandbox/imageroot.py). Their mounts lived in the
    runtime's mount helper and went with it; the empty directories stay behind a crash."""
    out: dict[int, list[Path]] = {}
    base = image_dir.parent
    for d in sorted(base.glob("roots-*")) if base.is_dir() else []:
        with contextlib.suppress(ValueError):
            out.setdefault(int(d.name.split("-", 1)[1], 16), []).append(d)
    return out


def _hidden_lists(lock_dir: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {}
    for f in sorted(lock_dir.glob("instance-*.hidden")) if lock_dir.is_dir() else []:
        with contextlib.suppress(ValueError):
            out.setdefault(int(f.name[len("instance-"):-len(".hidden")], 16), []).append(f)
    return out


def collect(dry_run: bool = False, lock_dir: Path = LOCK_DIR,
            image_dir: Path = Path("/var/cache/corral/images")) -> list[str]:
    """Remove leftovers of dead corral runtimes; returns what was (or, dry run, would be) removed."""
    tables, links, cgdirs, roots = _tables(), _links(), _cgroup_dirs(), _root_dirs(image_dir)
    hidden = _hidden_lists(lock_dir)
    removed: list[str] = []
    for inst in sorted(set(tables) | set(links) | set(cgdirs) | set(roots) | set(hidden)):
        with _instance_free(lock_dir, inst, create=not dry_run) as free:
            if not free:
                continue  # a live runtime owns it
            # Order matters: processes first (cgroups), then their links, and the nft table last, so
            # no sandbox process is ever left with a link into this namespace and no rules on it.
            if not dry_run:
                cgroups.remove_trees(cgdirs.get(inst, []))
            removed += [f"cgroup {d}" for d in cgdirs.get(inst, [])]
            for name in links.get(inst, []):
                if not dry_run:
                    _delete_link(name)
                removed.append(f"link {name}")
            for name in tables.get(inst, []):
                if not dry_run:
                    nft.remove_table(name)
                removed.append(f"nft table inet {name}")
            for d in roots.get(inst, []):
                if not dry_run:
                    shutil.rmtree(d, ignore_errors=True)
                removed.append(f"image roots {d}")
            for f in hidden.get(inst, []):
                if not dry_run:
                    f.unlink(missing_ok=True)
                removed.append(f"hidden-path list {f}")
    return removed
