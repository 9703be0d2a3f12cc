"""corral's findings as OCSF Detection Finding records (class 2004, category Findings), for SIEMs and
data lakes that take OCSF (`corral findings --format ocsf`; tests/test_ocsf.py checks them against the
vendored OCSF schema).

Mapping (OCSF 1.8.0):
- activity Create (a finding is reported once), status New; severity_id from corral's severity;
- time: the finding's, in ms; finding_info.first_seen_time: the event's, when it is known;
- finding_info: uid (the store's id), title, desc (the rule's description), types (the rule's family),
  analytic (the rule: name and uid are its id, type Rule), attacks (technique, sub-technique, tactic);
- resources: the sandbox; evidences: the process (pid, command line, executable) and the destination
  (ip, port, hostname) the finding rests on, where known;
- unmapped: what OCSF has no place for (sandbox, episode, step, run, the command, corral's action).
corral's action (block, kill, quarantine, ...) stays in unmapped rather than the security_control
profile's action_id/disposition_id: those describe one control's verdict on one activity, and a
finding's action can also end an episode or freeze a sandbox.
"""

from __future__ import annotations

import hashlib
from typing import Any

import corral
from corral.events import Event, Finding, Severity
from corral.observe.common import TACTICS, TECHNIQUES, exe_name, facts, tactic_of

OCSF_VERSION = "1.8.0"
CATEGORY_UID, CATEGORY_NAME = 2, "Findings"
CLASS_UID, CLASS_NAME = 2004, "Detection Finding"
ACTIVITY_CREATE = 1
TYPE_UID = CLASS_UID * 100 + ACTIVITY_CREATE

# OCSF severity_id: 0 Unknown, 1 Informational, 2 Low, 3 Medium, 4 High, 5 Critical, 6 Fatal, 99 Other
SEVERITY: dict[Severity, tuple[int, str]] = {
    Severity.INFO: (1, "Informational"),
    Severity.LOW: (2, "Low"),
    Severity.MEDIUM: (3, "Medium"),
    Severity.HIGH: (4, "High"),
    Severity.CRITICAL: (5, "Critical"),
}
_REGULAR_FILE = 1  # OCSF file.type_id


def _ms(ts: float) -> int:
    return int(ts * 1000)


def _uid(finding: Finding) -> str:
    if finding.id is not None:
        return str(finding.id)
    # not yet stored (an alert judged a moment ago): stable over what identifies it
    key = f"{finding.sandbox_id}|{finding.rule_id}|{finding.ts!r}|{finding.step}|{finding.pid}"
    return "corral-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _attacks(technique: str | None) -> list[dict[str, Any]]:
    if not technique:
        return []
    attack: dict[str, Any] = {}
    parent = technique.split(".")[0]
    if "." in technique:
        sub: dict[str, Any] = {"uid": technique}
        if technique in TECHNIQUES:
            sub["name"] = TECHNIQUES[technique][0]
        attack["sub_technique"] = sub
    tech: dict[str, Any] = {"uid": parent}
    if parent in TECHNIQUES:
        tech["name"] = TECHNIQUES[parent][0]
    attack["technique"] = tech
    if tactic := tactic_of(technique):
        attack["tactic"] = {"uid": tactic[0], "name": TACTICS[tactic[0]]}
    return [attack]


def to_ocsf(finding: Finding, event: Event | None = None) -> dict[str, Any]:
    """One OCSF Detection Finding. Without the event, the process and destination come from what the
    finding itself recorded (the store keeps those in its data)."""
    data = finding.data or {}
    sev_id, sev_name = SEVERITY.get(Severity(finding.severity), (0, "Unknown"))
    f = facts(finding, event)
    info: dict[str, Any] = {
        "uid": _uid(finding),
        "title": finding.title,
        "desc": data.get("desc") or finding.title,
        "analytic": {"uid": finding.rule_id, "name": finding.rule_id, "type_id": 1, "type": "Rule"},
        "created_time": _ms(finding.ts),
        "product": {"name": "corral", "vendor_name": "corral"},
    }
    if data.get("family"):
        info["types"] = [str(data["family"])]
    if attacks := _attacks(finding.technique):
        info["attacks"] = attacks
    if event is not None:
        info["first_seen_time"] = info["last_seen_time"] = _ms(event.ts)
    evidence: dict[str, Any] = {}
    if f.pid is not None:  # an OCSF process is known by its pid: a command refused before it ran has none
        proc: dict[str, Any] = {"pid": f.pid}
        if f.cmd_line:
            proc["cmd_line"] = f.cmd_line
        if f.exe:
            proc["name"] = exe_name(f.exe)
            proc["path"] = f.exe
            proc["file"] = {"name": exe_name(f.exe), "path": f.exe, "type_id": _REGULAR_FILE, "type": "Regular File"}
        evidence["process"] = proc
    if f.dst_ip or f.dst_name:
        dst: dict[str, Any] = {}
        if f.dst_ip:
            dst["ip"] = f.dst_ip
        if f.dst_port is not None:
            dst["port"] = f.dst_port
        if f.dst_name:
            dst["hostname"] = f.dst_name
        if f.protocol:
            dst["svc_name"] = f.protocol  # what corral's gateway classified the first bytes as
        evidence["dst_endpoint"] = dst
    # the event's kind and action say what happened; evidence.data is OCSF's place for the rest
    about = {"event_kind": data.get("event_kind"), "event_action": data.get("event_action"),
             "event_ids": finding.evidence or None}
    evidence["data"] = {k: v for k, v in about.items() if v is not None}
    unmapped = {k: v for k, v in {
        "sandbox_id": finding.sandbox_id, "episode_id": finding.episode_id, "step": finding.step,
        "run_id": getattr(finding, "run_id", None), "command": finding.command, "action": finding.action,
        "rule_id": finding.rule_id, "output": data.get("output")}.items() if v is not None}
    message = f"{finding.title} ({finding.rule_id}) in sandbox {finding.sandbox_id}"
    if finding.step is not None:
        message += f", step {finding.step}"
    return {
        "activity_id": ACTIVITY_CREATE,
        "activity_name": "Create",
        "category_uid": CATEGORY_UID,
        "category_name": CATEGORY_NAME,
        "class_uid": CLASS_UID,
        "class_name": CLASS_NAME,
        "type_uid": TYPE_UID,
        "type_name": f"{CLASS_NAME}: Create",
        "severity_id": sev_id,
        "severity": sev_name,
        "time": _ms(finding.ts),
        "message": message,
        "status_id": 1,
        "status": "New",
        "is_alert": finding.action != "record",
        "finding_info": info,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "corral", "vendor_name": "corral", "version": corral.__version__},
            "log_name": "findings",
            "uid": info["uid"],
        },
        "resources": [{"uid": finding.sandbox_id, "name": finding.sandbox_id, "type": "corral sandbox"}],
        "evidences": [evidence],
        "unmapped": unmapped,
    }
