"""corral's own cgroups, only ever beneath the cgroup corral itself runs in.

Layout (per hierarchy on v1, one tree on v2)::

    <corral's own cgroup>/corral-<instance>/corral-<sandbox>/          limits, freezer
    <corral's own cgroup>/corral-<instance>/corral-<sandbox>/step-<n>  one per command (lineage)
    <corral's own cgroup>/corral-<instance>/corral-<sandbox>/session-<k>  a session shell before its first
                                                         command, and after one that left processes running

Every process a step's command starts is born in that step's cgroup (the agent's spawn handshake
guarantees it) and its descendants stay there, daemonized or not. That makes "which step started
this process" a kernel fact and "kill everything this command started" exact.

cgroups corral did not create are never written, except the single write that moves a process we
started into one of ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from corral.config import Limits
from corral.sandbox.procs import read_proc

V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
PREFIX = "corral-"
SANDBOXES_CPU_SHARES = 256  # cgroup v1; a thread of corral's weighs 1024
SANDBOXES_CPU_WEIGHT = 25  # cgroup v2; corral's own cgroup's siblings weigh 100
HELD = ("pids.current", "pids.events")  # a session shell's cgroup's counters, read around each command


@dataclass
class Hierarchies:
    version: int | None  # 1, 2 or None when no usable cgroup fs
    roots: dict[str, Path] = field(default_factory=dict)  # controller ("unified" on v2) -> corral base dir
    problem: str | None = None

    @property
    def tracking(self) -> str:
        return "pids" if self.version == 1 else "unified"


def _own_cgroups() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":
            out["unified"] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def _mounts() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _, opts = ([*post.split(" "), "", ""])[:3]
        mountpoint = Path(pre.split(" ")[4])
        if fstype == "cgroup2":
            out.setdefault("unified", mountpoint)
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt in V1_CONTROLLERS or opt == "cpuacct":
                    out.setdefault(opt, mountpoint)
    return out


def discover(instance: str) -> Hierarchies:
    """Find where corral may create its cgroups; never creates anything."""
    try:
        own, mounts = _own_cgroups(), _mounts()
    except OSError as e:
        return Hierarchies(None, problem=f"cannot read /proc cgroup info: {e}")
    if all(c in mounts for c in V1_CONTROLLERS):
        ctrls = list(V1_CONTROLLERS)
        if "cpuacct" in mounts and mounts["cpuacct"] != mounts["cpu"]:
            ctrls.append("cpuacct")  # mounted on its own here: CPU accounting needs its own cgroup
        roots = {c: mounts[c] / own.get(c, "/").lstrip("/") / f"{PREFIX}{instance}" for c in ctrls}
        if all(os.access(r.parent, os.W_OK) for r in roots.values()):
            return Hierarchies(1, roots)
        return Hierarchies(None, problem="cgroup v1 hierarchies are not writable; run corral as root")
    if "unified" in mounts and Path(mounts["unified"], "cgroup.controllers").exists():
        base = mounts["unified"] / own.get("unified", "/").lstrip("/")
        if os.access(base, os.W_OK):
            return Hierarchies(2, {"unified": base / f"{PREFIX}{instance}"})
        return Hierarchies(None, problem=f"{base} is not writable; run corral in a delegated cgroup "
                           "(systemd-run --user --scope -p Delegate=yes ...) or as root")
    return Hierarchies(None, problem="no cgroup v1 memory/pids/cpu/freezer or cgroup v2 mount found")


class InstanceCgroups:
    """The corral-<instance> directories of one runtime. The caller holds the instance's lock, so a
    directory already there is a dead runtime's (a crash before `corral gc`): it is cleared first,
    and no stale sandbox cgroup, limit or frozen state carries into this runtime."""

    def __init__(self, h: Hierarchies) -> None:
        self.h = h
        self.limits_enforced = False
        remove_trees(h.roots.values())
        if h.version == 2:
            base = h.roots["unified"]
            base.mkdir(exist_ok=True)
            # Limits need the controllers delegated down to us (enabled in the subtree_control of the
            # cgroup corral runs in, by whoever owns it: corral never writes outside its own cgroups);
            # tracking, freeze and kill do not.
            available = set((base / "cgroup.controllers").read_text().split())
            try:
                if not {"memory", "pids", "cpu"} <= available:
                    raise OSError("controllers not delegated")
                _write(base / "cgroup.subtree_control", "+memory +pids +cpu")
                self.limits_enforced = True
            except OSError:
                self.limits_enforced = False
        elif h.version == 1:
            for root in h.roots.values():
                root.mkdir(exist_ok=True)
            self.limits_enforced = True
        self._yield_cpu()

    def _yield_cpu(self) -> None:
        """All sandboxes together weigh a quarter of a corral thread when the CPU is contended: the
        monitor judging every exec and connection must not be starved by the workloads it watches
        (a sandbox spinning on its CPU quota would otherwise delay every other tenant's judgements).
        An idle corral costs the sandboxes nothing. Best effort: the file is there only where the cpu
        controller reaches this cgroup."""
        with contextlib.suppress(OSError, KeyError):
            if self.h.version == 1:
                _write(self.h.roots["cpu"] / "cpu.shares", str(SANDBOXES_CPU_SHARES))
            elif self.h.version == 2:
                _write(self.h.roots["unified"] / "cpu.weight", str(SANDBOXES_CPU_WEIGHT))

    def sandbox(self, sandbox_id: str, limits: Limits) -> SandboxCgroup:
        return SandboxCgroup(self, sandbox_id, limits)

    def remove(self) -> None:
        remove_trees(self.h.roots.values())


class SandboxCgroup:
    def __init__(self, inst: InstanceCgroups, sandbox_id: str, limits: Limits) -> None:
        self.h = inst.h
        # A directory of its own, never one in use: a sandbox's spare deployment, or a pooled
        # sandbox renamed after its cgroup was made, has a cgroup named by another id ("+<k>" then)
        for k in range(1 << 16):
            name = f"{PREFIX}{sandbox_id}" + (f"+{k}" if k else "")
            self.dirs = {c: root / name for c, root in self.h.roots.items()}
            try:
                self.dirs[self.h.tracking].mkdir()
                break
            except FileExistsError:
                continue
        # A kill freezes and thaws the sandbox; a quarantine holds it frozen. The lock keeps a kill
        # from thawing a quarantine that lands while it runs, and two kills from interleaving.
        self.quarantined = False
        self.renames = True  # until the hierarchy says otherwise (cgroup2 has no rename)
        # read from the event loop and from threads (stats), closed by remove() in another: opened,
        # read and closed under its lock, and never opened again once removed
        self._oom_fd: int | None = None
        self._oom_lock = threading.Lock()
        self._removed = False
        # pids.current and pids.events of a session shell's cgroup, read around each of its commands,
        # through descriptors held open and keyed by the cgroup's current name: a directory keeps its
        # files across rename(), so the shell's cgroup, renamed from step to step, is read with one
        # pread (~3 us) instead of a path walk and an open (~35 us). Two descriptors per session,
        # closed when the shell leaves that cgroup (forget) or the cgroup is removed.
        self._held: dict[tuple[str, str], int] = {}
        self._held_lock = threading.Lock()
        self._freeze_lock = threading.Lock()
        for d in self.dirs.values():
            d.mkdir(exist_ok=True)
        if inst.limits_enforced:
            self._apply(limits)

    def _apply(self, limits: Limits) -> None:
        mem = limits.memory_mb << 20
        period = 100_000
        quota = int(limits.cpus * period)
        if self.h.version == 1:
            _write(self.dirs["memory"] / "memory.limit_in_bytes", str(mem))
            with contextlib.suppress(OSError):  # only present with swap accounting
                _write(self.dirs["memory"] / "memory.memsw.limit_in_bytes", str(mem))
            _write(self.dirs["pids"] / "pids.max", str(limits.pids))
            _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(period))
            _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        else:
            d = self.dirs["unified"]
            _write(d / "memory.max", str(mem))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(limits.pids))
            _write(d / "cpu.max", f"{quota} {period}")

    # -- membership ------------------------------------------------------------------------------
    @property
    def _join_file(self) -> str:
        """The file a single-threaded process writes "0" (itself) to, to join a cgroup. On v1 that is
        `tasks`: a thread moving itself skips the kernel's global threadgroup lock, whose taking waits
        out an RCU grace period (~5 ms a write, 14 ms seen under load) that a pid written to
        cgroup.procs pays (Linux >= 6.1; older kernels take the lock either way). v2 has cgroup.procs."""
        return "tasks" if self.h.version == 1 else "cgroup.procs"

    def join_files(self) -> list[str]:
        """What a freshly forked child (the launcher of bwrap) writes "0" to, to join this sandbox."""
        return [str(d / self._join_file) for d in self.dirs.values()]

    def _child(self, name: str) -> Path:
        """The cgroup `name` ("step-N", "session-N") of this sandbox's tracking hierarchy, made if missing."""
        d = self.dirs[self.h.tracking] / name
        d.mkdir(exist_ok=True)
        return d

    def step_dir(self, step: int) -> Path:
        return self._child(f"step-{step}")

    def move(self, pid: int, step: int) -> None:
        _write(self.step_dir(step) / "cgroup.procs", str(pid))

    def join_fd(self, name: str) -> int:
        """A descriptor a child of the agent writes "0" to, to move itself into the cgroup `name`
        (placement.py hands it over with the request). Opened here, by corral: the sandbox cannot open
        a cgroup file itself."""
        return os.open(self._child(name) / self._join_file, os.O_WRONLY | os.O_CLOEXEC)

    def holds(self, name: str, pid: int) -> bool:
        """Whether the kernel lists `pid` in the cgroup `name`."""
        return pid in _procs(self.dirs[self.h.tracking] / name)

    def move_to_session(self, pid: int, session: int) -> None:
        """A session shell into a cgroup of its own: at its start, and out of a step whose command left
        processes running (the next command renames the shell's cgroup to its step: see alone())."""
        _write(self._child(f"session-{session}") / "cgroup.procs", str(pid))

    def pids(self, step: int | None = None) -> list[int]:
        """Processes of one step, or of the whole sandbox (its own cgroup, every step and session)."""
        base = self.dirs[self.h.tracking]
        dirs = [base / f"step-{step}"] if step is not None else [base, *_subgroups(base, "step-", "session-", "stage-")]
        out: list[int] = []
        for d in dirs:
            out.extend(_procs(d))
        return out

    def rename(self, old: str, new: str) -> bool:
        """Rename a cgroup of this sandbox's own tree: its processes change group with no migration
        (on cgroup v1 a migration takes the kernel's global threadgroup lock for writing, which after
        an idle moment waits an RCU grace period: ~6 ms here; a rename ~0.2 ms: profile_step.py). False when it
        cannot be done: `new` exists, `old` is gone, or the hierarchy has no rename (cgroup v2)."""
        if not self.renames:
            return False
        base = self.dirs[self.h.tracking]
        try:
            os.rename(base / old, base / new)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError:  # EPERM/EINVAL/ENOTSUP: this hierarchy cannot rename; stop trying
            self.renames = False
            return False
        with self._held_lock:
            for key in [k for k in self._held if k[0] == old]:
                self._held[(new, key[1])] = self._held.pop(key)
        return True

    def alone(self, name: str, pid: int) -> bool:
        """Whether `pid` (a session shell), put in this sandbox's cgroup `name` by corral, is the only
        task there: one read of its pids.current, whose descriptors are then held (a thread or a
        child not yet reaped counts too: the caller then moves the shell instead of renaming its
        cgroup, which is only slower). Without a pids controller there, its process list."""
        raw = self._counter(name, "pids.current", hold=True)
        if raw is None:
            return _procs(self.dirs[self.h.tracking] / name) == [pid]
        return raw.strip() == b"1"

    def _counter(self, name: str, file: str, hold: bool = False) -> bytes | None:
        """A counter file (one of HELD) of cgroup `name`; None when it cannot be read (no such cgroup
        or file). Its descriptors are kept open with `hold` (see _held); a held descriptor of a cgroup
        since removed (ENODEV) is dropped and the file opened again by its path."""
        key = (name, file)
        with self._held_lock:
            fd = self._held.get(key)
            if fd is not None:
                try:
                    return os.pread(fd, 4096, 0)
                except OSError:
                    del self._held[key]
                    os.close(fd)
            d = self.dirs[self.h.tracking] / name
            if self._removed or not hold:
                try:
                    return read_proc(d / file)
                except OSError:
                    return None
            for f in HELD:
                if (name, f) not in self._held:
                    with contextlib.suppress(OSError):
                        self._held[(name, f)] = os.open(d / f, os.O_RDONLY | os.O_CLOEXEC)
            fd = self._held.get(key)
            try:
                return os.pread(fd, 4096, 0) if fd is not None else None
            except OSError:
                return None

    def forget(self, name: str) -> None:
        """Close the descriptors held for cgroup `name` (removed, or no longer a session's)."""
        with self._held_lock:
            for key in [k for k in self._held if k[0] == name]:
                os.close(self._held.pop(key))

    def session_pids(self, session: int) -> list[int]:
        return _procs(self.dirs[self.h.tracking] / f"session-{session}")

    def live_steps(self, prunable: Callable[[int], bool], ignore: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Steps whose cgroup holds a process (other than those in `ignore`) now, read from the
        cgroups themselves: a process a session shell forks into a finished step's cgroup counts.
        Empty cgroups of steps that `prunable` says are over are removed, so this stays one read per
        live step however long the episode."""
        out = []
        for d in _subgroups(self.dirs[self.h.tracking], "step-"):
            try:
                step = int(d.name[5:])
            except ValueError:
                continue
            pids = _procs(d)
            if any(p not in ignore for p in pids):
                out.append(step)
            elif not pids and prunable(step):
                with contextlib.suppress(OSError):  # EBUSY: a process arrived meanwhile; next time
                    d.rmdir()
                    self.forget(d.name)
        return sorted(out)

    def prune_sessions(self, keep: set[int]) -> None:
        """Remove the empty cgroups of sessions that are over (not in `keep`), and empty parking
        cgroups of staged children."""
        base = self.dirs[self.h.tracking]
        for d in _subgroups(base, "session-"):
            if d.name[8:].isdigit() and int(d.name[8:]) not in keep and not _procs(d):
                with contextlib.suppress(OSError):
                    d.rmdir()
                    self.forget(d.name)
        for d in _subgroups(base, "stage-"):
            if not _procs(d):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def group(self, pid: int) -> tuple[str, int] | None:
        """group_of(pid), but only for a process of this sandbox: a pid that is gone may already
        be another sandbox's process (pids are reused)."""
        return self.group_of(pid, self.dirs[self.h.tracking].name)

    def task_count(self) -> int:
        """Tasks (threads included) in the whole sandbox subtree: one read."""
        try:
            return int((self.dirs[self.h.tracking] / "pids.current").read_text())
        except (OSError, ValueError, KeyError):
            return 0

    @staticmethod
    def step_of(pid: int) -> int | None:
        """The step whose command started pid (None for corral's own agent and idle session shells)."""
        group = SandboxCgroup.group_of(pid)
        return group[1] if group is not None and group[0] == "step" else None

    @staticmethod
    def group_of(pid: int, sandbox_dir: str | None = None) -> tuple[str, int] | None:
        """("step", n) or ("session", k) for a process of a step or session cgroup; ("sandbox", 0)
        for one in the sandbox's own cgroup (bwrap, the agent, a child not yet placed); None when
        the process is gone, or is no sandbox's (or not that of `sandbox_dir`, when given)."""
        try:
            text = read_proc(f"/proc/{pid}/cgroup").decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            _, ctrls, path = line.split(":", 2)
            if not ("pids" in ctrls.split(",") or ctrls == ""):
                continue
            if sandbox_dir is not None and f"/{sandbox_dir}/" not in path + "/":
                continue
            leaf = path.rstrip("/").rsplit("/", 1)[-1]
            for kind in ("step", "session"):
                if leaf.startswith(kind + "-") and leaf[len(kind) + 1:].isdigit():
                    return kind, int(leaf[len(kind) + 1:])
            if leaf.startswith(PREFIX) or leaf.startswith("stage-"):  # a staged child parked: not yet placed
                return "sandbox", 0
        return None

    # -- containment -----------------------------------------------------------------------------
    def _set_frozen(self, frozen: bool) -> None:
        if self.h.version == 1:
            _write(self.dirs["freezer"] / "freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            _write(self.dirs["unified"] / "cgroup.freeze", "1" if frozen else "0")

    def quarantine(self, on: bool = True) -> None:
        """Hold every process of the sandbox frozen (on) or let them run again (off)."""
        with self._freeze_lock:
            self._set_frozen(on)
            self.quarantined = on

    def kill(self, step: int | None = None, keep: set[int] | frozenset[int] = frozenset()) -> int:
        """SIGKILL every process of a step (or the whole sandbox), frozen first so none can fork away.
        A quarantined sandbox stays frozen afterwards."""
        killed = 0
        with self._freeze_lock:
            if self.quarantined:
                return self._kill_held(step, keep)
            self._set_frozen(True)
            try:
                for _ in range(50):
                    pids = [p for p in self.pids(step) if p not in keep]
                    if not pids:
                        break
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            killed += 1
                    self._set_frozen(False)  # SIGKILL is only acted on once thawed
                    time.sleep(0.002)
                    self._set_frozen(True)
            finally:
                self._set_frozen(self.quarantined)
        return killed

    def _kill_held(self, step: int | None, keep: set[int] | frozenset[int]) -> int:
        """Kill processes of a quarantined sandbox without letting the others run for a moment.
        v2 delivers SIGKILL to frozen tasks. v1 acts on it only once a task is thawed, and a v1 cgroup
        is frozen while any ancestor is: the doomed tasks move to a thawed sibling cgroup of corral's
        own, where the pending SIGKILL ends them, while the rest of the sandbox stays frozen."""
        pids = [p for p in self.pids(step) if p not in keep]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reaper = self._reaper
        if reaper is not None and pids:
            reaper.mkdir(exist_ok=True)
            for pid in pids:
                with contextlib.suppress(OSError):  # gone already
                    _write(reaper / "cgroup.procs", str(pid))
        # the kill is asynchronous for a frozen task: wait (bounded) until they are gone, as a caller
        # of kill() expects
        doomed = set(pids)
        for _ in range(400):
            if not doomed.intersection(self.pids(step)):
                break
            time.sleep(0.005)
        if reaper is not None and pids:
            with contextlib.suppress(OSError):
                reaper.rmdir()  # emptied once every task in it has exited; else removed with the sandbox
        return len(pids)

    # -- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters for the whole sandbox (per step: pids_max_hits(step)). On v1, pids_max_hits sums
        the steps whose cgroups are still there (an empty finished step's is removed)."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            if self.h.version == 1:
                m = self.dirs["memory"]
                out["memory_bytes"] = int((m / "memory.usage_in_bytes").read_text())
                out["memory_peak_bytes"] = int((m / "memory.max_usage_in_bytes").read_text())
                out["oom_kills"] = self.oom_kills()
                # v1 counts a refused fork in the forking task's own cgroup: sum the tree
                pdir = self.dirs["pids"]
                out["pids_max_hits"] = sum(_kv(d / "pids.events").get("max", 0)
                                           for d in (pdir, *pdir.glob("step-*")))
                cpuacct = self.dirs.get("cpuacct", self.dirs["cpu"]) / "cpuacct.usage"
                if cpuacct.exists():
                    out["cpu_ns"] = int(cpuacct.read_text())
            else:
                d = self.dirs["unified"]
                # cpu.stat is always there; the memory and pids files only with those controllers
                out["cpu_ns"] = _kv(d / "cpu.stat").get("usage_usec", 0) * 1000
                out["pids_max_hits"] = _kv(d / "pids.events").get("max", 0)
                out["oom_kills"] = self.oom_kills()
                out["memory_bytes"] = int((d / "memory.current").read_text())
                if (d / "memory.peak").exists():
                    out["memory_peak_bytes"] = int((d / "memory.peak").read_text())
        return out

    def oom_kills(self) -> int:
        """The sandbox's OOM kills so far. Read before and after every command, so the file stays open
        and is re-read from its start (one syscall, no path walk)."""
        with self._oom_lock:
            if self._oom_fd is None and not self._removed:
                name = "memory.oom_control" if self.h.version == 1 else "memory.events"
                with contextlib.suppress(OSError, KeyError):
                    self._oom_fd = os.open(self.dirs["memory" if self.h.version == 1 else "unified"] / name,
                                           os.O_RDONLY | os.O_CLOEXEC)
            if self._oom_fd is None:
                return 0
            try:
                text = os.pread(self._oom_fd, 4096, 0).decode()
            except OSError:
                return 0
        return _kv_text(text).get("oom_kill", 0)

    def pids_max_hits(self, step: int) -> int:
        """Forks refused by the process limit in this step's cgroup so far. A session's cgroup serves
        step after step (renamed), so its count carries earlier steps' refusals: a command's own are
        the difference between a read before it and one after."""
        raw = self._counter(f"step-{step}", "pids.events")
        return _kv_text(raw.decode()).get("max", 0) if raw is not None else 0

    @property
    def _reaper(self) -> Path | None:
        """v1: the thawed sibling cgroup where a quarantined sandbox's doomed tasks go to die."""
        f = self.dirs.get("freezer")
        return f.parent / f"{f.name}-kill" if f is not None else None

    def remove(self) -> None:
        with self._oom_lock:
            self._removed = True
            if self._oom_fd is not None:
                os.close(self._oom_fd)
                self._oom_fd = None
        with self._held_lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()
        remove_trees([*self.dirs.values(), *filter(None, [self._reaper])])


def _subgroups(base: Path, *prefixes: str) -> list[Path]:
    """The child cgroups of `base` whose names start with one of `prefixes` (one directory read; a
    pathlib glob per prefix cost a sandbox's kill ~1 ms of the event loop)."""
    try:
        with os.scandir(base) as it:
            return [base / e.name for e in it if e.name.startswith(prefixes) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _procs(d: Path) -> list[int]:
    try:
        return [int(p) for p in read_proc(d / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _kv(path: Path) -> dict[str, int]:
    try:
        return _kv_text(read_proc(path).decode())
    except OSError:
        return {}


def _kv_text(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v)
    return out


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def remove_trees(dirs: Iterable[Path]) -> None:
    """remove_tree for several hierarchies' directories, the freezer's first: on v1 a frozen
    process acts on SIGKILL only once thawed, and only the freezer hierarchy can thaw it. Then the
    other hierarchies hold nothing that still has to die."""
    for d in sorted(dirs, key=lambda d: not (d / "freezer.state").exists()):
        remove_tree(d)


def remove_tree(d: Path) -> None:
    """rmdir a cgroup tree bottom-up (cgroup dirs cannot be removed recursively in one call).
    Any process still inside is one corral started: it is killed by pid first."""
    if not d.exists():
        return
    # os.walk, not rglob: a sandbox closing meanwhile removes its own directories, and a walk that
    # meets a vanished one must go on (rglob raises), or this runtime's cgroups would be left behind
    children = [Path(top) / name for top, dirs, _ in os.walk(d) for name in dirs]
    for child in sorted(children, key=lambda p: len(p.parts), reverse=True):
        _evict_and_rmdir(child)
    _evict_and_rmdir(d)


def _evict_and_rmdir(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            freezer = d / "freezer.state"
            if freezer.exists():
                with contextlib.suppress(OSError):
                    _write(freezer, "THAWED")
            time.sleep(0.01)
