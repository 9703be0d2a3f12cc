"""Where a cold create's time goes: each phase of `Runtime.create()` timed over N cold creates.

The runtime's own functions are wrapped with timers for the run (a profiler, not a benchmark: the
wrapping costs a little, and phases run in threads overlap), then one `exec("echo hi")` after each
create. Prints p50 per phase and writes results/profile_create.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/profile_create.py [-n 15]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_runtime import RESULTS_DIR, preflight
from timers import TIMES, timed

import corral.net.netpool as netpool_mod
import corral.runtime as runtime_mod
import corral.sandbox.cgroups as cgroups_mod
import corral.sandbox.deployment as deployment_mod
import corral.sandbox.sandbox as sandbox_mod
from corral import Runtime, RuntimeConfig, SandboxConfig

PHASES = [  # (what, owner, attribute, is a coroutine function)
    # made ahead by the network pool (net/netpool.py), off the create's path when one is ready
    ("network namespace, veth, addresses (made ahead)", runtime_mod.Runtime, "_make_net", False),
    ("the sandbox's cgroups (in a thread)", cgroups_mod.InstanceCgroups, "sandbox", False),
    ("masks of the host's tree (in a thread)", deployment_mod, "root_mounts", False),
    ("bwrap's argv and fds (_prepare)", deployment_mod.Deployment, "_prepare", True),
    ("fork + cgroup + exec of bwrap (Popen)", deployment_mod.subprocess, "Popen", False),
    ("launch until the agent is ready (start)", deployment_mod.Deployment, "start", True),
    ("exec monitor, stage, file watch (_activate)", sandbox_mod.Sandbox, "_activate", True),
]


TAKEN: list[bool] = []  # per create: a network made ahead was ready (else the create made its own)


async def run(n: int) -> dict[str, Any]:
    for name, owner, attr, coro in PHASES:
        setattr(owner, attr, timed(name, getattr(owner, attr), coro))
    take = netpool_mod.NetPool.take

    def counted_take(pool: netpool_mod.NetPool) -> Any:
        got = take(pool)
        TAKEN.append(got is not None)
        return got

    netpool_mod.NetPool.take = counted_take  # type: ignore[method-assign]
    state = Path(tempfile.mkdtemp(prefix="corral-profile-create-"))
    rt = Runtime(RuntimeConfig(state_dir=state, system_dns=False, reset_spare=False))
    await rt.start()
    try:
        sb = await rt.create(SandboxConfig())  # builds the native agent once, warms the paths
        await sb.exec("true")
        await sb.close()
        TIMES.clear()
        TAKEN.clear()
        await asyncio.sleep(0.5)  # the pool refilled after the warm-up create
        create, first = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            sb = await rt.create(SandboxConfig())
            t1 = time.perf_counter()
            await sb.exec("echo hi")
            create.append((t1 - t0) * 1000)
            first.append((time.perf_counter() - t1) * 1000)
            await sb.close()
    finally:
        await rt.close()
    return {"n": n, "create_p50_ms": statistics.median(create), "first_exec_p50_ms": statistics.median(first),
            "networks_ready": f"{sum(TAKEN)}/{len(TAKEN)}",
            "phases_p50_ms": {k: round(statistics.median(v), 2) for k, v in TIMES.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=15, help="cold creates (default 15)")
    args = ap.parse_args()
    if preflight(False) is None:
        return 2
    out = asyncio.run(run(args.n))
    out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    print(f"cold create p50 {out['create_p50_ms']:.1f} ms, then first exec {out['first_exec_p50_ms']:.1f} ms; "
          f"a network made ahead was ready for {out['networks_ready']} creates")
    for k, v in out["phases_p50_ms"].items():
        print(f"  {k:<45} {v:8.2f} ms")
    path = RESULTS_DIR / "profile_create.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
