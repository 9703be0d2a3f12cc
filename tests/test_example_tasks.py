"""Every example task (examples/tasks) end to end in a real sandbox with the task's own egress policy:
its verifier fails on the starting workspace, and passes after the task's scripted solution
(solution.yaml), which raises no finding. The files the tasks download (corral.rollout.taskworld)
come from the test world's pkg.example.com; an online task's download fails without its egress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from corral import Runtime, RuntimeConfig
from corral.agent.tasks import Task, load_tasks
from corral.rollout.taskworld import TASK_FILES, TASK_HOST
from corral.sandbox.sandbox import ExecResult, Sandbox
from corral.testworld import World

TASKS_DIR = Path(__file__).resolve().parents[1] / "examples" / "tasks"
TASKS = load_tasks(TASKS_DIR)
ALL_PASSED = re.compile(r"(\d+) passed, 0 failed")
TOOLS = {"shell", "write_file", "edit_file", "read_file", "submit"}


def solution(task: Task) -> list[dict]:
    actions = yaml.safe_load((TASKS_DIR / task.id / "solution.yaml").read_text())
    assert isinstance(actions, list) and actions, f"{task.id}: solution.yaml must be a non-empty list of actions"
    return actions


@pytest.fixture(scope="module")
def task_world(world: World) -> World:
    """The suite's one world (worlds share the documentation addresses and their routes, so a second
    one cannot start beside it); its pkg.example.com serves TASK_FILES. build_task_world() itself is
    checked in a namespace of its own below."""
    return world


@pytest_asyncio.fixture(scope="module")
async def task_runtime(task_world: World, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    rt = Runtime(RuntimeConfig(state_dir=tmp_path_factory.mktemp("task-state"), hosts=task_world.hosts,
                               system_dns=False))
    await rt.start()
    yield rt
    await rt.close()


async def populate(sb: Sandbox, task: Task) -> None:
    for rel, content in task.files.items():
        await sb.write_file(f"/workspace/{rel}", content)
    for cmd in task.setup:
        r = await sb.exec(cmd, cwd="/workspace", timeout=60)
        assert r.exit_code == 0, f"{task.id}: setup {cmd!r} failed: {r.stderr}"


async def grade(sb: Sandbox, task: Task) -> ExecResult:
    for rel, content in task.verifier.files.items():
        await sb.write_file(f"/workspace/{rel}", content)
    return await sb.exec(task.verifier.command, cwd="/workspace", timeout=task.verifier.timeout)


async def act(sb: Sandbox, task: Task, actions: list[dict]) -> None:
    for i, a in enumerate(actions):
        tool, args = a["tool"], a.get("arguments") or {}
        where = f"{task.id} action {i} ({tool})"
        if tool == "shell":
            if "agent" not in sb.sessions():
                await sb.create_session("agent")
            r = await sb.run_in_session("agent", args["command"], timeout=60)
            assert r.exit_code == 0, f"{where}: exit {r.exit_code}\n{r.stdout}\n{r.stderr}"
        elif tool == "write_file":
            await sb.write_file(args["path"], args["content"])
        elif tool == "edit_file":
            text = (await sb.read_file(args["path"])).decode()
            assert text.count(args["old"]) == 1, f"{where}: 'old' must occur exactly once in {args['path']}"
            await sb.write_file(args["path"], text.replace(args["old"], args["new"], 1))
        elif tool == "read_file":
            await sb.read_file(args["path"])
        elif tool == "submit":
            return
    raise AssertionError(f"{task.id}: the solution never submits")


def test_the_suite_is_what_it_claims() -> None:
    assert len(TASKS) >= 12
    online = [t for t in TASKS if t.egress]
    assert len(online) >= 3 and all(t.egress == [f"{TASK_HOST[2]}:{TASK_HOST[1]}"] for t in online)
    assert len(online) < len(TASKS)  # some tasks need no network at all
    assert "/simple/" in TASK_FILES
    for t in TASKS:
        assert t.verifier.command == "python3 tests/run.py" and t.verifier.score == "pytest"
        assert "tests/run.py" in t.verifier.files and any(p.startswith("tests/test_") for p in t.verifier.files)
        actions = solution(t)
        assert len(actions) <= 8 and actions[-1]["tool"] == "submit", t.id
        assert {a["tool"] for a in actions} <= TOOLS, t.id
    runners = {t.verifier.files["tests/run.py"] for t in TASKS}
    assert len(runners) == 1  # one runner, copied into every task


@pytest.mark.parametrize("task", TASKS, ids=[t.id for t in TASKS])
async def test_task_fails_before_and_passes_after_its_solution(task: Task, task_runtime: Runtime) -> None:
    sb = await task_runtime.create(task.sandbox_config(), episode_id=f"example-{task.id}")
    try:
        await populate(sb, task)
        before = await grade(sb, task)
        assert before.exit_code not in (0, None), f"{task.id}: verifier passes on the starting workspace"
        last = before.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"\d+ passed, [1-9]\d* failed", last), before.stdout + before.stderr

        await sb.reset()
        await populate(sb, task)
        await act(sb, task, solution(task))
        after = await grade(sb, task)
        last = after.stdout.strip().splitlines()[-1] if after.stdout.strip() else ""
        assert after.exit_code == 0 and ALL_PASSED.fullmatch(last) and int(last.split()[0]) > 0, (
            f"{task.id}: verifier after the solution:\n{after.stdout}\n{after.stderr}")
        await asyncio.sleep(0.2)
        found = [(f.rule_id, f.command) for f in task_runtime.store.findings(sandbox_id=sb.id)]
        assert found == [], f"{task.id}: the honest solution raised findings {found}"
    finally:
        await sb.close()


@pytest.mark.parametrize("task", [t for t in TASKS if t.egress], ids=[t.id for t in TASKS if t.egress])
async def test_online_task_needs_its_egress(task: Task, task_runtime: Runtime) -> None:
    """The download step of the solution works only because the task allows pkg.example.com."""
    download = next(a for a in solution(task) if a["tool"] == "shell")
    assert "pkg.example.com" in download["arguments"]["command"]
    offline = task.model_copy(update={"egress": []}).sandbox_config()
    sb = await task_runtime.create(offline, episode_id=f"example-{task.id}-offline")
    try:
        await populate(sb, task)
        r = await sb.exec(download["arguments"]["command"], timeout=60)
        assert r.exit_code not in (0, None), f"{task.id}: downloaded without egress:\n{r.stdout}"
    finally:
        await sb.close()


STANDALONE = """
import hashlib, json, urllib.request
from corral.rollout.taskworld import TASK_FILES, TASK_HOST, build_task_world
w = build_task_world(link="corralw2")
try:
    got = {p: hashlib.sha256(urllib.request.urlopen(f"http://{TASK_HOST[0]}{p}", timeout=5).read()).hexdigest()
           for p in TASK_FILES}
    print(json.dumps({"hosts": w.hosts, "files": got}))
finally:
    w.close()
"""


def test_build_task_world_serves_the_task_files() -> None:
    """build_task_world() on its own (as a rollout uses it), in a fresh namespace beside the suite's world."""
    out = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", STANDALONE], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["hosts"] == {TASK_HOST[2]: [TASK_HOST[0]]}
    assert got["files"] == {p: hashlib.sha256(b).hexdigest() for p, b in TASK_FILES.items()}
    for name in ("sales-2024.csv", "textkit-1.2.py", "rates-2024-06-03.json"):
        assert f"/files/{name}".encode() in TASK_FILES["/simple/"]
