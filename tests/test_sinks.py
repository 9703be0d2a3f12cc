"""Alert sinks against real receivers on loopback: a real runtime judges real sandbox commands, and
each sink kind gets its alert, well formed, above its severity; a flaky receiver gets the alert again,
a dead one never holds up judging, and a flood of findings costs a bounded queue, its drops counted."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from corral import Runtime, RuntimeConfig
from corral.config import AlertSink
from corral.errors import ConfigError
from corral.events import Finding, Severity
from corral.observe import payloads
from corral.observe.sinks import Alerts
from tests.conftest import eventually, py

MINER = "cp /bin/sleep /tmp/xmrig && /tmp/xmrig 1"
METADATA = py("import urllib.request\ntry: urllib.request.urlopen('http://169.254.169.254/latest/meta-data/', "
              "timeout=3)\nexcept Exception as e: print('blocked', type(e).__name__)")
FALCO_PRIORITIES = {"Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug"}
RFC3339_NANOS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST (path, headers, JSON body) and answers
    with `statuses` in turn, then 200; with a `gate`, it holds each request until the gate opens."""

    def __init__(self, statuses: tuple[int, ...] = (), gate: threading.Event | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        statuses_left = list(statuses)
        me = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                me.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                if gate is not None:
                    gate.wait(30)
                self.send_response(statuses_left.pop(0) if statuses_left else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def at_least(findings: list[Finding], severity: str) -> set[str]:
    return {f.rule_id for f in findings if Severity(f.severity).rank >= Severity(severity).rank}


async def test_each_sink_kind_gets_its_alert_well_formed_and_filtered(tmp_path):
    hook, chat, falco, crit, flaky = Receiver(), Receiver(), Receiver(), Receiver(), Receiver(statuses=(500,))
    dead = f"http://127.0.0.1:{closed_port()}/"
    sinks = (
        AlertSink(kind="webhook", url=hook.url + "hooks/corral", min_severity="medium",
                  headers={"Authorization": "Bearer t0ken"}),
        AlertSink(kind="slack", url=chat.url + "services/T0/B0/secret"),  # default: high and above
        AlertSink(kind="falco", url=falco.url, min_severity="medium"),
        AlertSink(kind="webhook", url=crit.url, min_severity="critical"),
        AlertSink(kind="webhook", url=flaky.url, min_severity="critical"),
        AlertSink(kind="webhook", url=dead, min_severity="info", retries=1),
    )
    rt = Runtime(RuntimeConfig(state_dir=tmp_path, system_dns=False, alerts=sinks))
    await rt.start()
    try:
        assert rt.alerts is not None
        sb = await rt.create(episode_id="ep-alerts")
        miner = await sb.exec(MINER)
        assert miner.refused
        meta = await sb.exec(METADATA)
        assert "blocked" in meta.stdout
        # a dead receiver held nothing up: both commands came back judged, their findings stored
        await eventually(lambda: {"miner-binary", "metadata-service"} <= {
            f.rule_id for f in rt.store.findings(sandbox_id=sb.id)}, "both findings in the store")
        await rt.drain()
        await asyncio.wait_for(rt.alerts.wait_idle(), 60)
        found = rt.store.findings(sandbox_id=sb.id)
        n_critical = sum(f.severity == "critical" for f in found)

        # min_severity: each receiver got exactly the rules at or above its threshold
        assert {b["finding"]["rule_id"] for b in hook.bodies} == at_least(found, "medium")
        assert {b["finding"]["rule_id"] for b in crit.bodies} == at_least(found, "critical") == {"miner-binary"}
        assert {b["output_fields"]["corral.rule"] for b in falco.bodies} == at_least(found, "medium")
        assert len(chat.bodies) == sum(Severity(f.severity).rank >= Severity.HIGH.rank for f in found)

        # webhook: corral's finding with the event's destination and command, and the sink's headers
        assert {r["path"] for r in hook.requests} == {"/hooks/corral"}
        assert all(r["headers"]["Authorization"] == "Bearer t0ken" for r in hook.requests)
        m = next(b for b in hook.bodies if b["finding"]["rule_id"] == "metadata-service")
        assert m["finding"]["sandbox_id"] == sb.id and m["finding"]["episode_id"] == "ep-alerts"
        assert m["finding"]["step"] == meta.step and m["finding"]["command"] == METADATA
        assert m["event"]["dst_ip"] == "169.254.169.254" and m["event"]["dst_port"] == 80
        assert m["finding"]["id"] in {f.id for f in found}  # rendered after the store gave it its id
        assert all(uuid.UUID(b["uuid"]) for b in hook.bodies)

        # slack: an incoming-webhook message within Slack's limits, naming what happened
        for b in chat.bodies:
            assert isinstance(b["text"], str) and b["text"]
            assert {blk["type"] for blk in b["blocks"]} <= {"header", "section", "context"}
            header = b["blocks"][0]
            assert header["type"] == "header" and len(header["text"]["text"]) <= 150
            for blk in b["blocks"]:
                assert len(blk.get("fields", [])) <= 10
                assert len(blk.get("text", {}).get("text", "")) <= 3000
        s = next(b for b in chat.bodies if "metadata-service" in b["text"])
        shown = json.dumps(s["blocks"])
        assert "[HIGH]" in s["text"] and sb.id in shown and "ep-alerts" in shown and "169.254.169.254:80" in shown
        assert "urllib.request" in shown and f"*Step*\\n{meta.step}" in shown

        # falco: what falcosidekick's `/` accepts (its Check(): priority, rule, time, output_fields)
        for b in falco.bodies:
            assert set(b) == {"uuid", "output", "priority", "rule", "time", "output_fields", "source", "tags",
                              "hostname"}
            assert b["priority"] in FALCO_PRIORITIES and b["rule"] and b["source"] == "corral"
            assert RFC3339_NANOS.match(b["time"]), b["time"]
            datetime.datetime.fromisoformat(b["time"][:26] + "+00:00")  # a real instant, microseconds kept
            assert b["output_fields"] and all(isinstance(v, str | int | float) for v in b["output_fields"].values())
            assert b["tags"][0] == "corral" and uuid.UUID(b["uuid"])
        by_rule = {b["rule"]: b for b in falco.bodies}
        assert by_rule["miner-binary"]["priority"] == "Critical" and "mitre_impact" in by_rule["miner-binary"]["tags"]
        fm = by_rule["metadata-service"]
        assert fm["priority"] == "Error" and fm["output_fields"]["fd.sip"] == "169.254.169.254"
        assert fm["output_fields"]["fd.sport"] == 80 and fm["output_fields"]["corral.step"] == meta.step
        assert fm["output_fields"]["corral.sandbox"] == sb.id
        assert fm["output"].startswith(fm["time"][11:-1] + ": Error ")  # Falco's "%evt.time: Priority ..."

        # a 500 is retried: the same alert (same uuid) again, then delivered
        assert len(flaky.bodies) == n_critical + 1 and flaky.bodies[0] == flaky.bodies[1]
        st = rt.alerts.sinks[4].stats()
        assert (st["sent"], st["retried"], st["failed"], st["dropped"]) == (n_critical, 1, 0, 0)
        # the dead receiver: every alert tried twice, logged and counted as failed, never raised
        st = rt.alerts.sinks[5].stats()
        assert st["target"] == dead.rstrip("/") and st["sent"] == 0
        assert st["failed"] == st["retried"] == len(found)
        # and judging went on: the sandbox still runs commands
        assert (await sb.exec("echo still here")).stdout == "still here\n"
    finally:
        await rt.close()
        for r in (hook, chat, falco, crit, flaky):
            r.close()
    assert rt.alerts is None


async def test_a_flood_of_findings_costs_a_bounded_queue_and_drops_are_counted():
    gate = threading.Event()
    slow = Receiver(gate=gate)  # holds every request until the gate opens
    alerts = Alerts([AlertSink(kind="webhook", url=slow.url, min_severity="info", queue_size=50, timeout_s=30)])
    alerts.start()
    sink = alerts.sinks[0]

    def finding(title: str) -> Finding:
        return Finding(rule_id="flood", title=title, severity="high", sandbox_id="sb-flood")

    try:
        alerts.submit(finding("first"), None)
        await eventually(lambda: slow.requests, "the first alert reaching the stuck receiver")
        for i in range(5000):  # an agent flooding findings: each hand-over returns at once
            alerts.submit(finding(f"flood {i}"), None)
        assert len(sink.queue) == 50 and sink.dropped == 4950
        await asyncio.sleep(0.2)  # the receiver is still stuck: nothing more is queued or sent
        assert len(sink.queue) == 50 and len(slow.requests) == 1
        gate.set()
        await asyncio.wait_for(alerts.wait_idle(), 60)
        # the newest 50 are the ones kept, in order
        assert [b["finding"]["title"] for b in slow.bodies] == ["first"] + [f"flood {i}" for i in range(4950, 5000)]
        assert alerts.stats()[0] | {"target": None} == {"kind": "webhook", "target": None, "queued": 0, "sent": 51,
                                                       "failed": 0, "retried": 0, "dropped": 4950}
    finally:
        gate.set()
        await alerts.close()
        slow.close()


def test_slack_alert_cannot_ping_the_channel():
    f = Finding(rule_id="r", title="t <!channel>", severity="critical", sandbox_id="s",
                command="echo '<!channel> <https://evil.example|click>' ```x```")
    msg = payloads.slack(f, None)
    # Slack parses mentions and links in mrkdwn (the text, sections, context), not in plain_text headers
    mrkdwn = [msg["text"]] + [json.dumps(b) for b in msg["blocks"] if b["type"] != "header"]
    assert not any("<!channel>" in t or "<https://" in t for t in mrkdwn)
    assert "&lt;!channel&gt;" in msg["text"] and msg["blocks"][0]["text"]["type"] == "plain_text"


@pytest.mark.parametrize(("sink", "where", "says"), [
    ("{kind: webhook, url: 'ftp://example.com/x'}", "alerts.0.url", "http(s) URL"),
    ("{kind: webhook, url: 'example.com/hook'}", "alerts.0.url", "e.g. 'https://"),
    ("{kind: webhook, url: 'http://example.com:99999/'}", "alerts.0.url", "invalid port"),
    ("{kind: pagerduty, url: 'https://example.com/'}", "alerts.0.kind", "'webhook', 'slack' or 'falco'"),
    ("{kind: slack, url: 'https://example.com/', min_severity: urgent}", "alerts.0.min_severity", "'critical'"),
    ("{kind: falco, url: 'https://example.com/', token: x}", "alerts.0.token", "Extra inputs"),
    ("{kind: webhook, url: 'https://example.com/', headers: {'Bad Name': x}}", "alerts.0.headers", "header name"),
    ("{kind: webhook, url: 'https://example.com/', timeout_s: 0}", "alerts.0.timeout_s", "greater than 0"),
])
def test_a_malformed_sink_names_the_field_and_the_fix(tmp_path, sink, where, says):
    p = tmp_path / "corral.yaml"
    p.write_text(f"alerts:\n  - {sink}\n")
    with pytest.raises(ConfigError) as e:
        RuntimeConfig.from_file(p)
    assert where in str(e.value) and says in str(e.value), str(e.value)
