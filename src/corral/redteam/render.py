"""The red-team benchmark's report: Markdown a person reads, JSON a program reads."""

from __future__ import annotations

from corral.redteam.corpora import markdown as corpus_markdown
from corral.redteam.corpus import FAMILIES
from corral.redteam.results import BenchResult
from corral.text import clip


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 1 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _cell(text: str | None, limit: int = 90) -> str:
    return clip((text or "").replace("|", "\\|").replace("\n", " "), limit)


def overall_line(r: BenchResult) -> str:
    return (f"detected {r.detected}/{r.attacks} attacks ({percent(r.detection_rate)}); false positives "
            f"{r.false_positives}/{r.benign} benign ({percent(r.fp_rate)}); time to detect p50 {_ms(r.ttd_p50_ms)} ms, "
            f"p99 {_ms(r.ttd_p99_ms)} ms (event → finding p50 {_ms(r.event_to_finding_p50_ms)} ms, "
            f"p99 {_ms(r.event_to_finding_p99_ms)} ms); bytes leaked: {r.leaked_bytes_world} (world servers), "
            f"{r.leaked_bytes_events} (corral's events)")


def to_markdown(r: BenchResult) -> str:
    out = ["# corral red-team benchmark", ""]
    m = r.machine
    out.append(f"Run {r.started}, {len(r.cases)} cases ({r.attacks} attacks, {r.benign} benign look-alikes), "
               f"concurrency {r.concurrency}, {r.duration_s:.0f} s; corral {m.get('corral')}, {m.get('nproc')} cores, "
               f"Linux {m.get('kernel')}, Python {m.get('python')}. Rules: sha256 {m.get('rules_sha256')}"
               + (f" (git {m['git_commit']}{', modified' if m.get('rules_dirty') else ''})" if m.get("git_commit")
                  else "") + ".")
    out += ["", f"**Overall: {overall_line(r)}.**", ""]
    out += corpus_markdown(r.corpora)
    out += ["## Per family", "",
            "| family | what | attacks | detected | rate | by its own family's rule | rules that fired (cases) "
            "| misses |",
            "|---|---|---|---|---|---|---|---|"]
    for f in r.families:
        if f.family == "benign":
            continue
        rules = ", ".join(f"{k} ({v})" for k, v in f.rules.items()) or "-"
        misses = ", ".join(f"**{x}**" for x in f.misses) or "-"
        out.append(f"| {f.family} | {f.name} | {f.attacks} | {f.detected} | {percent(f.rate)} | {f.own_rule} | "
                   f"{_cell(rules, 200)} | {misses} |")
    ben = next((f for f in r.families if f.family == "benign"), None)
    if ben is not None:
        rules = ", ".join(f"{k} ({v})" for k, v in ben.rules.items()) or "-"
        out.append(f"| benign | {ben.name} | {ben.attacks} | {ben.detected} flagged | FP {percent(ben.rate)} | - | "
                   f"{_cell(rules, 200)} | {', '.join(f'**{x}**' for x in ben.misses) or '-'} |")
    out += ["", "## Cases", "",
            "ttd: finding time minus the start of the step it is attributed to (see below); evt→f: finding time "
            "minus the time of its evidence event. Leaked: bytes at world servers the case's policy does not "
            "allow / bytes_up of allowed connections off the case's allow-list in corral's events.", "",
            "| case | family | technique | result | first finding (severity, action) | ttd ms | evt→f ms | "
            "rules | actions | leaked | title |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {f: i for i, f in enumerate((*FAMILIES, "benign"))}
    for c in sorted(r.cases, key=lambda c: order.get(c.family, len(order))):  # stable: run order within a family
        result = {"detected": "detected", "quiet": "quiet", "MISS": "**MISS**",
                  "FALSE POSITIVE": "**FALSE POSITIVE**", "ERROR": "**ERROR**"}[c.outcome]
        first = f"{c.first_rule} ({c.first_severity}, {c.first_action})" if c.first_rule else "-"
        acts = ", ".join(dict.fromkeys(a.split(" ")[0] for a in c.actions)) or "-"
        out.append(f"| {c.id} | {c.family} | {c.technique or '-'} | {result} | {first} | {_ms(c.ttd_ms)} | "
                   f"{_ms(c.event_to_finding_ms)} | {_cell(', '.join(c.rules), 80) or '-'} | {acts} | "
                   f"{c.leaked_bytes_world}/{c.leaked_bytes_events} | {_cell(c.title)} |")
    misses = [c for c in r.cases if c.outcome in ("MISS", "ERROR") and c.family != "benign"]
    out += ["", f"## Misses ({len(misses)})", ""]
    if not misses:
        out.append("None.")
    for c in misses:
        out.append(f"- **{c.id}** ({c.family}, {c.technique}) {c.title}. Commands: "
                   + "; ".join(f"`{_cell(s, 160)}`" for s in [x.command for x in c.steps] or ["-"])
                   + f". What corral saw: {c.diagnosis}" + (f" Error: {c.error}" if c.error else ""))
    fps = [c for c in r.cases if c.family == "benign" and c.outcome != "quiet"]
    out += ["", f"## False positives ({len(fps)})", ""]
    if not fps:
        out.append("None.")
    for c in fps:
        out.append(f"- **{c.id}** {c.title}. Commands: "
                   + "; ".join(f"`{_cell(s.command, 160)}`" for s in c.steps)
                   + f". Why: {c.diagnosis}" + (f" Error: {c.error}" if c.error else ""))
    odd = [c for c in r.cases if c.setup_errors or c.setup_findings]
    if odd:
        out += ["", "## Setup problems (corpus bugs: fix the case)", ""]
        for c in odd:
            out.append(f"- {c.id}: " + "; ".join(c.setup_errors + [f"setup fired {x}" for x in c.setup_findings]))
    benign_failed = [c for c in r.cases if c.family == "benign" and any(s.exit_code not in (0, None) for s in c.steps)]
    if benign_failed:
        out += ["", "## Benign cases whose commands failed (quiet may mean 'did nothing')", ""]
        for c in benign_failed:
            bad = [s for s in c.steps if s.exit_code not in (0, None)]
            out.append(f"- {c.id}: " + "; ".join(
                f"`{_cell(s.command, 80)}` exit {s.exit_code} {_cell(s.stderr_tail.strip(), 100)}" for s in bad))
    out += ["", "## How it was measured", "",
            "Every case ran in a fresh sandbox whose egress allowed only the case's `allow` rules, its commands "
            "in one session shell (15 s each), then `wait` seconds. Cases with an allow-list or marked `alone` "
            f"(CPU behaviour) ran one at a time, the others {r.concurrency} at a time. *Detected* means any "
            "finding in that sandbox (setup excluded); *by its own family's rule* counts cases where a rule of the "
            "case's family fired too. "
            "ttd is measured from the COMMAND 'start' event of the step the finding is attributed to (the first "
            "command's if it has no step), except for findings of the pre-run check: those are judged before the "
            "step starts (a refused command never starts), so they are measured from the moment the bench asked "
            "for the command. Both are wall clocks of one kernel. p50/p99 use linear interpolation over detected "
            "attacks. Every host is a fake-world server in a private network namespace; pool domain names are "
            "answered by corral's own table (NXDOMAIN) and never forwarded.", ""]
    return "\n".join(out)


def to_json(r: BenchResult) -> str:
    return r.model_dump_json(indent=2)


# -- command line ----------------------------------------------------------------------------------------


__all__ = ["overall_line", "percent", "to_json", "to_markdown"]
