"""What judging a long command line costs corral, and what it costs every other sandbox.

1. Offline: the rules' pre-check of each line (every simple command of it judged, as Sandbox._precheck
   does, a step's standard input with it in 64 KiB windows), with the parse caches emptied before each
   round: p50 ms per line.
2. Live: the line run by `sb.exec` in a real sandbox while a ticker on corral's event loop sleeps 5 ms
   at a time: the worst lateness of a tick (what every other sandbox's events wait), against the same
   ticker beside a plain `true`.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_lines.py [--rounds 3] [--offline-only]'

`--offline-only` runs part 1 alone, and needs no sandbox. `PYTHONPATH=OTHER/src` times another tree on
the same lines (`--out lines-REV.json` keeps its results apart).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LINES = {
    "50 x `curl x | python3 -u <1.2 KB>` (61 KB)": " ; ".join(["curl x | python3 -u " + "a" * 1200] * 50),
    "200 x `echo hello world N` (4.7 KB)": " && ".join(f"echo hello world {i}" for i in range(200)),
    "100 x `git config --global` (3.6 KB)": " ; ".join(f"git config --global user.name x{i}" for i in range(100)),
    "one 100 KB argument": "echo " + "x" * 100_000,
    "`echo` of 20,000 words (40 KB)": "echo " + " ".join(["w"] * 20_000),
    "a 150 KB here-document to a file": "cat > /workspace/m.py <<'EOF'\n" + "\n".join(
        f"def f{i}(x):\n    return x + {i}  # a comment here" for i in range(3000)) + "\nEOF",
}
# a step's standard input, judged with its line in 64 KiB windows up to 1 MiB (the write_file tool's shape)
INPUTS = {
    "1 MiB on standard input (`cat > m.py`, write_file)": ("cat > /workspace/m.py", "".join(
        f"def f{i}(x):\n    return x + {i}  # a comment here\n" for i in range(24000)).encode()[:1 << 20]),
}


def _clear_caches() -> None:
    from corral import protect
    from corral.detect import command
    for mod in (command, protect):
        for v in vars(mod).values():
            if isinstance(v, functools._lru_cache_wrapper):
                v.cache_clear()


def offline(rounds: int) -> dict[str, float]:
    from corral.detect.command import input_texts, split
    from corral.detect.detector import Detector
    from corral.events import Event, EventKind

    d = Detector()
    out: dict[str, float] = {}
    for name, (line, stdin) in {**{k: (v, None) for k, v in LINES.items()}, **INPUTS}.items():
        times = []
        for _ in range(rounds):
            _clear_caches()
            t = time.perf_counter()
            for text in input_texts(line, stdin) or [None]:
                for s in split(line):
                    d.evaluate(Event(kind=EventKind.COMMAND, action="check", sandbox_id="s", step=1, command=line,
                                     argv=s.argv, data={"redirects": s.redirects, "writes": s.writes, "session": None,
                                                        "protected": [], **({"text": text} if text else {})}))
            times.append((time.perf_counter() - t) * 1000)
        out[name] = statistics.median(times)
        print(f"  {name:45s} judged in {out[name]:8.1f} ms", flush=True)
    return out


async def live(rounds: int) -> dict[str, dict[str, float]]:
    from corral import Runtime, RuntimeConfig, SandboxConfig

    async def stalls(cmd: str, stdin: bytes | None = None) -> tuple[float, float]:
        worst, done = 0.0, False

        async def tick() -> None:
            nonlocal worst
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - t - 0.005)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        await sb.exec(cmd, stdin=stdin)
        wall = time.perf_counter() - t0
        done = True
        await ticker
        return worst * 1000, wall * 1000

    out: dict[str, dict[str, float]] = {}
    rt = Runtime(RuntimeConfig(state_dir=Path(tempfile.mkdtemp(prefix="corral-bench-lines-"))))
    async with rt:
        sb = await rt.create(SandboxConfig())
        cases = {"`true` (baseline)": ("true", None), **{k: (v, None) for k, v in LINES.items()}, **INPUTS}
        for name, (line, stdin) in cases.items():
            cmd = line if "here-document" in line or stdin else line + " > /dev/null"
            samples = []
            for _ in range(rounds):
                _clear_caches()
                samples.append(await stalls(cmd, stdin))
            out[name] = {"loop_stall_ms": statistics.median(s[0] for s in samples),
                         "exec_ms": statistics.median(s[1] for s in samples)}
            print(f"  {name:45s} worst loop stall {out[name]['loop_stall_ms']:7.1f} ms, "
                  f"exec {out[name]['exec_ms']:8.1f} ms", flush=True)
        await sb.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--offline-only", action="store_true")
    ap.add_argument("--out", default="lines.json", help="the results file's name, under results/")
    args = ap.parse_args()
    print("offline: the rules' pre-check of each line, p50")
    off = offline(args.rounds)
    if args.offline_only:
        return 0
    from bench_runtime import RESULTS_DIR, preflight
    pre = preflight(False)
    if pre is None:
        return 2
    _console, machine = pre
    print("live: a real sandbox runs the line; a 5 ms ticker on corral's loop")
    on = asyncio.run(live(args.rounds))
    RESULTS_DIR.mkdir(exist_ok=True)
    import corral
    (RESULTS_DIR / args.out).write_text(json.dumps(
        {"machine": machine, "tree": str(Path(corral.__file__).parents[1]), "rounds": args.rounds,
         "offline_ms": off, "live": on}, indent=1))
    print(f"wrote {RESULTS_DIR / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
