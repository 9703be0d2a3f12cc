"""Incident reports: for a sandbox or an episode, the timeline command -> processes -> connections
and DNS -> findings -> actions, step by step. One model, four renderings (rich, JSON, Markdown,
self-contained HTML)."""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from corral.detect.novelty import NOVELTY_RULE
from corral.errors import CorralError
from corral.events import Event, EventKind, Finding, Severity
from corral.store import Store

SEVERITY_ORDER = [s.value for s in Severity]  # weakest first: the enum's own order


class ReportNotFound(CorralError):
    """No sandbox or episode with that id is in the store."""


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
    processes: list[Event] = field(default_factory=list)
    network: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    actions: list[Event] = field(default_factory=list)


@dataclass
class Report:
    subject: str
    kind: str  # "sandbox" | "episode"
    steps: list[StepReport]
    findings: list[Finding]
    lifecycle: list[Event]
    generated: float = field(default_factory=time.time)
    # novel-behaviour findings (detect/novelty.py): for review, listed apart from what the rules found
    novelties: list[Finding] = field(default_factory=list)

    @property
    def worst(self) -> str | None:
        sev = [str(f.severity) for f in self.findings]
        return Severity.strongest(sev)


def build(store: Store, subject: str) -> Report:
    events = store.events(sandbox_id=subject)
    findings = store.findings(sandbox_id=subject)
    kind = "sandbox"
    if not events:
        events = store.events(episode_id=subject)
        findings = store.findings(episode_id=subject)
        kind = "episode"
        if events:
            # an episode's sandbox events without episode id (lifecycle) belong in it too
            sids = {e.sandbox_id for e in events}
            extra = [e for sid in sids for e in store.events(sandbox_id=sid, kind=EventKind.SANDBOX)]
            events = sorted({e.id: e for e in [*events, *extra]}.values(), key=lambda e: e.id or 0)
    if not events:
        raise ReportNotFound(f"no sandbox or episode named {subject!r} in {store.url}; "
                             "list ids with 'corral events'")
    steps: dict[tuple[str, int | None], StepReport] = {}

    def step_of(sid: str, n: int | None, ep: str | None = None) -> StepReport:
        key = (sid, n or None)
        if key not in steps:
            steps[key] = StepReport(sid, n or None, episode_id=ep)
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
    novelties = [f for f in findings if f.rule_id == NOVELTY_RULE]
    findings = [f for f in findings if f.rule_id != NOVELTY_RULE]
    for f in findings:
        step_of(f.sandbox_id, f.step, f.episode_id).findings.append(f)
    ordered = sorted(steps.values(), key=lambda s: (s.sandbox_id, s.step or 0))
    return Report(subject, kind, ordered, findings, lifecycle, novelties=novelties)


def _novelty_line(f: Finding) -> str:
    return f"step {f.step}: {f.data.get('output') or f.title}"


# -- renderings ---------------------------------------------------------------------------------------
def _net_line(e: Event) -> str:
    if e.kind == EventKind.DNS:
        answers = ", ".join(e.data.get("answers") or []) or "-"
        return f"DNS {e.data.get('qtype', '?')} {e.name} -> {answers} [{e.verdict}]"
    who = f"{e.exe or '?'}[{e.pid}]" if e.pid else "?"
    dest = f"{e.dst_ip}:{e.dst_port}" + (f" ({e.name})" if e.name else "")
    extra = f" up {e.bytes_up}B down {e.bytes_down}B" if e.action == "close" else ""
    return f"{e.action} {who} -> {dest} {e.protocol or ''} [{e.verdict}] {e.reason or ''}{extra}".strip()


def _proc_line(e: Event) -> str:
    argv = " ".join(e.argv or [])[:200]
    return f"exec {e.exe} [{e.pid}] {argv}" + (f" [{e.verdict}: {e.reason}]" if e.verdict == "deny" else "")


def _finding_line(f: Finding) -> str:
    return f"{f.severity.upper()} {f.rule_id}: {f.title} ({f.technique or '-'}) -> {f.action}"


def _action_line(e: Event) -> str:
    extra = f", killed {e.data['killed']}" if e.data.get("killed") is not None else ""
    return f"{e.action} (rule {e.data.get('rule')}{extra})"


def to_dict(r: Report) -> dict[str, Any]:
    return {
        "subject": r.subject, "kind": r.kind, "generated": r.generated, "worst_severity": r.worst,
        "findings": [f.model_dump(mode="json") for f in r.findings],
        "novelties": [f.model_dump(mode="json") for f in r.novelties],
        "lifecycle": [e.model_dump(mode="json") for e in r.lifecycle],
        "steps": [
            {"sandbox_id": s.sandbox_id, "step": s.step, "episode_id": s.episode_id, "command": s.command,
             "exit_code": s.exit_code, "duration": s.duration, "refused": s.refused,
             "processes": [e.model_dump(mode="json") for e in s.processes],
             "network": [e.model_dump(mode="json") for e in s.network],
             "findings": [f.model_dump(mode="json") for f in s.findings],
             "actions": [e.model_dump(mode="json") for e in s.actions]}
            for s in r.steps
        ],
    }


def to_json(r: Report) -> str:
    return json.dumps(to_dict(r), indent=2)


def _step_title(s: StepReport) -> str:
    label = f"step {s.step}" if s.step else "not attributed to a step"
    status = f"refused: {s.refused}" if s.refused else (f"exit {s.exit_code}" if s.exit_code is not None else "")
    return f"{s.sandbox_id} {label}: {s.command or ''}" + (f"  [{status}]" if status else "")


def to_markdown(r: Report) -> str:
    out = [f"# corral incident report: {r.kind} `{r.subject}`", ""]
    out.append(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.generated))}. "
               f"{len(r.findings)} finding(s); worst severity: {r.worst or 'none'}.")
    out.append("")
    if r.findings:
        out += ["## Findings", "", "| severity | rule | technique | step | command | action |",
                "|---|---|---|---|---|---|"]
        for f in r.findings:
            cmd = (f.command or "").replace("|", "\\|")[:120]
            out.append(f"| {f.severity} | {f.rule_id} | {f.technique or ''} | {f.step} | `{cmd}` | {f.action} |")
        out.append("")
    if r.novelties:
        out += ["## Novel behaviour (for review)", "", *(f"- {_novelty_line(f)}" for f in r.novelties), ""]
    out += ["## Timeline", ""]
    for s in r.steps:
        out.append(f"### {_step_title(s)}")
        for e in s.processes:
            out.append(f"- {_proc_line(e)}")
        for e in s.network:
            out.append(f"- {_net_line(e)}")
        for f in s.findings:
            out.append(f"- **{_finding_line(f)}**")
        for e in s.actions:
            out.append(f"- action: {_action_line(e)}")
        out.append("")
    return "\n".join(out)


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.critical{color:#fff;background:#b00020}.high{background:#f4b183}.medium{background:#ffe699}
.low,.info{background:#ddebf7}.step{margin:1em 0;padding:.5em 1em;border-left:4px solid #888}
.flag{border-left-color:#b00020}code{background:#f3f3f3;padding:0 3px}li{margin:2px 0}"""


def to_html(r: Report) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td class='{e(str(f.severity))}'>{e(str(f.severity))}</td><td>{e(f.rule_id)}</td>"
        f"<td>{e(f.technique or '')}</td><td>{f.step}</td><td><code>{e((f.command or '')[:200])}</code></td>"
        f"<td>{e(f.action)}</td></tr>" for f in r.findings)
    steps = []
    for s in r.steps:
        items = [f"<li>{e(_proc_line(x))}</li>" for x in s.processes]
        items += [f"<li>{e(_net_line(x))}</li>" for x in s.network]
        items += [f"<li><b class='{e(str(f.severity))}'>{e(_finding_line(f))}</b></li>" for f in s.findings]
        items += [f"<li>action: {e(_action_line(x))}</li>" for x in s.actions]
        cls = "step flag" if s.findings else "step"
        steps.append(f"<div class='{cls}'><b>{e(_step_title(s))}</b><ul>{''.join(items)}</ul></div>")
    novel = ("<h2>Novel behaviour (for review)</h2><ul>" + "".join(f"<li>{e(_novelty_line(f))}</li>"
                                                                     for f in r.novelties) + "</ul>"
             if r.novelties else "")
    table = (f"<table><tr><th>severity</th><th>rule</th><th>technique</th><th>step</th><th>command</th>"
             f"<th>action</th></tr>{rows}</table>") if rows else "<p>No findings.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>corral report {e(r.subject)}</title>"
            f"<style>{_CSS}</style></head><body><h1>corral incident report: {e(r.kind)} {e(r.subject)}</h1>"
            f"<p>{len(r.findings)} finding(s); worst severity: {e(r.worst or 'none')}.</p><h2>Findings</h2>"
            f"{table}{novel}<h2>Timeline</h2>{''.join(steps)}</body></html>")


def render(r: Report, console: Console) -> None:
    console.print(f"[bold]corral incident report[/] {r.kind} [cyan]{r.subject}[/]: "
                  f"{len(r.findings)} finding(s), worst severity {r.worst or 'none'}")
    if r.findings:
        t = Table("severity", "rule", "technique", "step", "command", "action", title="Findings")
        for f in r.findings:
            t.add_row(str(f.severity), f.rule_id, f.technique or "", str(f.step), escape((f.command or "")[:80]),
                      f.action)
        console.print(t)
    if r.novelties:
        console.print("[bold]Novel behaviour (for review)[/]")
        for f in r.novelties:
            console.print(f"  {escape(_novelty_line(f))}")
    tree = Tree("timeline")
    for s in r.steps:
        node = tree.add(("[red]" if s.findings else "") + escape(_step_title(s)))
        for x in s.processes:
            node.add(escape(_proc_line(x)))
        for x in s.network:
            node.add(escape(_net_line(x)))
        for f in s.findings:
            node.add(f"[bold red]{escape(_finding_line(f))}[/]")
        for x in s.actions:
            node.add(f"[magenta]action: {escape(_action_line(x))}[/]")
    console.print(tree)
