"""`corral run` and `corral shell`: a command, or an interactive session, in a sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli.app import app
from corral.cli.common import (
    ActionOpt,
    AllowOpt,
    CpusOpt,
    ImageOpt,
    MemOpt,
    PidsOpt,
    PolicyOpt,
    RulesOpt,
    StateDirOpt,
    TimeoutOpt,
    WorkspaceOpt,
    _detection,
    _exit_code,
    _fail,
    _fail_corral,
    _run_async,
    _sandbox_config,
    _state_dir,
    egress_table,
    err,
    out,
)
from corral.config import RuntimeConfig, SandboxConfig
from corral.errors import ConfigError, CorralError
from corral.events import Event, EventKind
from corral.text import clip

# the descriptors of our own stdout/stderr found closed (a reader that went away): written no more
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

    label = clip(f"run {command}", 500)
    async with Runtime(RuntimeConfig(state_dir=state_dir, run_kind="run", run_label=label, **detection)) as rt:
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
    async with Runtime(RuntimeConfig(state_dir=state_dir, run_kind="shell", run_label="shell")) as rt:
        with _away_from_terminal_signals():
            sb = await rt.create(cfg)
        await sb.create_session("main")
        err.print(f"[bold]corral shell[/] in sandbox {escape(sb.id)} "
                  "[dim](state persists between lines; 'exit' or Ctrl-D leaves, Ctrl-C interrupts)[/]")
        reader = _LineReader(loop)
        current: asyncio.Task | None = None

        def on_sigint() -> None:
            if current is not None and not current.done():
                if not current.cancelling():  # a second Ctrl-C while the first is handled: nothing more
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
                    # The interrupted command's processes are dead (Sandbox._run kills its step, sparing
                    # the session's shell), and the shell has finished it: the session goes on as it was.
                    # Only a shell stuck in the command itself (a builtin loop) is killed with it.
                    if "main" in sb.sessions():
                        err.print("\n[yellow]interrupted[/]")
                    else:
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
