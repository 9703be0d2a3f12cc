"""`corral rollout`: episodes of a policy on tasks, with safety-shaped rewards."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli.app import app
from corral.cli.common import (
    ActionOpt,
    RulesOpt,
    StateDirOpt,
    _detection,
    _fail,
    _fail_corral,
    _only_loopback,
    _state_dir,
    err,
    out,
)
from corral.errors import CorralError
from corral.text import clip


def _make_policy(spec: str, tasks_path: Path, base_url: str | None, model: str | None, temperature: float):
    from corral.agent.scripted import ReplayPolicy, ScriptedPolicy

    kind, _, arg = spec.partition(":")
    if kind == "scripted" and arg:
        return ScriptedPolicy.from_file(arg)
    if kind == "solutions":
        return ScriptedPolicy.from_solutions(arg or tasks_path)
    if kind == "replay" and arg:
        return ReplayPolicy.from_jsonl(arg)
    if kind == "openai":
        from corral.agent.openai_policy import OpenAIPolicy, OpenAIPolicyConfig

        if not base_url or not model:
            _fail("--policy openai needs --base-url and --model")
        return OpenAIPolicy(OpenAIPolicyConfig(base_url=base_url, model=model, temperature=temperature))
    _fail(f"unknown policy {spec!r}; use scripted:FILE, solutions[:DIR], replay:FILE.jsonl or openai")


@app.command()
def rollout(
    tasks_path: Annotated[Path, typer.Argument(
        metavar="TASKS", help="A task directory, task YAML, or a directory of them.")],
    policy: Annotated[str, typer.Option(
        "--policy", "-p", help="scripted:FILE, solutions[:DIR], replay:FILE.jsonl, openai.")] = "solutions",
    n: Annotated[int, typer.Option("-n", help="Episodes per task.", min=1)] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Sandboxes at once.", min=1)] = 4,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Trajectories (JSONL; appended, resumable).")] = Path(
        "trajectories.jsonl"),
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="OpenAI-compatible endpoint (openai policy).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name (openai policy).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 0.0,
    task_world: Annotated[bool, typer.Option("--task-world", help="Serve the example tasks' package index "
                                             "(pkg.example.com) in a fake world; needs a private netns.")] = False,
    parquet: Annotated[Path | None, typer.Option("--parquet", help="Also export all trajectories to Parquet.")] = None,
    rules: RulesOpt = None,
    action: ActionOpt = None,
    state_dir: StateDirOpt = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS", help="Run the sandboxes on a Ray cluster: HOST:PORT, auto, ray://HOST:PORT, "
        "or 'local' for a local one; -c counts episodes across the cluster (needs: pip install 'ray>=2.9').")] = None,
    summary_json: Annotated[Path | None, typer.Option(
        "--summary-json", metavar="FILE", help="Also write the summary (and the run id) as JSON.")] = None,
    tensorboard: Annotated[Path | None, typer.Option(
        "--tensorboard", metavar="DIR", help="Log safety metrics as TensorBoard scalars in DIR/RUN, one point per "
        "-c episodes finished (needs: pip install 'corral[tensorboard]').")] = None,
) -> None:
    """Run episodes of agents on tasks in parallel sandboxes, scored by verifier and safety."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from corral import Runtime, RuntimeConfig
    from corral.agent.tasks import load_tasks
    from corral.agent.trajectory import read_jsonl, to_parquet
    from corral.events import new_run_id
    from corral.observe.trainer_log import VIOLATION_REASONS
    from corral.rollout.runner import finished as finished_in
    from corral.rollout.runner import pending, resumed_run, run_rollout

    try:
        tasks = load_tasks(tasks_path)
        pol = _make_policy(policy, tasks_path, base_url, model, temperature)
    except CorralError as e:
        _fail_corral(e)
    detection = _detection(rules, action)
    from corral.rollout.taskworld import TASK_HOST

    needs_world = sorted(t.id for t in tasks if any(e.split(":")[0] == TASK_HOST[2] for e in t.egress))
    if needs_world and not task_world:
        err.print(f"[yellow]note:[/] {', '.join(needs_world[:4])}{' ...' if len(needs_world) > 4 else ''} fetch from "
                  f"{TASK_HOST[2]}, which only --task-world serves (in a private network namespace); without it "
                  "their downloads fail", soft_wrap=True)
    if task_world and not _only_loopback():
        _fail("--task-world builds a fake internet and must run in a private network namespace",
              hint="unshare --net --mount -- sh -c 'ip link set lo up && corral rollout ... --task-world'")
    spec = None
    if ray_address is not None:
        try:
            import ray  # noqa: F401

            from corral.rollout.ray_backend import policy_spec
        except ImportError as e:
            _fail(f"--ray needs Ray ({e})", hint="pip install 'ray>=2.9'")
        if task_world and ray_address != "local":
            _fail("--task-world serves its fake world in this machine's network namespace only",
                  hint="use it with --ray local, or give the cluster's nodes real package indexes")
        try:
            spec = policy_spec(pol)
        except CorralError as e:
            _fail_corral(e)
    # a rollout continued into its own output is the same run (its episode ids stay), else a new one
    run_id = resumed_run(out_path) or new_run_id()
    todo = len(pending(tasks, n, run_id, finished_in(out_path)))
    label = f"rollout {tasks_path} -n {n} --policy {policy}"
    safety_log = None
    if tensorboard is not None:
        from corral.observe.trainer_log import SafetyLogger

        try:
            safety_log = SafetyLogger(tensorboard / run_id)
        except ImportError as e:
            _fail(f"--tensorboard: {e}", hint="pip install 'corral[tensorboard]'")

    finished: list[Any] = []  # the trajectories of the episodes run now
    counts = {"violated": 0, "findings": 0}  # episodes ended by a violation, findings: the bar shows them
    unlogged: list[Any] = []  # finished, not yet in TensorBoard
    logged_before = n * len(tasks) - todo  # episodes of this run already done (a resumed rollout): steps go on

    def log_safety(final: bool = False) -> None:
        nonlocal safety_log
        if safety_log is None or not unlogged or (len(unlogged) < concurrency and not final):
            return
        try:
            safety_log.log(unlogged, step=logged_before + len(finished))
        except Exception as e:  # a full disk must not sink the rollout
            err.print(f"[yellow]warning:[/] TensorBoard logging stopped: {escape(str(e))}")
            safety_log = None
        unlogged.clear()

    async def main() -> int:
        world = None
        hosts: dict[str, list[str]] = {}
        if task_world:
            from corral.rollout.taskworld import build_task_world

            world = await asyncio.to_thread(build_task_world)
            hosts = world.hosts
        try:
            with Progress(TextColumn("[bold]rollout"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          TextColumn("{task.fields[safety]}"), console=err) as progress:
                bar = progress.add_task("episodes", total=todo, safety=_safety_text(counts))

                def done(traj: Any) -> None:
                    finished.append(traj)
                    counts["violated"] += traj.termination_reason in VIOLATION_REASONS
                    counts["findings"] += len(traj.violations)
                    progress.update(bar, advance=1, safety=_safety_text(counts))
                    unlogged.append(traj)
                    log_safety()
                if spec is not None:
                    from corral.rollout.ray_backend import run_rollout_ray

                    rc: dict = {"hosts": hosts, "system_dns": not task_world, "run_id": run_id, "run_label": label,
                                "rule_files": [str(p.resolve()) for p in detection["rule_files"]],
                                "actions": detection["actions"]}
                    if ray_address == "local" or state_dir or os.environ.get("CORRAL_HOME"):
                        rc["state_dir"] = str(_state_dir(state_dir).resolve())  # else each node's default
                    summary = await run_rollout_ray(None if ray_address == "local" else ray_address, tasks, spec,
                                                    n=n, concurrency=concurrency, out=out_path, runtime_config=rc,
                                                    on_done=done)
                else:
                    rt = Runtime(RuntimeConfig(state_dir=_state_dir(state_dir), hosts=hosts,
                                               system_dns=not task_world, run_id=run_id, run_kind="rollout",
                                               run_label=label, **detection))
                    try:
                        await rt.start()
                        summary = await run_rollout(rt, tasks, pol, n=n, concurrency=concurrency, out=out_path,
                                                    on_done=done)
                    finally:
                        await rt.close()
        finally:
            if world is not None:
                await asyncio.to_thread(world.close)
            log_safety(final=True)
            if safety_log is not None:
                safety_log.close()
        t = Table(title=f"rollout {run_id}: {summary.episodes} episode(s) in {out_path} "
                        f"({summary.ran_now} run now, {summary.skipped} already done)")
        t.add_column("metric")
        t.add_column("value")
        t.add_row("pass rate", f"{summary.pass_rate:.1%}")
        t.add_row("reward", ", ".join(f"{k} {v:g}" for k, v in summary.reward.items()))
        t.add_row("termination", ", ".join(f"{k}: {v}" for k, v in sorted(summary.termination.items())))
        t.add_row("violation rate by rule",
                  "\n".join(f"{r}: {v:.1%}" for r, v in summary.violation_rate_by_rule.items()) or "none")
        t.add_row("episodes per minute", f"{summary.episodes_per_minute:g}")
        out.print(t)
        for e in summary.errors:
            err.print(f"[red]episode failed:[/] {escape(e)}")
        # an episode that ended in error (a model server that does not answer, a replay file that is not
        # there) is a failed rollout: its reason is said here, not only inside the JSONL
        errored = [t for t in finished if t.termination_reason == "error"]
        for t in errored[:5]:
            why = "; ".join(t.metrics.get("notes") or []) or t.metrics.get("termination_detail") or "no reason recorded"
            err.print(f"[red]episode {escape(t.episode_id)} ended in error:[/] {escape(clip(str(why), 600))}",
                      soft_wrap=True)
        if len(errored) > 5:
            err.print(f"[red]... and {len(errored) - 5} more episode(s) ended in error[/] (termination_reason "
                      f"'error' in {escape(str(out_path))})", soft_wrap=True)
        if parquet is not None:
            to_parquet(read_jsonl(out_path), parquet)
            err.print(f"wrote {parquet}")
        if summary_json is not None:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps({"run_id": run_id, "trajectories": str(out_path),
                                                **dataclasses.asdict(summary)}, indent=2) + "\n")
            err.print(f"wrote {summary_json}")
        if safety_log is not None:
            err.print(f"wrote TensorBoard scalars in {safety_log.tensorboard_dir}")
        return 1 if summary.errors or errored else 0

    try:
        raise typer.Exit(asyncio.run(main()))
    except CorralError as e:
        _fail_corral(e)


def _safety_text(counts: dict[str, int]) -> str:
    """The bar's live safety count: episodes that ended in a violation, findings of every severity."""
    style = "red" if counts["violated"] else "yellow" if counts["findings"] else "green"
    return (f"[{style}]{counts['violated']} violating episode{'s' * (counts['violated'] != 1)}, "
            f"{counts['findings']} finding{'s' * (counts['findings'] != 1)}[/]")


# -- benchmarks ------------------------------------------------------------------------------------
