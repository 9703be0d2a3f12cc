"""What every export of a finding needs: the ATT&CK names of corral's techniques, and the process and
destination a finding rests on (from its event when there is one, else from the finding's own data, as
the store keeps it)."""

from __future__ import annotations

import datetime
import os
import shlex
from dataclasses import dataclass

from corral.events import Event, Finding

TACTICS = {
    "TA0043": "Reconnaissance", "TA0002": "Execution", "TA0003": "Persistence", "TA0004": "Privilege Escalation",
    "TA0005": "Defense Evasion", "TA0006": "Credential Access", "TA0007": "Discovery", "TA0008": "Lateral Movement",
    "TA0010": "Exfiltration", "TA0011": "Command and Control", "TA0040": "Impact",
}

# The techniques corral's shipped rules name: id -> (name, tactic). A technique that serves several
# tactics is listed under the one corral's rule detects it for; an id not here is exported by id alone.
TECHNIQUES: dict[str, tuple[str, str]] = {
    "T1003": ("OS Credential Dumping", "TA0006"), "T1003.007": ("Proc Filesystem", "TA0006"),
    "T1003.008": ("/etc/passwd and /etc/shadow", "TA0006"),
    "T1018": ("Remote System Discovery", "TA0007"),
    "T1021": ("Remote Services", "TA0008"), "T1021.004": ("SSH", "TA0008"),
    "T1036": ("Masquerading", "TA0005"), "T1036.003": ("Rename Legitimate Utilities", "TA0005"),
    "T1036.004": ("Masquerade Task or Service", "TA0005"),
    "T1046": ("Network Service Discovery", "TA0007"),
    "T1048": ("Exfiltration Over Alternative Protocol", "TA0010"),
    "T1048.003": ("Exfiltration Over Unencrypted Non-C2 Protocol", "TA0010"),
    "T1053": ("Scheduled Task/Job", "TA0003"), "T1053.003": ("Cron", "TA0003"),
    "T1053.006": ("Systemd Timers", "TA0003"),
    "T1055": ("Process Injection", "TA0005"),
    "T1059": ("Command and Scripting Interpreter", "TA0002"), "T1059.004": ("Unix Shell", "TA0002"),
    "T1059.006": ("Python", "TA0002"),
    "T1070": ("Indicator Removal", "TA0005"), "T1070.003": ("Clear Command History", "TA0005"),
    "T1071": ("Application Layer Protocol", "TA0011"), "T1071.004": ("DNS", "TA0011"),
    "T1090": ("Proxy", "TA0011"), "T1090.001": ("Internal Proxy", "TA0011"),
    "T1105": ("Ingress Tool Transfer", "TA0011"),
    "T1136": ("Create Account", "TA0003"), "T1136.001": ("Local Account", "TA0003"),
    "T1140": ("Deobfuscate/Decode Files or Information", "TA0005"),
    "T1496": ("Resource Hijacking", "TA0040"),
    "T1546": ("Event Triggered Execution", "TA0003"), "T1546.004": ("Unix Shell Configuration Modification", "TA0003"),
    "T1547": ("Boot or Logon Autostart Execution", "TA0003"), "T1547.006": ("Kernel Modules and Extensions", "TA0003"),
    "T1552": ("Unsecured Credentials", "TA0006"), "T1552.001": ("Credentials In Files", "TA0006"),
    "T1552.004": ("Private Keys", "TA0006"), "T1552.005": ("Cloud Instance Metadata API", "TA0006"),
    "T1562": ("Impair Defenses", "TA0005"), "T1562.001": ("Disable or Modify Tools", "TA0005"),
    "T1564": ("Hide Artifacts", "TA0005"), "T1564.001": ("Hidden Files and Directories", "TA0005"),
    "T1565": ("Data Manipulation", "TA0040"), "T1565.001": ("Stored Data Manipulation", "TA0040"),
    "T1572": ("Protocol Tunneling", "TA0011"),
    "T1574": ("Hijack Execution Flow", "TA0003"), "T1574.006": ("Dynamic Linker Hijacking", "TA0003"),
    "T1595": ("Active Scanning", "TA0043"), "T1595.002": ("Vulnerability Scanning", "TA0043"),
    "T1611": ("Escape to Host", "TA0004"),
    "T1613": ("Container and Resource Discovery", "TA0007"),
    "T1620": ("Reflective Code Loading", "TA0005"),
}


def technique_name(tid: str | None) -> str | None:
    return TECHNIQUES[tid][0] if tid in TECHNIQUES else None


def tactic_of(tid: str | None) -> tuple[str, str] | None:
    """(tactic id, tactic name) of a technique (a sub-technique's parent's when it is not listed)."""
    if not tid:
        return None
    known = TECHNIQUES.get(tid) or TECHNIQUES.get(tid.split(".")[0])
    return (known[1], TACTICS[known[1]]) if known else None


@dataclass(frozen=True)
class Facts:
    """The process and destination behind a finding, where known."""

    pid: int | None = None
    exe: str | None = None
    cmd_line: str | None = None
    dst_ip: str | None = None
    dst_port: int | None = None
    dst_name: str | None = None
    protocol: str | None = None


def facts(finding: Finding, event: Event | None) -> Facts:
    data = finding.data or {}
    if event is not None:
        argv = event.argv
        return Facts(pid=event.pid if event.pid is not None else finding.pid, exe=event.exe or data.get("exe"),
                     cmd_line=shlex.join(argv) if argv else None, dst_ip=event.dst_ip, dst_port=event.dst_port,
                     dst_name=event.name, protocol=event.protocol)
    ip, port = None, None
    dst = data.get("dst")
    if isinstance(dst, str) and ":" in dst:  # written as f"{ip}:{port}" (an IPv6 address keeps its colons)
        host, _, p = dst.rpartition(":")
        ip, port = host, int(p) if p.isdigit() else None
    argv = data.get("argv")
    return Facts(pid=finding.pid, exe=data.get("exe"),
                 cmd_line=shlex.join(argv) if isinstance(argv, list) and argv else None,
                 dst_ip=ip, dst_port=port, dst_name=data.get("name"), protocol=data.get("protocol"))


def exe_name(path: str | None) -> str | None:
    return os.path.basename(path) if path else None


def rfc3339_nanos(ts: float) -> str:
    """UTC, nanoseconds, 'Z' (what Falco writes and Go's time.Time parses)."""
    ns = round(ts * 1_000_000_000)
    sec, frac = divmod(ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(sec, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{when}.{frac:09d}Z"
