"""Benchmark: what each trainer interface adds to one agent step.

The same shell tool call (`echo step`) as one step of an episode, through:
  direct    AsyncToolEpisode.call on the caller's event loop (the baseline)
  gym       SandboxEnv.step (Gymnasium; blocking wrapper over corral's background loop)
  trl       CorralTRLEnv.shell (TRL's environment_factory class; same wrapper)
  openenv   CorralEnvClient.step over OpenEnv's WebSocket session, through `corral serve`'s app
  rock      ROCK's run_in_session over HTTP (httpx), through the same app
Rounds are interleaved, so machine noise lands on every interface alike; medians and their ratio to
direct are reported.

Run it as `make bench` does, inside a private network namespace:
    unshare --net --mount --propagation private -- \
        sh -c 'ip link set lo up && .venv/bin/python benchmarks/bench_interfaces.py'
Figures are printed and written to benchmarks/results/interfaces.json (.quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from bench_runtime import Metric, Report, ms_since, render, run_script, write_results
from rich.console import Console

from corral import Runtime, RuntimeConfig
from corral.agent.tasks import Task
from corral.envs import CorralTRLEnv, SandboxEnv
from corral.envs.episode import AsyncToolEpisode
from corral.envs.openenv_env import CorralAction, CorralEnvClient
from corral.server import create_app
from corral.server.app import PREFIX
from corral.server.config import OpenEnvSettings, ServeConfig
from corral.sync import SyncRuntime

CMD = "echo step"
TOKEN = "bench-interfaces-" + "t" * 16
TASK_SPEC = {"id": "bench", "instruction": "Run commands.", "verifier": {"command": "true", "score": "exit_code"},
             "limits": {"max_steps": 100_000, "max_seconds": 86_400}}
TASK = Task.model_validate(TASK_SPEC)


class Service:
    """`corral serve`'s app under uvicorn on a loopback port, in a thread of its own."""

    def __init__(self, state: Path) -> None:
        tasks = state / "tasks"
        tasks.mkdir(parents=True)
        (tasks / "bench.yaml").write_text(yaml.safe_dump(TASK_SPEC))  # OpenEnv serves tasks from a directory
        cfg = ServeConfig(runtime=RuntimeConfig(state_dir=state, system_dns=False),
                          openenv=OpenEnvSettings(tasks=tasks))
        self.app = create_app(cfg, [TOKEN])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("corral serve's app did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def measure(rep: Report, n: int, tmp: Path, base: str) -> None:
    m = {k: rep.add(Metric(f"step_{k}", label, "ms", baseline=None if k == "direct" else "step_direct"))
         for k, label in (("direct", "baseline: AsyncToolEpisode.call (in process)"),
                          ("gym", "Gymnasium SandboxEnv.step"),
                          ("trl", "TRL CorralTRLEnv.shell"),
                          ("openenv", "OpenEnv step over WebSocket (corral serve)"),
                          ("rock", "ROCK run_in_session over HTTP (corral serve)"))}
    rt = Runtime(RuntimeConfig(state_dir=tmp / "direct", system_dns=False))
    await rt.start()
    sync_rt = SyncRuntime(RuntimeConfig(state_dir=tmp / "sync", system_dns=False)).start()
    direct = AsyncToolEpisode(rt, [TASK])
    gym_env = SandboxEnv([TASK], runtime=sync_rt)
    trl_env = CorralTRLEnv([TASK], runtime=sync_rt)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        await direct.start(TASK)
        await asyncio.to_thread(gym_env.reset, options={"task_id": "bench"})
        await asyncio.to_thread(trl_env.reset, task_id="bench")
        gym_action = json.dumps({"tool": "shell", "arguments": {"command": CMD}})
        async with (CorralEnvClient(base_url=f"{base}/openenv", token=TOKEN) as oe,
                    httpx.AsyncClient(base_url=f"{base}{PREFIX}", headers=headers, timeout=60) as http):
            await oe.reset(task_id="bench")
            sid = (await http.post("/start_async", json={"image": "bench"})).json()["result"]["sandbox_id"]
            r = await http.post("/create_session", json={"sandbox_id": sid, "session": "s"})
            r.raise_for_status()
            for _ in range(n):
                t0 = time.perf_counter()
                out = await direct.call("shell", {"command": CMD})
                m["direct"].samples.append(ms_since(t0))
                assert out.stdout == "step\n", out
                t0 = time.perf_counter()
                obs, *_ = await asyncio.to_thread(gym_env.step, gym_action)
                m["gym"].samples.append(ms_since(t0))
                assert "step" in obs, obs
                t0 = time.perf_counter()
                text = await asyncio.to_thread(trl_env.shell, CMD)
                m["trl"].samples.append(ms_since(t0))
                assert "step" in text, text
                t0 = time.perf_counter()
                res = await oe.step(CorralAction(tool="exec", command=CMD))
                m["openenv"].samples.append(ms_since(t0))
                assert res.observation.stdout == "step\n", res
                t0 = time.perf_counter()
                r = await http.post("/run_in_session", json={"sandbox_id": sid, "session": "s", "command": CMD})
                m["rock"].samples.append(ms_since(t0))
                assert r.json()["result"]["output"] == "step", r.text
    finally:
        gym_env.close()
        CorralTRLEnv.shutdown()
        sync_rt.close()
        await direct.close_sandbox()
        await rt.close()


async def main(args: argparse.Namespace, console: Console, machine: dict[str, Any]) -> int:
    rep = Report()
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-interfaces-"))
    rep.group("per-step latency of one shell tool call, by interface")
    try:
        with Service(tmp / "serve") as base:
            await measure(rep, 20 if args.quick else 200, tmp, base)
    except Exception as e:  # report what was measured, and why the rest was not
        rep.errors["interfaces"] = f"{type(e).__name__}: {e}"
    render(console, rep, [], "corral trainer-interface benchmark")
    write_results(console, "interfaces", rep, [], machine, args.quick)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(run_script(__doc__, "fewer steps: a smoke run", main))
