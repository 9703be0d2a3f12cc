"""The GPU monitor, with a test double at the NVML boundary and everything else real.

This machine has no GPU, so FakeNvml stands in for NvmlBackend (the only code that calls NVML) and
reports chosen pids as GPU processes. The pids are real processes placed in real cgroup directories
of corral's layout (corral-<instance>/corral-<sandbox>/step-<n>), so attribution reads the kernel's
/proc/<pid>/cgroup, and the events are judged by the real rule engine. The check against a real
driver and a real CUDA workload is scripts/check_gpu.py, for a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.detect import Detector
from corral.events import Event, EventKind
from corral.monitor.gpu import (
    NO_DRIVER,
    GpuDevice,
    GpuMonitor,
    GpuProcess,
    NvmlBackend,
    resolve_from_cgroup,
    sandbox_of_cgroup_file,
    sandbox_of_cgroup_path,
)
from corral.sandbox.cgroups import remove_tree

GIB = 1 << 30


# -- a real cgroup tree of corral's layout -------------------------------------------------------------------
def _tracking_base() -> Path | None:
    """Where corral itself would put its cgroups on this machine (beneath the cgroup we run in):
    the v1 pids hierarchy when there is one, else the v2 tree. None when we may not write there."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else ["unified"]:
            own[c] = path
    v1 = Path("/sys/fs/cgroup/pids")
    if v1.is_dir() and "pids" in own:
        base = v1 / own["pids"].lstrip("/")
    elif Path("/sys/fs/cgroup/cgroup.controllers").exists() and "unified" in own:
        base = Path("/sys/fs/cgroup") / own["unified"].lstrip("/")
    else:
        return None
    return base if os.access(base, os.W_OK) else None


BASE = _tracking_base()
needs_cgroups = pytest.mark.skipif(BASE is None, reason="no writable pids cgroup hierarchy (run as root)")


class Tree:
    """corral-gputest-<hex>/corral-<sandbox>/step-<n>, holding real `sleep` processes."""

    def __init__(self, base: Path) -> None:
        self.instance = "gputest-" + os.urandom(4).hex()
        self.root = base / f"corral-{self.instance}"
        self.root.mkdir()
        self.children: list[subprocess.Popen] = []

    def spawn(self, sandbox_id: str | None = None, step: int | None = None) -> int:
        """A real process; in the sandbox's cgroup (at `step` if given) unless sandbox_id is None."""
        child = subprocess.Popen(["sleep", "30"])
        self.children.append(child)
        if sandbox_id is not None:
            d = self.root / f"corral-{sandbox_id}"
            if step is not None:
                d = d / f"step-{step}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "cgroup.procs").write_text(str(child.pid))
        return child.pid

    def close(self) -> None:
        for c in self.children:
            c.kill()
            c.wait()
        remove_tree(self.root)


@pytest.fixture
def tree() -> Iterator[Tree]:
    assert BASE is not None
    t = Tree(BASE)
    try:
        yield t
    finally:
        t.close()


# -- the NVML double -----------------------------------------------------------------------------------------
class FakeNvml:
    """Same methods as NvmlBackend; `procs[i]` are the processes NVML would list on GPU i."""

    def __init__(self, gpus: int = 1) -> None:
        self.procs: dict[int, list[GpuProcess]] = {i: [] for i in range(gpus)}
        self.broken: set[int] = set()  # devices whose reads fail
        self.inits = self.shutdowns = 0

    def use(self, pid: int, gpu: int = 0, mem_mb: int | None = 512, kind: str = "compute") -> None:
        self.procs[gpu].append(GpuProcess(pid, mem_mb << 20 if mem_mb is not None else None, kind))

    def init(self) -> None:
        self.inits += 1

    def shutdown(self) -> None:
        self.shutdowns += 1

    def device_count(self) -> int:
        return len(self.procs)

    def device(self, i: int) -> GpuDevice:
        if i in self.broken:
            raise OSError(f"GPU {i} has fallen off the bus")
        return GpuDevice(i, "Fake H200", f"GPU-fake-{i}", 37, 20 * GIB, 141 * GIB)

    def processes(self, i: int) -> list[GpuProcess]:
        if i in self.broken:
            raise OSError(f"GPU {i} has fallen off the bus")
        return list(self.procs[i])


class BrokenNvml(FakeNvml):
    """Every call fails, as a driver in trouble would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def _fail(self, *_: object) -> None:
        self.calls += 1
        raise RuntimeError("NVML exploded")

    init = shutdown = device_count = device = processes = _fail  # type: ignore[assignment]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def monitor(tree: Tree | None, grants: dict[str, tuple[bool, set[int] | None]], backend: FakeNvml,
            **kw) -> tuple[GpuMonitor, list[Event]]:
    got: list[Event] = []
    resolve: Callable[[int], tuple[str, int | None] | None] = (
        functools.partial(resolve_from_cgroup, instance=tree.instance) if tree else resolve_from_cgroup)
    mon = GpuMonitor(resolve=resolve, granted=grants.get, emit=got.append, backend=backend, **kw)
    return mon, got


def judged(ev: Event) -> list[str]:
    return [f.rule_id for f in Detector().evaluate(ev).findings]


# -- attribution by cgroup -----------------------------------------------------------------------------------
def test_cgroup_paths() -> None:
    assert sandbox_of_cgroup_path("/corral-01a/corral-sb-12ab/step-3") == ("sb-12ab", 3)
    assert sandbox_of_cgroup_path("/corral-01a/corral-sb-12ab") == ("sb-12ab", None)  # the agent, not a step
    assert sandbox_of_cgroup_path("/corral-01a/corral-my-agent-7/step-12") == ("my-agent-7", 12)
    # corral's own cgroup may be named corral-*: the sandbox is the corral- dir inside an instance dir
    assert sandbox_of_cgroup_path("/corral-svc/corral-01a/corral-sb-1/step-2") == ("sb-1", 2)
    assert sandbox_of_cgroup_path("/corral-01a") is None  # an instance alone is no sandbox
    assert sandbox_of_cgroup_path("/corral-svc/corral-01a", instance="01a") is None
    assert sandbox_of_cgroup_path("/corral-01b/corral-sb-1/step-2", instance="01a") is None  # another runtime's
    assert sandbox_of_cgroup_path("/user.slice/session-3.scope") is None
    assert sandbox_of_cgroup_path("/corral-01a/corral-/step-1") is None
    v1 = "9:name=systemd:/\n8:pids:/corral-01a/corral-sb-9/step-4\n4:memory:/corral-01a/corral-sb-9\n0::/\n"
    assert sandbox_of_cgroup_file(v1) == ("sb-9", 4)
    assert sandbox_of_cgroup_file("0::/system.slice/corral.service/corral-02c/corral-sb-5/step-1\n") == ("sb-5", 1)
    assert sandbox_of_cgroup_file("0::/init.scope\n") is None


@needs_cgroups
def test_resolve_real_processes(tree: Tree) -> None:
    inside = tree.spawn("sb-c0ffee", step=3)
    agent = tree.spawn("sb-c0ffee")
    outside = tree.spawn(None)
    assert resolve_from_cgroup(inside) == ("sb-c0ffee", 3)
    assert resolve_from_cgroup(inside, instance=tree.instance) == ("sb-c0ffee", 3)
    assert resolve_from_cgroup(inside, instance="someone-else") is None
    assert resolve_from_cgroup(agent, instance=tree.instance) == ("sb-c0ffee", None)
    assert resolve_from_cgroup(outside) is None
    assert resolve_from_cgroup(os.getpid()) is None
    assert resolve_from_cgroup(2**22 + 12345) is None  # no such process


# -- events and the rules that judge them --------------------------------------------------------------------
@needs_cgroups
def test_gpu_without_grant(tree: Tree) -> None:
    pid = tree.spawn("sb-a1", step=3)
    nv = FakeNvml()
    nv.use(pid, mem_mb=1024)
    mon, got = monitor(tree, {"sb-a1": (False, None)}, nv)
    evs = mon.poll_once()
    assert evs == got and len(evs) == 1
    ev = evs[0]
    assert (ev.kind, ev.action, ev.sandbox_id, ev.step, ev.pid) == (EventKind.GPU, "process", "sb-a1", 3, pid)
    assert ev.exe is not None and os.path.basename(ev.exe) == "sleep" and ev.argv == ["sleep", "30"]
    assert ev.ppid == os.getpid()
    assert ev.data["gpu_granted"] is False and ev.data["in_granted_tree"] is False
    assert ev.data["gpu_index"] == 0 and ev.data["gpu_uuid"] == "GPU-fake-0" and ev.data["gpu_name"] == "Fake H200"
    assert ev.data["used_memory_mb"] == 1024 and ev.data["utilization"] == 37
    assert judged(ev) == ["gpu-without-grant"]


@needs_cgroups
def test_granted_sandbox_process_outside_granted_steps(tree: Tree) -> None:
    pid = tree.spawn("sb-b2", step=3)
    nv = FakeNvml()
    nv.use(pid)
    mon, _ = monitor(tree, {"sb-b2": (True, {2})}, nv)
    [ev] = mon.poll_once()
    assert ev.step == 3 and ev.data["gpu_granted"] is True and ev.data["in_granted_tree"] is False


@needs_cgroups
def test_granted_sandbox_outside_granted_steps_is_a_finding(tree: Tree) -> None:
    pid = tree.spawn("sb-b3", step=3)
    nv = FakeNvml()
    nv.use(pid)
    mon, _ = monitor(tree, {"sb-b3": (True, {2})}, nv)
    [ev] = mon.poll_once()
    assert judged(ev) == ["gpu-outside-granted-tree"]


@needs_cgroups
def test_granted_step_is_fine(tree: Tree) -> None:
    in_step = tree.spawn("sb-c3", step=2)
    whole = tree.spawn("sb-d4", step=7)
    nv = FakeNvml()
    nv.use(in_step)
    nv.use(whole)
    mon, _ = monitor(tree, {"sb-c3": (True, {2}), "sb-d4": (True, None)}, nv)  # None: every step granted
    evs = mon.poll_once()
    assert {(e.sandbox_id, e.step) for e in evs} == {("sb-c3", 2), ("sb-d4", 7)}
    for ev in evs:
        assert ev.data["gpu_granted"] is True and ev.data["in_granted_tree"] is True
        assert judged(ev) == []


@needs_cgroups
def test_processes_outside_sandboxes_are_not_ours(tree: Tree) -> None:
    stranger = tree.spawn(None)  # a real process in no corral cgroup
    other_runtime = Tree(tree.root.parent)  # a sandbox of another corral instance on the same host
    try:
        theirs = other_runtime.spawn("sb-e5", step=1)
        gone = subprocess.Popen(["true"])
        gone.wait()  # exited (and reaped) before the monitor looked
        nv = FakeNvml()
        for pid in (stranger, theirs, gone.pid, os.getpid()):
            nv.use(pid)
        mon, got = monitor(tree, {"sb-e5": (False, None)}, nv)
        assert mon.poll_once() == [] and got == []
    finally:
        other_runtime.close()


@needs_cgroups
def test_unknown_sandbox_is_skipped(tree: Tree) -> None:
    pid = tree.spawn("sb-f6", step=1)
    nv = FakeNvml()
    nv.use(pid)
    mon, got = monitor(tree, {}, nv)  # granted() says None: not a sandbox of this runtime
    assert mon.poll_once() == [] and got == []


@needs_cgroups
def test_compute_and_graphics_and_several_gpus(tree: Tree) -> None:
    pid = tree.spawn("sb-a7", step=1)
    nv = FakeNvml(gpus=2)
    nv.use(pid, gpu=0, kind="compute+graphics", mem_mb=None)
    nv.use(pid, gpu=1)
    mon, _ = monitor(tree, {"sb-a7": (False, None)}, nv)
    evs = mon.poll_once()
    assert sorted(e.data["gpu_index"] for e in evs) == [0, 1]  # one event per (process, GPU)
    on0 = next(e for e in evs if e.data["gpu_index"] == 0)
    assert on0.data["proc_type"] == "compute+graphics" and on0.data["used_memory_mb"] is None


# -- cadence -------------------------------------------------------------------------------------------------
@needs_cgroups
def test_process_then_samples_every_10s(tree: Tree) -> None:
    pid = tree.spawn("sb-b8", step=1)
    nv = FakeNvml()
    nv.use(pid)
    clock = Clock()
    mon, got = monitor(tree, {"sb-b8": (False, None)}, nv, clock=clock)

    def poll_at(dt: float) -> list[str]:
        clock.t += dt
        return [e.action for e in mon.poll_once()]

    assert poll_at(0) == ["process"]
    assert poll_at(1) == []
    assert poll_at(8.9) == []
    assert poll_at(0.1) == ["sample"]  # 10 s after the first event
    assert poll_at(5) == []
    assert poll_at(5) == ["sample"]
    nv.procs[0].clear()  # the process left the GPU ...
    assert poll_at(1) == []
    nv.use(pid)  # ... and came back: news again
    assert poll_at(1) == ["process"]
    assert [e.action for e in got] == ["process", "sample", "sample", "process"]


@needs_cgroups
def test_failed_emit_is_retried(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    pid = tree.spawn("sb-c9", step=1)
    nv = FakeNvml()
    nv.use(pid)
    sent: list[Event] = []
    fail = [True]

    def emit(ev: Event) -> None:
        if fail[0]:
            raise OSError("database is locked")
        sent.append(ev)

    mon = GpuMonitor(resolve=resolve_from_cgroup, granted={"sb-c9": (False, None)}.get, emit=emit, backend=nv)
    with caplog.at_level(logging.WARNING, logger="corral.monitor.gpu"):
        assert mon.poll_once() == []
    assert "database is locked" in caplog.text
    fail[0] = False
    assert [e.action for e in mon.poll_once()] == ["process"]  # not lost: the first report of it
    assert [e.action for e in sent] == ["process"]


# -- a failing backend ---------------------------------------------------------------------------------------
@needs_cgroups
def test_one_broken_gpu_does_not_blind_the_others(tree: Tree, caplog: pytest.LogCaptureFixture) -> None:
    pid = tree.spawn("sb-da", step=1)
    nv = FakeNvml(gpus=2)
    nv.use(pid, gpu=1)
    nv.broken = {0}
    mon, _ = monitor(tree, {"sb-da": (False, None)}, nv)
    with caplog.at_level(logging.WARNING, logger="corral.monitor.gpu"):
        evs = mon.poll_once()
    assert [e.data["gpu_index"] for e in evs] == [1]
    assert "cannot read GPU 0" in caplog.text


def test_backend_that_always_fails(caplog: pytest.LogCaptureFixture) -> None:
    nv = BrokenNvml()
    mon, got = monitor(None, {}, nv)
    with caplog.at_level(logging.WARNING, logger="corral.monitor.gpu"):
        assert mon.poll_once() == []
        assert mon.poll_once() == []
    assert got == [] and nv.calls == 2  # init is tried again each round
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NVML exploded" in warnings[0].getMessage()  # said once, not every second


async def test_run_keeps_going_and_stops_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    nv = BrokenNvml()
    mon, _ = monitor(None, {}, nv, interval=0.01)
    with caplog.at_level(logging.WARNING, logger="corral.monitor.gpu"):
        task = mon.start()
        assert mon.start() is task  # idempotent
        for _ in range(500):
            if mon.polls >= 5:
                break
            await asyncio.sleep(0.01)
        assert mon.polls >= 5 and not task.done()
        await mon.stop()
    assert task.cancelled()  # ended by stop(), not by an exception of its own
    assert "NVML exploded" in caplog.text
    await mon.stop()  # a second stop is harmless


@needs_cgroups
async def test_run_emits_and_shuts_the_backend_down(tree: Tree) -> None:
    pid = tree.spawn("sb-eb", step=2)
    nv = FakeNvml()
    nv.use(pid)
    mon, got = monitor(tree, {"sb-eb": (False, None)}, nv, interval=0.01)
    mon.start()
    for _ in range(500):
        if got:
            break
        await asyncio.sleep(0.01)
    await mon.stop()
    assert [(e.action, e.sandbox_id, e.step, e.pid) for e in got] == [("process", "sb-eb", 2, pid)]
    assert nv.inits == 1
    for _ in range(100):  # shutdown runs on the monitor's worker thread, after any poll in flight
        if nv.shutdowns:
            break
        await asyncio.sleep(0.01)
    assert nv.shutdowns == 1


# -- the real backend, here ----------------------------------------------------------------------------------
def _driver_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_driver_present(), reason="this machine has an NVIDIA driver; see scripts/check_gpu.py")
def test_nvml_unavailable_here() -> None:
    ok, why = NvmlBackend.available()
    assert ok is False
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert "nvidia-ml-py" in why
    else:
        assert why == NO_DRIVER
    # and a monitor on the real backend just reports the problem, round after round
    mon = GpuMonitor(granted=lambda _: (False, None), emit=lambda _: None)
    assert mon.poll_once() == [] and mon.poll_once() == []
