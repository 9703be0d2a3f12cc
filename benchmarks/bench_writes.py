"""What knowing each file's last writer costs (monitor/writers.py): a command that writes N small files,
in a sandbox with the writer watch and in one without it (its creation refused, as on a kernel that
cannot), rounds alternating. Prints p50 of corral's own CPU time and of the command's wall time per
round, and the ratio to the baseline; writes results/writes.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_writes.py [--files 5000] [--rounds 5]'
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_runtime import RESULTS_DIR, preflight

import corral.sandbox.sandbox as sandbox_mod
from corral import Runtime, RuntimeConfig, SandboxConfig


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class NoWriters:
    def __init__(self, _agent_pid: int) -> None:
        raise OSError("turned off for the baseline")


async def run(files: int, rounds: int) -> dict:
    cmd = f"python3 -c \"for i in range({files}): open(f'/workspace/f{{i}}', 'w').write('x')\""
    real = sandbox_mod.WriterWatch
    rt = Runtime(RuntimeConfig(state_dir=Path(tempfile.mkdtemp(prefix="corral-bench-writes-"))))
    out: dict[str, dict[str, list[float]]] = {k: {"cpu_ms": [], "wall_ms": []} for k in ("watched", "baseline")}
    async with rt:
        sandbox_mod.WriterWatch = NoWriters  # type: ignore[misc,assignment]
        try:
            base = await rt.create(SandboxConfig())
        finally:
            sandbox_mod.WriterWatch = real  # type: ignore[misc]
        watched = await rt.create(SandboxConfig())
        for _ in range(rounds):
            for key, sb in (("watched", watched), ("baseline", base)):
                c0, t0 = cpu_s(), time.perf_counter()
                r = await sb.exec(cmd)
                wall = time.perf_counter() - t0
                await asyncio.sleep(1.2)  # the watch's periodic read of what is left falls in this round
                if r.exit_code != 0:
                    raise RuntimeError(f"{key}: {r.stderr[-300:]}")
                out[key]["cpu_ms"].append((cpu_s() - c0) * 1000)
                out[key]["wall_ms"].append(wall * 1000)
        await watched.close()
        await base.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pre = preflight(False)
    if pre is None:
        return 2
    console, machine = pre
    res = asyncio.run(run(args.files, args.rounds))
    p50 = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    for m in ("cpu_ms", "wall_ms"):
        w, b = p50["watched"][m], p50["baseline"][m]
        what = "corral's CPU (with the exec's round trip)" if m == "cpu_ms" else "the command's wall time"
        console.print(f"{args.files} file writes, {what} p50: watched {w:.1f} ms, baseline {b:.1f} ms, "
                      f"ratio {w / b:.2f}")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "writes.json").write_text(json.dumps(
        {"machine": machine, "files": args.files, "rounds": args.rounds, "p50": p50, "samples": res}, indent=1))
    console.print(f"wrote {RESULTS_DIR / 'writes.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
