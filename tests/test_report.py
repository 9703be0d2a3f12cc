"""`corral report` and `corral findings` read the real store and tell the incident step by step."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from corral import report
from tests.conftest import POOL, connect_cmd, eventually

pytestmark = pytest.mark.asyncio


async def _incident(sb_factory, runtime):
    sb = await sb_factory(episode_id="ep-report-1")
    s = await sb.create_session("main")
    await s.run("echo setting up")
    bg = await s.run("(sleep 0.3; " + connect_cmd(POOL[0], POOL[1], b'{"id":1,"method":"mining.subscribe"}\n')
                     + ") >/dev/null 2>&1 &")
    await s.run("ls")
    await eventually(lambda: any(f.rule_id == "stratum-protocol" for f in runtime.store.findings(sandbox_id=sb.id)),
                     "the stratum finding")
    await runtime.responder.drain()  # the kill action lands on a worker thread
    return sb, bg


async def test_report_timeline_in_every_format(sb_factory, runtime, tmp_path):
    sb, bg = await _incident(sb_factory, runtime)
    r = report.build(runtime.store, sb.id)
    step = next(s for s in r.steps if s.step == bg.step)
    assert any(f.rule_id == "stratum-protocol" for f in step.findings)
    assert any(e.protocol == "stratum" for e in step.network)
    assert any("python3" in (e.exe or "") for e in step.processes)
    assert any(a.action == "kill" for a in step.actions)
    assert r.worst == "critical"
    # by episode id too
    assert report.build(runtime.store, "ep-report-1").findings
    data = json.loads(report.to_json(r))
    assert any(s["step"] == bg.step and s["findings"] for s in data["steps"])
    md = report.to_markdown(r)
    assert "stratum-protocol" in md and "| critical |" in md
    page = report.to_html(r)
    assert page.startswith("<!doctype html>") and "stratum-protocol" in page and "<script" not in page
    with pytest.raises(report.ReportNotFound):
        report.build(runtime.store, "no-such-id")


async def test_report_and_findings_cli(sb_factory, runtime, tmp_path):
    sb, bg = await _incident(sb_factory, runtime)
    db = runtime.store.url.removeprefix("sqlite:///")
    out = tmp_path / "r.html"
    cli = [sys.executable, "-m", "corral.cli"]
    p = await asyncio.to_thread(subprocess.run, [*cli, "report", sb.id, "--format", "html", "-o", str(out),
                                                 "--db", db], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "stratum-protocol" in out.read_text()
    p = await asyncio.to_thread(subprocess.run, [*cli, "report", sb.id, "--db", db], capture_output=True,
                                text=True, timeout=60)
    assert p.returncode == 0 and "stratum-protocol" in p.stdout and f"step {bg.step}" in p.stdout
    p = await asyncio.to_thread(subprocess.run, [*cli, "findings", "--sandbox", sb.id, "--json", "--db", db],
                                capture_output=True, text=True, timeout=60)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert any(r["rule_id"] == "stratum-protocol" and r["step"] == bg.step for r in rows)
    p = await asyncio.to_thread(subprocess.run, [*cli, "findings", "--severity", "nope", "--db", db],
                                capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown severity" in p.stderr
    # the runtime's run: every event and finding carries it, `corral runs` lists it, --run filters by it
    assert {f["run_id"] for f in rows} == {runtime.run_id}
    p = await asyncio.to_thread(subprocess.run, [*cli, "runs", "--json", "--db", db], capture_output=True,
                                text=True, timeout=60)
    runs = {r["id"]: r for r in map(json.loads, p.stdout.splitlines())}
    assert runs[runtime.run_id]["kind"] == "library" and runs[runtime.run_id]["findings"] >= 1
    p = await asyncio.to_thread(subprocess.run, [*cli, "findings", "--run", "no-such-run", "--json", "--db", db],
                                capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == ""


async def test_a_long_command_is_never_cut_and_plumbing_is_hidden_by_default(sb_factory, runtime):
    """The whole command shows in every rendering (wrapped, never silently cut); corral's own work
    (its helper commands, step 0) is left out unless asked for, and says how much was left out."""
    from rich.console import Console

    sb = await sb_factory(episode_id="ep-report-long")
    await sb.read_file("/etc/hostname")  # a corral helper (an internal cat): plumbing
    pad = "-".join(f"part{i:03d}" for i in range(40))  # 319 characters no one would read to the end
    cmd = f"cp /bin/sleep /tmp/xmrig && echo {pad} >/dev/null && /tmp/xmrig 1 && echo tail-of-the-command"
    await sb.exec(cmd)
    await eventually(lambda: runtime.store.findings(sandbox_id=sb.id), "a finding for the miner")
    r = report.build(runtime.store, "ep-report-long")
    assert r.findings and all(c.command == cmd for c in r.sections[0].cards)
    console = Console(width=90, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    report.render(r, console)
    flat = "".join(ch for ch in console.export_text() if ch not in "│ \n")
    assert cmd.replace(" ", "") in flat
    assert cmd in report.to_markdown(r) and cmd.replace("&", "&amp;").replace(">", "&gt;") in report.to_html(r)
    sec = r.sections[0]
    assert sec.hidden >= 1 and not [x for x in sec.timeline if x.plumbing]
    full = report.build(runtime.store, "ep-report-long", show_all=True).sections[0]
    assert len([x for x in full.timeline if x.plumbing]) == sec.hidden
    assert f"{sec.hidden} line(s) of corral's own work hidden" in report.to_markdown(r)
