"""corral's OpenEnv environment served by OpenEnv's own server helper on a real uvicorn server, driven
by OpenEnv's EnvClient (CorralEnvClient) over the WebSocket session protocol, and its HTTP routes
with plain httpx. The main test server mounts the app under /openenv, sharing the parent's Runtime
and requiring a token, as corral serve will; a second one serves it standalone with a Runtime of
its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("openenv")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from starlette.requests import HTTPConnection  # noqa: E402

from corral import Runtime, RuntimeConfig  # noqa: E402
from corral.agent.tasks import Task  # noqa: E402
from corral.envs.openenv_env import (  # noqa: E402
    CorralAction,
    CorralEnvClient,
    CorralEnvironment,
    CorralObservation,
    OpenEnvServerError,
    RuntimeHandle,
    create_openenv_app,
)
from corral.errors import EnvironmentUsageError  # noqa: E402
from corral.sync import run  # noqa: E402
from tests.conftest import serve_app  # noqa: E402

TOKEN = "tok-openenv-" + "z" * 16
CALC = Task.model_validate({
    "id": "calc", "instruction": "Write add(a, b) in /workspace/calc.py.",
    "verifier": {"command": "python3 -c \"import sys; sys.path.append('/workspace'); import calc; "
                            "raise SystemExit(0 if calc.add(2, 3) == 5 else 1)\"",
                 "score": "exit_code"}, "limits": {"max_steps": 10}})
TINY = Task.model_validate({
    "id": "tiny", "instruction": "One turn only.", "verifier": {"command": "true", "score": "exit_code"},
    "setup": ["echo prepared > /workspace/prepared.txt"], "limits": {"max_steps": 1}})
SOLUTION = "def add(a, b):\n    return a + b\n"
TUNNEL = "ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"


async def wait_closed(rt: Runtime, sandbox_id: str | None) -> None:
    deadline = time.monotonic() + 30
    while sandbox_id in rt.sandboxes:
        assert time.monotonic() < deadline, f"sandbox {sandbox_id} was not closed"
        await asyncio.sleep(0.05)


def token_check(conn: HTTPConnection) -> str | None:
    return "tenant-a" if conn.headers.get("authorization") == f"Bearer {TOKEN}" else None


@pytest.fixture(scope="module")
def mounted(world, tmp_path_factory) -> Iterator[tuple[str, dict]]:
    """A parent app like corral serve: its Runtime starts in its lifespan; the OpenEnv app is mounted
    under /openenv and shares it."""
    cfg = RuntimeConfig(state_dir=tmp_path_factory.mktemp("openenv-state"), hosts=world.hosts, system_dns=False)
    shared: dict = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        shared["runtime"] = rt = Runtime(cfg)
        await rt.start()
        try:
            yield
        finally:
            await rt.close()

    parent = FastAPI(lifespan=lifespan)
    parent.mount("/openenv", create_openenv_app(tasks=[CALC, TINY], runtime=lambda: shared.get("runtime"),
                                                max_concurrent_envs=2, authenticate=token_check))
    with serve_app(parent) as base:
        yield f"{base}/openenv", shared
    assert not shared["runtime"].started and not shared["runtime"].sandboxes


def client(url: str, **kw) -> CorralEnvClient:
    return CorralEnvClient(base_url=url, token=TOKEN, **kw)


async def test_client_solves_calc(mounted):
    url, shared = mounted
    async with client(url) as env:
        r = await env.reset(task_id="calc", episode_id="oe-calc-1")
        obs = r.observation
        assert isinstance(obs, CorralObservation) and not r.done and r.reward is None
        assert "add(a, b)" in obs.output and obs.task_id == "calc" and obs.episode_id == "oe-calc-1"
        assert obs.sandbox_id in shared["runtime"].sandboxes  # the parent's runtime runs it

        r = await env.step(CorralAction(tool="write_file", path="/workspace/calc.py", content=SOLUTION))
        assert (r.done, r.reward) == (False, 0.0) and r.observation.termination_reason is None
        r = await env.step(CorralAction(tool="read_file", path="/workspace/calc.py"))
        assert "return a + b" in r.observation.output
        r = await env.step(CorralAction(tool="exec", command="cd /workspace && python3 -c 'import calc; "
                                                             "print(calc.add(2, 3))'"))
        assert r.observation.exit_code == 0 and r.observation.stdout == "5\n" and not r.done
        state = await env.state()
        assert (state.task_id, state.episode_id, state.step_count, state.done) == ("calc", "oe-calc-1", 3, False)

        r = await env.step(CorralAction(tool="submit"))
        obs = r.observation
        assert r.done and r.reward == 1.0 and obs.done and obs.reward == 1.0
        assert obs.termination_reason == "submitted" and not obs.truncated and obs.violations == []
        assert obs.verifier is not None and obs.verifier["score"] == 1.0
        state = await env.state()
        assert state.done and state.reward == 1.0 and state.termination_reason == "submitted"

        with pytest.raises(OpenEnvServerError, match=r"episode has ended \(submitted\); reset"):
            await env.step(CorralAction(tool="exec", command="true"))
        # the session outlives the error: the next episode starts in a new sandbox
        r2 = await env.reset(task_id="calc")
        assert not r2.done and r2.observation.sandbox_id != obs.sandbox_id
        assert obs.sandbox_id not in shared["runtime"].sandboxes


async def test_violation_ends_episode_with_penalty(mounted):
    url, shared = mounted
    async with client(url) as env:
        await env.reset(task_id="calc")
        r = await env.step(CorralAction(tool="exec", command=TUNNEL))
        obs = r.observation
        assert r.done and r.reward == -1.0 and obs.reward == -1.0 and not obs.truncated
        assert obs.termination_reason == "security_violation"
        v = obs.violations[0]
        assert v["rule"] == "ssh-tunnel" and v["step"] == obs.step == 1 and v["command"] == TUNNEL
        assert v["severity"] and v["title"]
        state = await env.state()
        assert state.done and state.reward == -1.0 and state.violations >= 1
    await wait_closed(shared["runtime"], obs.sandbox_id)  # the session's end closes its sandbox


async def test_turn_limit_is_done_and_truncated(mounted):
    url, _ = mounted
    async with client(url) as env:
        await env.reset(task_id="tiny")
        r = await env.step(CorralAction(tool="read_file", path="/workspace/prepared.txt"))
        assert "prepared" in r.observation.output  # the task's setup ran before the first turn
        # a limit ends the episode like every other ending: the work is graded as it stands
        assert r.done and r.reward == 1.0 and r.observation.verifier["score"] == 1.0
        assert r.observation.truncated and r.observation.termination_reason == "max_steps"


async def test_invalid_actions_and_resets_are_clear_errors(mounted):
    url, _ = mounted
    # the typed action refuses locally, saying what is wrong
    with pytest.raises(ValidationError, match="exec needs `command`"):
        CorralAction(tool="exec")
    with pytest.raises(ValidationError, match="read_file does not take `command`"):
        CorralAction(tool="read_file", path="/x", command="ls")
    with pytest.raises(ValidationError, match="'exec', 'write_file'"):
        CorralAction(tool="rm")  # type: ignore[arg-type]
    async with client(url) as env:
        with pytest.raises(OpenEnvServerError, match="reset first"):
            await env.step(CorralAction(tool="exec", command="true"))
        with pytest.raises(OpenEnvServerError, match="no task 'nope'; known: calc, tiny"):
            await env.reset(task_id="nope")
        with pytest.raises(OpenEnvServerError, match=r"unknown reset option.*'task'.*task_id"):
            await env.reset(task="calc")
        await env.reset(task_id="calc")
        # what the server says about a raw action reaches the caller, and the session goes on
        with pytest.raises(OpenEnvServerError, match=r"VALIDATION_ERROR.*write_file needs `content`") as e:
            await env.step({"tool": "write_file", "path": "/workspace/a"})
        assert e.value.code == "VALIDATION_ERROR"
        with pytest.raises(OpenEnvServerError, match="Extra inputs are not permitted"):
            await env.step({"tool": "submit", "cmd": "x"})
        r = await env.step({"tool": "exec", "command": "echo still here"})
        assert r.observation.stdout == "still here\n" and r.observation.turn == 1


async def test_sessions_are_isolated_and_capped(mounted):
    url, _ = mounted
    async with client(url) as a, client(url) as b:
        ra, rb = await asyncio.gather(a.reset(task_id="calc"), b.reset(task_id="calc"))
        assert ra.observation.sandbox_id != rb.observation.sandbox_id
        await a.step(CorralAction(tool="write_file", path="/workspace/calc.py", content=SOLUTION))
        r = await b.step(CorralAction(tool="submit"))
        assert r.done and r.reward == 0.0  # b's sandbox never got a's file
        with pytest.raises(OpenEnvServerError, match="CAPACITY_REACHED"):
            async with client(url) as c:
                await c.reset(task_id="calc")


async def test_token_required(mounted):
    url, _ = mounted
    with pytest.raises(ConnectionError, match="403"):
        async with CorralEnvClient(base_url=url) as env:
            await env.reset(task_id="calc")
    async with CorralEnvClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as env:
        assert not (await env.reset(task_id="calc")).done
    async with httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/health")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_http_routes(mounted):
    url, shared = mounted
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert (await c.get("/health")).json() == {"status": "healthy"}
        schema = (await c.get("/schema")).json()
        assert schema["action"]["properties"]["tool"]["enum"] == ["exec", "write_file", "read_file", "edit_file",
                                                                  "submit"]
        props = schema["observation"]["properties"]
        assert {"output", "violations", "termination_reason", "stdout", "stderr", "exit_code", "task_id",
                "episode_id", "sandbox_id", "truncated"} <= set(props)
        meta = (await c.get("/metadata")).json()
        assert meta["name"] == "corral" and "calc" in meta["description"]
        # OpenEnv's HTTP /state answers a fresh environment's state, cut to its base State model
        assert (await c.get("/state")).json() == {"episode_id": None, "step_count": 0}

        # HTTP /reset and /step are stateless in OpenEnv: each runs on a fresh environment
        r = await c.post("/reset", json={"task_id": "calc", "episode_id": "oe-http-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["done"] is False and body["reward"] is None
        assert body["observation"]["task_id"] == "calc" and "add(a, b)" in body["observation"]["output"]
        assert body["observation"]["episode_id"] == "oe-http-1"
        r = await c.post("/reset", json={"task_id": "nope"})
        assert r.status_code == 400 and "known: calc, tiny" in r.json()["detail"]
        r = await c.post("/step", json={"action": {"tool": "exec", "command": "true"}})
        assert r.status_code == 409 and "reset first" in r.json()["detail"] and "/ws" in r.json()["detail"]
        r = await c.post("/step", json={"action": {"tool": "exec"}})
        assert r.status_code == 422 and r.json()["detail"][0]["msg"].startswith("exec needs `command`")
    # the environment behind the HTTP reset closed its sandbox after answering
    await wait_closed(shared["runtime"], body["observation"]["sandbox_id"])


def test_standalone_app_solves_an_example_task(world, tmp_path):
    """No mount, no shared runtime: the app starts its own Runtime on first reset and closes it at
    shutdown. The example tasks are the default; fix-median is solved by replaying its solution.yaml
    through OpenEnv's blocking client wrapper."""
    cfg = RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False)
    app = create_openenv_app(cfg)
    solution = yaml.safe_load((EXAMPLES / "fix-median" / "solution.yaml").read_text())
    with serve_app(app) as base:
        with CorralEnvClient(base_url=base).sync() as env:
            r = env.reset(task_id="fix-median")
            assert "median" in r.observation.output and not r.done
            for act in solution:
                tool = "exec" if act["tool"] == "shell" else act["tool"]
                r = env.step(CorralAction(tool=tool, **act["arguments"]))
            assert r.done and r.reward == 1.0 and r.observation.termination_reason == "submitted"
            assert r.observation.violations == []
            # a seeded reset without task_id picks a task and says which
            r = env.reset(seed=3)
            assert r.observation.task_id in {p.name for p in EXAMPLES.iterdir() if p.is_dir()}
        handle = app.state.corral_runtime
        assert handle.owned is not None and handle.owned.started
        rt = handle.owned
    assert handle.owned is None and not rt.started, "shutdown left the app's runtime open"


def test_environment_used_directly_with_blocking_calls(world, tmp_path):
    """Without a server the sync reset/step run on corral's background loop."""
    handle = RuntimeHandle(config=RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False))
    env = CorralEnvironment([CALC], handle)
    try:
        with pytest.raises(EnvironmentUsageError, match="reset first"):
            env.step(CorralAction(tool="submit"))
        obs = env.reset(seed=0)
        assert obs.task_id == "calc" and env.state.sandbox_id == obs.sandbox_id
        env.step(CorralAction(tool="write_file", path="/workspace/calc.py", content=SOLUTION))
        obs = env.step(CorralAction(tool="submit"))
        assert obs.done and obs.reward == 1.0 and env.state.step_count == 2
        env.close()
        assert handle.owned is not None and obs.sandbox_id not in handle.owned.sandboxes
    finally:
        run(handle.aclose())
