"""The native agent (agent.c) against agent.py, in one run, sample by sample.

Two runtimes side by side, one per agent (`RuntimeConfig.agent`), with bare bubblewrap as the floor:
- idle memory: N sandboxes of each, Pss summed over each sandbox's processes (bwrap and the agent; shared
  pages split among their users), after a second idle;
- starts per second: 32 sandboxes created with 8 in flight, each to its first output;
- cold create -> first output, alternating agents and `bwrap ... echo hi`;
- one command in a running sandbox: a session command and `sb.exec` (`echo hi`), alternating agents.
Prints a table with ratios and writes results/agent.json.

    unshare --net --mount --propagation private -- sh -c \\
        'ip link set lo up && .venv/bin/python benchmarks/bench_agent.py [--quick]'
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_peers import BWRAP, timed
from bench_runtime import Metric, MiB, Report, Target, ms_since, p50_ratio, preflight, pss_of, render, write_results

from corral import Runtime, RuntimeConfig, SandboxConfig

AGENTS = ("native", "python")


async def first_output(rt: Runtime, cfg: SandboxConfig) -> float:
    t0 = time.perf_counter()
    sb = await rt.create(cfg)
    await sb.exec("echo hi")
    ms = ms_since(t0)
    await sb.close()
    return ms


async def starts_per_second(rt: Runtime, total: int, in_flight: int) -> float:
    gate = asyncio.Semaphore(in_flight)
    made = []

    async def one(i: int) -> None:
        async with gate:
            sb = await rt.create(SandboxConfig(hostname=f"rate{i}"))
            made.append(sb)
            r = await sb.exec("echo hi")
            assert r.stdout == "hi\n", r

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    rate = total / (time.perf_counter() - t0)
    await asyncio.gather(*(sb.close() for sb in made))
    return rate


async def idle_pss(rt: Runtime, count: int) -> list[float]:
    sbs = []
    try:
        while len(sbs) < count:
            batch = min(10, count - len(sbs))
            sbs += await asyncio.gather(*(rt.create(SandboxConfig(hostname="idle")) for _ in range(batch)))
        await asyncio.sleep(1)  # idle: start-up pages settle
        return [sum(pss_of(p) for p in sb.pids()) / MiB for sb in sbs]
    finally:
        await asyncio.gather(*(sb.close() for sb in sbs))


async def run_bench(rep: Report, quick: bool) -> None:
    state = Path(tempfile.mkdtemp(prefix="corral-bench-agent-"))
    rts = {a: Runtime(RuntimeConfig(state_dir=state / a, system_dns=False, agent=a, reset_spare=False)) for a in AGENTS}
    n = 10 if quick else 60
    try:
        for rt in rts.values():
            await rt.start()
            await first_output(rt, SandboxConfig())  # builds the native agent, warms every path

        rep.group("idle memory per sandbox (bwrap + agent, Pss)")
        count = 10 if quick else 50
        mem = {a: rep.add(Metric(f"mem_{a}", f"{a} agent: N={count}", "MiB",
                                 baseline=None if a == "python" else "mem_python")) for a in AGENTS}
        for _ in range(1 if quick else 2):
            for a, rt in rts.items():
                mem[a].samples += await idle_pss(rt, count)

        rep.group("sandboxes started per second (32, 8 in flight, each to its first output)")
        rate = {a: rep.add(Metric(f"rate_{a}", f"{a} agent", "/s", higher_is_better=True,
                                  baseline=None if a == "python" else "rate_python")) for a in AGENTS}
        for _ in range(1 if quick else 3):
            for a, rt in rts.items():
                rate[a].samples.append(await starts_per_second(rt, 16 if quick else 32, 8))

        rep.group("cold create -> first output")
        cold = {a: rep.add(Metric(f"cold_{a}", f"{a} agent", "ms", baseline="cold_bwrap")) for a in AGENTS}
        floor = rep.add(Metric("cold_bwrap", "bwrap ... echo hi (the floor)", "ms"))
        for _ in range(max(n // 3, 3)):
            for a, rt in rts.items():
                cold[a].samples.append(await first_output(rt, SandboxConfig()))
            floor.samples.append(await asyncio.to_thread(timed, [*BWRAP, "echo", "hi"]))

        rep.group("one command in a running sandbox: echo hi")
        sbs = {a: await rt.create(SandboxConfig()) for a, rt in rts.items()}
        for sb in sbs.values():
            await sb.create_session("s")
        sess = {a: rep.add(Metric(f"session_{a}", f"{a} agent: session command", "ms",
                                  baseline=None if a == "python" else "session_python")) for a in AGENTS}
        ex = {a: rep.add(Metric(f"exec_{a}", f"{a} agent: sb.exec", "ms",
                                baseline=None if a == "python" else "exec_python")) for a in AGENTS}
        for i in range(n + 10):
            for a, sb in sbs.items():
                t0 = time.perf_counter()
                await sb.run_in_session("s", "echo hi")
                if i >= 10:  # the first ten warm the path
                    sess[a].samples.append(ms_since(t0))
                t0 = time.perf_counter()
                await sb.exec("echo hi")
                if i >= 10:
                    ex[a].samples.append(ms_since(t0))
                await asyncio.sleep(0.05)  # an agent's think time between steps
        for sb in sbs.values():
            await sb.close()
    finally:
        for rt in rts.values():
            await rt.close()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small n")
    ap.add_argument("--out", default="", help="JSON output path (default benchmarks/results/agent.json)")
    args = ap.parse_args()
    pre = preflight(args.quick)
    if pre is None:
        return 2
    console, machine = pre
    if shutil.which("cc") is None:
        console.print("no C compiler: the native agent cannot be built (apt-get install gcc libc6-dev)")
        return 2
    rep = Report()
    asyncio.run(run_bench(rep, args.quick))
    tgts = [Target("idle memory <= 2 MiB per sandbox (native)", lambda r: r.metrics["mem_native"].p50,
                   lambda v: v <= 2, lambda v: f"{v:.2f} MiB"),
            Target(">= 100 sandboxes started per second (native)", lambda r: r.metrics["rate_native"].p50,
                   lambda v: v >= 100, lambda v: f"{v:.0f}/s"),
            Target("cold create -> first output <= 30 ms (native)", lambda r: r.metrics["cold_native"].p50,
                   lambda v: v <= 30, lambda v: f"{v:.0f} ms"),
            Target("native / python, session command", p50_ratio("session_native", "session_python"),
                   lambda v: v <= 1.1, lambda v: f"{v:.2f}x")]
    extra: dict[str, Any] = {"cc": subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout
                             .splitlines()[0]}
    render(console, rep, tgts, title="native agent against agent.py")
    write_results(console, "agent", rep, tgts, machine, args.quick, args.out, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
