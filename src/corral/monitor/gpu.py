"""Which sandbox is using which GPU: NVML's per-device process lists, attributed by cgroup.

Every `interval` seconds the monitor asks NVML for the compute and graphics processes on each GPU,
maps each host pid to its sandbox and step by the cgroup it lives in (a kernel fact: a sandbox's
processes cannot leave corral's cgroups), and emits a GPU event for each process that belongs to a
sandbox. The rules judge it: a sandbox without a grant on a GPU (gpu-without-grant), or a process
outside the steps that were granted one (gpu-outside-granted-tree). A process in no corral sandbox
is not ours and is ignored.

NVML is reached only through a backend object (NvmlBackend here, a double in the tests), so that
everything above it runs and is tested on machines without a GPU. NVML reports pids as the driver
translates them for the caller; when corral runs inside a container with its own pid namespace, an
old driver may report pids this /proc cannot resolve, and those processes then go unattributed.
scripts/check_gpu.py shows on a real machine whether a sandboxed workload's pid comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral.events import Event, EventKind
from corral.sandbox import procs
from corral.sandbox.cgroups import PREFIX

log = logging.getLogger(__name__)

NO_DRIVER = "NVML not found: no NVIDIA driver on this machine"
SAMPLE_EVERY = 10.0  # seconds between "sample" events for a process that stays on a GPU
MIB = 1 << 20

Resolve = Callable[[int], tuple[str, int | None] | None]
# (has a GPU grant, granted steps or None for every step); None: a sandbox this runtime does not know
Granted = Callable[[str], tuple[bool, set[int] | None] | None]


# -- the NVML boundary ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    uuid: str
    utilization: int | None  # % of the last sample period a kernel ran, whole device; None where unsupported
    memory_used: int | None  # bytes, whole device
    memory_total: int | None


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as NVML reports it (see the module docstring about pid namespaces)
    used_memory: int | None  # bytes; None where the driver cannot tell (MIG without privileges, WDDM)
    kind: str  # "compute", "graphics" or "compute+graphics"


class GpuBackend(Protocol):
    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def device_count(self) -> int: ...
    def device(self, i: int) -> GpuDevice: ...
    def processes(self, i: int) -> list[GpuProcess]: ...


class NvmlBackend:
    """The few NVML calls the monitor makes (nvidia-ml-py, imported only when used)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether NVML can be loaded and initialised here, and why not."""
        try:
            import pynvml
        except ImportError:
            return False, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            return False, NO_DRIVER
        except pynvml.NVMLError as e:
            return False, f"NVML did not initialise: {e}"
        try:
            count, driver = pynvml.nvmlDeviceGetCount(), pynvml.nvmlSystemGetDriverVersion()
            return True, f"NVML ready: {count} GPU(s), driver {driver}"
        except pynvml.NVMLError as e:
            return False, f"NVML initialised but cannot list GPUs: {e}"
        finally:
            # NVML counts inits; this one must not end a monitor's session elsewhere in the process
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    def init(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles.clear()

    def shutdown(self) -> None:
        if self._nvml is None:
            return
        nvml, self._nvml = self._nvml, None
        self._handles.clear()
        nvml.nvmlShutdown()

    def _lib(self) -> Any:
        if self._nvml is None:
            raise RuntimeError("NVML is not initialised")
        return self._nvml

    def _handle(self, i: int) -> Any:
        if i not in self._handles:
            self._handles[i] = self._lib().nvmlDeviceGetHandleByIndex(i)
        return self._handles[i]

    def device_count(self) -> int:
        return int(self._lib().nvmlDeviceGetCount())

    def device(self, i: int) -> GpuDevice:
        nvml, h = self._lib(), self._handle(i)
        # utilisation and memory are missing on some devices (MIG, vGPU): the device is still watched
        optional = (nvml.NVMLError_NotSupported, nvml.NVMLError_NoPermission)
        util = used = total = None
        with contextlib.suppress(*optional):
            util = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        with contextlib.suppress(*optional):
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            used, total = int(mem.used), int(mem.total)
        return GpuDevice(index=int(nvml.nvmlDeviceGetIndex(h)), name=str(nvml.nvmlDeviceGetName(h)),
                         uuid=str(nvml.nvmlDeviceGetUUID(h)), utilization=util, memory_used=used, memory_total=total)

    def processes(self, i: int) -> list[GpuProcess]:
        h = self._handle(i)
        merged: dict[int, GpuProcess] = {}
        for kind in ("Compute", "Graphics"):
            for p in self._running(kind, h):
                pid, mem = int(p.pid), p.usedGpuMemory
                mem = int(mem) if mem is not None else None
                prev = merged.get(pid)
                if prev is None:
                    merged[pid] = GpuProcess(pid, mem, kind.lower())
                else:  # one process with both kinds of context: report it once, as nvidia-smi's "C+G"
                    both = max((m for m in (prev.used_memory, mem) if m is not None), default=None)
                    merged[pid] = GpuProcess(pid, both, "compute+graphics")
        return sorted(merged.values(), key=lambda p: p.pid)

    def _running(self, kind: str, h: Any) -> list[Any]:
        nvml = self._lib()
        # The newest struct version first; drivers older than the bindings lack it (FunctionNotFound).
        for suffix in ("_v3", "_v2", ""):
            fn = getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses{suffix}", None)
            if fn is None:
                continue
            try:
                return list(fn(h))
            except nvml.NVMLError_FunctionNotFound:
                continue
            except nvml.NVMLError_NotSupported:
                return []  # e.g. graphics processes on a compute-only board
        return []


# -- attribution ---------------------------------------------------------------------------------------------
_STEP = re.compile(r"step-(\d+)")


def sandbox_of_cgroup_path(path: str, instance: str | None = None) -> tuple[str, int | None] | None:
    """(sandbox id, step) for a cgroup path of corral's layout, `.../corral-<instance>/corral-<sandbox>[/step-<n>]`.

    The sandbox is the `corral-` directory whose parent is also a `corral-` directory (the instance):
    corral's own cgroup may itself be named corral-something, and an instance directory alone is no
    sandbox. With `instance` given, only that runtime's sandboxes count, so that two runtimes on one
    host do not report each other's processes.
    """
    comps = [c for c in path.split("/") if c]
    for i in range(len(comps) - 1, 0, -1):
        name, parent = comps[i], comps[i - 1]
        if not (name.startswith(PREFIX) and len(name) > len(PREFIX) and parent.startswith(PREFIX)):
            continue
        if instance is not None and parent != PREFIX + instance:
            continue
        step = None
        if i + 1 < len(comps) and (m := _STEP.fullmatch(comps[i + 1])):
            step = int(m.group(1))
        return name[len(PREFIX):], step
    return None


def sandbox_of_cgroup_file(text: str, instance: str | None = None) -> tuple[str, int | None] | None:
    """Parse /proc/<pid>/cgroup. corral tracks steps in the v1 pids hierarchy or the v2 tree, so those
    lines are read first; other v1 hierarchies only know the sandbox, not the step."""
    ranked: list[tuple[int, str]] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        rank = 0 if "pids" in ctrls.split(",") else 1 if ctrls == "" else 2
        ranked.append((rank, path))
    for _, path in sorted(ranked, key=lambda r: r[0]):
        found = sandbox_of_cgroup_path(path, instance)
        if found is not None:
            return found
    return None


def resolve_from_cgroup(pid: int, instance: str | None = None) -> tuple[str, int | None] | None:
    """Host pid -> (sandbox id as named in its cgroup, step), or None when pid is in no corral sandbox
    (or has exited)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return sandbox_of_cgroup_file(text, instance)


def _start_time(pid: int) -> int | None:
    """Start time in clock ticks (field 22 of /proc/<pid>/stat): with the pid it names one process,
    so a recycled pid is not taken for the process that had it before."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


# -- the monitor ---------------------------------------------------------------------------------------------
Snapshot = list[tuple[GpuDevice, list[GpuProcess]]]
Key = tuple[str, int, int | None, str]  # (sandbox, pid, process start time, gpu uuid or index)


class GpuMonitor:
    """Polls a GPU backend and emits attributed GPU events; never raises out of its loop."""

    def __init__(self, *, granted: Granted, emit: Callable[[Event], object], resolve: Resolve = resolve_from_cgroup,
                 backend: GpuBackend | None = None, interval: float = 1.0, sample_every: float = SAMPLE_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.resolve = resolve
        self.granted = granted
        self.emit = emit
        self.backend: GpuBackend = backend if backend is not None else NvmlBackend()
        self.interval = interval
        self.sample_every = sample_every
        self.clock = clock
        self.polls = 0  # completed poll rounds, failed or not (a liveness signal)
        self._ready = False  # backend initialised
        self._seen: dict[Key, float] = {}  # -> when its last event was emitted
        self._problems: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    # -- one round -------------------------------------------------------------------------------------------
    def poll_once(self) -> list[Event]:
        """Ask the backend, emit what is new or due, return the events emitted. Never raises."""
        return self._handle(self._collect())

    def _collect(self) -> Snapshot | None:
        """Every backend call of a round (blocking: run() makes it in a worker thread). None when no
        device could be listed at all."""
        try:
            if not self._ready:
                self.backend.init()
                self._ready = True
            count = self.backend.device_count()
        except Exception as e:
            self._problem("cannot list GPUs", e)
            self._reset_backend()  # a lost GPU or unloaded driver needs a fresh init next round
            return None
        snap: Snapshot = []
        failed = False
        for i in range(count):
            try:
                snap.append((self.backend.device(i), self.backend.processes(i)))
            except Exception as e:  # one broken device must not blind the monitor to the others
                self._problem(f"cannot read GPU {i}", e)
                failed = True
        if not failed and self._problems:
            log.info("gpu monitor: GPUs readable again")
            self._problems.clear()
        return snap

    def _handle(self, snap: Snapshot | None) -> list[Event]:
        self.polls += 1
        if snap is None:
            return []  # nothing known this round: keep what was seen, so recovery does not repeat it
        now = self.clock()
        out: list[Event] = []
        present: set[Key] = set()
        for dev, plist in snap:
            for p in plist:
                try:
                    made = self._event(dev, p, now, present)
                    if made is None:
                        continue
                    ev, key = made
                    self.emit(ev)
                except Exception as e:
                    # not marked seen: the next round tries again rather than lose a finding
                    self._problem(f"cannot report GPU process {p.pid}", e)
                    continue
                self._seen[key] = now
                out.append(ev)
        polled = {self._gpu_key(dev) for dev, _ in snap}
        for key in [k for k in self._seen if k[3] in polled and k not in present]:
            del self._seen[key]  # gone from the GPU: if it comes back, that is news again
        return out

    @staticmethod
    def _gpu_key(dev: GpuDevice) -> str:
        return dev.uuid or str(dev.index)

    def _event(self, dev: GpuDevice, p: GpuProcess, now: float,
               present: set[Key]) -> tuple[Event, Key] | None:
        where = self.resolve(p.pid)
        if where is None:
            return None  # not in any corral sandbox: not ours
        sandbox_id, step = where
        grant = self.granted(sandbox_id)
        if grant is None:
            return None  # a sandbox this runtime does not own (another instance's, or closing)
        has_gpu, steps = grant
        start = _start_time(p.pid)
        key = (sandbox_id, p.pid, start, self._gpu_key(dev))
        present.add(key)
        last = self._seen.get(key)
        if last is None:
            action = "process"
        elif now - last >= self.sample_every:
            action = "sample"
        else:
            return None
        # Without a grant nothing is in a granted tree; with one, steps=None grants the whole sandbox.
        in_tree = has_gpu and (steps is None or (step is not None and step in steps))
        info = procs.info(p.pid)
        ev = Event(
            kind=EventKind.GPU, action=action, sandbox_id=sandbox_id, step=step, pid=p.pid,
            ppid=info.ppid if info else None, exe=info.exe if info else None, argv=info.argv if info else None,
            data={
                "gpu_index": dev.index, "gpu_uuid": dev.uuid, "gpu_name": dev.name,
                "used_memory_mb": round(p.used_memory / MIB) if p.used_memory is not None else None,
                "utilization": dev.utilization,  # the whole device's: NVML has no cheap per-process figure
                "gpu_memory_used_mb": round(dev.memory_used / MIB) if dev.memory_used is not None else None,
                "gpu_memory_total_mb": round(dev.memory_total / MIB) if dev.memory_total is not None else None,
                "proc_type": p.kind, "start_time": start,
                "gpu_granted": has_gpu, "in_granted_tree": in_tree,
            },
        )
        return ev, key

    def _problem(self, what: str, e: BaseException) -> None:
        msg = f"{what}: {type(e).__name__}: {e}"
        if msg in self._problems:
            log.debug("gpu monitor: %s", msg)  # said once already; a broken GPU would otherwise log every second
        else:
            self._problems.add(msg)
            log.warning("gpu monitor: %s", msg)

    def _reset_backend(self) -> None:
        if self._ready:
            self._ready = False
            with contextlib.suppress(Exception):
                self.backend.shutdown()

    # -- the loop --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Poll every `interval` seconds until cancelled. Backend calls run on one worker thread of
        their own: NVML can block for seconds on a failing GPU, and must not stall the event loop or
        the default executor; one thread also keeps init, polls and shutdown in order."""
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-gpu")
        try:
            while True:
                try:
                    snap = await loop.run_in_executor(pool, self._collect)
                    self._handle(snap)
                except Exception as e:
                    self._problem("poll failed", e)
                await asyncio.sleep(self.interval)
        finally:
            # queued behind a poll still in flight; not awaited, so stop() is not held up by a hung driver
            pool.submit(self._reset_backend)
            pool.shutdown(wait=False)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="corral-gpu-monitor")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
