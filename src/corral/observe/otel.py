"""OpenTelemetry traces of a corral Runtime: an episode is a trace, a step a span, a finding a span event.

    tracing = Tracing(runtime, tracer_provider=provider)   # or Tracing.otlp(endpoint, runtime=runtime)
    ...
    tracing.detach()                                        # ends what is still open

The span model:

- one trace per episode (events carry `episode_id`; a sandbox used without one gets a trace of its own),
  its root span `episode <id>` (`sandbox <id>`) opened at the first event seen (the sandbox's `created`,
  or its first command) and ended by the episode's outcome (`episode_outcome`, with `corral.outcome`
  and `corral.reward`), by the close of its last sandbox (an episode may have two: the agent's and a
  grading one), when the sandbox starts another episode, or when evicted (see bounds). A security
  finding's `episode_ended` sets the outcome and ERROR but leaves the span open for the outcome and
  reward that follow it, which an episode engine records just after.
- a span per step, child of the root: `step N` from its command's check or `start` to its `exit`
  (exit code, duration, timed out) or `refused` (ERROR). ERROR also for a kill: a timeout, a signal, the
  memory or process limit, an interrupt, or corral's own `kill` action.
- span events on the step: process execs, connections, DNS queries, protected-file changes and
  corral's containment actions; findings as `finding <rule>` (severity, technique, action,
  destination). A finding at high or above sets the step's and the episode's status to ERROR. What
  arrives after its step ended (a background process, a late connection) goes on the root span, with
  `corral.step`.

The callbacks run on the event loop every tenant shares, in the middle of `Runtime.emit`: they only
keep spans. Exporting is the span processor's job (the SDK's BatchSpanProcessor sends from its own
thread; `Tracing.otlp` uses one). An agent chooses what it runs, so everything kept is bounded: span
events per span (the rest counted in `corral.events_dropped` / `corral.findings_dropped`), span events
held by all open spans together, open steps per sandbox, sandboxes per trace, and open traces (past
`max_traces` the oldest is ended, `corral.trace.ended_by: evicted`); a sandbox's spans are forgotten
when it closes; long text (commands, argv, reasons) is cut with a visible `…[+N chars]` marker.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from corral.errors import ConfigError
from corral.events import Event, EventKind, Finding, Severity
from corral.observe.follow import Follower
from corral.text import clip_counted

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Status, StatusCode
except ImportError:  # the API comes with opentelemetry-sdk: `pip install 'corral[otel]'`
    otel_trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.trace import Span, TracerProvider

    from corral.runtime import Runtime

log = logging.getLogger("corral")

INSTALL_HINT = "pip install 'corral[otel]'"
MAX_TRACES = 4096  # open traces (episodes, or sandboxes without one); past it the oldest is ended
MAX_SANDBOXES_PER_TRACE = 64  # an episode's sandboxes followed step by step (the agent's, a grader's)
MAX_OPEN_STEPS = 16  # steps running at once in one sandbox (exec and sessions side by side)
# span events per span, kept within the SDK's default SpanLimits.max_events (128) together: past
# the SDK's limit it would drop the oldest silently, where corral keeps the first and counts the rest
MAX_EVENTS_PER_SPAN = 96
MAX_FINDINGS_PER_SPAN = 32
MAX_HELD_EVENTS = 100_000  # span events held by every open span together
MAX_COMMAND = 2048  # characters of a command kept on its step
MAX_TEXT = 512  # characters of any other text (names, reasons, each argument)
MAX_ARGS = 32  # arguments of an exec kept
_ERROR_OUTCOMES = frozenset({"security_violation", "sandbox_lost", "error"})
_SPAN_EVENT_KINDS = frozenset({EventKind.PROCESS, EventKind.CONNECT, EventKind.DNS, EventKind.FILE, EventKind.ACTION})
_COMMAND_OPENS = frozenset({"check", "start", "refused"})  # a step's first events (check: before it runs)
_NAMES = {(EventKind.PROCESS, "exec"): "exec", (EventKind.CONNECT, "connect"): "connect"}
_HIGH = Severity.HIGH.rank


class OtelUnavailable(ConfigError):
    """OpenTelemetry traces were asked for but its SDK (or exporter) is not installed."""


def require_sdk(*, exporter: bool = False) -> None:
    """Raise OtelUnavailable, naming the extra to install, unless the SDK (and the OTLP/HTTP exporter)
    can be imported."""
    try:
        importlib.import_module("opentelemetry.sdk.trace")
        if exporter:
            importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError as e:
        what = "the OpenTelemetry SDK and its OTLP/HTTP exporter" if exporter else "the OpenTelemetry SDK"
        raise OtelUnavailable(f"OpenTelemetry traces need {what}, which are not installed ({e}): "
                              f"{INSTALL_HINT}") from None


def otlp_provider(endpoint: str, service_name: str = "corral", *, timeout_s: float = 10.0) -> TracerProvider:
    """An SDK TracerProvider sending spans to an OTLP/HTTP endpoint (`http://127.0.0.1:4318/v1/traces`)
    from a BatchSpanProcessor's thread. Proxy settings in the environment are not used (as for alert
    sinks); the OTEL_EXPORTER_OTLP_TRACES_* variables (headers, certificates, compression) are."""
    require_sdk(exporter=True)
    import requests
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from corral import __version__

    session = requests.Session()
    session.trust_env = False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                        "service.version": __version__}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s,
                                                                    session=session)))
    return provider


# -- small helpers (attribute values must be str, bool, int, float or lists of one of them) ---------------
def _ns(ts: float) -> int:
    return int(ts * 1e9)


def _clip(s: str, limit: int = MAX_TEXT) -> str:
    return clip_counted(s, limit, "…[+{n} chars]")


def _int(v: object) -> int | None:
    return v if type(v) is int else None


def _num(v: object) -> float | None:
    return float(v) if type(v) in (int, float) else None


def _attrs(**kw: Any) -> dict[str, Any]:
    """The non-None values, strings clipped; `__` in a keyword stands for `.` in the attribute name."""
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if v is None:
            continue
        out[k.replace("__", ".")] = _clip(str(v)) if isinstance(v, str) else v
    return out


def _argv(argv: list[str] | None) -> list[str] | None:
    if not argv:
        return None
    out = [_clip(str(a), 256) for a in argv[:MAX_ARGS]]
    if len(argv) > MAX_ARGS:
        out.append(f"…[+{len(argv) - MAX_ARGS} args]")
    return out


# -- bookkeeping --------------------------------------------------------------------------------------
class _Kept:
    """One open span and what corral has put on it."""

    __slots__ = ("dropped_events", "dropped_findings", "error", "events", "findings", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.events = self.findings = self.dropped_events = self.dropped_findings = 0
        self.error: str | None = None


class _Member:
    """A sandbox of a trace: its open steps, and the highest step it started (a lower one not open
    has ended: its late events go on the root span)."""

    __slots__ = ("max_step", "steps")

    def __init__(self) -> None:
        self.max_step = 0
        self.steps: OrderedDict[int, _Kept] = OrderedDict()


class _Trace(_Kept):
    __slots__ = ("ctx", "key", "members", "n_findings", "n_steps", "outcome")

    def __init__(self, key: str, span: Span) -> None:
        super().__init__(span)
        self.key = key
        self.ctx = otel_trace.set_span_in_context(span)
        self.members: dict[str, _Member] = {}
        self.outcome: str | None = None
        self.n_steps = self.n_findings = 0


class Tracing(Follower):
    """Spans for one runtime's episodes, steps and findings (see the module's docstring).

    `tracer_provider`: an SDK TracerProvider with the processors and exporters you want; None uses the
    global one (`opentelemetry.trace.set_tracer_provider`). `Tracing.otlp(endpoint)` makes one that
    sends to an OTLP/HTTP collector, and shuts it down with `aclose()`/`shutdown()`.
    """

    def __init__(self, runtime: Runtime | None = None, *, tracer_provider: TracerProvider | None = None,
                 max_traces: int = MAX_TRACES, max_open_steps: int = MAX_OPEN_STEPS,
                 max_sandboxes_per_trace: int = MAX_SANDBOXES_PER_TRACE,
                 max_events_per_span: int = MAX_EVENTS_PER_SPAN, max_findings_per_span: int = MAX_FINDINGS_PER_SPAN,
                 max_held_events: int = MAX_HELD_EVENTS) -> None:
        if otel_trace is None:
            raise OtelUnavailable(f"OpenTelemetry traces need opentelemetry-api and opentelemetry-sdk: {INSTALL_HINT}")
        if min(max_traces, max_open_steps, max_sandboxes_per_trace) < 1:
            raise ValueError("max_traces, max_open_steps and max_sandboxes_per_trace must be at least 1")
        from corral import __version__  # here: corral/__init__ imports the runtime

        self.tracer_provider = tracer_provider if tracer_provider is not None else otel_trace.get_tracer_provider()
        self._tracer = self.tracer_provider.get_tracer("corral", __version__)
        self.max_traces, self.max_open_steps = max_traces, max_open_steps
        self.max_sandboxes_per_trace = max_sandboxes_per_trace
        self.max_events_per_span, self.max_findings_per_span = max_events_per_span, max_findings_per_span
        self.max_held_events = max_held_events
        self._traces: OrderedDict[str, _Trace] = OrderedDict()  # oldest first: the one evicted
        self._by_sandbox: dict[str, _Trace] = {}  # each followed sandbox's current trace
        # keys of traces ended lately: a late command of an ended episode does not start a second trace
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._held = 0
        self._failures = 0
        self.evicted = 0
        self._owns_provider = False
        self._runtime: Runtime | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        if runtime is not None:
            self.attach(runtime)

    @classmethod
    def otlp(cls, endpoint: str, service_name: str = "corral", *, runtime: Runtime | None = None,
             timeout_s: float = 10.0, **limits: int) -> Tracing:
        """Tracing with its own provider sending to an OTLP/HTTP endpoint (see `otlp_provider`)."""
        t = cls(tracer_provider=otlp_provider(endpoint, service_name, timeout_s=timeout_s), **limits)
        t._owns_provider = True
        if runtime is not None:
            t.attach(runtime)
        return t

    # -- attaching ---------------------------------------------------------------------------------
    def detach(self) -> None:
        """Stop following the runtime; what is still open ends now (`corral.trace.ended_by: detached`)."""
        super().detach()
        now = time.time()
        for tr in list(self._traces.values()):
            self._end(tr, now, "detached")

    def shutdown(self) -> None:
        """detach(), then flush and stop a provider made by `otlp()` (blocks while it sends)."""
        self.detach()
        if self._owns_provider:
            self.tracer_provider.shutdown()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """shutdown() for async code: the flush runs off the event loop."""
        self.detach()
        if self._owns_provider:
            await asyncio.to_thread(self.tracer_provider.shutdown)  # type: ignore[attr-defined]

    def stats(self) -> dict[str, int]:
        """What is held now: open traces and spans, span events on them; traces evicted so far."""
        spans = sum(1 + sum(len(m.steps) for m in tr.members.values()) for tr in self._traces.values())
        return {"traces_open": len(self._traces), "spans_open": spans, "events_held": self._held,
                "traces_evicted": self.evicted}

    # -- the hooks (on the event loop: span bookkeeping only) -----------------------------------------
    def observe_event(self, ev: Event) -> None:
        """The runtime's event subscriber. Never raises: a tracing bug must not break the event path."""
        try:
            self._event(ev)
        except Exception:
            self._failed(f"a {ev.kind}/{ev.action} event")

    def observe_finding(self, f: Finding, ev: Event) -> None:
        """The runtime's finding subscriber: a `finding <rule>` span event on the finding's step."""
        try:
            self._finding(f, ev)
        except Exception:
            self._failed(f"finding {f.rule_id}")

    def _failed(self, what: str) -> None:
        self._failures += 1
        if self._failures <= 10:  # a bug hit on every event must not flood the log
            log.exception("corral: tracing failed on %s", what)

    # -- events ------------------------------------------------------------------------------------
    def _event(self, ev: Event) -> None:
        kind, action = ev.kind, ev.action
        if action == "sample":  # periodic CPU/GPU samples: not something a step did
            return
        tr = self._trace_for(ev)
        if tr is None:
            return
        if kind == EventKind.SANDBOX:
            self._sandbox_event(tr, ev)
        elif kind == EventKind.COMMAND:
            self._command_event(tr, ev)
        elif kind in _SPAN_EVENT_KINDS:
            target, late = self._target(tr, ev.sandbox_id, ev.step)
            if kind == EventKind.ACTION and action == "kill" and not late and target.error is None:
                target.error = f"killed by corral (rule {ev.data.get('rule')})"
            if self._room(target):  # a flood past the cap costs a count, not the attributes
                target.span.add_event(_NAMES.get((kind, action), f"{kind} {action}"), self._event_attrs(ev, late),
                                      timestamp=_ns(ev.ts))

    @staticmethod
    def _opens(ev: Event) -> bool:
        return ((ev.kind == EventKind.SANDBOX and ev.action == "created")
                or (ev.kind == EventKind.COMMAND and ev.action in _COMMAND_OPENS))

    def _trace_for(self, ev: Event) -> _Trace | None:
        """The event's trace: its episode's, else its sandbox's; opened by a sandbox's creation or a
        command, never by anything else (a pooled sandbox's noise, a late event of an ended episode)."""
        sid = ev.sandbox_id
        if ev.episode_id is not None:
            key = "episode:" + ev.episode_id
            tr = self._traces.get(key)
        else:
            tr = self._by_sandbox.get(sid)
            key = tr.key if tr is not None else "sandbox:" + sid
        opens = self._opens(ev)
        if tr is None:
            created = ev.kind == EventKind.SANDBOX and ev.action == "created"
            if not opens or (key in self._ended and not created):
                return None
            tr = self._open(key, ev)
        if opens and sid not in tr.members:
            old = self._by_sandbox.get(sid)
            if old is not None and old is not tr:  # the sandbox moved on to another episode
                self._leave(old, sid, ev.ts, "next_episode")
            if len(tr.members) < self.max_sandboxes_per_trace:
                tr.members[sid] = _Member()
                self._by_sandbox[sid] = tr
        return tr

    def _open(self, key: str, ev: Event) -> _Trace:
        while len(self._traces) >= self.max_traces:
            oldest = next(iter(self._traces.values()))
            self.evicted += 1
            self._end(oldest, ev.ts, "evicted")
        name = f"episode {ev.episode_id}" if ev.episode_id is not None else f"sandbox {ev.sandbox_id}"
        span = self._tracer.start_span(
            _clip(name), context=Context(),  # a root: never the child of whatever span is current
            attributes=_attrs(corral__run_id=ev.run_id, corral__episode_id=ev.episode_id,
                              corral__sandbox_id=ev.sandbox_id),
            start_time=_ns(ev.ts))
        tr = _Trace(key, span)
        self._traces[key] = tr
        self._ended.pop(key, None)
        return tr

    def _sandbox_event(self, tr: _Trace, ev: Event) -> None:
        action = ev.action
        if action == "episode_outcome":
            tr.outcome = ev.reason or "unknown"
            reward = _num(ev.data.get("reward"))
            if reward is not None:
                tr.span.set_attribute("corral.reward", reward)
            if tr.outcome in _ERROR_OUTCOMES and tr.error is None:
                tr.error = f"episode outcome: {tr.outcome}"
            self._end(tr, ev.ts, "outcome")
        elif action == "closed":
            self._leave(tr, ev.sandbox_id, ev.ts, "closed")
        else:
            if action == "episode_ended":  # ended by a security finding: the outcome and reward follow
                tr.outcome = tr.outcome or "episode_ended"
                tr.error = tr.error or _clip(f"episode ended: {ev.reason}")
            if self._room(tr):
                tr.span.add_event(f"sandbox {action}", _attrs(corral__sandbox_id=ev.sandbox_id,
                                                              corral__reason=ev.reason), timestamp=_ns(ev.ts))

    def _command_event(self, tr: _Trace, ev: Event) -> None:
        m = tr.members.get(ev.sandbox_id)
        n = ev.step
        if m is None or not n:  # a sandbox past the per-trace cap, or corral's own helper (step 0)
            return
        st = m.steps.get(n)
        action = ev.action
        if st is None:
            if action not in _COMMAND_OPENS or n <= m.max_step:  # its step has ended
                return
            st = self._open_step(tr, m, n, ev.command, ev.ts, ev.sandbox_id)
        d = ev.data
        if action == "start":
            st.span.set_attributes(_attrs(corral__session=d.get("session"), corral__tool_call_id=d.get("tool_call_id")))
        elif action == "refused":
            st.span.set_attribute("corral.refused", True)
            st.error = _clip(ev.reason or "refused")
            self._end_step(m, n, st, ev.ts)
        elif action == "exit":
            code = _int(d.get("exit_code"))
            flags = {k: d.get(k) is True for k in ("timed_out", "oom_killed", "pids_limit_hit", "interrupted")}
            st.span.set_attributes(_attrs(corral__exit_code=code, corral__duration_s=_num(d.get("duration")),
                                          corral__stdout_bytes=_int(d.get("stdout_bytes")),
                                          corral__stderr_bytes=_int(d.get("stderr_bytes")),
                                          **{f"corral__{k}": v for k, v in flags.items()}))
            err = d.get("error") if isinstance(d.get("error"), str) else None
            if any(flags.values()) or (code is not None and code < 0) or (code is None and err):
                killed = next((k for k, v in flags.items() if v), f"exit code {code}" if code is not None else "")
                st.error = st.error or _clip(err or f"killed ({killed})")
            self._end_step(m, n, st, ev.ts)

    def _open_step(self, tr: _Trace, m: _Member, n: int, command: str | None, ts: float, sid: str) -> _Kept:
        while len(m.steps) >= self.max_open_steps:
            _n, old = m.steps.popitem(last=False)
            old.span.set_attribute("corral.step.unfinished", "too many steps open at once")
            self._finish(old, ts)
        attributes = _attrs(corral__step=n, corral__sandbox_id=sid)
        if command is not None:  # longer than other text (_attrs' limit)
            attributes["corral.command"] = _clip(command, MAX_COMMAND)
        span = self._tracer.start_span(f"step {n}", context=tr.ctx, start_time=_ns(ts), attributes=attributes)
        st = _Kept(span)
        m.steps[n] = st
        m.max_step = max(m.max_step, n)
        tr.n_steps += 1
        return st

    def _target(self, tr: _Trace, sid: str, step: int | None) -> tuple[_Kept, bool]:
        """Where an event of (sandbox, step) goes: its open step's span, else the root's; and whether
        it came after its step ended."""
        m = tr.members.get(sid)
        st = m.steps.get(step) if m is not None and step else None
        if st is not None:
            return st, False
        return tr, bool(step)

    @staticmethod
    def _event_attrs(ev: Event, late: bool) -> dict[str, Any]:
        a = _attrs(corral__step=ev.step if late else None, corral__verdict=ev.verdict and str(ev.verdict),
                   corral__reason=ev.reason)
        kind = ev.kind
        if kind == EventKind.PROCESS:
            a.update(_attrs(process__pid=ev.pid, process__parent_pid=ev.ppid, process__executable__path=ev.exe))
            args = _argv(ev.argv)
            if args:
                a["process.command_args"] = args
        elif kind in (EventKind.CONNECT, EventKind.DNS):
            a.update(_attrs(server__address=ev.dst_ip, server__port=ev.dst_port, corral__name=ev.name,
                            corral__protocol=ev.protocol, corral__bytes_up=ev.bytes_up,
                            corral__bytes_down=ev.bytes_down))
            if kind == EventKind.DNS and ev.name:
                a["dns.question.name"] = _clip(ev.name)
        elif kind == EventKind.FILE:
            a.update(_attrs(corral__file__op=ev.data.get("op") if isinstance(ev.data.get("op"), str) else None,
                            corral__file__path=ev.data.get("path") if isinstance(ev.data.get("path"), str) else None))
        elif kind == EventKind.ACTION:
            rule = ev.data.get("rule")
            a.update(_attrs(corral__rule=rule if isinstance(rule, str) else None))
        return a

    # -- findings ----------------------------------------------------------------------------------
    def _finding(self, f: Finding, ev: Event) -> None:
        # called before the event's own subscribers: a refused command's finding (on its check) is
        # the first thing seen of its step, so it may open the step as the check would
        tr = self._trace_for(ev)
        if tr is None:
            return
        sid = f.sandbox_id
        m = tr.members.get(sid)
        step = f.step
        if (m is not None and step and step not in m.steps and step > m.max_step
                and ev.kind == EventKind.COMMAND and ev.action in _COMMAND_OPENS):
            self._open_step(tr, m, step, f.command, ev.ts, sid)
        target, late = self._target(tr, sid, step)
        tr.n_findings += 1
        if Severity(f.severity).rank >= _HIGH:
            why = _clip(f"finding {f.rule_id} ({f.severity}): {f.title}")
            tr.error = tr.error or why
            if not late:
                target.error = target.error or why
        if not self._room(target, finding=True):
            return
        dest = ev.name or ev.dst_ip
        if dest and ev.dst_port:
            dest = f"{dest}:{ev.dst_port}"
        attrs = _attrs(corral__finding__rule=f.rule_id, corral__finding__title=f.title,
                       corral__finding__severity=str(f.severity), corral__finding__technique=f.technique,
                       corral__finding__action=f.action, corral__finding__destination=dest,
                       corral__finding__id=f.id, corral__step=step if late else None)
        target.span.add_event(f"finding {_clip(f.rule_id, 128)}", attrs, timestamp=_ns(f.ts))

    # -- span events and ends ----------------------------------------------------------------------
    def _room(self, k: _Kept, *, finding: bool = False) -> bool:
        """Whether `k` may take one more span event (then counted as held), else its drop is counted:
        within its span's cap (findings have their own) and the budget of all open spans together, whose
        last tenth only findings may take: an agent's flood of execs must not keep findings out of traces."""
        full = self._held >= self.max_held_events - (0 if finding else self.max_held_events // 10)
        if finding:
            if full or k.findings >= self.max_findings_per_span:
                k.dropped_findings += 1
                return False
            k.findings += 1
        else:
            if full or k.events >= self.max_events_per_span:
                k.dropped_events += 1
                return False
            k.events += 1
        self._held += 1
        return True

    def _finish(self, k: _Kept, ts: float) -> None:
        """End one span: its dropped counts and status set, its events no longer counted as held."""
        span = k.span
        if k.dropped_events:
            span.set_attribute("corral.events_dropped", k.dropped_events)
        if k.dropped_findings:
            span.set_attribute("corral.findings_dropped", k.dropped_findings)
        if k.error is not None:
            span.set_status(Status(StatusCode.ERROR, k.error))
        self._held -= k.events + k.findings
        span.end(end_time=_ns(ts))

    def _end_step(self, m: _Member, n: int, st: _Kept, ts: float) -> None:
        m.steps.pop(n, None)
        self._finish(st, ts)

    def _leave(self, tr: _Trace, sid: str, ts: float, why: str) -> None:
        """A sandbox leaves its trace (closed, or on to another episode): its open steps end, and the
        trace with its last sandbox."""
        m = tr.members.pop(sid, None)
        if m is not None:
            self._end_steps(m, ts, why)
        if self._by_sandbox.get(sid) is tr:
            del self._by_sandbox[sid]
        if not tr.members:
            self._end(tr, ts, why)

    def _end_steps(self, m: _Member, ts: float, why: str) -> None:
        while m.steps:
            _n, st = m.steps.popitem(last=False)
            st.span.set_attribute("corral.step.unfinished", why)
            self._finish(st, ts)

    def _end(self, tr: _Trace, ts: float, why: str) -> None:
        if self._traces.get(tr.key) is not tr:
            return
        del self._traces[tr.key]
        for sid, m in tr.members.items():
            self._end_steps(m, ts, why)
            if self._by_sandbox.get(sid) is tr:
                del self._by_sandbox[sid]
        tr.members.clear()
        tr.span.set_attributes({"corral.outcome": tr.outcome or why, "corral.trace.ended_by": why,
                                "corral.steps": tr.n_steps, "corral.findings": tr.n_findings})
        self._finish(tr, ts)
        self._ended[tr.key] = None
        while len(self._ended) > 4 * self.max_traces:
            self._ended.popitem(last=False)


__all__ = ["OtelUnavailable", "Tracing", "otlp_provider", "require_sdk"]
