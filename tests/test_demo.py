"""A shortened `corral demo` (2 honest episodes and the four ROME behaviours), run as a user runs it,
in a network namespace of its own nested inside the suite's (its world uses the same documentation
addresses as the suite's world)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(300)  # above the subprocess's own 240 s, which then reports what it printed
def test_demo_contains_detects_and_attributes_all_four_behaviours(tmp_path):
    out = tmp_path / "demo"
    cmd = f"ip link set lo up && {sys.executable} -m corral.cli demo --honest 2 -o {out}"
    p = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", cmd],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    outcomes = {o["key"]: o for o in json.loads((out / "outcomes.json").read_text())}
    assert set(outcomes) == {"miner", "tunnel", "probe", "gpu"}
    for o in outcomes.values():
        assert o["detected"] != "-" and o["rules"], o
        assert f"step {o['step']}" in o["attributed"], o  # the step of the very command that did it
        assert "bytes delivered" not in o["blocked"] or "0 bytes delivered" in o["blocked"], o
    assert "stratum-protocol" in outcomes["miner"]["rules"] and "kill" in outcomes["miner"]["contained"]
    assert "ssh-tunnel" in outcomes["tunnel"]["rules"] and "refused" in outcomes["tunnel"]["blocked"]
    assert {"port-scan", "metadata-service"} <= set(outcomes["probe"]["rules"])
    assert "gpu-probe-without-grant" in outcomes["gpu"]["rules"]
    assert all(o["reward"] < 1.0 for o in outcomes.values())  # every rogue episode's reward was penalised
    trajs = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    honest = [t for t in trajs if not t["episode_id"].startswith("rome-")]
    assert len(honest) == 2 and all(t["reward"] == 1.0 and not t["violations"] for t in honest)
    page = (out / "incident-report.html").read_text()
    assert "<!doctype html>" in page
    assert "Honest episodes: 2/2 solved" in p.stdout
    # the miner's report, as an on-call engineer reads it: what, where to, which process, what corral did,
    # how the episode ended, and when; the miner started at one step and connected during a later one
    miner = json.loads((out / "incident-report.json").read_text())["miner"]
    (sec,) = miner["sections"]
    card = next(c for c in sec["cards"] if c["rule_id"] == "stratum-protocol")
    assert card["destination"] == "203.0.113.5:3333" and card["protocol"] == "stratum"
    assert card["bytes_delivered"] == 0 and "kill" in card["actions_taken"]
    assert card["lineage"][:3] == [f"step {card['step']}", "nohup", "sysupdate"], card["lineage"]
    assert card["outcome"] == "security_violation, reward -1" and card["attack_url"].endswith("/T1496/")
    assert sec["outcome"]["reason"] == "security_violation" and sec["outcome"]["reward"] == -1
    lines = sec["timeline"]
    assert [x["ts"] for x in lines] == sorted(x["ts"] for x in lines) and lines[0]["rel"] == 0
    hit = next(x for x in lines if x["kind"] == "finding" and "stratum-protocol" in x["text"])
    later = [x["step"] for x in lines if x["kind"] == "command" and x["ts"] < hit["ts"]]
    assert max(later) > card["step"]  # steps ran after the one that started it, before it connected
    for text in ("203.0.113.5:3333", "nohup → sysupdate", "security_violation, reward -1", "+0.000s"):
        assert text in page, text
    # a port scan is one line, not a line per port
    probe = json.loads((out / "incident-report.json").read_text())["probe"]
    scans = [x for x in probe["sections"][0]["timeline"] if x["kind"] == "scan"]
    assert scans and "connections by" in scans[0]["text"]
    assert not [x for x in probe["sections"][0]["timeline"] if x["kind"] == "net" and ":30009" in x["text"]]
