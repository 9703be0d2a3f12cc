"""Rollouts on a Ray cluster (a local one here, inside the suite's private network namespace): the node
actors run their own corral Runtime, trajectories come back attributed and are appended by the driver,
resume skips finished episodes, and no Ray process outlives the test."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.agent.policy import AgentPolicyError
from corral.agent.reward import RewardConfig
from corral.agent.scripted import ScriptedPolicy
from corral.agent.trajectory import Trajectory, append_jsonl, read_jsonl
from corral.detect.rules import RuleError
from corral.events import episode_name
from corral.rollout.ray_backend import policy_from_spec, policy_spec, run_rollout_ray
from tests.test_episodes import ROGUE, SOLVE, calc_task

try:
    import ray
except ImportError as e:  # not installed, or a broken install
    pytest.skip(f"ray is not importable ({e}); the Ray backend is optional: pip install 'ray>=2.9'",
                allow_module_level=True)

pytestmark = pytest.mark.slow  # async tests run under asyncio_mode = "auto"

_RAY_PROCS = ("ray::", "raylet", "gcs_server", "ray/_private", "ray/dashboard", "ray/autoscaler")


def _ray_procs_here() -> list[str]:
    """Ray processes in this network namespace (the suite's own: any there were started by this test)."""
    me = os.readlink("/proc/self/ns/net")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) == os.getpid() or os.readlink(f"/proc/{pid}/ns/net") != me:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(k in cmd for k in _RAY_PROCS):
            found.append(f"{pid} {cmd[:120]}")
    return found


def _wait_no_ray_procs(timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _ray_procs_here()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module")
def ray_env() -> Iterator[dict]:
    """A short temp dir (Ray's unix sockets live there) and a token in the environment, so that Ray's
    token authentication stays on without writing ~/.ray/auth_token."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        mp.delenv("RAY_ADDRESS", raising=False)
        yield {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False, "_temp_dir": temp,
               "_node_ip_address": "127.0.0.1"}
    assert not ray.is_initialized()
    assert _wait_no_ray_procs() == []
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env: dict) -> Iterator[None]:
    """One local cluster shared by the tests below that use it; run_rollout_ray(None, ...) uses it."""
    ray.init(**ray_env)
    yield
    ray.shutdown()
    assert _wait_no_ray_procs() == []


def _rt_config(world, tmp_path: Path) -> dict:
    return {"hosts": world.hosts, "system_dns": False, "state_dir": str(tmp_path / "node-state")}


def test_policy_specs_round_trip():
    pol = policy_from_spec(policy_spec(ScriptedPolicy({"calc": SOLVE})))
    assert isinstance(pol, ScriptedPolicy) and pol.actions == {"calc": SOLVE}
    with pytest.raises(AgentPolicyError, match="unknown policy kind"):
        policy_from_spec({"kind": "magic"})
    with pytest.raises(AgentPolicyError, match="'tool' must be one of"):
        policy_from_spec({"kind": "scripted", "actions": {"calc": [{"tool": "hack"}]}})


async def test_local_cluster_solves_and_shuts_down(world, tmp_path, ray_env):
    """address=None and no Ray yet: a local cluster is started for the rollout and shut down after it."""
    out = tmp_path / "traj.jsonl"
    tasks = [calc_task(), calc_task(id="calc2")]
    seen: list[str] = []
    s = await run_rollout_ray(None, tasks, {"kind": "scripted", "actions": {"calc": SOLVE, "calc2": SOLVE}},
                              n=2, concurrency=2, out=out, runtime_config=_rt_config(world, tmp_path),
                              on_done=lambda t: seen.append(t.episode_id), init_kwargs=ray_env)
    assert s.errors == []
    assert s.episodes == 4 and s.ran_now == 4 and s.skipped == 0 and s.pass_rate == 1.0
    trajs = read_jsonl(out)
    assert sorted(t.episode_id for t in trajs) == sorted(seen)
    # one run across the cluster: episode ids carry it (unique in every store they are written to)
    assert len({t.run_id for t in trajs}) == 1 and trajs[0].run_id
    assert sorted(episode_name(t.episode_id) for t in trajs) == ["calc--0", "calc--1", "calc2--0", "calc2--1"]
    for t in trajs:
        assert t.reward == 1.0 and t.termination_reason == "submitted" and t.violations == []
        node = t.metrics["node"]
        assert node["id"] and node["hostname"] and node["ip"] == "127.0.0.1"
        assert node["pid"] != os.getpid()  # run in the node's actor, not in this process
        assert t.store_url and str(tmp_path / "node-state") in t.store_url  # the node's store
    assert not ray.is_initialized()
    assert _wait_no_ray_procs() == []


async def test_rogue_episode_is_stopped_and_attributed_on_the_node(world, tmp_path, cluster):
    out = tmp_path / "rogue.jsonl"
    s = await run_rollout_ray(None, [calc_task()], {"kind": "scripted", "actions": {"calc": ROGUE}}, n=1,
                              concurrency=1, out=out, reward=RewardConfig(violation_penalty=-2.0),
                              runtime_config=_rt_config(world, tmp_path))
    assert s.errors == [] and s.termination == {"security_violation": 1}
    assert s.violation_rate_by_rule.get("stratum-protocol") == 1.0
    assert ray.is_initialized()  # the caller's connection is left alone
    (traj,) = read_jsonl(out)
    assert traj.terminated and traj.termination_reason == "security_violation"
    assert traj.reward == -2.0 and traj.reward_components["safety"] == -2.0
    started = next(st for st in traj.steps if "nohup" in str(st.arguments))
    v = next(v for v in traj.violations if v.rule == "stratum-protocol")
    assert v.step == started.sandbox_step and v.command and "nohup python3" in v.command and v.evidence
    assert "submit" not in [st.tool for st in traj.steps]
    assert traj.metrics["node"]["id"] == ray.get_runtime_context().get_node_id()


async def test_resume_skips_finished_episodes(world, tmp_path, cluster):
    """Finished lines are skipped; an episode that ended in an error runs again."""
    out = tmp_path / "traj.jsonl"
    for ep, reason in [("calc--0", "submitted"), ("calc--1", "security_violation"), ("calc2--0", "max_steps"),
                       ("calc2--1", "error")]:
        task_id = ep.split("--")[0]
        append_jsonl(out, Trajectory(episode_id=ep, task_id=task_id, sandbox_id="sb-old", policy="scripted",
                                     messages=[], tools=[], steps=[], reward=0.0, reward_components={},
                                     terminated=True, truncated=False, termination_reason=reason, violations=[],
                                     metrics={}, started=0, finished=0))
    tasks = [calc_task(), calc_task(id="calc2")]
    spec = {"kind": "scripted", "actions": {"calc": SOLVE, "calc2": SOLVE}}
    s = await run_rollout_ray(None, tasks, spec, n=2, concurrency=2, out=out,
                              runtime_config=_rt_config(world, tmp_path))
    assert s.errors == [] and s.skipped == 3 and s.ran_now == 1
    new = read_jsonl(out)[4:]
    assert [episode_name(t.episode_id) for t in new] == ["calc2--1"] and new[0].reward == 1.0
    assert new[0].metrics["node"]
    # everything done: nothing runs (no actor is even started)
    s = await run_rollout_ray(None, tasks, spec, n=2, concurrency=2, out=out,
                              runtime_config=_rt_config(world, tmp_path))
    assert s.ran_now == 0 and s.skipped == 4 and len(read_jsonl(out)) == 5


async def test_node_that_cannot_start_corral_is_a_clear_error(world, tmp_path, cluster):
    """The node's own error (here a missing rule file) comes back to the driver; nothing is written."""
    out = tmp_path / "traj.jsonl"
    cfg = {**_rt_config(world, tmp_path), "rule_files": [str(tmp_path / "missing.yaml")]}
    with pytest.raises(RuleError, match=r"missing\.yaml: cannot read rule file"):
        await run_rollout_ray(None, [calc_task()], {"kind": "scripted", "actions": {"calc": SOLVE}}, n=1,
                              concurrency=1, out=out, runtime_config=cfg)
    assert not out.exists()
    with pytest.raises(AgentPolicyError, match="unknown policy kind"):  # checked before any node is asked
        await run_rollout_ray(None, [calc_task()], {"kind": "magic"}, n=1, concurrency=1, out=out)
