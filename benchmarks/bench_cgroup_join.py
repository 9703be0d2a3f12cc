"""What joining a cgroup costs: a freshly forked child moved by its pid (written to `cgroup.procs`, as
corral did) against the child moving itself ("0" written to the v1 `tasks` file, as the launcher and the
agent's children do now: cgroups.py `join_files`). The cgroups are a sandbox's, made by corral's own
code under corral's cgroup, and removed at the end. Each round forks a child, which times its own
write and reports it through a pipe; rounds are 150 ms apart (the kernel's lock for a move by pid waits
out an RCU grace period, which a move right after another can skip). Prints p50 per way and the ratio;
writes results/cgroup_join.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_cgroup_join.py [--rounds 20]'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench_runtime import RESULTS_DIR, preflight

from corral.config import Limits
from corral.sandbox.cgroups import InstanceCgroups, discover


def one(path: str, token: bytes | None) -> float:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # one thread: the child of a fork
        os.close(r)
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, token if token is not None else str(os.getpid()).encode())
        os.close(fd)
        os.write(w, f"{(time.perf_counter() - t) * 1000:.4f}".encode())
        os._exit(0)
    os.close(w)
    ms = float(os.read(r, 64) or b"nan")
    os.close(r)
    os.waitpid(pid, 0)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    pre = preflight(False)
    if pre is None:
        return 2
    console, machine = pre
    h = discover("b" + os.urandom(3).hex())
    if h.version is None:
        console.print(f"no usable cgroups: {h.problem}")
        return 2
    inst = InstanceCgroups(h)
    cg = inst.sandbox("sb-bench-join", Limits())
    samples: dict[str, list[float]] = {"by pid (cgroup.procs)": [], "itself (\"0\" to tasks)": []}
    try:
        step = cg.step_dir(1)
        procs = str(step / "cgroup.procs")
        itself = str(step / ("tasks" if h.version == 1 else "cgroup.procs"))
        for _ in range(args.rounds):
            for key, path, token in (("by pid (cgroup.procs)", procs, None),
                                     ("itself (\"0\" to tasks)", itself, b"0")):
                time.sleep(0.15)
                samples[key].append(one(path, token))
    finally:
        cg.remove()
        inst.remove()
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    for k, v in p50.items():
        console.print(f"join a step's cgroup, {k}: p50 {v:.3f} ms")
    by_pid, own = p50.values()
    console.print(f"ratio itself / by pid: {own / by_pid:.3f} (cgroup v{h.version})")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "cgroup_join.json").write_text(json.dumps(
        {"machine": machine, "cgroup_version": h.version, "rounds": args.rounds, "p50_ms": p50, "samples": samples},
        indent=1))
    console.print(f"wrote {RESULTS_DIR / 'cgroup_join.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
