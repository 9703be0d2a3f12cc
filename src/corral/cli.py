"""The `corral` command line: doctor, run, shell, events, gc.

The CLI only parses, renders and maps outcomes to exit codes; the work is done by the library
(Runtime, Sandbox, Store) and by corral.doctor / corral.gc, so everything here is also testable
without a terminal.

Exit codes: the command's own for `run`; 124 when it timed out; 128+N when a signal killed it;
2 for bad arguments, bad policies and unavailable isolation; 1 for `doctor` with a required
feature missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corral.config import EgressPolicy, EgressRule, Limits, RuntimeConfig, SandboxConfig
from corral.detect.baseline_cli import baseline_app
from corral.errors import ConfigError, CorralError, IsolationUnavailable
from corral.events import Event, EventKind, Verdict
from corral.images.cli import images_app

app = typer.Typer(
    name="corral",
    help="Run agent commands in isolated sandboxes with default-deny egress and attributed events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _console(stderr: bool) -> Console:
    # Off a terminal rich would wrap tables at 80 columns; logs and CI want whole rows instead.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, highlight=False, width=width)


# Tables and messages go to stderr: stdout belongs to the sandboxed command (`corral run ... | jq`).
err = _console(stderr=True)
out = _console(stderr=False)

EXIT_USAGE = 2


def _version(value: bool) -> None:
    if value:
        from corral import __version__

        out.print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print corral's version and exit.")] = False) -> None:
    """Run agent commands in isolated sandboxes with default-deny egress and attributed events."""
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


# -- run -------------------------------------------------------------------------------------------
_closed_streams: set[int] = set()


def _write(stream: Any, data: bytes) -> None:
    """Pass sandbox output through. Runs inside the sandbox's message callback, so it must never
    raise: a reader that went away (`corral run ... | head -1`) only stops our copy."""
    fd = stream.fileno()
    if fd in _closed_streams:
        return
    try:
        stream.buffer.write(data)
        stream.buffer.flush()
    except (BrokenPipeError, OSError, ValueError):
        _closed_streams.add(fd)


async def _egress_events(rt: Any, sb: Any) -> list[Event]:
    """Close the sandbox (its connections end with it), let in-flight judgements finish, then read
    every connect and DNS event of that sandbox."""
    await sb.close()
    await rt.drain()
    evs = (rt.store.events(sandbox_id=sb.id, kind=EventKind.CONNECT)
           + rt.store.events(sandbox_id=sb.id, kind=EventKind.DNS))
    return sorted(evs, key=lambda e: e.id or 0)


async def _run_one(cfg: SandboxConfig, state_dir: Path, command: str, timeout: float | None,
                   as_json: bool, detection: dict[str, Any]) -> int:
    from corral.runtime import Runtime

    async with Runtime(RuntimeConfig(state_dir=state_dir, **detection)) as rt:
        sb = await rt.create(cfg)

        def on_output(chunk: Any) -> None:
            _write(sys.stdout if chunk.stream == "stdout" else sys.stderr, chunk.data)

        res = await sb.exec(command, timeout=timeout, on_output=None if as_json else on_output)
        egress = await _egress_events(rt, sb)
        found = rt.store.findings(sandbox_id=sb.id)
        code = _exit_code(res.exit_code, res.timed_out)
        if as_json:
            doc = {"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
                   "timed_out": res.timed_out, "truncated": res.truncated, "oom_killed": res.oom_killed,
                   "pids_limit_hit": res.pids_limit_hit, "error": res.error, "duration": res.duration,
                   "sandbox_id": sb.id, "events": [e.model_dump(mode="json") for e in egress],
                   "findings": [f.model_dump(mode="json") for f in found]}
            out.file.write(json.dumps(doc) + "\n")
            out.file.flush()
            return code
        if res.error:
            err.print(f"[yellow]corral:[/] {escape(res.error)}")
        if egress:
            err.print(egress_table(egress, f"egress of {sb.id}"))
        else:
            err.print(f"[dim]corral: no network activity in {escape(sb.id)}[/]")
        if found:
            t = Table("severity", "rule", "technique", "step", "action", "title", title=f"findings in {sb.id}")
            for f in found:
                t.add_row(str(f.severity), f.rule_id, f.technique or "", str(f.step), f.action, f.title)
            err.print(t)
        return code


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="Command to run (put it after --).", show_default=False)],
    allow: AllowOpt = None,
    policy: PolicyOpt = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    pids: PidsOpt = None,
    timeout: TimeoutOpt = None,
    workspace: WorkspaceOpt = None,
    image: ImageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    rules: RulesOpt = None,
    action: ActionOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Run one command in a fresh sandbox, stream its output, then show its network activity."""
    try:
        cfg = _sandbox_config(allow, policy, mem, cpus, pids, timeout, workspace, image)
    except ConfigError as e:
        _fail(str(e))
    detection = _detection(rules, action)
    # One argument is a shell command line already ("make && make test"); several are an argv.
    cmd = command[0] if len(command) == 1 else shlex.join(command)
    try:
        code = _run_async(lambda: _run_one(cfg, _state_dir(state_dir), cmd, timeout, as_json, detection))
    except CorralError as e:
        _fail_corral(e)
    raise typer.Exit(code)


# -- shell -----------------------------------------------------------------------------------------
class _LineReader:
    """input() on a daemon thread, one line per request, so the event loop keeps serving the
    sandbox's network (gateway, DNS) while the user types, and exiting never waits on a blocked read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._requests: list[tuple[str, asyncio.Future[str | None]]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True, name="corral-shell-input").start()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._requests:
                    self._cond.wait()
                prompt, fut = self._requests.pop(0)
            try:
                line: str | None = input(prompt)
            except (EOFError, OSError, ValueError):  # end of input, or stdin closed under us
                line = None
            self.loop.call_soon_threadsafe(lambda f=fut, v=line: f.done() or f.set_result(v))
            if line is None:
                return

    async def read(self, prompt: str) -> str | None:
        fut: asyncio.Future[str | None] = self.loop.create_future()
        with self._cond:
            self._requests.append((prompt, fut))
            self._cond.notify()
        return await fut


@contextlib.contextmanager
def _away_from_terminal_signals() -> Iterator[None]:
    """Start sandboxes made inside this block outside the terminal's foreground process group.

    Ctrl-C makes the terminal send SIGINT to every process of its foreground group, and bubblewrap
    inherits ours: without this, Ctrl-C would kill the whole sandbox instead of interrupting the
    command. So while the sandbox starts we stand in a background group of our own (made by a helper
    child) and return afterwards; bwrap stays behind in that group. The sandbox never uses the
    terminal, so being in a background group costs it nothing.
    """
    try:
        fg = os.tcgetpgrp(sys.stdin.fileno())
    except OSError:
        fg = -1
    home = os.getpgrp()
    if fg != home:  # not an interactive foreground job: no terminal signals to dodge
        yield
        return
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:  # the helper only founds the group and waits to be let go
        os.close(w)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
            os.read(r, 1)
        os._exit(0)
    os.close(r)
    moved = False
    try:
        with contextlib.suppress(OSError):  # the helper may have done it first
            os.setpgid(helper, helper)
        try:
            os.setpgid(0, helper)
            moved = True
        except OSError:
            pass  # a session leader cannot change group; Ctrl-C will then end the sandbox too
        yield
    finally:
        if moved:
            # Back to our group; it is recreated (pgid = our pid) if we were its only member.
            os.setpgid(0, home if home != os.getpid() else 0)
        os.close(w)
        os.waitpid(helper, 0)


async def _shell(cfg: SandboxConfig, state_dir: Path, timeout: float | None) -> int:
    from corral.runtime import Runtime

    loop = asyncio.get_running_loop()
    async with Runtime(RuntimeConfig(state_dir=state_dir)) as rt:
        with _away_from_terminal_signals():
            sb = await rt.create(cfg)
        await sb.create_session("main")
        err.print(f"[bold]corral shell[/] in sandbox {escape(sb.id)} "
                  "[dim](state persists between lines; 'exit' or Ctrl-D leaves, Ctrl-C interrupts)[/]")
        reader = _LineReader(loop)
        current: asyncio.Task | None = None

        def on_sigint() -> None:
            if current is not None and not current.done():
                current.cancel()
            else:
                err.print("\n[dim](type 'exit' or press Ctrl-D to leave)[/]")

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        last = 0
        try:
            while True:
                line = await reader.read(f"corral:{sb.id}$ " if sys.stdin.isatty() else "")
                words = (line or "").split()
                if line is None or (words and words[0] in ("exit", "logout") and len(words) <= 2):
                    # Like a shell: `exit` keeps the last command's status, `exit N` sets it.
                    if len(words) == 2 and words[1].isdigit():
                        last = int(words[1]) & 0xFF
                    break
                if not line.strip():
                    continue

                def on_output(chunk: Any) -> None:
                    _write(sys.stdout if chunk.stream == "stdout" else sys.stderr, chunk.data)

                current = asyncio.ensure_future(sb.run_in_session("main", line, timeout=timeout,
                                                                  on_output=on_output))
                try:
                    res = await current
                except asyncio.CancelledError:
                    # The shell may still be running the command: restart the session to stop it.
                    await sb.close_session("main")
                    await sb.create_session("main")
                    err.print("\n[yellow]interrupted; the session was restarted (shell state is reset)[/]")
                    last = 130
                    continue
                finally:
                    current = None
                last = _exit_code(res.exit_code, res.timed_out)
                if res.error:
                    err.print(f"[yellow]corral:[/] {escape(res.error)}")
                    if "create it again" in res.error:
                        await sb.create_session("main")
                elif last != 0:
                    err.print(f"[dim]exit {last}[/]")
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        egress = await _egress_events(rt, sb)
        if egress:
            err.print(egress_table(egress, f"egress of {sb.id}"))
        return last


@app.command()
def shell(
    allow: AllowOpt = None,
    policy: PolicyOpt = None,
    mem: MemOpt = None,
    cpus: CpusOpt = None,
    pids: PidsOpt = None,
    timeout: TimeoutOpt = None,
    workspace: WorkspaceOpt = None,
    image: ImageOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """An interactive shell in a fresh sandbox (one persistent session)."""
    try:
        cfg = _sandbox_config(allow, policy, mem, cpus, pids, timeout, workspace, image)
    except ConfigError as e:
        _fail(str(e))
    try:
        code = _run_async(lambda: _shell(cfg, _state_dir(state_dir), timeout))
    except CorralError as e:
        _fail_corral(e)
    raise typer.Exit(code)


# -- events ----------------------------------------------------------------------------------------
@app.command()
def events(
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox id.")] = None,
    episode: Annotated[str | None, typer.Option("--episode", help="Only this episode id.")] = None,
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
        return store.events(sandbox_id=sandbox, episode_id=episode, kind=kind, verdict=verdict, after_id=after)

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


# -- findings and reports ----------------------------------------------------------------------------
RulesOpt = Annotated[list[Path] | None, typer.Option(
    "--rules", help="A rule file (corral's YAML or Sigma) loaded after corral's own; repeat for more.")]
ActionOpt = Annotated[list[str] | None, typer.Option(
    "--action", metavar="RULE=ACTION", help="What a rule id or severity does (e.g. high=end_episode, "
    "egress-denied=record); repeat for more.")]


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


@app.command()
def findings(
    sandbox: Annotated[str | None, typer.Option("--sandbox", help="Only this sandbox id.")] = None,
    episode: Annotated[str | None, typer.Option("--episode", help="Only this episode id.")] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only this rule id.")] = None,
    severity: Annotated[str | None, typer.Option(
        "--severity", help="Only at or above: info, low, medium, high, critical.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    db: DbOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """List findings (rule judgements, attributed to sandbox, episode, step and command)."""
    from corral.events import Severity
    from corral.report import SEVERITY_ORDER

    if severity is not None and severity not in SEVERITY_ORDER:
        _fail(f"unknown severity {severity!r}; use one of: {', '.join(SEVERITY_ORDER)}")
    store = _open_store(db, state_dir)
    try:
        got = store.findings(sandbox_id=sandbox, episode_id=episode)
    finally:
        store.close()
    if rule:
        got = [f for f in got if f.rule_id == rule]
    if severity:
        got = [f for f in got if Severity(f.severity).rank >= Severity(severity).rank]
    if as_json:
        for f in got:
            out.file.write(f.model_dump_json() + "\n")
        return
    if not got:
        err.print("[dim]no findings match[/]")
        return
    t = Table("id", "time", "severity", "rule", "technique", "sandbox", "episode", "step", "command", "action",
              title="Findings")
    for f in got:
        t.add_row(str(f.id), _ts(f.ts), str(f.severity), f.rule_id, f.technique or "", f.sandbox_id,
                  f.episode_id or "", str(f.step), _s((f.command or "")[:60]), f.action)
    out.print(t)


@app.command()
def report(
    subject: Annotated[str, typer.Argument(help="A sandbox id or an episode id.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="rich, json, md or html.")] = "rich",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    db: DbOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """The incident timeline of a sandbox or episode: command, processes, network, findings, actions."""
    from corral import report as rep

    if fmt not in ("rich", "json", "md", "html"):
        _fail(f"unknown format {fmt!r}; use rich, json, md or html")
    store = _open_store(db, state_dir)
    try:
        r = rep.build(store, subject)
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
) -> None:
    """Run episodes of agents on tasks in parallel sandboxes, scored by verifier and safety."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from corral import Runtime, RuntimeConfig
    from corral.agent.tasks import load_tasks
    from corral.agent.trajectory import read_jsonl, to_parquet
    from corral.rollout.runner import episode_id, run_rollout

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
    done_before = {t.episode_id for t in read_jsonl(out_path) if t.termination_reason != "error"}
    todo = sum(1 for i in range(n) for t in tasks if episode_id(t, i) not in done_before)

    finished: list[Any] = []  # the trajectories of the episodes run now

    async def main() -> int:
        world = None
        hosts: dict[str, list[str]] = {}
        if task_world:
            from corral.rollout.taskworld import build_task_world

            world = await asyncio.to_thread(build_task_world)
            hosts = world.hosts
        try:
            with Progress(TextColumn("[bold]rollout"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err) as progress:
                bar = progress.add_task("episodes", total=todo)

                def done(traj: Any) -> None:
                    finished.append(traj)
                    progress.advance(bar)
                if spec is not None:
                    from corral.rollout.ray_backend import run_rollout_ray

                    rc: dict = {"hosts": hosts, "system_dns": not task_world,
                                "rule_files": [str(p.resolve()) for p in detection["rule_files"]],
                                "actions": detection["actions"]}
                    if ray_address == "local" or state_dir or os.environ.get("CORRAL_HOME"):
                        rc["state_dir"] = str(_state_dir(state_dir).resolve())  # else each node's default
                    summary = await run_rollout_ray(None if ray_address == "local" else ray_address, tasks, spec,
                                                    n=n, concurrency=concurrency, out=out_path, runtime_config=rc,
                                                    on_done=done)
                else:
                    rt = Runtime(RuntimeConfig(state_dir=_state_dir(state_dir), hosts=hosts,
                                               system_dns=not task_world, **detection))
                    try:
                        await rt.start()
                        summary = await run_rollout(rt, tasks, pol, n=n, concurrency=concurrency, out=out_path,
                                                    on_done=done)
                    finally:
                        await rt.close()
        finally:
            if world is not None:
                await asyncio.to_thread(world.close)
        t = Table(title=f"rollout: {summary.episodes} episode(s) in {out_path} "
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
            err.print(f"[red]episode {escape(t.episode_id)} ended in error:[/] {escape(str(why))[:300]}")
        if parquet is not None:
            to_parquet(read_jsonl(out_path), parquet)
            err.print(f"wrote {parquet}")
        return 1 if summary.errors or errored else 0

    try:
        raise typer.Exit(asyncio.run(main()))
    except CorralError as e:
        _fail_corral(e)


# -- benchmarks ------------------------------------------------------------------------------------
bench_app = typer.Typer(help="Benchmarks that measure corral itself.", no_args_is_help=True)
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
        "--make-holdout", help="Write cases/holdout.txt: a 25% sample of each corpus but corral's own, "
        "seeded with this number; run nothing.")] = None,
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
def _only_loopback() -> bool:
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return names == ["lo"]


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


def main() -> None:
    app()


if __name__ == "__main__":
    app()
