"""The report as one self-contained HTML page: inline CSS, no script, no external resource (it opens
offline, from a mail attachment or a CI artefact). Every value from a sandbox is escaped: a command
line is the agent's text, and an agent can write HTML."""

from __future__ import annotations

import html

from corral.report.model import Report, Section, clock, novelty_line, rel
from corral.report.render import card_facts, section_heading

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}h1{font-size:1.4em}
h2{font-size:1.15em;margin-top:2em;border-bottom:2px solid #ddd}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.t{white-space:nowrap;font-variant-numeric:tabular-nums;color:#555}
.what{overflow-wrap:anywhere;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
.sev{display:inline-block;padding:0 6px;border-radius:3px;font-weight:600}
.sev.critical{color:#fff;background:#b00020}.sev.high{background:#f4b183}.sev.medium{background:#ffe699}
.sev.low,.sev.info{background:#ddebf7}
.card{border:1px solid #ccc;border-left:6px solid #888;margin:1em 0;padding:.6em 1em}
.card.critical,.card.high{border-left-color:#b00020;background:#fff}.card.medium{border-left-color:#d4a000;background:#fff}
.card dl{display:grid;grid-template-columns:8em 1fr;margin:.4em 0;gap:2px 10px}.card dt{color:#666}
.card dd{margin:0;overflow-wrap:anywhere}tr.finding td{background:#fdecea}tr.grading td{color:#555;font-style:italic}
tr.plumbing td{color:#888}.note{color:#666}code{background:#f3f3f3;padding:0 3px;overflow-wrap:anywhere}"""


def to_html(r: Report) -> str:
    e = html.escape
    body = [f"<h1>corral incident report: {e(r.kind)} {e(r.subject)}</h1>",
            f"<p>{len(r.findings)} finding(s) in {len(r.sections)} {'episode' if r.kind != 'sandbox' else 'sandbox'}"
            f"(s); worst severity: {_sev(r.worst) if r.worst else 'none'}. Times are this machine's local clock; "
            f"+s counts from each section's first event.</p>"]
    if not r.sections:
        body.append("<p>No episode of this run has a finding.</p>")
    for sec in r.sections:
        body.append(_section(sec, r.show_all))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>corral report {e(r.subject)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def _sev(sev: str | None) -> str:
    s = html.escape(sev or "")
    return f"<span class='sev {s}'>{s}</span>"


def _section(sec: Section, show_all: bool) -> str:
    e = html.escape
    out = [f"<h2>{e(section_heading(sec))}</h2>"]
    if sec.grading:
        out.append(f"<p class='note'>Grading ran in {e(', '.join(sec.grading))}: its lines are marked "
                   "<i>grading</i>.</p>")
    if not sec.cards:
        out.append("<p>No findings.</p>")
    for c in sec.cards:
        facts = []
        for k, v in card_facts(c):
            if k == "technique" and c.attack_url:
                v = (f"<a href='{e(c.attack_url)}'>{e(c.technique or '')}</a>")
            elif k == "command":
                v = f"<code>{e(v)}</code>"
            else:
                v = e(v)
            facts.append(f"<dt>{e(k)}</dt><dd>{v}</dd>")
        out.append(f"<div class='card {e(c.severity)}'><b>{_sev(c.severity)} {e(c.rule_id)}</b>"
                   f"<dl>{''.join(facts)}</dl></div>")
    if sec.novelties:
        out.append("<h3>Novel behaviour (for review)</h3><ul>" + "".join(
            f"<li>{e(novelty_line(f))}</li>" for f in sec.novelties) + "</ul>")
    rows = []
    for x in sec.timeline:
        cls = "finding" if x.kind == "finding" else "grading" if x.grading else "plumbing" if x.plumbing else ""
        what = e(x.text) + (" <i>(grading)</i>" if x.grading else "")
        if x.severity and x.kind in ("finding", "action", "command", "exec", "scan", "net", "dns"):
            what = f"{_sev(x.severity)} {what}"
        rows.append(f"<tr class='{cls}'><td class='t'>{e(clock(x.ts))}</td><td class='t'>{e(rel(x.rel))}</td>"
                    f"<td>{e(x.sandbox_id)}</td><td>{x.step or ''}</td><td class='what'>{what}</td></tr>")
    out.append("<h3>Timeline</h3><table><tr><th>time</th><th>+s</th><th>sandbox</th><th>step</th><th>what</th></tr>"
               + "".join(rows) + "</table>")
    if sec.hidden and not show_all:
        out.append(f"<p class='note'>{sec.hidden} line(s) of corral's own work hidden (<code>corral report --all"
                   "</code> shows them).</p>")
    return "".join(out)
