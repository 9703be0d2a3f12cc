"""`corral doctor`, `serve`, `demo`, `gc` and `bench`: the machine, the server and corral itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli.app import app
from corral.cli.common import (
    StateDirOpt,
    _fail,
    _fail_corral,
    _only_loopback,
    _state_dir,
    err,
    out,
)
from corral.detect.baseline_cli import baseline_app
from corral.errors import CorralError
from corral.images.cli import images_app


@app.command()
def doctor() -> None:
    """Check which isolation and limit features work on this machine, and how to fix missing ones."""
    from corral.doctor import all_required_ok, checks

    results = checks()
    t = Table(title="corral doctor", title_justify="left")
    t.add_column("feature")
    t.add_column("status")
    t.add_column("detail", overflow="fold")
    t.add_column("fix", overflow="fold")
    for c in results:
        if c.ok:
            status = "[green]ok[/]"
        elif c.required:
            status = "[bold red]MISSING[/]"
        else:
            status = "[yellow]warn[/]" if "optional" not in c.name.lower() else "[dim]absent[/]"
        t.add_row(escape(c.name), status, escape(c.detail), "" if c.ok else escape(c.fix))
    out.print(t)
    if all_required_ok(results):
        out.print("[green]All required features are available.[/]")
        return
    missing = ", ".join(c.name for c in results if c.required and not c.ok)
    out.print(f"[bold red]Missing required features:[/] {escape(missing)}")
    raise typer.Exit(1)





bench_app = typer.Typer(help="Benchmarks that measure corral itself.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(bench_app, name="bench")
app.add_typer(images_app, name="images")
app.add_typer(baseline_app, name="baseline")


@bench_app.command("redteam")
def bench_redteam(
    cases: Annotated[list[Path] | None, typer.Option(
        "--cases", help="Case file or directory (default: the shipped corpus); repeat to add more.")] = None,
    only: Annotated[str, typer.Option("--only", help="Comma-separated case ids.")] = "",
    family: Annotated[str, typer.Option("--family", help="Comma-separated families (F1..F12, benign).")] = "",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 4,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where redteam.md and redteam.json go.")] = Path(
        "benchmarks/results"),
    corpus: Annotated[str, typer.Option(
        "--corpus", help="Comma-separated corpora: corral, catalogue, benign-work.")] = "",
    name: Annotated[str, typer.Option("--name", help="File stem of the outputs.")] = "redteam",
    link: Annotated[str, typer.Option("--link", help="Name of the veth link to the fake world.")] = "corralw3",
    make_holdout: Annotated[int | None, typer.Option(
        "--make-holdout", help="Add to cases/holdout.txt a 25% sample of each case file not drawn yet "
        "(not corral's own), seeded with this number; run nothing.")] = None,
) -> None:
    """Run the red-team corpus (attacks and benign look-alikes), each in a fresh sandbox against a fake
    world; report detection per family and per corpus (tuned and hold-out apart), false positives,
    time to detect and leaked bytes."""
    from corral.redteam.bench import main as redteam_main

    argv = ["--concurrency", str(concurrency), "--out-dir", str(out_dir), "--name", name, "--link", link]
    for c in cases or []:
        argv += ["--cases", str(c)]
    for flag, value in (("--only", only), ("--family", family), ("--corpus", corpus)):
        if value:
            argv += [flag, value]
    if make_holdout is not None:
        argv += ["--make-holdout", str(make_holdout)]
    raise typer.Exit(redteam_main(argv))


# -- serve -----------------------------------------------------------------------------------------
@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(
        "--config", help="Service YAML (host, port, token_file, images, runtime, sandbox, openenv); "
                         "the flags below override it.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to bind [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port [default: 8080].")] = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File with one token per line (one tenant each), mode 600; or set "
                              "CORRAL_SERVE_TOKEN.")] = None,
    image: Annotated[list[str] | None, typer.Option(
        "--image", help="NAME=ROOTFS_DIR: what a client's image name runs on (others: the host root, read-only)."
    )] = None,
    allow_gpu: Annotated[bool | None, typer.Option("--allow-gpu/--no-gpu", help="Let clients ask for GPU sandboxes.",
                                                   show_default=False)] = None,
    state_dir: StateDirOpt = None,
    max_sandboxes: Annotated[int | None, typer.Option(
        "--max-sandboxes", min=1, help="Running sandboxes each token may hold [default: 64].")] = None,
    tasks: Annotated[Path | None, typer.Option("--tasks", help="Task directory the OpenEnv endpoint serves.")] = None,
    openenv: Annotated[bool | None, typer.Option("--openenv/--no-openenv", help="Mount the OpenEnv server at "
                                                 "/openenv [default: on].", show_default=False)] = None,
) -> None:
    """One HTTP service with token authentication: ROCK's sandbox API, OpenEnv's environment protocol
    at /openenv, corral's /findings and /health. SIGTERM or Ctrl-C closes every sandbox, then exits."""
    try:
        import uvicorn

        from corral.server import create_app
        from corral.server.config import ServeConfig
    except ImportError as e:
        _fail(f"corral serve needs FastAPI and uvicorn ({e})", hint="pip install 'corral[serve]'")
    try:
        cfg = ServeConfig.from_file(config) if config else ServeConfig()
        images = dict(cfg.images)
        for item in image or []:
            name, sep, path = item.partition("=")
            if not sep or not Path(path).is_dir():
                _fail(f"--image {item!r}: use NAME=DIRECTORY with an existing root filesystem directory")
            images[name] = Path(path)
        if state_dir or "state_dir" not in cfg.runtime.model_fields_set:
            runtime = cfg.runtime.model_copy(update={"state_dir": _state_dir(state_dir)})
        else:
            runtime = cfg.runtime
        updates = {"host": host, "port": port, "token_file": token_file, "allow_gpu": allow_gpu,
                   "max_sandboxes_per_tenant": max_sandboxes}
        cfg = cfg.model_copy(update={**{k: v for k, v in updates.items() if v is not None},
                                     "images": images, "runtime": runtime,
                                     "openenv": cfg.openenv.model_copy(update={
                                         k: v for k, v in (("tasks", tasks), ("enabled", openenv)) if v is not None})})
        if cfg.runtime.detection and cfg.runtime.rule_files:
            from corral.detect.rules import load as load_rules

            # a bad rule file is named now, with its line, not as a traceback when the server starts
            load_rules(list(cfg.runtime.rule_files))
        application = create_app(cfg, cfg.tokens())
    except CorralError as e:
        _fail_corral(e)
    err.print(f"corral serve on http://{cfg.host}:{cfg.port} (state in {cfg.runtime.state_dir})")
    # uvicorn turns SIGTERM/SIGINT into a graceful stop: requests finish, the lifespan closes the runtime
    uvicorn.run(application, host=cfg.host, port=cfg.port, lifespan="on", log_level="warning",
                timeout_graceful_shutdown=30)


# -- demo ------------------------------------------------------------------------------------------


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the report and trajectories go.")] = Path(
        "corral-demo"),
    tasks: Annotated[Path | None, typer.Option("--tasks", help="Task suite [default: examples/tasks].")] = None,
    honest: Annotated[int | None, typer.Option("--honest", help="Only the first N honest episodes.", min=1)] = None,
) -> None:
    """Replay the ROME incident against a fake world: blocked, detected, attributed, contained."""
    from corral.demo import run_demo

    if not _only_loopback():
        _fail("the demo builds its own fake internet and must run in a private network namespace",
              hint="run 'make demo' (or: unshare --net --mount -- sh -c 'ip link set lo up && corral demo')")
    raise typer.Exit(asyncio.run(run_demo(output, out, tasks_dir=tasks, honest=honest)))


# -- gc --------------------------------------------------------------------------------------------
@app.command()
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be removed.")] = False,
    lock_dir: Annotated[Path, typer.Option("--lock-dir", help="Instance lock directory of the runtimes.")] = Path(
        "/run/corral"),
) -> None:
    """Remove nftables tables, links and cgroups left behind by crashed corral runtimes."""
    from corral import gc as gc_mod

    try:
        removed = gc_mod.collect(dry_run=dry_run, lock_dir=lock_dir)
    except CorralError as e:
        _fail_corral(e)
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        out.print(f"{verb} {escape(item)}")
    if not removed:
        out.print("[dim]nothing to remove[/]")
