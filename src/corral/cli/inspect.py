"""`corral events`, `corral runs`, `corral findings` and `corral report`: what the store recorded."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corral.cli.app import app
from corral.cli.common import (
    DbOpt,
    RunOpt,
    StateDirOpt,
    _event_line,
    _fail,
    _fail_corral,
    _open_store,
    _s,
    _state_dir,
    _ts,
    err,
    events_table,
    out,
)
from corral.errors import CorralError
from corral.events import Event, EventKind, Verdict


@app.command()
def events(
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox id.")] = None,
    episode: Annotated[str | None, typer.Option("--episode", help="Only this episode id.")] = None,
    run: RunOpt = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", help=f"Only this kind: {', '.join(k.value for k in EventKind)}.")] = None,
    verdict: Annotated[str | None, typer.Option("--verdict", help="Only allow or deny.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events (Ctrl-C stops).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="Only the last N events.", min=1)] = None,
    db: Annotated[str | None, typer.Option("--db", help="Store path or URL [default: STATE_DIR/corral.db].",
                                           show_default=False)] = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Show recorded events (sandbox lifecycle, commands, connections, DNS...)."""
    from corral.store import Store

    if kind is not None and kind not in {k.value for k in EventKind}:
        _fail(f"unknown kind {kind!r}; use one of: {', '.join(k.value for k in EventKind)}")
    if verdict is not None and verdict not in {v.value for v in Verdict}:
        _fail(f"unknown verdict {verdict!r}; use allow or deny")
    url = db or str(_state_dir(state_dir) / "corral.db")
    if "://" not in url and not Path(url).exists() and not follow:
        _fail(f"no event store at {url}", hint="run a command first, or pass --db / --state-dir / CORRAL_HOME")
    try:
        store = Store(url)
    except CorralError as e:
        _fail_corral(e)

    def emit(evs: list[Event], first: bool) -> None:
        if as_json:
            for ev in evs:
                out.file.write(ev.model_dump_json() + "\n")
            out.file.flush()
        elif follow or not first:
            for ev in evs:
                out.print(_event_line(ev), soft_wrap=True)
        elif evs:
            out.print(events_table(evs))
        else:
            err.print("[dim]no events match[/]")

    def query(after: int) -> list[Event]:
        return store.events(sandbox_id=sandbox, episode_id=episode, kind=kind, verdict=verdict, after_id=after,
                            run_id=run)

    try:
        evs = query(0)
        if limit:
            evs = evs[-limit:]
        emit(evs, first=True)
        last = max((e.id or 0 for e in evs), default=0)
        if not evs:
            # Nothing matched: later events must still be newer than everything already stored.
            every = store.events(after_id=0)
            last = (every[-1].id or 0) if every else 0
        # Ctrl-C sets a flag instead of raising: an interrupt in the middle of a query could leave the
        # connection pool's lock held, and closing the store would then wait forever.
        stop = threading.Event()
        if follow:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        while follow and not stop.wait(0.2):
            new = query(last)
            if new:
                emit(new, first=False)
                last = new[-1].id or last
    except KeyboardInterrupt:
        pass
    except CorralError as e:
        _fail_corral(e)
    finally:
        store.close()


# -- runs, findings and reports ---------------------------------------------------------------------
@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", "-n", help="Only the newest N runs.", min=1)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    db: DbOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """List runs (rollouts, demos, `corral run`s, serve sessions), newest first, with their sandboxes,
    episodes, findings and violation rate; filter events, findings and reports with --run ID."""
    store = _open_store(db, state_dir)
    try:
        rows = store.runs(limit)
    except CorralError as e:
        _fail_corral(e)
    finally:
        store.close()
    if as_json:
        for r in rows:
            out.file.write(json.dumps(r) + "\n")
        return
    if not rows:
        err.print("[dim]no runs recorded (a store written before runs existed has none)[/]")
        return
    t = Table("run", "kind", "started", "ended", "sandboxes", "episodes", "findings", "violating episodes", "what",
              title="Runs")
    for r in rows:
        rate = f"{r['violating']}/{r['episodes']}" + (
            f" ({r['violating'] / r['episodes']:.0%})" if r["episodes"] else "")
        t.add_row(r["id"], r["kind"], _ts(r["started"]), _ts(r["ended"]) if r["ended"] else "[yellow]running[/]",
                  str(r["sandboxes"]), str(r["episodes"]), str(r["findings"]), rate, escape(r["label"] or ""))
    out.print(t)





@app.command()
def findings(
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox id.")] = None,
    episode: Annotated[str | None, typer.Option("--episode", help="Only this episode id.")] = None,
    run: RunOpt = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only this rule id.")] = None,
    severity: Annotated[str | None, typer.Option(
        "--severity", help="Only at or above: info, low, medium, high, critical.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line (--format json).")] = False,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="table; json (corral's findings, one per line); ocsf (OCSF 1.8 Detection Finding "
        "records, class 2004, one JSON object per line).", show_default=False)] = None,
    db: DbOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """List findings (rule judgements, attributed to sandbox, episode, step and command)."""
    from corral.events import Severity
    from corral.report import SEVERITY_ORDER

    if severity is not None and severity not in SEVERITY_ORDER:
        _fail(f"unknown severity {severity!r}; use one of: {', '.join(SEVERITY_ORDER)}")
    if fmt not in (None, "table", "json", "ocsf"):
        _fail(f"unknown format {fmt!r}; use table, json or ocsf")
    if as_json and fmt not in (None, "json"):
        _fail(f"--json and --format {fmt} disagree; give one of them")
    fmt = "json" if as_json else fmt or "table"
    store = _open_store(db, state_dir)
    try:
        got = store.findings(sandbox_id=sandbox, episode_id=episode, run_id=run)
    finally:
        store.close()
    if rule:
        got = [f for f in got if f.rule_id == rule]
    if severity:
        got = [f for f in got if Severity(f.severity).rank >= Severity(severity).rank]
    if fmt == "json":
        for f in got:
            out.file.write(f.model_dump_json() + "\n")
        return
    if fmt == "ocsf":  # JSON Lines, as SIEM and data-lake loaders take OCSF: a record per finding
        from corral.observe.ocsf import to_ocsf

        for f in got:
            out.file.write(json.dumps(to_ocsf(f)) + "\n")
        return
    if not got:
        err.print("[dim]no findings match[/]")
        return
    t = Table("id", "time", "severity", "rule", "technique", "sandbox", "episode", "step", "command", "action",
              title="Findings")
    from corral.report.render import SEVERITY_STYLE

    for f in got:
        sev = str(f.severity)
        t.add_row(str(f.id), _ts(f.ts), f"[{SEVERITY_STYLE.get(sev, '')}]{sev}[/]", f.rule_id, f.technique or "",
                  f.sandbox_id, f.episode_id or "", str(f.step), _s(f.command or ""), f.action)
    out.print(t)


@app.command()
def report(
    subject: Annotated[str | None, typer.Argument(
        help="A sandbox id or an episode id (`calc--0` names the newest run's calc--0@RUN); none with --run: "
             "every episode of the run that has a finding.", show_default=False)] = None,
    run: RunOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also corral's own work (its helpers, the seeding of "
                                           "the workspace, lookups of programs that are not there) and, with "
                                           "--run, the episodes without findings.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="rich, json, md or html.")] = "rich",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    db: DbOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """The incident report of a sandbox, an episode or a run: a card per finding (what, destination, process
    lineage, action, outcome) and the timeline of everything, with times."""
    from corral import report as rep

    if fmt not in ("rich", "json", "md", "html"):
        _fail(f"unknown format {fmt!r}; use rich, json, md or html")
    store = _open_store(db, state_dir)
    try:
        r = rep.build(store, subject, run_id=run, show_all=show_all)
    except CorralError as e:
        _fail_corral(e)
    finally:
        store.close()
    if output is not None:
        try:  # a folder named for the report is made, as `-o reports/x.html` asks
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"cannot make the folder {output.parent} for the report: {e.strerror}",
                  hint="choose another --output path")
    if fmt == "rich":
        console = Console(file=output.open("w"), width=160) if output else out
        rep.render(r, console)
        return
    text = {"json": rep.to_json, "md": rep.to_markdown, "html": rep.to_html}[fmt](r)
    if output:
        try:
            output.write_text(text)
        except OSError as e:
            _fail(f"cannot write {output}: {e.strerror}", hint="choose another --output path")
        err.print(f"wrote {output}")
    else:
        out.file.write(text + "\n")


# -- rollouts --------------------------------------------------------------------------------------
