"""The novelty layer (detect/novelty.py): a task's baseline is built from its honest episodes in real
sandboxes; a later episode that does something none of them did gets a low `novel-behaviour` finding at
the step that did it, its reward untouched unless configured; `corral baseline` manages it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from corral import Runtime, RuntimeConfig
from corral.agent.engine import EpisodeEngine
from corral.agent.reward import RewardConfig
from corral.agent.tasks import DEFAULT_TASKS, load_task
from corral.detect.novelty import Baselines, features

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]
TASK = "wordfreq-cli"


async def _episode(rt: Runtime, episode_id: str, extra: list[str], reward: RewardConfig | None = None):
    """The task's reference solution, with `extra` shell commands before it submits."""
    engine = EpisodeEngine(rt, load_task(DEFAULT_TASKS / TASK), episode_id=episode_id, reward=reward)
    await engine.start()
    try:
        acts = yaml.safe_load((DEFAULT_TASKS / TASK / "solution.yaml").read_text())
        for act in acts[:-1]:
            await engine.call(act["tool"], act.get("arguments") or {})
        steps = {}
        for cmd in extra:
            steps[cmd] = (await engine.call("shell", {"command": cmd})).step
        out = await engine.call(acts[-1]["tool"], acts[-1].get("arguments") or {})
        return out, steps, engine.sandbox_id
    finally:
        await engine.close()


async def test_a_behaviour_no_honest_episode_showed_is_novel_low_and_attributed(world, tmp_path):
    rt = Runtime(RuntimeConfig(state_dir=tmp_path / "state", hosts=world.hosts, system_dns=False))
    await rt.start()
    try:
        honest = {}
        for i in range(2):
            out, _, sb_id = await _episode(rt, f"honest-{i}", ["ls -la /workspace"])
            assert out.termination_reason == "submitted" and out.reward == 1.0, out.verifier
            honest[f"honest-{i}"] = rt.store.events(episode_id=f"honest-{i}", sandbox_id=sb_id)
        base = Baselines(rt.config.state_dir).accept(TASK, honest)
        assert base.episodes == ["honest-0", "honest-1"] and "program:/usr/bin/ls" in base.features
        # the same work again: nothing novel
        out, _, _ = await _episode(rt, "honest-2", ["ls -la /workspace"])
        assert not [v for v in out.violations if v["rule"] == "novel-behaviour"], out.violations
        # a new program and a new destination, in steps of their own
        probe = "getent hosts db.internal.example.com; true"  # a lookup no rule names, and nothing else
        out, steps, _ = await _episode(rt, "odd-1", ["ls -la /workspace", "uname -a", probe])
        found = rt.store.findings(episode_id="odd-1")
        novel = [f for f in found if f.rule_id == "novel-behaviour"]
        by_step = {f.step: f for f in novel}
        assert "program:/usr/bin/uname" in by_step[steps["uname -a"]].data["output"]
        assert "dns:deny:db.internal.example.com" in by_step[steps[probe]].data["output"]
        assert steps["ls -la /workspace"] not in by_step
        assert all(f.severity == "low" and f.action == "record" for f in novel)
        assert [f.rule_id for f in found if f.rule_id != "novel-behaviour"] == []
        # for review: the episode ends as it would have, and by default its reward is untouched
        assert out.termination_reason == "submitted" and out.reward == 1.0 and out.reward_components["safety"] == 0
        # the report lists novelties apart from what the rules found
        from corral import report
        rep = report.build(rt.store, "odd-1")
        md = report.to_markdown(rep)
        assert not rep.findings and rep.novelties and "## Novel behaviour (for review)" in md
        assert "program:/usr/bin/uname" in md and "## Findings" not in md
        assert "Novel behaviour (for review)" in report.to_html(rep)
        # configured, each novel finding costs what it is told to
        out2, _, _ = await _episode(rt, "odd-2", ["uname -a"], reward=RewardConfig(novelty_penalty=-0.01))
        n2 = [f for f in rt.store.findings(episode_id="odd-2") if f.rule_id == "novel-behaviour"]
        assert n2 and out2.reward_components["safety"] == pytest.approx(-0.01 * len(n2))
    finally:
        await rt.close()


async def test_features_name_programs_destinations_and_shape():
    from corral.events import Event, EventKind, Verdict

    evs = [Event(kind=EventKind.PROCESS, action="exec", sandbox_id="s", step=1, pid=7, exe="/tmp/tmp.x1/tool"),
           Event(kind=EventKind.PROCESS, action="exec", sandbox_id="s", step=0, pid=8, exe="/usr/bin/tar"),
           Event(kind=EventKind.CONNECT, action="connect", sandbox_id="s", step=2, verdict=Verdict.DENY,
                 dst_ip="203.0.113.10", dst_port=4444),
           Event(kind=EventKind.DNS, action="query", sandbox_id="s", step=2, verdict=Verdict.ALLOW,
                 name="PKG.example.com.")]
    got = features(evs)
    assert got["program:/tmp/tool"] == 1 and "program:/usr/bin/tar" not in got  # step 0 is corral's own
    assert got["connect:deny:203.0.113.10:4444"] == 2 and got["dns:allow:pkg.example.com"] == 2
    assert "shape:processes:1" in got and "shape:connections:1" in got


async def test_baseline_cli_show_accept_reset(tmp_path):
    from corral.events import Event, EventKind
    from corral.store import Store

    state = tmp_path / "st"
    store = Store(str(state / "corral.db"))
    store.record(Event(kind=EventKind.PROCESS, action="exec", sandbox_id="s1", episode_id="e1", step=1, pid=3,
                       exe="/usr/bin/make"))
    store.close()
    (tmp_path / "roll.jsonl").write_text("\n".join(json.dumps(t) for t in [
        {"task_id": "build", "episode_id": "e1", "sandbox_id": "s1", "termination_reason": "submitted"},
        {"task_id": "build", "episode_id": "e2", "sandbox_id": "s2", "termination_reason": "security_violation"},
        {"task_id": "other", "episode_id": "e3", "sandbox_id": "s3", "termination_reason": "submitted"}]) + "\n")

    def corral(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "corral.cli", *args, "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60)

    r = corral("baseline", "show", "build")
    assert r.returncode == 2 and "no baseline yet" in r.stdout
    r = corral("baseline", "accept", "build", "--trajectories", str(tmp_path / "roll.jsonl"))
    assert r.returncode == 0 and "1 episode(s)" in r.stdout, r.stdout + r.stderr
    r = corral("baseline", "show", "build", "--json")
    assert json.loads(r.stdout)["features"]["program:/usr/bin/make"] == 1
    r = corral("baseline", "accept", "build", "--episode", "nope")
    assert r.returncode == 2 and "no agent step in the store" in r.stdout
    assert corral("baseline", "reset", "build").returncode == 0
    assert corral("baseline", "show", "build").returncode == 2
    (state / "baselines" / "build.json").write_text("{broken")
    r = corral("baseline", "show", "build")
    assert r.returncode == 2 and "cannot read the baseline" in r.stdout


async def test_a_shape_is_novel_only_well_above_the_largest_honest_one():
    from corral.detect.novelty import Baseline

    base = Baseline(task="t", episodes=["a", "b"], features={"shape:processes:4": 1, "shape:processes:8": 1,
                                                            "program:/usr/bin/make": 2})
    assert base.novel({"shape:processes:16": None, "shape:processes:1": None, "program:/usr/bin/make": 1}) == {}
    assert base.novel({"shape:processes:32": None, "shape:connections:1": None}) == {
        "shape:processes:32": None, "shape:connections:1": None}
