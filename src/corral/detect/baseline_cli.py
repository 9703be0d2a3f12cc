"""`corral baseline show|accept|reset`: the per-task baselines of honest episodes (detect/novelty.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral.detect.novelty import BaselineError, Baselines

baseline_app = typer.Typer(help="Per-task baselines of honest episodes: what no rule names is reported as "
                                "novel-behaviour (low, for review).", no_args_is_help=True, rich_markup_mode=None)
console = Console()
StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", help="corral's state directory (baselines/, the event store). [env: CORRAL_HOME; default .corral]",
    show_default=False)]
Db = Annotated[str | None, typer.Option("--db", help="Store path or URL [default: STATE_DIR/corral.db].",
                                        show_default=False)]


def _baselines(state_dir: Path | None) -> Baselines:
    from corral.cli.common import _state_dir

    return Baselines(_state_dir(state_dir))


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@baseline_app.command("show")
def show(task: str, state_dir: StateDir = None,
         as_json: Annotated[bool, typer.Option("--json", help="The baseline as JSON.")] = False) -> None:
    """What the task's accepted episodes do: each feature and in how many of them."""
    try:
        base = _baselines(state_dir).get(task)
    except BaselineError as e:
        _fail(str(e))
        return
    if base is None:
        _fail(f"task {task!r} has no baseline yet; build one with 'corral baseline accept {task} --trajectories FILE'")
        return
    if as_json:
        print(json.dumps(base.model_dump(), indent=1, sort_keys=True))
        return
    t = Table(title=f"baseline of {task}: {len(base.episodes)} episode(s)")
    t.add_column("feature", overflow="fold")
    t.add_column("episodes", justify="right")
    for feature, n in sorted(base.features.items()):
        t.add_row(feature, str(n))
    console.print(t)


@baseline_app.command("accept")
def accept(
    task: str,
    episode: Annotated[list[str] | None, typer.Option("--episode", help="An honest episode's id; repeat.")] = None,
    trajectories: Annotated[Path | None, typer.Option(
        "--trajectories", help="A rollout's JSONL: its episodes of TASK that ended without a violation.")] = None,
    state_dir: StateDir = None, db: Db = None,
) -> None:
    """Add honest episodes (their events in the store) to the task's baseline."""
    from corral.cli.common import _open_store

    ids: dict[str, str | None] = dict.fromkeys(episode or [])  # episode -> its own sandbox, when known
    if trajectories is not None:
        try:
            lines = trajectories.read_text().splitlines()
        except OSError as e:
            _fail(f"cannot read {trajectories}: {e.strerror}")
            return
        for n, line in enumerate(lines, 1):
            try:
                t = json.loads(line)
            except ValueError:
                _fail(f"{trajectories}:{n}: not a JSON line (a `corral rollout` output file is needed)")
                return
            if t.get("task_id") == task and t.get("termination_reason") != "security_violation":
                # the episode's own sandbox: its grading sandbox ran the verifier, not the agent
                ids[t["episode_id"]] = t.get("sandbox_id") or None
    if not ids:
        _fail(f"no honest episode of task {task!r} to accept: pass --episode or --trajectories")
    store = _open_store(db, state_dir)
    try:
        base = _baselines(state_dir).accept(task, {e: store.events(episode_id=e, sandbox_id=sb)
                                                   for e, sb in ids.items()})
    except BaselineError as e:
        _fail(str(e))
        return
    finally:
        store.close()
    console.print(f"baseline of {task}: {len(base.episodes)} episode(s), {len(base.features)} feature(s)")


@baseline_app.command("reset")
def reset(task: str, state_dir: StateDir = None) -> None:
    """Forget the task's baseline (novelty is then not judged for it until one is accepted again)."""
    try:
        gone = _baselines(state_dir).reset(task)
    except BaselineError as e:
        _fail(str(e))
        return
    console.print(f"baseline of {task} {'removed' if gone else 'did not exist'}")
