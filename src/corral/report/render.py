"""The report as a terminal page (rich), as Markdown and as JSON. Nothing is cut: long commands and
lines wrap (a terminal table folds them), and the destination is always printed whole."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from corral.report.model import Card, Report, Section, clock, novelty_line, rel

SEVERITY_STYLE = {"critical": "bold white on red", "high": "bold red", "medium": "yellow", "low": "cyan",
                  "info": "dim"}


def card_facts(c: Card) -> list[tuple[str, str]]:
    """The card's rows, in the order every rendering shows them."""
    rows = [("what", f"{c.title} ({c.rule_id})")]
    if c.technique:
        rows.append(("technique", c.technique + (f" {c.attack_url}" if c.attack_url else "")))
    if c.destination or c.name:
        dest = " ".join(x for x in (c.destination, f"({c.name})" if c.name else None, c.protocol) if x)
        if c.bytes_delivered is not None:
            dest += f"; {c.bytes_delivered} bytes delivered"
        rows.append(("destination", dest))
    if c.lineage:
        rows.append(("lineage", " → ".join(c.lineage)))
    where = f"sandbox {c.sandbox_id}" + (f", episode {c.episode_id}" if c.episode_id else "") + (
        f", step {c.step}" if c.step else "")
    rows.append(("where", where))
    if c.command:
        rows.append(("command", c.command))
    taken = ", ".join(c.actions_taken) or "none"
    rows.append(("action", f"{c.action} (taken: {taken})"))
    if c.outcome:
        rows.append(("episode", c.outcome))
    seen = clock(c.first_seen) + (f" … {clock(c.last_seen)}" if c.last_seen != c.first_seen else "")
    rows.append(("seen", f"{seen}, {c.count} time(s)"))
    return rows


def section_heading(sec: Section) -> str:
    parts = [f"episode {sec.episode_id}" if sec.episode_id else f"sandbox {sec.title}"]
    if sec.run_id:
        parts.append(f"run {sec.run_id}")
    parts.append(f"{clock(sec.start)} … {clock(sec.end)}")
    if sec.outcome_text:
        parts.append(f"ended: {sec.outcome_text}")
    return " · ".join(parts)


def render(r: Report, console: Console) -> None:
    console.print(f"[bold]corral incident report[/] {r.kind} [cyan]{escape(r.subject)}[/]: {len(r.findings)} "
                  f"finding(s), worst severity {r.worst or 'none'}")
    for sec in r.sections:
        console.rule()
        console.print(f"[bold]{escape(section_heading(sec))}[/]", soft_wrap=True)
        for c in sec.cards:
            t = Table.grid(padding=(0, 1))
            t.add_column(style="dim", no_wrap=True)
            t.add_column(overflow="fold")
            for k, v in card_facts(c):
                t.add_row(k, escape(v))
            style = SEVERITY_STYLE.get(c.severity, "")
            console.print(Panel(t, title=f"[{style}]{c.severity.upper()}[/] {escape(c.rule_id)}", title_align="left",
                                border_style=style.replace("bold ", "").split(" on ")[-1] or "white"))
        if sec.novelties:
            console.print("[bold]Novel behaviour (for review)[/]")
            for f in sec.novelties:
                console.print(f"  {escape(novelty_line(f))}", soft_wrap=True)
        t = Table("time", "+s", "sandbox", "step", "what", title="Timeline", show_lines=False)
        t.columns[4].overflow = "fold"
        for x in sec.timeline:
            style = SEVERITY_STYLE.get(x.severity or "", "")
            what = escape(x.text) + (" [dim](grading)[/]" if x.grading else "")
            t.add_row(clock(x.ts)[11:], rel(x.rel), escape(x.sandbox_id), str(x.step or ""),
                      f"[{style}]{what}[/]" if style else what)
        console.print(t)
        if sec.hidden and not r.show_all:
            console.print(f"[dim]{sec.hidden} line(s) of corral's own work hidden (--all shows them)[/]")


def to_markdown(r: Report) -> str:
    out = [f"# corral incident report: {r.kind} `{r.subject}`", "",
           f"Generated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r.generated))}. "
           f"{len(r.findings)} finding(s); worst severity: {r.worst or 'none'}.", ""]
    for sec in r.sections:
        out += [f"## {section_heading(sec)}", ""]
        if sec.findings:
            out += ["| severity | rule | technique | step | command | action |", "|---|---|---|---|---|---|"]
            for c in sec.cards:
                cmd = (c.command or "").replace("|", "\\|").replace("\n", " ")
                out.append(f"| {c.severity} | {c.rule_id} | {c.technique or ''} | {c.step} | `{cmd}` | {c.action} |")
            out.append("")
        for c in sec.cards:
            out += [f"### {c.severity.upper()} {c.rule_id}", ""]
            out += [f"- **{k}**: {v}" for k, v in card_facts(c)]
            out.append("")
        if sec.novelties:
            out += ["### Novel behaviour (for review)", "", *(f"- {novelty_line(f)}" for f in sec.novelties), ""]
        out += ["### Timeline", "", "| time | +s | sandbox | step | what |", "|---|---|---|---|---|"]
        for x in sec.timeline:
            what = x.text.replace("|", "\\|").replace("\n", " ") + (" (grading)" if x.grading else "")
            if x.severity in ("high", "critical"):
                what = f"**{what}**"
            out.append(f"| {clock(x.ts)[11:]} | {rel(x.rel)} | {x.sandbox_id} | {x.step or ''} | {what} |")
        if sec.hidden and not r.show_all:
            out.append(f"\n{sec.hidden} line(s) of corral's own work hidden (`--all` shows them).")
        out.append("")
    return "\n".join(out)


def to_dict(r: Report) -> dict[str, Any]:
    def dump(xs: list) -> list:
        return [x.model_dump(mode="json") for x in xs]

    return {
        "subject": r.subject, "kind": r.kind, "run_id": r.run_id, "generated": r.generated, "worst_severity": r.worst,
        "findings": dump(r.findings), "novelties": dump(r.novelties), "lifecycle": dump(r.lifecycle),
        "sections": [
            {"title": s.title, "episode_id": s.episode_id, "run_id": s.run_id, "sandboxes": s.sandboxes,
             "grading": s.grading, "start": s.start, "end": s.end, "outcome": s.outcome, "hidden": s.hidden,
             "cards": [{**c.__dict__, "attack_url": c.attack_url} for c in s.cards],
             "timeline": [x.__dict__ for x in s.timeline]}
            for s in r.sections],
        "steps": [
            {"sandbox_id": s.sandbox_id, "step": s.step, "episode_id": s.episode_id, "command": s.command,
             "exit_code": s.exit_code, "duration": s.duration, "refused": s.refused, "grading": s.grading,
             "processes": dump(s.processes), "network": dump(s.network), "findings": dump(s.findings),
             "actions": dump(s.actions)}
            for s in r.steps
        ],
    }


def to_json(r: Report) -> str:
    return json.dumps(to_dict(r), indent=2)


__all__ = ["SEVERITY_STYLE", "card_facts", "render", "section_heading", "to_dict", "to_json", "to_markdown"]
