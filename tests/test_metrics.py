"""Prometheus metrics (corral/observe/metrics.py), counted from a real runtime's real sandboxes: a refused
miner under its rule, severity and action; a denied connection under `deny`, once per connection; the
active-sandbox gauge up and back down; time to detect and command latency observed. Agent-chosen values
(sandbox ids, commands, destinations, names) never become labels: minting series is an attack on the
monitoring. `corral serve`'s /metrics needs the API token; the Grafana dashboard names only metrics
that exist."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import RuntimeConfig
from corral.events import Event, EventKind, Finding, Severity, Verdict
from corral.observe import Metrics
from corral.observe.metrics import MAX_RULES, OTHER
from tests.conftest import OTHER as OTHER_HOST
from tests.conftest import PKG, allow, connect_cmd, eventually, findings_for, py

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "corral-dashboard.json"


@pytest.fixture
def metrics(runtime) -> Iterator[Metrics]:
    m = Metrics(runtime)
    yield m
    m.detach()


def val(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def series(m: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for fam in m.registry.collect() for s in fam.samples}


def label_values(m: Metrics) -> set[str]:
    return {v for fam in m.registry.collect() for s in fam.samples for k, v in s.labels.items()}


# -- a real runtime ------------------------------------------------------------------------------------
async def test_a_refused_miner_is_counted_under_its_rule_severity_and_action(sb_factory, runtime, metrics):
    sb = await sb_factory()
    before_refused = val(metrics, "corral_commands_refused_total")
    before_started = val(metrics, "corral_commands_total")
    before_detect = val(metrics, "corral_time_to_detect_seconds_count")
    r = await sb.exec("cp /bin/sleep /tmp/xmrig && /tmp/xmrig 5")
    assert r.refused
    assert await findings_for(runtime, sb, "miner-binary")
    await runtime.drain()  # every finding judged so far is in the store
    found = runtime.store.findings(sandbox_id=sb.id)
    f = next(x for x in found if x.rule_id == "miner-binary")
    assert f.severity == "critical"
    same = [x for x in found if (x.rule_id, x.severity, x.action) == (f.rule_id, f.severity, f.action)]
    assert val(metrics, "corral_findings_total", rule=f.rule_id, severity=f.severity, action=f.action) == len(same)
    # refused before anything ran: no command started, no latency observed for it
    assert val(metrics, "corral_commands_refused_total") == before_refused + 1
    assert val(metrics, "corral_commands_total") == before_started
    # one time-to-detect observation per finding of the sandbox (whatever the rule)
    assert val(metrics, "corral_time_to_detect_seconds_count") == before_detect + len(found)
    assert val(metrics, "corral_time_to_detect_seconds_sum") >= 0


async def test_an_exec_refused_inside_a_script_is_counted(sb_factory, runtime, metrics):
    sb = await sb_factory()
    await sb.write_file("/workspace/setup.sh", "cp /bin/sleep /tmp/xmrig\n/tmp/xmrig 30\necho after\n")
    allowed, denied = val(metrics, "corral_execs_total", verdict="allow"), val(metrics, "corral_execs_total",
                                                                               verdict="deny")
    await sb.exec("bash /workspace/setup.sh")
    assert await findings_for(runtime, sb, "miner-binary")
    assert val(metrics, "corral_execs_total", verdict="deny") >= denied + 1  # /tmp/xmrig, refused at exec
    assert val(metrics, "corral_execs_total", verdict="allow") >= allowed + 2  # bash and cp ran
    assert sum(s.value for fam in metrics.registry.collect() for s in fam.samples
               if s.name == "corral_findings_total" and s.labels["rule"] == "miner-binary") >= 1


async def test_connections_and_dns_counted_by_verdict_once_per_connection(sb_factory, runtime, metrics):
    sb = await sb_factory(allow("pkg.example.com"))
    c_allow, c_deny = (val(metrics, "corral_connections_total", verdict=v) for v in ("allow", "deny"))
    d_allow, d_deny = (val(metrics, "corral_dns_queries_total", verdict=v) for v in ("allow", "deny"))
    # an allowed request by name: one DNS answer, one connection (its close is not a second one)
    r = await sb.exec(connect_cmd(PKG[2], PKG[1], b"GET / HTTP/1.0\r\nHost: pkg.example.com\r\n\r\n"))
    assert "package index" in r.stdout, r.stdout + r.stderr
    await eventually(lambda: [e for e in runtime.store.events(sandbox_id=sb.id, kind="connect")
                              if e.action == "close"], "the relay's close event")
    assert val(metrics, "corral_connections_total", verdict="allow") == c_allow + 1
    assert val(metrics, "corral_dns_queries_total", verdict="allow") >= d_allow + 1
    # a host no rule allows: denied, zero bytes, counted under deny
    r = await sb.exec(connect_cmd(OTHER_HOST[0], OTHER_HOST[1], b"GET / HTTP/1.0\r\nHost: other.example.com\r\n\r\n"))
    assert r.exit_code != 0
    await runtime.drain()
    assert val(metrics, "corral_connections_total", verdict="deny") == c_deny + 1
    assert val(metrics, "corral_connections_total", verdict="allow") == c_allow + 1
    # a name no rule allows: NXDOMAIN, counted under deny
    r = await sb.exec(py("import socket\ntry: socket.getaddrinfo('other.example.com', 80)\n"
                         "except OSError: print('no')"))
    assert r.stdout == "no\n"
    await runtime.drain()
    assert val(metrics, "corral_dns_queries_total", verdict="deny") >= d_deny + 1


async def test_active_sandboxes_go_up_then_down_and_commands_are_timed(sb_factory, runtime, metrics):
    active, started = val(metrics, "corral_sandboxes_active"), val(metrics, "corral_sandboxes_started_total")
    timed, cmds = val(metrics, "corral_command_duration_seconds_count"), val(metrics, "corral_commands_total")
    sb = await sb_factory()
    assert val(metrics, "corral_sandboxes_active") == active + 1
    assert val(metrics, "corral_sandboxes_started_total") == started + 1
    assert (await sb.exec("true")).exit_code == 0
    assert (await sb.exec("echo hi")).stdout == "hi\n"
    assert val(metrics, "corral_commands_total") == cmds + 2
    assert val(metrics, "corral_command_duration_seconds_count") == timed + 2
    # every command falls in the +Inf bucket, and buckets are cumulative
    assert val(metrics, "corral_command_duration_seconds_bucket", le="+Inf") == timed + 2
    assert (val(metrics, "corral_command_duration_seconds_bucket", le="0.005")
            <= val(metrics, "corral_command_duration_seconds_bucket", le="3600.0"))
    await sb.close()
    assert val(metrics, "corral_sandboxes_active") == active


async def test_agent_chosen_sandbox_ids_commands_and_destinations_mint_no_series(sb_factory, runtime, metrics):
    """The agent picks its sandbox's id (through the API), its commands, where it connects and what it
    looks up. Were any of them a label, each new value would be a new series: a few thousand
    commands would exhaust Prometheus. Three sandboxes, each with its own id, commands, addresses and
    names, add no series but findings' (bounded by the rule set)."""
    warm = await sb_factory()
    await warm.exec("true")
    before = {s for s in series(metrics) if not s[0].startswith("corral_findings")}
    chosen: list[str] = []
    for _ in range(3):
        tag = secrets.token_hex(4)
        sb = await sb_factory(sandbox_id=f"agent-{tag}")
        chosen += [sb.id, tag]
        for i in range(4):
            await sb.exec(py(
                "import socket\n"
                "for j in range(5):\n"
                "    try:\n"
                f"        s = socket.create_connection(('203.0.113.{100 + i}', {40000 + i * 10} + j), timeout=3)\n"
                f"        s.sendall(b'x-{tag}'); s.recv(16)\n"
                "    except OSError: pass\n"
                f"    try: socket.getaddrinfo('h{i}-%d-{tag}.example.net' % j, 80)\n"
                "    except OSError: pass\n") + f"  # {tag} {i}")
    await runtime.drain()
    assert val(metrics, "corral_connections_total", verdict="deny") >= 3 * 4  # the attack did happen
    after = {s for s in series(metrics) if not s[0].startswith("corral_findings")}
    assert after == before
    rules = set(runtime.detector.ruleset.rules) | {OTHER}
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name.startswith("corral_findings"):
                assert s.labels["rule"] in rules and s.labels["severity"] in set(Severity)
    values = label_values(metrics)
    assert not [v for v in values if any(c in v for c in chosen) or "203.0.113." in v or "example" in v]


def test_a_flood_of_distinct_values_and_rule_ids_stays_bounded():
    """The same attack at volume, on the hooks directly: thousands of distinct sandboxes, commands and
    destinations; and a rule set with more rule ids than the cap (findings past it count as 'other')."""
    m = Metrics()
    kinds = [(EventKind.CONNECT, "connect"), (EventKind.DNS, "query"), (EventKind.PROCESS, "exec"),
             (EventKind.COMMAND, "start"), (EventKind.SANDBOX, "created")]
    m.observe_event(Event(kind=EventKind.COMMAND, action="exit", sandbox_id="s", data={"duration": 0.1}))
    ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id="s")
    m.observe_finding(Finding(rule_id="r", title="t", severity=Severity.HIGH, sandbox_id="s"), ev)
    base = len(series(m))
    for i in range(3000):
        kind, action = kinds[i % len(kinds)]
        m.observe_event(Event(kind=kind, action=action, sandbox_id=f"sb-{i}", episode_id=f"ep-{i}",
                              command=f"cmd {i}", dst_ip=f"10.{i // 256 % 256}.{i % 256}.1", dst_port=i,
                              name=f"n{i}.example.net", verdict=Verdict.DENY if i % 2 else None,
                              data={"duration": i / 1000}))
        m.observe_finding(Finding(rule_id="r", title=f"t{i}", severity=Severity.HIGH, sandbox_id=f"sb-{i}",
                                  command=f"cmd {i}", action="kill"), ev)
    # the only new series: ("r", high, kill), once
    per_finding_series = len([s for s in series(m) if s[0].startswith("corral_findings")]) // 2
    assert len(series(m)) == base + 2 and per_finding_series == 2
    for i in range(MAX_RULES + 100):
        m.observe_finding(Finding(rule_id=f"rule-{i}", title="t", severity=Severity.LOW, sandbox_id="s",
                                  action=f"action-{i}"), ev)
    rules = {s[1] for s in series(m) if s[0] == "corral_findings_total"}
    assert len(rules) <= MAX_RULES + 2  # the cap, "r"'s two series and "other"
    assert val(m, "corral_findings_total", rule=OTHER, severity="low", action=OTHER) >= 100


# -- exposition ----------------------------------------------------------------------------------------
TOKEN = "tok-metrics-" + "m" * 16


@pytest.fixture(scope="module")
def server(world, tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from corral.server import create_app
    from tests.conftest import serve_app

    cfg = RuntimeConfig(state_dir=tmp_path_factory.mktemp("metrics-serve"), hosts=world.hosts, system_dns=False)
    with serve_app(create_app(cfg, TOKEN)) as base:
        yield base


def scrape(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


async def test_serve_metrics_needs_the_token_and_counts_a_denied_connection(server):
    from corral.server.app import PREFIX

    async with httpx.AsyncClient(base_url=server) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
            r = await c.get("/metrics", headers=headers)
            assert r.status_code == 401 and "corral_" not in r.text
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server, headers=auth, timeout=60) as c:
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = scrape(r.text)
        assert got[("corral_sandboxes_active", ())] == 0
        assert any(name == "corral_build_info" and dict(labels).get("version") for name, labels in got)
        sid = (await c.post(f"{PREFIX}/start_async", json={"image": "python:3.11"})).json()["result"]["sandbox_id"]
        out = (await c.post(f"{PREFIX}/execute", json={
            "sandbox_id": sid, "command": connect_cmd(PKG[0], PKG[1], b"GET / HTTP/1.0\r\n\r\n")})).json()
        assert out["result"]["exit_code"] != 0
        got = scrape((await c.get("/metrics")).text)
        assert got[("corral_sandboxes_active", ())] == 1
        assert got[("corral_connections_total", (("verdict", "deny"),))] >= 1
        assert got[("corral_commands_total", ())] >= 1
        body = (await c.get("/metrics")).text
        assert sid not in body and PKG[0] not in body
        await c.post(f"{PREFIX}/delete", json={"sandbox_id": sid})
        assert scrape((await c.get("/metrics")).text)[("corral_sandboxes_active", ())] == 0


def test_metrics_serve_for_library_users():
    m = Metrics()
    m.observe_event(Event(kind=EventKind.COMMAND, action="start", sandbox_id="s"))
    srv = m.serve(0)
    try:
        host, port = srv.server_address[:2]
        assert host == "127.0.0.1"
        got = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        assert got[("corral_commands_total", ())] == 1
    finally:
        srv.shutdown()
        srv.server_close()


# -- the Grafana dashboard -----------------------------------------------------------------------------
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, grouping label names) of a PromQL expression: strings, label matchers, range
    selectors and grouping clauses removed; an identifier followed by '(' is a function."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    grouping = {g.strip() for clause in _GROUPING.findall(s) for g in clause.split(",") if g.strip()}
    s = _GROUPING.sub(" ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.group().lower() not in _NOT_METRICS and not s[m.end():].lstrip().startswith("("):
            names.add(m.group())
    return names, grouping


def panels(items: list[dict]) -> Iterator[dict]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def test_promql_parser_finds_metrics_not_functions_or_labels():
    names, grouping = promql_names('histogram_quantile(0.99, sum by (le, rule) (rate(x_bucket{a="b(c)"}[5m])))'
                                   ' / on (instance) group_left y_total offset 5m')
    assert names == {"x_bucket", "y_total"} and grouping == {"le", "rule", "instance"}


def test_dashboard_names_only_metrics_corral_exports():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["name"] == "DS_PROMETHEUS" for v in dash["templating"]["list"])
    exported = Metrics().exported()
    scrape_labels = {"instance", "job"}  # added by Prometheus to every series
    seen: set[str] = set()
    exprs = [(p["title"], t["expr"], t.get("legendFormat", ""))
             for p in panels(dash["panels"]) for t in p.get("targets", [])]
    assert len(exprs) >= 6
    for title, expr, legend in exprs:
        names, grouping = promql_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"panel {title!r} names {sorted(unknown)}, which corral does not export"
        labels = set().union(*(exported[n] for n in names)) | scrape_labels
        assert grouping <= labels, f"panel {title!r} groups by {sorted(grouping - labels)}: no such label"
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert shown <= (grouping or labels), f"panel {title!r} shows {sorted(shown)} in its legend"
        seen |= names
    for p in panels(dash["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    for v in dash["templating"]["list"]:  # label_values(metric, label) in a variable's query
        for metric, label in re.findall(r"label_values\((\w+),\s*(\w+)\)", json.dumps(v.get("query", ""))):
            assert metric in exported and label in exported[metric] | scrape_labels
    # the panels the dashboard exists for
    for wanted in ("corral_findings_total", "corral_connections_total", "corral_sandboxes_active",
                   "corral_time_to_detect_seconds_bucket", "corral_command_duration_seconds_bucket"):
        assert wanted in seen
