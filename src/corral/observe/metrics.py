"""Prometheus metrics for a corral Runtime: findings, egress decisions, commands, execs, sandboxes,
time to detect and command latency, counted from the runtime's event and finding hooks.

The callbacks run on the event loop every tenant shares, in the middle of `Runtime.emit`, so they do
nothing but increment: no I/O, no locks held for long, no lookups that grow. Scraping reads the
registry from another thread (prometheus_client's metrics are thread-safe).

Labels are a bounded vocabulary chosen by corral: rule ids (the operator's rule files), severities,
actions, verdicts, event kinds. Nothing an agent chooses (sandbox ids, commands, destinations, names,
episode or run ids) is ever a label: each distinct value would be a new series, and an agent that
can mint series can exhaust the monitoring system watching it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder, start_http_server

from corral.events import Action, Event, EventKind, Finding, Verdict
from corral.observe.follow import Follower

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from corral.runtime import Runtime

OTHER = "other"  # the label value for anything outside the bounded vocabulary
MAX_RULES = 256  # distinct rule labels; past it (a misconfigured rule set) findings count as "other"
_ACTIONS = frozenset(a.value for a in Action)
_DNS_ACTIONS = frozenset({"query", "malformed"})  # one packet each ("rate_limited" summarises a second)
# detection is synchronous for most rules (well under a millisecond); a background process or a sampled
# signal (CPU, GPU) is found seconds later
DETECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
COMMAND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# the series each metric type exposes, for `exported()` (a dashboard or alert names these)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "gauge": ("",), "info": ("_info",)}


def _verdict(ev: Event) -> str:
    # an exec that was let through carries no verdict: only a refusal sets one
    return Verdict.DENY.value if ev.verdict == Verdict.DENY else Verdict.ALLOW.value


class Metrics(Follower):
    """A Prometheus registry of its own (never the process-global one: two runtimes, or a test and an
    app, never share counters) fed by one runtime's hooks.

        m = Metrics(runtime)          # or Metrics() then m.attach(runtime)
        m.serve(9464)                 # optional: a plain /metrics on 127.0.0.1:9464, no token
        body, ctype = m.render()      # or expose m.registry yourself (corral serve: GET /metrics)
    """

    def __init__(self, runtime: Runtime | None = None, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels: dict[str, frozenset[str]] = {}
        self._runtime: Runtime | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._rules: set[str] = set()
        self.findings = self._counter("corral_findings", "Findings, by rule, severity and the action taken",
                                      ("rule", "severity", "action"))
        self.connections = self._counter(
            "corral_connections", "Outbound connections decided by the gateway (once per connection, at its "
            "first decision), and datagrams refused, by verdict", ("verdict",))
        self.connection_units_denied = self._counter(
            "corral_connection_units_denied", "Later units of an allowed connection refused (a tunnel or a "
            "second request to a host no rule allows)")
        self.dns_queries = self._counter("corral_dns_queries", "DNS queries answered by corral's resolver, by "
                                         "verdict", ("verdict",))
        self.commands = self._counter("corral_commands", "Commands started in sandboxes (steps)")
        self.commands_refused = self._counter("corral_commands_refused", "Commands refused before anything ran")
        self.execs = self._counter("corral_execs", "Process execs judged, by verdict (deny: refused)", ("verdict",))
        self.sandboxes_started = self._counter("corral_sandboxes_started", "Sandboxes handed out (created or "
                                               "taken from the warm pool)")
        self.degraded = self._counter("corral_degraded", "Degraded events: actions refused because they could not "
                                      "be judged or recorded, and component failures (fail closed)")
        self.events = self._counter("corral_events", "Events judged, by kind", ("kind",))
        self.sandboxes_active = Gauge("corral_sandboxes_active", "Sandboxes open now (the warm pool excluded)",
                                      registry=self.registry)
        self.sandboxes_active.set_function(self._active)
        self._labels["corral_sandboxes_active"] = frozenset()
        self.time_to_detect = Histogram(
            "corral_time_to_detect_seconds", "From an event to the finding it raised (finding.ts - event.ts)",
            buckets=DETECT_BUCKETS, registry=self.registry)
        self._labels["corral_time_to_detect_seconds"] = frozenset()
        self.command_duration = Histogram("corral_command_duration_seconds", "How long commands ran",
                                          buckets=COMMAND_BUCKETS, registry=self.registry)
        self._labels["corral_command_duration_seconds"] = frozenset()
        from corral import __version__  # here: corral/__init__ imports the runtime, which may import us

        Info("corral_build", "corral's version", registry=self.registry).info({"version": __version__})
        self._labels["corral_build"] = frozenset({"version"})
        # every bounded value is a series from the start (rate() over a series born mid-window misses its
        # first increments, and a dashboard shows 0 rather than "no data"); the hot path looks them up here
        self._conn = {v.value: self.connections.labels(verdict=v.value) for v in Verdict}
        self._dns = {v.value: self.dns_queries.labels(verdict=v.value) for v in Verdict}
        self._exec = {v.value: self.execs.labels(verdict=v.value) for v in Verdict}
        self._kind = {k: self.events.labels(kind=k.value) for k in EventKind}
        if runtime is not None:
            self.attach(runtime)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        self._labels[name] = frozenset(labels)
        return Counter(name, doc, labels, registry=self.registry)

    def _active(self) -> float:
        # read at scrape time, from the scraping thread: a length is one atomic read of the dict
        rt = self._runtime
        return float(len(rt.sandboxes)) if rt is not None else 0.0

    # -- the hooks (on the event loop: increments only) ----------------------------------------------
    def observe_event(self, ev: Event) -> None:
        """Count one event (the runtime's subscriber; also usable to replay stored events)."""
        kind, action = ev.kind, ev.action
        child = self._kind.get(kind)
        if child is not None:
            child.inc()
        if kind == EventKind.CONNECT:
            if action != "connect":  # close, connect_failed, local, udp-connect: not a decision to count
                return
            if "connect_event" in ev.data:  # a later unit of a connection already counted
                if ev.verdict == Verdict.DENY:
                    self.connection_units_denied.inc()
                return
            # the gateway records connections refused over a sandbox's cap once per interval, with a count
            refused = ev.data.get("refused")
            n = refused if type(refused) is int and refused > 0 else 1
            self._conn[_verdict(ev)].inc(n)
        elif kind == EventKind.DNS:
            if action in _DNS_ACTIONS:
                self._dns[_verdict(ev)].inc()
        elif kind == EventKind.PROCESS:
            if action == "exec":
                self._exec[_verdict(ev)].inc()
        elif kind == EventKind.COMMAND:
            if action == "start":
                self.commands.inc()
            elif action == "refused":
                self.commands_refused.inc()
            elif action == "exit":
                duration = ev.data.get("duration")
                if isinstance(duration, int | float) and duration >= 0:  # an interrupted command has none
                    self.command_duration.observe(duration)
        elif kind == EventKind.SANDBOX:
            if action == "created":
                self.sandboxes_started.inc()
            elif action == "degraded":
                self.degraded.inc()

    def observe_finding(self, f: Finding, ev: Event) -> None:
        """Count one finding and how long after its event it came (the runtime's finding subscriber)."""
        rule = f.rule_id
        if rule not in self._rules:
            if len(self._rules) >= MAX_RULES:
                rule = OTHER
            else:
                self._rules.add(rule)
        action = f.action if f.action in _ACTIONS else OTHER
        self.findings.labels(rule=rule, severity=str(f.severity), action=action).inc()
        self.time_to_detect.observe(max(0.0, f.ts - ev.ts))  # clocks are the host's; never negative

    # -- exposing ----------------------------------------------------------------------------------
    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for a scrape's Accept header: (body, content type); Prometheus's text format
        unless the scraper asks for OpenMetrics."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def serve(self, port: int, addr: str = "127.0.0.1") -> WSGIServer:
        """A plain HTTP /metrics for library users, on a daemon thread; `.shutdown()` stops it. It has no
        token: bind it to loopback or to a network only Prometheus reaches (corral serve's /metrics
        needs the API token)."""
        server, _thread = start_http_server(port, addr, registry=self.registry)
        return server

    def exported(self) -> dict[str, frozenset[str]]:
        """Every series name these metrics can expose, with its label names (`le` on buckets): what a
        dashboard or an alert rule may refer to."""
        out: dict[str, frozenset[str]] = {}
        for fam in self.registry.collect():
            labels = self._labels.get(fam.name, frozenset())
            for suffix in _SUFFIXES.get(fam.type, ("",)):
                out[fam.name + suffix] = (labels | {"le"}) if suffix == "_bucket" else labels
        return out
