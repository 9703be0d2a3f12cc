#!/usr/bin/env python3
"""Check corral's GPU monitor against a real NVIDIA driver and a real GPU workload.

tests/test_gpu.py puts a double at the NVML boundary; this is the other half, for a machine with
an NVIDIA GPU (run as root, so that it may create cgroups):

    .venv/bin/python scripts/check_gpu.py

1. NvmlBackend against the driver: the devices, their utilisation and memory.
2. A small real GPU workload in a child process (torch, else cupy, else the CUDA driver API through
   ctypes: cuInit + the device's primary context + a 1 MiB cuMemAlloc, which makes a compute process NVML lists),
   placed in a temporary cgroup corral-check-<hex>/corral-sb-check/step-1 laid out as corral's.
3. GpuMonitor.poll_once() reports it with sandbox sb-check and step 1, and the real rules raise
   gpu-without-grant for it (no grant), and gpu-outside-granted-tree (granted, but to step 2 only).

Prints PASS/FAIL lines, exits 1 on any FAIL; prints SKIP and exits 0 where there is no NVIDIA driver.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from corral.detect import Detector
from corral.events import Event
from corral.monitor.gpu import GpuMonitor, NvmlBackend, resolve_from_cgroup
from corral.sandbox.cgroups import remove_tree

HOLD_S = 60  # the workload keeps its context this long at most; it is killed as soon as the check is done
READY_WITHIN_S = 120  # importing torch and a first CUDA init can take a while
SEEN_WITHIN_S = 20  # NVML lists a new context within a second or two; allow for a slow first init

failures = 0


def report(ok: bool, what: str, detail: str = "") -> bool:
    global failures
    print(f"{'PASS' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""), flush=True)
    failures += not ok
    return ok


# The workloads print "ready" once a CUDA context exists on GPU 0, then hold it until killed.
TORCH = ("import time, torch\nx = torch.ones(1 << 18, device='cuda:0'); torch.cuda.synchronize()\n"
         f"print('ready', flush=True); time.sleep({HOLD_S})")
CUPY = ("import time, cupy\nx = cupy.ones(1 << 18); cupy.cuda.Device(0).synchronize()\n"
        f"print('ready', flush=True); time.sleep({HOLD_S})")
CUDA_DRIVER = f"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
def check(name, rc):
    if rc != 0:
        print(f"{{name}} failed: CUresult {{rc}}", file=sys.stderr, flush=True)
        sys.exit(1)
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
check("cuInit", cuda.cuInit(0))
check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), 0))
# the primary context (what the CUDA runtime uses): the same call on every driver since CUDA 7
check("cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
check("cuCtxSetCurrent", cuda.cuCtxSetCurrent(ctx))
check("cuMemAlloc_v2", cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(1 << 20)))
print("ready", flush=True)
time.sleep({HOLD_S})
"""


def _has_module(python: str, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0


def workloads() -> list[tuple[str, list[str]]]:
    """(what, argv) of each workload this machine may run, in the order to try them."""
    out = []
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3")) if p))
    for module, code in (("torch", TORCH), ("cupy", CUPY)):
        py = next((py for py in pythons if _has_module(py, module)), None)
        if py is not None:
            out.append((f"{module} ({py})", [py, "-c", code]))
    out.append(("CUDA driver API via ctypes", [sys.executable, "-c", CUDA_DRIVER]))
    return out


def start_workload(step_dir: Path) -> subprocess.Popen | None:
    """The first workload that gets a CUDA context, running in step_dir's cgroup; None if none did."""
    for what, argv in workloads():
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # In the step's cgroup before it touches the GPU, as a sandboxed command would be (the monitor
        # reads cgroups at poll time, so the order is for realism, not correctness).
        (step_dir / "cgroup.procs").write_text(str(child.pid))
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], READY_WITHIN_S)
        line = child.stdout.readline().strip() if ready else ""
        if line == "ready":
            report(True, "workload created a CUDA context", what)
            return child
        child.kill()
        _, err = child.communicate(timeout=10)
        why = (err or "").strip().splitlines()[-1:] or [f"no context within {READY_WITHIN_S}s"]
        print(f"INFO workload {what} did not start: {why[0][:300]}", flush=True)
    report(False, "workload created a CUDA context", "no workload could (torch, cupy, CUDA driver API)")
    return None


def tracking_base() -> Path | None:
    """Where corral would put its cgroups: beneath our own, in the v1 pids hierarchy or the v2 tree."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else ["unified"]:
            own[c] = path
    if Path("/sys/fs/cgroup/pids").is_dir() and "pids" in own:
        base = Path("/sys/fs/cgroup/pids") / own["pids"].lstrip("/")
    elif Path("/sys/fs/cgroup/cgroup.controllers").exists() and "unified" in own:
        base = Path("/sys/fs/cgroup") / own["unified"].lstrip("/")
    else:
        return None
    return base if os.access(base, os.W_OK) else None


def check_devices(backend: NvmlBackend) -> bool:
    backend.init()
    n = backend.device_count()
    if not report(n > 0, "NVML lists GPUs", f"{n} device(s)"):
        return False
    for i in range(n):
        d = backend.device(i)
        procs = backend.processes(i)
        mem = (f"{d.memory_used >> 20}/{d.memory_total >> 20} MiB" if d.memory_used is not None
               and d.memory_total is not None else "memory n/a")
        report(bool(d.uuid and d.name), f"GPU {d.index}",
               f"{d.name} {d.uuid}, utilization {d.utilization}%, {mem}, {len(procs)} process(es) now")
    return True


def check_workload(instance: str, base: Path) -> None:
    root = base / f"corral-{instance}"
    step_dir = root / "corral-sb-check" / "step-1"
    step_dir.mkdir(parents=True)
    child = None
    try:
        child = start_workload(step_dir)
        if child is None:
            return
        report(resolve_from_cgroup(child.pid, instance) == ("sb-check", 1), "workload is in corral-sb-check/step-1",
               str(resolve_from_cgroup(child.pid, instance)))

        grants: dict[str, tuple[bool, set[int] | None]] = {"sb-check": (False, None)}
        got: list[Event] = []
        mon = GpuMonitor(resolve=functools.partial(resolve_from_cgroup, instance=instance),
                         granted=lambda sid: grants.get(sid), emit=got.append, backend=NvmlBackend())
        ev = _await_event(mon, got, child.pid)
        if ev is None:
            listed = sorted({p.pid for i in range(mon.backend.device_count()) for p in mon.backend.processes(i)})
            report(False, "GpuMonitor reports the workload",
                   f"pid {child.pid} not among NVML's pids {listed} within {SEEN_WITHIN_S}s"
                   + (" (pids from another pid namespace? see corral/monitor/gpu.py)" if listed else ""))
            return
        report((ev.sandbox_id, ev.step, ev.action) == ("sb-check", 1, "process"), "GpuMonitor reports the workload",
               f"sandbox {ev.sandbox_id} step {ev.step} pid {ev.pid} gpu {ev.data['gpu_index']} "
               f"{ev.data['used_memory_mb']} MiB, {ev.data.get('proc_type')}")
        report(ev.data["gpu_granted"] is False and ev.data["in_granted_tree"] is False, "event without a grant",
               f"gpu_granted={ev.data['gpu_granted']} in_granted_tree={ev.data['in_granted_tree']}")
        rules = [f.rule_id for f in Detector().evaluate(ev).findings]
        report("gpu-without-grant" in rules, "detector: gpu-without-grant", str(rules))

        # Granted, but to step 2 only: the workload (step 1) is outside the granted tree.
        grants["sb-check"] = (True, {2})
        mon2 = GpuMonitor(resolve=functools.partial(resolve_from_cgroup, instance=instance),
                          granted=lambda sid: grants.get(sid), emit=got.append, backend=NvmlBackend())
        ev2 = _await_event(mon2, got, child.pid)
        if report(ev2 is not None and ev2.data["in_granted_tree"] is False, "event outside the granted steps"):
            assert ev2 is not None
            rules2 = [f.rule_id for f in Detector().evaluate(ev2).findings]
            report("gpu-outside-granted-tree" in rules2, "detector: gpu-outside-granted-tree", str(rules2))
        mon.backend.shutdown()
        mon2.backend.shutdown()
    finally:
        if child is not None:
            child.kill()
            child.wait()
        remove_tree(root)


def _await_event(mon: GpuMonitor, got: list[Event], pid: int) -> Event | None:
    deadline = time.monotonic() + SEEN_WITHIN_S
    while time.monotonic() < deadline:
        for ev in mon.poll_once():
            if ev.pid == pid:
                return ev
        time.sleep(0.5)
    return None


def main() -> int:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        print("SKIP no NVIDIA driver on this machine (libnvidia-ml.so.1 not found); nothing to check", flush=True)
        return 0
    ok, why = NvmlBackend.available()
    if not report(ok, "NVML available", why):
        return 1
    backend = NvmlBackend()
    try:
        devices_ok = check_devices(backend)
    finally:
        backend.shutdown()
    if not devices_ok:
        return 1
    base = tracking_base()
    if report(base is not None, "cgroups writable", str(base) if base else "run as root, in corral's cgroup setup"):
        assert base is not None
        check_workload("check-" + os.urandom(3).hex(), base)
    print(f"{'FAIL' if failures else 'PASS'} check_gpu: {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
