"""What an incident report holds: for a sandbox, an episode, or every violating episode of a run, a card
per rule that fired (what, where to, by which process lineage, what corral did, how the episode ended)
and one timeline of everything in time order. The renderings (render.py, html.py) only lay it out."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from corral.detect.novelty import NOVELTY_RULE
from corral.errors import CorralError
from corral.events import Event, EventKind, Finding, Severity
from corral.store import Store

SEVERITY_ORDER = [s.value for s in Severity]  # weakest first: the enum's own order
INTERNAL_STEP = 0  # corral's own helpers (file reads, the task's setup): sandbox/boundary.py
SCAN_AT = 5  # distinct destinations (or names) from one process in one step that read as a scan
LINEAGE_DEPTH = 12


class ReportNotFound(CorralError):
    """No sandbox, episode or run with that id is in the store."""


@dataclass
class StepReport:
    sandbox_id: str
    step: int | None
    command: str | None = None
    episode_id: str | None = None
    started: float | None = None
    exit_code: int | None = None
    duration: float | None = None
    refused: str | None = None
    grading: bool = False  # a step of the verifier's sandbox, not the agent's
    processes: list[Event] = field(default_factory=list)
    network: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    actions: list[Event] = field(default_factory=list)


@dataclass
class Card:
    """One rule's findings in one episode (or sandbox), summed up."""

    rule_id: str
    title: str
    severity: str
    technique: str | None
    count: int
    first_seen: float
    last_seen: float
    sandbox_id: str
    episode_id: str | None
    step: int | None
    command: str | None
    action: str
    desc: str | None = None
    destination: str | None = None  # ip:port
    name: str | None = None  # the name asked for (DNS, SNI, Host)
    protocol: str | None = None
    bytes_delivered: int | None = None  # what left the sandbox toward the destination
    lineage: list[str] = field(default_factory=list)  # "step 3", "nohup", "sysupdate", "python3"
    actions_taken: list[str] = field(default_factory=list)
    outcome: str | None = None  # "security_violation, reward -1"

    @property
    def attack_url(self) -> str | None:
        """The technique's page at MITRE ATT&CK (T1036.003 -> /techniques/T1036/003/)."""
        if not self.technique or not self.technique.startswith("T"):
            return None
        return "https://attack.mitre.org/techniques/" + self.technique.replace(".", "/") + "/"


@dataclass
class Line:
    """One timeline entry; `rel` is seconds since the section's first event."""

    ts: float
    rel: float
    sandbox_id: str
    step: int | None
    kind: str  # lifecycle, outcome, command, exec, net, dns, scan, file, finding, action, gpu
    text: str
    severity: str | None = None
    plumbing: bool = False  # corral's own work, or a lookup of a program that is not there
    grading: bool = False


@dataclass
class Section:
    """One episode (or the sandbox asked for)."""

    title: str
    episode_id: str | None
    run_id: str | None
    sandboxes: list[str]
    grading: list[str]  # sandboxes that ran the verifier for it
    start: float
    end: float
    outcome: dict[str, Any] | None
    cards: list[Card]
    timeline: list[Line]
    findings: list[Finding]
    novelties: list[Finding]
    steps: list[StepReport]
    lifecycle: list[Event]
    hidden: int = 0  # plumbing lines left out (shown with show_all)

    @property
    def outcome_text(self) -> str | None:
        if not self.outcome:
            return None
        reward = self.outcome.get("reward")
        return f"{self.outcome.get('reason')}, reward {reward:g}" if isinstance(reward, int | float) else str(
            self.outcome.get("reason"))


@dataclass
class Report:
    subject: str
    kind: str  # "sandbox" | "episode" | "run"
    sections: list[Section]
    generated: float = field(default_factory=time.time)
    show_all: bool = False
    run_id: str | None = None

    @property
    def steps(self) -> list[StepReport]:
        return [s for sec in self.sections for s in sec.steps]

    @property
    def findings(self) -> list[Finding]:
        return [f for sec in self.sections for f in sec.findings]

    @property
    def novelties(self) -> list[Finding]:
        return [f for sec in self.sections for f in sec.novelties]

    @property
    def lifecycle(self) -> list[Event]:
        return [e for sec in self.sections for e in sec.lifecycle]

    @property
    def worst(self) -> str | None:
        return Severity.strongest([str(f.severity) for f in self.findings])


# -- building ------------------------------------------------------------------------------------------
def build(store: Store, subject: str | None = None, *, run_id: str | None = None, show_all: bool = False) -> Report:
    """The report of a sandbox id or an episode id (a name without its run, `calc--0`, means the newest
    run's, or `run_id`'s); with no subject, every episode of `run_id` that has a finding (every
    episode with show_all)."""
    if subject is None:
        if run_id is None:
            raise ReportNotFound("name a sandbox, an episode or a run (--run)")
        return _run_report(store, run_id, show_all)
    events = store.events(sandbox_id=subject)
    if events:
        findings = store.findings(sandbox_id=subject)
        return Report(subject, "sandbox", [_section(subject, None, events, findings, show_all)], show_all=show_all,
                      run_id=next((e.run_id for e in events if e.run_id), None))
    episode = _resolve_episode(store, subject, run_id)
    if episode is None:
        raise ReportNotFound(f"no sandbox or episode named {subject!r} in {store.url}; list ids with "
                             "'corral findings' or 'corral events', runs with 'corral runs'")
    sec = _episode_section(store, episode, show_all)
    return Report(episode, "episode", [sec], show_all=show_all, run_id=sec.run_id)


def _resolve_episode(store: Store, subject: str, run_id: str | None) -> str | None:
    if "@" not in subject:
        named = store.episodes_named(subject)  # newest first
        if run_id is not None:
            named = [e for e in named if e.endswith("@" + run_id)]
        if named:
            return named[0]
    return subject if store.events(episode_id=subject, limit=1) else None


def _run_report(store: Store, run_id: str, show_all: bool) -> Report:
    if not any(r["id"] == run_id for r in store.runs()):
        raise ReportNotFound(f"no run {run_id!r} in {store.url}; list runs with 'corral runs'")
    flagged = {f.episode_id for f in store.findings(run_id=run_id) if f.episode_id}
    episodes = flagged
    if show_all:
        episodes = {e.episode_id for e in store.events(run_id=run_id) if e.episode_id}
    sections = [_episode_section(store, ep, show_all) for ep in episodes]
    sections.sort(key=lambda s: s.start)
    return Report(run_id, "run", sections, show_all=show_all, run_id=run_id)


def _episode_section(store: Store, episode: str, show_all: bool) -> Section:
    events = store.events(episode_id=episode)
    # an episode's sandbox events without episode id (lifecycle) belong in it too
    sids = {e.sandbox_id for e in events}
    extra = [e for sid in sids for e in store.events(sandbox_id=sid, kind=EventKind.SANDBOX)]
    events = sorted({e.id: e for e in [*events, *extra]}.values(), key=lambda e: e.id or 0)
    return _section(episode, episode, events, store.findings(episode_id=episode), show_all)


def _section(title: str, episode: str | None, events: list[Event], findings: list[Finding],
             show_all: bool) -> Section:
    grading = sorted({e.sandbox_id for e in events if e.kind == EventKind.SANDBOX and e.action == "grading"})
    outcome_ev = next((e for e in reversed(events) if e.kind == EventKind.SANDBOX and e.action == "episode_outcome"),
                      None)
    outcome = {"reason": outcome_ev.reason, **outcome_ev.data} if outcome_ev else None
    novelties = [f for f in findings if f.rule_id == NOVELTY_RULE]
    findings = [f for f in findings if f.rule_id != NOVELTY_RULE]
    steps, lifecycle = _steps(events, findings, set(grading))
    start = min((e.ts for e in events), default=time.time())
    end = max([e.ts for e in events] + [f.ts for f in findings] or [start])
    sec = Section(title=title, episode_id=episode, run_id=next((e.run_id for e in events if e.run_id), None),
                  sandboxes=sorted({e.sandbox_id for e in events} - set(grading)), grading=grading, start=start,
                  end=end, outcome=outcome, cards=[], timeline=[], findings=findings, novelties=novelties,
                  steps=steps, lifecycle=lifecycle)
    sec.cards = _cards(events, findings, sec.outcome_text)
    lines = _timeline(events, findings, start, set(grading))
    sec.hidden = sum(1 for x in lines if x.plumbing)
    sec.timeline = lines if show_all else [x for x in lines if not x.plumbing]
    return sec


def _steps(events: list[Event], findings: list[Finding], grading: set[str]) -> tuple[list[StepReport], list[Event]]:
    steps: dict[tuple[str, int | None], StepReport] = {}

    def step_of(sid: str, n: int | None, ep: str | None = None) -> StepReport:
        key = (sid, n or None)
        if key not in steps:
            steps[key] = StepReport(sid, n or None, episode_id=ep, grading=sid in grading)
        return steps[key]

    lifecycle = []
    for e in events:
        if e.kind == EventKind.SANDBOX:
            lifecycle.append(e)
            continue
        st = step_of(e.sandbox_id, e.step, e.episode_id)
        if e.command and not st.command:
            st.command = e.command
        if e.kind == EventKind.COMMAND:
            if e.action == "start":
                st.started = e.ts
            elif e.action == "exit":
                st.exit_code = e.data.get("exit_code")
                st.duration = e.data.get("duration")
            elif e.action == "refused":
                st.refused = e.reason
        elif e.kind == EventKind.PROCESS:
            st.processes.append(e)
        elif e.kind in (EventKind.CONNECT, EventKind.DNS):
            st.network.append(e)
        elif e.kind == EventKind.ACTION:
            st.actions.append(e)
    for f in findings:
        step_of(f.sandbox_id, f.step, f.episode_id).findings.append(f)
    return sorted(steps.values(), key=lambda s: (s.sandbox_id, s.step or 0)), lifecycle


# -- cards ---------------------------------------------------------------------------------------------
def _cards(events: list[Event], findings: list[Finding], outcome: str | None) -> list[Card]:
    by_id = {e.id: e for e in events if e.id is not None}
    execs: dict[tuple[str, int], list[Event]] = defaultdict(list)
    for e in events:
        if e.kind == EventKind.PROCESS and e.action == "exec" and e.pid:
            execs[(e.sandbox_id, e.pid)].append(e)
    groups: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        groups[f.rule_id].append(f)
    cards = []
    for rule, fs in groups.items():
        first = min(fs, key=lambda f: f.ts)
        worst = max(fs, key=lambda f: Severity(f.severity).rank)
        card = Card(rule_id=rule, title=worst.title, severity=str(worst.severity), technique=worst.technique,
                    count=len(fs), first_seen=first.ts, last_seen=max(f.ts for f in fs), sandbox_id=first.sandbox_id,
                    episode_id=first.episode_id, step=first.step, command=first.command, action=worst.action,
                    desc=worst.data.get("desc"), outcome=outcome)
        evidence = [by_id[i] for f in fs for i in f.evidence if i in by_id]
        net = next((e for e in evidence if e.dst_ip), None)
        if net is not None:
            card.destination, card.name, card.protocol = f"{net.dst_ip}:{net.dst_port}", net.name, net.protocol
            card.bytes_delivered = _delivered(net, events)
        elif worst.data.get("dst"):
            card.destination = worst.data["dst"]
        pid = first.pid or next((e.pid for e in evidence if e.pid), None)
        if pid:
            card.lineage = _lineage(first.sandbox_id, pid, first.step, first.ts, execs)
        ids = {f.id for f in fs}
        card.actions_taken = sorted({e.action for e in events if e.kind == EventKind.ACTION
                                     and (e.data.get("finding") in ids or e.data.get("rule") == rule)})
        cards.append(card)
    cards.sort(key=lambda c: (-Severity(c.severity).rank, c.first_seen))
    return cards


def _delivered(net: Event, events: list[Event]) -> int:
    """Bytes that left toward the destination over that connection: its close event's count (0 when the
    connection was denied, which is the point of a denial)."""
    if net.verdict == "deny":
        return 0
    closes = [e for e in events if e.kind == EventKind.CONNECT and e.action == "close" and e.dst_ip == net.dst_ip
              and e.dst_port == net.dst_port and e.sandbox_id == net.sandbox_id and (e.pid == net.pid or not net.pid)]
    if closes:
        return sum(e.bytes_up or 0 for e in closes)
    return net.bytes_up or 0


def _lineage(sid: str, pid: int, step: int | None, ts: float, execs: dict[tuple[str, int], list[Event]]) -> list[str]:
    """`step 3 -> nohup -> sysupdate -> python3`: the programs the finding's process ran, one exec after
    another (nohup execs the script, the script's shell execs python3), then its ancestors', up to the
    step's shell. What the kernel ran for a script (its interpreter) is not a program of its own."""
    chain: list[str] = []
    seen: set[int] = set()
    while pid and pid not in seen and len(chain) < LINEAGE_DEPTH:
        seen.add(pid)
        runs = [e for e in execs.get((sid, pid), []) if e.ts <= ts + 1.0 and not e.data.get("derived")]
        if not runs:
            break
        chain += [os.path.basename((e.argv or [e.exe or "?"])[0]) or (e.exe or "?") for e in reversed(runs)]
        pid = runs[0].ppid or 0
    # one program exec'd twice in a row (a re-judged exec, python3 starting python3) reads as one
    chain = [n for i, n in enumerate(chain) if i == 0 or n != chain[i - 1]][:LINEAGE_DEPTH]
    chain.reverse()
    return ([f"step {step}"] if step else []) + chain


# -- timeline ------------------------------------------------------------------------------------------
def _timeline(events: list[Event], findings: list[Finding], start: float, grading: set[str]) -> list[Line]:
    lines: list[Line] = []
    scans, folded = _scans(events)

    def add(e: Event | Finding, kind: str, text: str, severity: str | None = None, plumbing: bool = False) -> None:
        lines.append(Line(e.ts, e.ts - start, e.sandbox_id, e.step, kind, text, severity, plumbing,
                          e.sandbox_id in grading))

    for e in events:
        if e.id in folded:
            continue
        internal = e.step == INTERNAL_STEP or bool(e.data.get("internal"))
        if e.kind == EventKind.SANDBOX:
            kind = "outcome" if e.action == "episode_outcome" else "lifecycle"
            add(e, kind, lifecycle_line(e))
        elif e.kind == EventKind.COMMAND:
            text = command_line(e)
            if text:
                add(e, "command", text, "high" if e.action == "refused" else None, plumbing=internal)
        elif e.kind == EventKind.PROCESS:
            add(e, "exec", proc_line(e), "high" if e.verdict == "deny" else None,
                plumbing=internal or (bool(e.data.get("unopened")) and e.verdict != "deny"))
        elif e.kind == EventKind.CONNECT:
            add(e, "net", net_line(e), "medium" if e.verdict == "deny" else None, plumbing=internal)
        elif e.kind == EventKind.DNS:
            add(e, "dns", net_line(e), "medium" if e.verdict == "deny" else None, plumbing=internal)
        elif e.kind == EventKind.ACTION:
            add(e, "action", "action: " + action_line(e), "high")
        else:
            add(e, str(e.kind), f"{e.kind} {e.action} {e.name or ''} {e.reason or ''}".strip(), plumbing=internal)
    for s in scans:
        lines.append(Line(s.ts, s.ts - start, s.sandbox_id, s.step, "scan", s.text, "medium" if s.denied else None,
                          grading=s.sandbox_id in grading))
    for f in findings:
        lines.append(Line(f.ts, f.ts - start, f.sandbox_id, f.step, "finding", finding_line(f), str(f.severity),
                          grading=f.sandbox_id in grading))
    lines.sort(key=lambda x: x.ts)
    return lines


@dataclass
class _Scan:
    ts: float
    sandbox_id: str
    step: int | None
    text: str
    denied: int


def _scans(events: list[Event]) -> tuple[list[_Scan], set[int | None]]:
    """Many destinations (or names) from one process in one step become one line: a port scan reads as
    `scan: 254 connections by nc[812] to 10.20.0.1-10.20.0.254 ports 22, 80: 254 denied`."""
    groups: dict[tuple[str, int | None, int | None, str], list[Event]] = defaultdict(list)
    for e in events:
        if e.kind in (EventKind.CONNECT, EventKind.DNS):
            groups[(e.sandbox_id, e.step, e.pid, str(e.kind))].append(e)
    scans, folded = [], set()
    for (sid, step, pid, kind), evs in groups.items():
        if kind == EventKind.CONNECT:
            tries = [e for e in evs if e.action == "connect" and not e.data.get("connect_event")]
            targets = {(e.dst_ip, e.dst_port) for e in tries}
        else:
            tries = [e for e in evs if e.action == "query"]
            targets = {(e.name, None) for e in tries}
        if len(targets) < SCAN_AT:
            continue
        folded |= {e.id for e in evs}
        denied = sum(1 for e in tries if e.verdict == "deny")
        who = f"{os.path.basename(tries[0].exe or '?')}[{pid}]" if pid else "a process"
        if kind == EventKind.CONNECT:
            ips = sorted({str(ip) for ip, _ in targets}, key=_ip_key)
            ports = sorted({p for _, p in targets if p is not None})
            text = (f"scan: {len(tries)} connections by {who} to {len(ips)} address(es) {_span(ips)} port(s) "
                    f"{_ports(ports)}: {denied} denied, {len(tries) - denied} allowed")
        else:
            names = sorted({str(n) for n, _ in targets})
            text = (f"scan: {len(tries)} DNS lookups by {who} of {len(names)} names ({', '.join(names[:3])}"
                    f"{', …' if len(names) > 3 else ''}): {denied} denied")
        scans.append(_Scan(min(e.ts for e in tries), sid, step, text, denied))
    return scans, folded


def _ip_key(ip: str) -> tuple:
    parts = ip.split(".")
    return tuple(int(p) for p in parts) if len(parts) == 4 and all(p.isdigit() for p in parts) else (999, ip)


def _span(ips: list[str]) -> str:
    return ", ".join(ips) if len(ips) <= 3 else f"{ips[0]} … {ips[-1]}"


def _ports(ports: list[int]) -> str:
    shown = ", ".join(str(p) for p in ports[:8])
    return shown + (f" and {len(ports) - 8} more" if len(ports) > 8 else "")


# -- one-line texts (shared by every rendering) -------------------------------------------------------------
def lifecycle_line(e: Event) -> str:
    if e.action == "episode_outcome":
        reward = e.data.get("reward")
        return f"episode ended: {e.reason}" + (f", reward {reward:g}" if isinstance(reward, int | float) else "") + (
            f" ({e.data['termination_detail']})" if e.data.get("termination_detail") else "")
    if e.action == "grading":
        return f"grading: the verifier ({e.data.get('command', '')}) runs in sandbox {e.sandbox_id}"
    return f"sandbox {e.sandbox_id} {e.action}" + (f": {e.reason}" if e.reason else "")


def command_line(e: Event) -> str | None:
    if e.action == "start":
        return f"step {e.step} $ {e.command or ''}"
    if e.action == "exit":
        d = e.data
        extra = "timed out" if d.get("timed_out") else f"exit {d.get('exit_code')}"
        dur = d.get("duration")
        return f"step {e.step} {extra}" + (f" after {dur:.3f}s" if isinstance(dur, int | float) else "")
    if e.action == "refused":
        return f"step {e.step} refused before running: {e.reason or ''}"
    return None


def net_line(e: Event) -> str:
    if e.kind == EventKind.DNS:
        answers = ", ".join(e.data.get("answers") or []) or "-"
        return f"DNS {e.data.get('qtype', '?')} {e.name} -> {answers} [{e.verdict}]"
    who = f"{os.path.basename(e.exe or '?')}[{e.pid}]" if e.pid else "?"
    dest = f"{e.dst_ip}:{e.dst_port}" + (f" ({e.name})" if e.name else "")
    extra = f" up {e.bytes_up or 0}B down {e.bytes_down or 0}B" if e.action == "close" else ""
    return f"{e.action} {who} -> {dest} {e.protocol or ''} [{e.verdict}] {e.reason or ''}{extra}".strip()


def proc_line(e: Event) -> str:
    text = f"exec {e.exe} [{e.pid}] {' '.join(e.argv or [])}"
    if e.data.get("unopened"):
        text += " (no such program)"
    return text + (f" [{e.verdict}: {e.reason}]" if e.verdict == "deny" else "")


def finding_line(f: Finding) -> str:
    return f"{str(f.severity).upper()} {f.rule_id}: {f.title} ({f.technique or '-'}) -> {f.action}"


def action_line(e: Event) -> str:
    extra = f", killed {e.data['killed']}" if e.data.get("killed") is not None else ""
    return f"{e.action} (rule {e.data.get('rule')}{extra})"


def novelty_line(f: Finding) -> str:
    return f"step {f.step}: {f.data.get('output') or f.title}"


def clock(ts: float) -> str:
    """Absolute time, to the millisecond, in this machine's zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def rel(seconds: float) -> str:
    return f"+{seconds:.3f}s"
