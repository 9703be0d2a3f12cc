"""OpenTelemetry traces (corral/observe/otel.py) of a real runtime's real sandboxes, through the real SDK:
an episode is one trace, its steps child spans with their commands, a finding a span event with its
rule, statuses ERROR for a refusal, a kill and a high finding, nothing left open after close. A real
OTLP/HTTP export (the SDK's exporter, and `corral serve` with `otel:`) to a receiver on loopback,
decoded with opentelemetry-proto. Bounds: a flood of execs on one step, many sandboxes never closed."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import secrets
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from corral import RuntimeConfig
from corral.events import Event, EventKind
from corral.observe.otel import MAX_COMMAND, Tracing
from tests.conftest import eventually

TOKEN = "tok-otel-" + "o" * 16


class Opened(SpanProcessor):
    """A span processor of the SDK's own kind that notes which spans started and which ended."""

    def __init__(self) -> None:
        self.started: set[int] = set()
        self.ended: set[int] = set()

    def on_start(self, span, parent_context=None) -> None:
        self.started.add(span.context.span_id)

    def on_end(self, span) -> None:
        self.ended.add(span.context.span_id)


@pytest.fixture
def traced(runtime) -> Iterator[tuple[Tracing, InMemorySpanExporter, Opened]]:
    exporter, opened = InMemorySpanExporter(), Opened()
    provider = TracerProvider()
    provider.add_span_processor(opened)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(runtime, tracer_provider=provider)
    yield tracing, exporter, opened
    tracing.detach()
    provider.shutdown()


def by_name(spans, trace_id: int | None = None) -> dict:
    return {s.name: s for s in spans if trace_id is None or s.context.trace_id == trace_id}


def events(span, prefix: str = "") -> list:
    return [e for e in span.events if e.name.startswith(prefix)]


# -- a real episode ------------------------------------------------------------------------------------
async def test_an_episode_is_one_trace_its_steps_spans_and_a_finding_a_span_event(traced, runtime):
    tracing, exporter, opened = traced
    episode = f"otel-ep-{secrets.token_hex(3)}"
    sb = await runtime.create(episode_id=episode)
    try:
        r1 = await sb.exec("ls /workspace; getent hosts pkg.example.com; true")
        r2 = await sb.exec("cp /bin/sleep /tmp/xmrig; /tmp/xmrig 1")
        assert r2.refused and "miner-binary" in r2.error
        r3 = await sb.exec("sleep 5", timeout=0.5)
        assert r3.timed_out
        await runtime.drain()
        assert tracing.stats()["traces_open"] == 1
        # how an episode engine ends an episode (agent/engine.py): its outcome and reward
        runtime.emit(Event(kind=EventKind.SANDBOX, action="episode_outcome", sandbox_id=sb.id, episode_id=episode,
                           reason="security_violation", data={"reward": -1.0}))
    finally:
        await sb.close()

    spans = exporter.get_finished_spans()
    root = by_name(spans)[f"episode {episode}"]
    mine = [s for s in spans if s.context.trace_id == root.context.trace_id]
    assert {s.name for s in mine} == {f"episode {episode}", f"step {r1.step}", f"step {r2.step}", f"step {r3.step}"}
    assert root.parent is None and all(s.parent.span_id == root.context.span_id for s in mine if s is not root)
    assert dict(root.attributes).items() >= {
        "corral.run_id": runtime.run_id, "corral.episode_id": episode, "corral.sandbox_id": sb.id,
        "corral.outcome": "security_violation", "corral.reward": -1.0, "corral.trace.ended_by": "outcome",
        "corral.steps": 3}.items()
    assert root.attributes["corral.findings"] >= 1
    assert root.status.status_code == StatusCode.ERROR and "miner-binary" in root.status.description

    steps = by_name(mine)
    s1, s2, s3 = steps[f"step {r1.step}"], steps[f"step {r2.step}"], steps[f"step {r3.step}"]
    assert s1.attributes["corral.command"] == "ls /workspace; getent hosts pkg.example.com; true"
    assert s1.attributes["corral.step"] == r1.step and s1.attributes["corral.exit_code"] == 0
    assert s1.attributes["corral.timed_out"] is False and s1.attributes["corral.duration_s"] > 0
    assert s1.status.status_code == StatusCode.UNSET
    execs = [e.attributes.get("process.executable.path", "") for e in events(s1, "exec")]
    assert any(p.endswith("/ls") for p in execs) and any(p.endswith("/getent") for p in execs), execs
    dns = [e.attributes for e in events(s1, "dns query")]
    assert any(a.get("dns.question.name") == "pkg.example.com" for a in dns), dns

    # refused before anything ran: its finding is an event on its span, the span ERROR
    assert s2.attributes["corral.command"] == "cp /bin/sleep /tmp/xmrig; /tmp/xmrig 1"
    assert s2.attributes["corral.refused"] is True and "corral.exit_code" not in s2.attributes
    assert s2.status.status_code == StatusCode.ERROR and "miner-binary" in s2.status.description
    (finding,) = events(s2, "finding ")
    assert finding.name == "finding miner-binary"
    assert dict(finding.attributes).items() >= {"corral.finding.rule": "miner-binary",
                                                "corral.finding.severity": "critical",
                                                "corral.finding.technique": "T1496"}.items()
    assert finding.attributes["corral.finding.action"]

    # the timeout killed the step: ERROR, with the exit's attributes
    assert s3.attributes["corral.timed_out"] is True and s3.status.status_code == StatusCode.ERROR
    assert "timed out" in s3.status.description
    assert all(s.end_time >= s.start_time for s in mine) and root.start_time <= min(s.start_time for s in mine)

    # nothing left open, and the close after the outcome started nothing new
    assert opened.started == opened.ended and tracing.stats() == {
        "traces_open": 0, "spans_open": 0, "events_held": 0, "traces_evicted": 0}


async def test_closing_a_sandbox_ends_its_trace_and_a_step_still_running(traced, runtime):
    tracing, exporter, opened = traced
    sb = await runtime.create()  # no episode: the sandbox is the trace
    long_cmd = "echo " + "x" * (MAX_COMMAND + 100)
    await sb.exec(long_cmd)
    task = asyncio.ensure_future(sb.exec("sleep 30"))
    await eventually(lambda: tracing.stats()["spans_open"] == 2, "the running step's span")
    await sb.close()
    with contextlib.suppress(Exception):
        await task
    assert tracing.stats()["spans_open"] == 0 and opened.started == opened.ended
    spans = by_name(exporter.get_finished_spans())
    root = spans[f"sandbox {sb.id}"]
    assert root.attributes["corral.outcome"] == "closed" and "corral.episode_id" not in root.attributes
    first = spans["step 1"]
    assert first.context.trace_id == root.context.trace_id
    cmd = first.attributes["corral.command"]  # cut, with a marker that says so
    assert cmd.startswith("echo xxx") and cmd.endswith(f"…[+{len(long_cmd) - MAX_COMMAND} chars]")
    running = spans["step 2"]
    assert running.end_time is not None and running.context.trace_id == root.context.trace_id
    # either its exit (killed: ERROR) came before the close, or the close ended it unfinished
    assert running.status.status_code == StatusCode.ERROR or running.attributes["corral.step.unfinished"] == "closed"


# -- bounds ---------------------------------------------------------------------------------------------
async def test_a_flood_of_execs_on_one_step_is_capped_and_counted(runtime):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(runtime, tracer_provider=provider, max_events_per_span=16)
    seen: dict[str, int] = {"open": 0}
    exited: set[int] = set()

    def count(ev: Event) -> None:  # exec events of a step the runtime delivered while it ran
        if ev.kind == EventKind.COMMAND and ev.action == "exit":
            exited.add(ev.step)
        elif ev.kind == EventKind.PROCESS and ev.action == "exec" and ev.step and ev.step not in exited:
            seen["open"] += 1

    undo = runtime.subscribe(count)
    sb = await runtime.create()
    try:
        r = await sb.exec("for i in $(seq 80); do /bin/true; done")
        assert r.exit_code == 0
    finally:
        await sb.close()
        undo()
        tracing.detach()
    step = by_name(exporter.get_finished_spans())["step 1"]
    assert seen["open"] > 16 + 40, seen  # the flood was real
    assert len(step.events) == 16 and step.attributes["corral.events_dropped"] == seen["open"] - 16
    assert tracing.stats()["events_held"] == 0


async def test_sandboxes_never_closed_do_not_grow_open_traces(runtime):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(runtime, tracer_provider=provider, max_traces=2)
    sbs = []
    try:
        for _ in range(3):
            sbs.append(await runtime.create(episode_id=f"otel-leak-{secrets.token_hex(3)}"))
            await sbs[-1].exec("true")
        assert tracing.stats()["traces_open"] == 2 and tracing.evicted == 1
        first = by_name(exporter.get_finished_spans())[f"episode {sbs[0].episode_id}"]
        assert first.attributes["corral.trace.ended_by"] == "evicted"
        # an evicted episode's later commands do not start a second trace for it
        await sbs[0].exec("true")
        assert tracing.stats()["traces_open"] == 2
    finally:
        for sb in sbs:
            await sb.close()
        tracing.detach()
    assert tracing.stats()["traces_open"] == 0
    names = [s.name for s in exporter.get_finished_spans() if s.parent is None]
    assert sorted(names) == sorted(f"episode {sb.episode_id}" for sb in sbs)


def test_an_attack_at_scale_stays_within_every_bound():
    """The hooks alone, at a scale no test sandbox reaches: 150 sandboxes created and never closed,
    each starting steps that never end and flooding one with execs and findings."""
    from corral.events import Finding

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer_provider=provider, max_traces=16, max_held_events=1500)
    for i in range(150):
        sid, ep = f"sb-{i}", f"ep-{i}"
        tracing.observe_event(Event(kind=EventKind.SANDBOX, action="created", sandbox_id=sid, episode_id=ep))
        for step in range(1, 40):  # steps started and never ended: capped per sandbox
            tracing.observe_event(Event(kind=EventKind.COMMAND, action="start", sandbox_id=sid, episode_id=ep,
                                        step=step, command="x" * 10_000))
        ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id=sid, episode_id=ep, step=39, exe="/tmp/x",
                   argv=["a" * 1000] * 100)
        finding = Finding(rule_id="r", title="t", severity="high", sandbox_id=sid, episode_id=ep, step=39)
        for j in range(150):
            tracing.observe_event(ev)
            if j % 3 == 0:
                tracing.observe_finding(finding, ev)
        s = tracing.stats()
        assert s["traces_open"] <= 16 and s["spans_open"] <= 16 * 17 and s["events_held"] <= 1500
    assert tracing.evicted == 150 - 16
    tracing.detach()
    assert tracing.stats() == {"traces_open": 0, "spans_open": 0, "events_held": 0, "traces_evicted": 150 - 16}
    step39 = [s for s in exporter.get_finished_spans() if s.name == "step 39"]
    first, last = step39[0], step39[-1]  # the first kept the first of each; the held budget then ran out
    assert sorted(e.name for e in first.events) == ["exec"] * 96 + ["finding r"] * 32
    assert first.attributes["corral.events_dropped"] == 150 - 96
    assert first.attributes["corral.findings_dropped"] == 50 - 32
    dropped = last.attributes.get("corral.events_dropped", 0) + last.attributes.get("corral.findings_dropped", 0)
    assert len(last.events) + dropped == 150 + 50 and dropped > 0
    args = first.events[0].attributes["process.command_args"]
    assert len(args) == 33 and args[-1] == "…[+68 args]" and args[0].endswith("…[+744 chars]")


# -- OTLP/HTTP to a receiver on loopback --------------------------------------------------------------
@pytest.fixture
def receiver() -> Iterator[tuple[str, list]]:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces, protobuf bodies decoded and kept."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    got: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
            if ok:
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                got.append(req)
            out = ExportTraceServiceResponse().SerializeToString() if ok else b""
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1/traces", got
    srv.shutdown()
    srv.server_close()


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def received(got: list) -> list[tuple[dict, object]]:
    """(resource attributes, span) for every span the receiver was sent."""
    return [({kv.key: _value(kv.value) for kv in rs.resource.attributes}, span)
            for req in got for rs in req.resource_spans for ss in rs.scope_spans for span in ss.spans]


def attrs(span) -> dict:
    return {kv.key: _value(kv.value) for kv in span.attributes}


async def test_otlp_http_export_reaches_a_collector(runtime, receiver):
    url, got = receiver
    tracing = Tracing.otlp(url, "corral-otel-test", runtime=runtime)
    episode = f"otel-otlp-{secrets.token_hex(3)}"
    sb = await runtime.create(episode_id=episode)
    try:
        await sb.exec("echo hello")
        r = await sb.exec("cp /bin/sleep /tmp/xmrig; /tmp/xmrig 1")
        assert r.refused
    finally:
        await sb.close()
    await tracing.aclose()  # the batch processor's flush: the export happens now, from its thread
    spans = received(got)
    assert spans and all(res["service.name"] == "corral-otel-test" for res, _ in spans)
    named = {s.name: s for _, s in spans}
    root, s1, s2 = named[f"episode {episode}"], named["step 1"], named["step 2"]
    assert attrs(root)["corral.episode_id"] == episode and attrs(root)["corral.outcome"] == "closed"
    assert s1.trace_id == s2.trace_id == root.trace_id and not root.parent_span_id
    assert s1.parent_span_id == s2.parent_span_id == root.span_id
    assert attrs(s1)["corral.command"] == "echo hello" and attrs(s1)["corral.exit_code"] == 0
    assert [e.name for e in s2.events if e.name.startswith("finding")] == ["finding miner-binary"]
    assert s2.status.code == 2 and root.status.code == 2  # STATUS_CODE_ERROR


def test_serve_with_otel_sends_its_sandboxes_steps(world, tmp_path, receiver):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from corral.server import create_app
    from corral.server.app import PREFIX
    from corral.server.config import ServeConfig
    from tests.conftest import serve_app

    url, got = receiver
    cfg = ServeConfig.model_validate({
        "runtime": RuntimeConfig(state_dir=tmp_path, hosts=world.hosts, system_dns=False),
        "otel": {"endpoint": url, "service_name": "corral-serve-test"}, "openenv": {"enabled": False}})
    app = create_app(cfg, [TOKEN])

    async def session(base: str) -> str:
        async with httpx.AsyncClient(base_url=f"{base}{PREFIX}", headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60) as c:
            sid = (await c.post("/start_async", json={"image": "python:3.11"})).json()["result"]["sandbox_id"]
            out = (await c.post("/execute", json={"sandbox_id": sid, "command": "echo traced"})).json()
            assert out["result"]["stdout"] == "traced\n"
            await c.post("/delete", json={"sandbox_id": sid})
            return sid

    with serve_app(app) as base:
        asyncio.run(session(base))
    # the lifespan's shutdown flushed the exporter before the server exited
    spans = received(got)
    assert spans and {res["service.name"] for res, _ in spans} == {"corral-serve-test"}
    steps = [s for _, s in spans if s.name.startswith("step ") and attrs(s).get("corral.command") == "echo traced"]
    assert len(steps) == 1
    roots = [s for _, s in spans if s.span_id == steps[0].parent_span_id]
    assert len(roots) == 1 and roots[0].name.startswith("sandbox ") and attrs(roots[0])["corral.outcome"] == "closed"


def test_serve_refuses_otel_without_the_sdk_naming_the_extra(monkeypatch):
    from corral.server import create_app
    from corral.server.config import ServeConfig, ServeConfigError

    cfg = ServeConfig.model_validate({"otel": {}})
    assert cfg.otel.endpoint == "http://127.0.0.1:4318/v1/traces" and cfg.otel.service_name == "corral"
    with pytest.raises(ValueError, match="endpoint"):
        ServeConfig.model_validate({"otel": {"endpoint": "127.0.0.1:4318"}})
    # as if the exporter were not installed: an import of it fails
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ServeConfigError, match=r"pip install 'corral\[otel\]'"):
        create_app(cfg, [TOKEN])
    create_app(ServeConfig(openenv={"enabled": False}), [TOKEN])  # without otel: nothing is needed
