"""What every command shares: consoles, failures and exit codes, state and store, the options of
sandbox commands, and the tables that render events."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corral.config import EgressPolicy, EgressRule, Limits, SandboxConfig
from corral.errors import ConfigError, CorralError, IsolationUnavailable
from corral.events import Event, EventKind, Verdict


def _console(stderr: bool) -> Console:
    # Off a terminal rich would wrap tables at 80 columns; logs and CI want whole rows instead.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


# Tables and messages go to stderr: stdout belongs to the sandboxed command (`corral run ... | jq`).
err = _console(stderr=True)
out = _console(stderr=False)

EXIT_USAGE = 2


EXIT_TIMEOUT = 124


def _fail(message: str, code: int = EXIT_USAGE, hint: str | None = None) -> NoReturn:
    # never wrapped: an error line is grepped and pasted whole
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err.print(f"[dim]{escape(hint)}[/]", soft_wrap=True)
    raise typer.Exit(code)


def _fail_corral(e: CorralError) -> NoReturn:
    hint = "run 'corral doctor' to see which isolation feature is missing" if isinstance(
        e, IsolationUnavailable) and "corral doctor" not in str(e) else None
    _fail(str(e), hint=hint)


def _validation_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'value'}: {x['msg']}" for x in e.errors())


def _state_dir(state_dir: Path | None) -> Path:
    return state_dir or Path(os.environ.get("CORRAL_HOME") or ".corral")


StateDirOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="corral's state directory (event store, runtime files). [env: CORRAL_HOME; default .corral]",
    show_default=False)]
AllowOpt = Annotated[list[str] | None, typer.Option(
    "--allow", "-a", help="Egress allow rule (repeatable): pypi.org, '*.example.com:443', 10.0.0.0/8, host:8000-8100.")]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="YAML egress policy file (allow: [...]).")]
MemOpt = Annotated[int | None, typer.Option("--mem", help="Memory limit in MiB.", show_default=False)]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU limit (cores, fractional).", show_default=False)]
PidsOpt = Annotated[int | None, typer.Option("--pids", help="Process limit.", show_default=False)]
TimeoutOpt = Annotated[float | None, typer.Option("--timeout", help="Wall-clock limit per command, seconds.",
                                                  show_default=False)]
WorkspaceOpt = Annotated[Path | None, typer.Option("--workspace", help="Directory copied into /workspace.")]
ImageOpt = Annotated[str | None, typer.Option(
    "--image", help="OCI image as the sandbox's root (pulled into the image store when missing; see "
                    "`corral images`), read-only [default: the host's root].")]


def _sandbox_config(allow: list[str] | None, policy: Path | None, mem: int | None, cpus: float | None,
                    pids: int | None, timeout: float | None, workspace: Path | None,
                    image: str | None = None) -> SandboxConfig:
    """Build the sandbox config; every mistake becomes a ConfigError naming the bad value."""
    egress = EgressPolicy.from_file(policy) if policy is not None else EgressPolicy()
    if allow:
        extra = tuple(EgressRule.parse(r) for r in allow)
        # Rules given with --allow add to the policy file's (already validated) rules.
        egress = egress.model_copy(update={"allow": egress.allow + extra})
    given = {"memory_mb": mem, "cpus": cpus, "pids": pids, "timeout": timeout}
    try:
        limits = Limits(**{k: v for k, v in given.items() if v is not None})
        return SandboxConfig(limits=limits, egress=egress, workspace_template=workspace, image=image)
    except ValidationError as e:
        raise ConfigError(_validation_message(e)) from None


def _exit_code(code: int | None, timed_out: bool) -> int:
    if timed_out:
        return EXIT_TIMEOUT
    if code is None:
        return 1  # killed without a status (sandbox died): a failure, not a success
    if code < 0:
        return 128 - code  # killed by signal -code, as shells report it
    return code & 0xFF


def _run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """asyncio.run with SIGTERM treated like Ctrl-C, so `kill corral` still closes every sandbox."""

    terminated = False

    async def wrapper() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None

        def on_term() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, on_term)
        try:
            return await main()
        except asyncio.CancelledError:
            if terminated:
                return 128 + signal.SIGTERM
            raise  # Ctrl-C: asyncio.run turns this into KeyboardInterrupt

    try:
        return asyncio.run(wrapper())
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


# -- rendering -------------------------------------------------------------------------------------
def _ts(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _proc(ev: Event) -> str:
    if ev.pid is None and not ev.exe:
        return ""
    exe = os.path.basename(ev.exe) if ev.exe else "?"
    return f"{ev.pid}/{exe}" if ev.pid is not None else exe


def _dest(ev: Event) -> str:
    if not ev.dst_ip:
        return ""
    host = f"[{ev.dst_ip}]" if ":" in ev.dst_ip else ev.dst_ip
    return f"{host}:{ev.dst_port}" if ev.dst_port is not None else host


def _verdict(ev: Event) -> str:
    if ev.verdict == Verdict.ALLOW:
        return "[green]allow[/]"
    if ev.verdict == Verdict.DENY:
        return "[bold red]deny[/]"
    return ""


def _bytes(ev: Event) -> str:
    if ev.bytes_up is None and ev.bytes_down is None:
        return ""
    return f"{ev.bytes_up or 0}/{ev.bytes_down or 0}"


def _s(value: object) -> str:
    return "" if value is None else escape(str(value))




_NO_WRAP = {"id", "time", "step", "kind", "verdict"}


def egress_table(events: list[Event], title: str) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    # Short columns never wrap; the free-text ones take what width is left.
    for col in ("time", "step", "pid/exe", "kind", "destination", "name", "proto", "verdict", "reason",
                "bytes up/down"):
        t.add_column(col, overflow="fold", no_wrap=col in _NO_WRAP)
    for ev in events:
        t.add_row(_ts(ev.ts), _s(ev.step), _s(_proc(ev)), ev.kind.value, _s(_dest(ev)), _s(ev.name),
                  _s(ev.protocol), _verdict(ev), _s(ev.reason), _bytes(ev))
    return t


def _summary(ev: Event) -> str:
    """One cell saying what happened, whatever the kind."""
    if ev.kind in (EventKind.CONNECT, EventKind.DNS):
        parts = [_dest(ev), ev.name or "", ev.protocol or "", ev.reason or ""]
        return " ".join(p for p in parts if p)
    if ev.kind == EventKind.PROCESS and ev.argv:
        return shlex.join(ev.argv)
    if ev.kind == EventKind.COMMAND:
        code = ev.data.get("exit_code") if ev.action == "exit" else None
        return (ev.command or "") + (f"  -> {code}" if ev.action == "exit" else "")
    if ev.reason:
        return ev.reason
    return ev.command or ""


def events_table(events: list[Event]) -> Table:
    t = Table(show_lines=False)
    for col in ("id", "time", "sandbox", "step", "kind", "action", "pid/exe", "verdict", "what"):
        t.add_column(col, overflow="fold", no_wrap=col in _NO_WRAP)
    for ev in events:
        t.add_row(str(ev.id), _ts(ev.ts), escape(ev.sandbox_id), _s(ev.step), ev.kind.value, escape(ev.action),
                  _s(_proc(ev)), _verdict(ev), _s(_summary(ev)))
    return t


def _event_line(ev: Event) -> str:
    fields = [f"[dim]{ev.id:>6} {_ts(ev.ts)}[/]", escape(ev.sandbox_id), f"step={_s(ev.step)}",
              f"[bold]{ev.kind.value}[/]/{escape(ev.action)}", _s(_proc(ev)), _verdict(ev), _s(_summary(ev))]
    return " ".join(f for f in fields if f)


# -- doctor ----------------------------------------------------------------------------------------

def _detection(rules: list[Path] | None, actions: list[str] | None) -> dict[str, Any]:
    """RuntimeConfig's rule_files and actions from --rules and --action, checked now: a bad file or
    action is named before any sandbox starts."""
    from corral.detect.rules import load as load_rules
    from corral.events import Action

    pairs: dict[str, str] = {}
    for item in actions or []:
        key, sep, value = item.partition("=")
        if not sep or not key or value not in {a.value for a in Action}:
            _fail(f"--action {item!r}: use RULE_OR_SEVERITY=ACTION, ACTION one of {', '.join(a.value for a in Action)}")
        pairs[key] = value
    if rules:  # the runtime loads them again when it starts; this only names a bad one before anything runs
        try:
            load_rules(list(rules))
        except CorralError as e:
            _fail_corral(e)
    return {"rule_files": tuple(rules or ()), "actions": pairs}


DbOpt = Annotated[str | None, typer.Option("--db", help="Store path or URL [default: STATE_DIR/corral.db].",
                                           show_default=False)]


def _open_store(db: str | None, state_dir: Path | None):
    from corral.store import Store

    url = db or str(_state_dir(state_dir) / "corral.db")
    if "://" not in url and not Path(url).exists():
        _fail(f"no event store at {url}", hint="run a command first, or pass --db / --state-dir / CORRAL_HOME")
    try:
        return Store(url)
    except CorralError as e:
        _fail_corral(e)


RunOpt = Annotated[str | None, typer.Option("--run", help="Only this run (see `corral runs`).")]
RulesOpt = Annotated[list[Path] | None, typer.Option(
    "--rules", help="A rule file (corral's YAML or Sigma) loaded after corral's own; repeat for more.")]
ActionOpt = Annotated[list[str] | None, typer.Option(
    "--action", metavar="RULE=ACTION", help="What a rule id or severity does (e.g. high=end_episode, "
    "egress-denied=record); repeat for more.")]


def _only_loopback() -> bool:
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return names == ["lo"]
