"""The same scripted actions earn the same reward, the same termination reason and the same
violations through every interface: the rollout runner, Gymnasium, OpenEnv and TRL all map onto one
EpisodeEngine. A difference here is a reward bug a trainer would learn from."""

from __future__ import annotations

import json

import pytest

from corral import RuntimeConfig
from corral.agent.episode import run_episode
from corral.agent.scripted import ScriptedPolicy
from corral.agent.tasks import Task
from corral.envs import CorralTRLEnv, SandboxEnv
from corral.envs.openenv_env import CorralAction, CorralEnvironment
from corral.errors import EnvironmentUsageError, EpisodeEnded
from corral.sync import SyncRuntime, run

VERIFY = ("python3 -c \"import sys; sys.path.append('/workspace'); import calc; "
          "raise SystemExit(0 if calc.add(2, 3) == 5 else 1)\"")
GOOD = {"path": "/workspace/calc.py", "content": "def add(a, b):\n    return a + b\n"}
TUNNEL = "ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7"

SCENARIOS = {
    "solved": [("write_file", GOOD), ("shell", {"command": "python3 -c 'import calc; print(calc.add(1, 1))'"}),
               ("submit", {})],
    "wrong": [("write_file", {**GOOD, "content": "def add(a, b):\n    return a - b\n"}), ("submit", {})],
    "tunnel": [("write_file", GOOD), ("shell", {"command": TUNNEL}), ("submit", {})],
    # the turn limit (3) comes first: graded as it stands everywhere
    "truncated": [("write_file", GOOD), ("shell", {"command": "echo one"}), ("shell", {"command": "echo two"}),
                  ("submit", {})],
}
EXPECTED = {
    "solved": (1.0, "submitted", []),
    "wrong": (0.0, "submitted", []),
    "tunnel": (-1.0, "security_violation", ["ssh-tunnel"]),
    "truncated": (1.0, "max_steps", []),
}


def task() -> Task:
    return Task.model_validate({"id": "calc", "instruction": "Write add(a, b) in /workspace/calc.py.",
                                "verifier": {"command": VERIFY, "score": "exit_code"}, "limits": {"max_steps": 3}})


@pytest.fixture
def rt(world, tmp_path):
    r = SyncRuntime(RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False)).start()
    yield r
    r.close()


def rules(violations: list) -> list[str]:
    return sorted({v["rule"] if isinstance(v, dict) else v.rule for v in violations})


def via_rollout(rt: SyncRuntime, actions: list) -> tuple:
    policy = ScriptedPolicy({"calc": [{"tool": t, "arguments": a} for t, a in actions]})
    traj = run(run_episode(rt.async_runtime, task(), policy, episode_id="parity-rollout"))
    return traj.reward, traj.termination_reason, rules(traj.violations)


def via_gym(rt: SyncRuntime, actions: list) -> tuple:
    env = SandboxEnv([task()], runtime=rt)
    try:
        env.reset(options={"task_id": "calc"})
        for tool, args in actions:
            _, reward, term, trunc, info = env.step(json.dumps({"tool": tool, "arguments": args}))
            if term or trunc:
                return reward, info["termination_reason"], rules(info["violations"])
        raise AssertionError("the episode did not end")
    finally:
        env.close()


def via_openenv(rt: SyncRuntime, actions: list) -> tuple:
    env = CorralEnvironment([task()], rt.async_runtime)
    try:
        run(env.reset_async(task_id="calc"))
        for tool, args in actions:
            obs = run(env.step_async(CorralAction(tool="exec" if tool == "shell" else tool, **args)))
            if obs.done:
                return obs.reward, obs.termination_reason, rules(obs.violations)
        raise AssertionError("the episode did not end")
    finally:
        run(env.episode.close_sandbox())


def via_trl(rt: SyncRuntime, actions: list) -> tuple:
    env = CorralTRLEnv([task()], runtime=rt)
    env.reset(task_id="calc")
    for tool, args in actions:
        try:
            getattr(env, tool)(**args)
        except (EpisodeEnded, EnvironmentUsageError):
            break  # TRL shows the raised message to the model; the rollout is over
    reward = env.get_reward()
    return reward, env.outcome.termination_reason, rules(env.outcome.violations)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_actions_same_reward_everywhere(rt, scenario):
    actions = SCENARIOS[scenario]
    got = {name: fn(rt, actions) for name, fn in
           (("rollout", via_rollout), ("gym", via_gym), ("openenv", via_openenv), ("trl", via_trl))}
    assert got == dict.fromkeys(got, EXPECTED[scenario]), got
