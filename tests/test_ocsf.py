"""`corral findings --format ocsf` and `to_ocsf`: real findings from real sandboxes, exported as OCSF
Detection Finding records and checked against the OCSF schema's own files (vendored, tests/data/ocsf;
compiled to a JSON Schema by tests/ocsf_schema.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys

from corral.events import Event, Finding
from corral.observe.ocsf import OCSF_VERSION, to_ocsf
from tests.conftest import POOL, connect_cmd, eventually
from tests.ocsf_schema import problems, version

CLI = [sys.executable, "-m", "corral.cli"]
STRATUM = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5"]}\n'


def test_the_vendored_schema_is_the_version_corral_writes():
    assert version() == OCSF_VERSION


def test_the_checker_catches_what_ocsf_forbids():
    """The check is not vacuous: a good record passes, and each kind of fault is named where it is."""
    f = Finding(id=7, rule_id="x", title="t", severity="medium", technique="T1059.004", sandbox_id="s", pid=3,
                data={"exe": "/usr/bin/curl", "argv": ["curl", "x"], "dst": "2001:db8::1:443"})
    good = to_ocsf(f)
    assert problems(good) == []
    assert good["evidences"][0]["dst_endpoint"] == {"ip": "2001:db8::1", "port": 443}
    bad = copy.deepcopy(good)
    bad["severity"] = "High"  # severity_id 3 is Medium
    bad["type_uid"] = 200402  # Update, but activity_id is Create
    bad["finding_info"].pop("uid")
    bad["finding_info"]["analytic"]["type_id"] = 42
    bad["metadata"].pop("version")
    proc = bad["evidences"][0]["process"]
    proc["bogus"] = 1
    proc["namespace_pid"] = 3  # the container profile's, not declared in metadata.profiles
    proc["file"].pop("type_id")
    bad["evidences"][0]["dst_endpoint"].update(ip="not-an-ip", port=70000)
    got = "\n".join(problems(bad))
    for expected in ("severity: 'Medium' was expected", "activity_id: 2 was expected",
                     "finding_info: 'uid' is a required property", "analytic/type_id: 42 is not one of",
                     "metadata: 'version' is a required property", "'bogus', 'namespace_pid' were unexpected",
                     "file: 'type_id' is a required property", "ip: 'not-an-ip' does not match",
                     "port: 70000 is greater than the maximum of 65535"):
        assert expected in got, got
    declared = copy.deepcopy(good)
    declared["metadata"]["profiles"] = ["container"]
    declared["evidences"][0]["process"]["namespace_pid"] = 3
    assert problems(declared) == []
    no_evidence = copy.deepcopy(good)
    no_evidence["evidences"] = [{}]
    assert any("is not valid under any of the given schemas" in p for p in problems(no_evidence))


async def test_findings_export_as_valid_ocsf_detection_findings(sb_factory, runtime, world, tmp_path):
    live: list[tuple[Finding, Event]] = []
    unsubscribe = runtime.subscribe_findings(lambda f, ev: live.append((f, ev)))
    try:
        sb = await sb_factory(episode_id="ep-ocsf-1")
        miner = await sb.exec("cp /bin/sleep /tmp/xmrig && /tmp/xmrig 1")
        pool = await sb.exec(connect_cmd(POOL[0], POOL[1], STRATUM))
        await eventually(lambda: {"miner-binary", "stratum-protocol"} <= {
            f.rule_id for f in runtime.store.findings(sandbox_id=sb.id)}, "the miner and stratum findings")
        await runtime.drain()
    finally:
        unsubscribe()
    assert miner.refused

    # what an alert sink or exporter sees at once: the finding with its event
    mine = [(f, ev) for f, ev in live if f.sandbox_id == sb.id]
    for f, ev in mine:
        assert problems(to_ocsf(f, ev)) == [], (f.rule_id, problems(to_ocsf(f, ev)))
    f, ev = next((f, ev) for f, ev in mine if f.rule_id == "stratum-protocol")
    rec = to_ocsf(f, ev)
    assert rec["finding_info"]["first_seen_time"] == int(ev.ts * 1000)
    assert rec["evidences"][0]["process"]["pid"] == ev.pid and rec["evidences"][0]["process"]["cmd_line"]

    # what the store keeps, through the CLI
    db = runtime.store.url.removeprefix("sqlite:///")
    p = await asyncio.to_thread(subprocess.run, [*CLI, "findings", "--sandbox", sb.id, "--format", "ocsf",
                                                 "--db", db], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(records) == len(runtime.store.findings(sandbox_id=sb.id)) >= 2
    for r in records:
        assert problems(r) == [], (r["finding_info"]["analytic"]["uid"], problems(r))
        assert (r["class_uid"], r["category_uid"], r["type_uid"], r["metadata"]["version"]) == (
            2004, 2, 200401, OCSF_VERSION)
        assert r["unmapped"]["sandbox_id"] == sb.id and r["unmapped"]["episode_id"] == "ep-ocsf-1"
        assert r["resources"] == [{"uid": sb.id, "name": sb.id, "type": "corral sandbox"}]
    by_rule = {r["finding_info"]["analytic"]["uid"]: r for r in records}
    m = by_rule["miner-binary"]
    assert m["severity_id"] == 5 and m["severity"] == "Critical" and m["is_alert"] is True
    assert m["finding_info"]["attacks"] == [{"technique": {"uid": "T1496", "name": "Resource Hijacking"},
                                             "tactic": {"uid": "TA0040", "name": "Impact"}}]
    assert m["unmapped"]["step"] == miner.step and m["unmapped"]["command"].endswith("/tmp/xmrig 1")
    s = by_rule["stratum-protocol"]
    assert s["unmapped"]["step"] == pool.step
    dst = s["evidences"][0]["dst_endpoint"]
    assert (dst["ip"], dst["port"], dst["svc_name"]) == (POOL[0], POOL[1], "stratum")
    assert s["evidences"][0]["process"]["pid"] > 0  # the connecting process, by lineage
    assert str(s["finding_info"]["uid"]) in {str(f.id) for f in runtime.store.findings(sandbox_id=sb.id)}

    # --format picks one output; a wrong one, or one that contradicts --json, is refused
    p = await asyncio.to_thread(subprocess.run, [*CLI, "findings", "--sandbox", sb.id, "--format", "json",
                                                 "--db", db], capture_output=True, text=True, timeout=60)
    assert {json.loads(line)["rule_id"] for line in p.stdout.splitlines()} == set(by_rule)
    for bad, says in ((["--format", "xml"], "unknown format 'xml'"), (["--json", "--format", "ocsf"], "disagree")):
        p = await asyncio.to_thread(subprocess.run, [*CLI, "findings", *bad, "--db", db], capture_output=True,
                                    text=True, timeout=60)
        assert p.returncode == 2 and says in p.stderr, p.stderr
