"""The bodies alert sinks send: corral's own JSON (webhook), a Slack incoming-webhook message, and a
Falco alert as falcosidekick takes it on its `/` endpoint. Pure functions of (finding, event)."""

from __future__ import annotations

import socket
from typing import Any

import corral
from corral.events import Event, Finding, Severity
from corral.observe.common import exe_name, facts, rfc3339_nanos, tactic_of, technique_name
from corral.text import clip

# corral severity -> Falco priority. Falco's scale (Emergency, Alert, Critical, Error, Warning, Notice,
# Informational, Debug) comes from syslog; its own rules use Critical to Notice, and Emergency/Alert
# mean the whole system is unusable, which one sandbox's finding never says. So corral's top severity
# is Falco's Critical, and each step down is one step down Falco's scale.
FALCO_PRIORITY: dict[Severity, str] = {
    Severity.CRITICAL: "Critical",
    Severity.HIGH: "Error",
    Severity.MEDIUM: "Warning",
    Severity.LOW: "Notice",
    Severity.INFO: "Informational",
}

_EVENT_FIELDS = ("id", "ts", "kind", "action", "command", "pid", "ppid", "exe", "argv", "dst_ip", "dst_port",
                 "name", "protocol", "verdict", "reason")


def webhook(finding: Finding, event: Event | None) -> dict[str, Any]:
    """corral's finding as JSON, with the event it rests on (its process, destination and command)."""
    ev = event.model_dump(mode="json", include=set(_EVENT_FIELDS)) if event is not None else None
    return {"source": "corral", "version": corral.__version__, "finding": finding.model_dump(mode="json"),
            "event": ev}


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn treats &, < and > as control characters: an agent's command could otherwise
    # inject links or mentions into the operators' channel
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(finding: Finding, event: Event | None) -> dict[str, Any]:
    """A Slack incoming-webhook message: `text` for notifications, Block Kit `blocks` for the channel
    (header <= 150 characters, section texts <= 3000, at most 10 fields, as Slack requires)."""
    f = facts(finding, event)
    sev = str(finding.severity).upper()
    technique = finding.technique or "-"
    if name := technique_name(finding.technique):
        technique = f"{technique} {name}"
    dest = None
    if f.dst_ip or f.dst_name:
        dest = (f.dst_name + " " if f.dst_name else "") + (f"{f.dst_ip}:{f.dst_port}" if f.dst_ip else "")
        dest += f" ({f.protocol})" if f.protocol else ""
    command = finding.command or f.cmd_line or ""
    fields = [("Rule", finding.rule_id), ("Technique", technique), ("Sandbox", finding.sandbox_id),
              ("Episode", finding.episode_id or "-"), ("Step", str(finding.step) if finding.step is not None else "-"),
              ("Action", finding.action)]
    if dest:
        fields.append(("Destination", dest))
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": clip(f"[{sev}] {finding.title}", 150)}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": clip(f"*{k}*\n{_slack_escape(v)}", 2000)}
                                       for k, v in fields]},
    ]
    if command:
        # ``` inside the command would end the code block early
        shown = _slack_escape(clip(command, 2800)).replace("```", "'''")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Command*\n```{shown}```"}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _slack_escape(
        f"corral {rfc3339_nanos(finding.ts)[:23]}Z" + (f" finding {finding.id}" if finding.id else ""))}]})
    text = f"[{sev}] {finding.title} ({finding.rule_id}) in sandbox {finding.sandbox_id}"
    if finding.step is not None:
        text += f" step {finding.step}"
    if command:
        text += f": {clip(command, 200)}"
    return {"text": _slack_escape(clip(text, 3000)), "blocks": blocks}


def falco(finding: Finding, event: Event | None, uuid: str, hostname: str | None = None) -> dict[str, Any]:
    """Falco's JSON alert (uuid, output, priority, rule, time, output_fields, source, tags, hostname).
    Falco's own field names where the meaning is the same (proc.*, fd.*), corral.* for the rest."""
    f = facts(finding, event)
    priority = FALCO_PRIORITY.get(Severity(finding.severity), "Warning")
    when = rfc3339_nanos(event.ts if event is not None else finding.ts)
    fields: dict[str, Any] = {
        "evt.time": when, "corral.rule": finding.rule_id, "corral.severity": str(finding.severity),
        "corral.sandbox": finding.sandbox_id, "corral.episode": finding.episode_id, "corral.step": finding.step,
        "corral.command": finding.command, "corral.action": finding.action, "corral.technique": finding.technique,
        "corral.finding_id": finding.id, "proc.pid": f.pid, "proc.exepath": f.exe, "proc.name": exe_name(f.exe),
        "proc.cmdline": f.cmd_line, "fd.sip": f.dst_ip, "fd.sport": f.dst_port, "fd.sip.name": f.dst_name,
        "corral.protocol": f.protocol,
    }
    fields = {k: v for k, v in fields.items() if v is not None}  # falcosidekick renders nulls as "<nil>"
    detail = " ".join(f"{k}={fields[k]}" for k in ("corral.sandbox", "corral.episode", "corral.step",
                                                    "proc.cmdline", "fd.sip", "fd.sport", "fd.sip.name")
                      if k in fields)
    message = (finding.data or {}).get("output") or finding.title
    tags = ["corral"]
    if finding.technique:
        tags.append(finding.technique)
        if tactic := tactic_of(finding.technique):
            tags.append("mitre_" + tactic[1].lower().replace(" ", "_"))  # Falco's own tag style
    if family := (finding.data or {}).get("family"):
        tags.append(str(family))
    return {
        "uuid": uuid,
        "output": f"{when[11:-1]}: {priority} {message} ({detail})",  # as Falco writes %evt.time
        "priority": priority,
        "rule": finding.rule_id,  # Falco's rule name is its unique id; the title is in the output
        "time": when,
        "output_fields": fields,
        "source": "corral",
        "tags": tags,
        "hostname": hostname or socket.gethostname(),
    }
