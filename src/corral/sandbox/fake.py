"""A fake sandbox behind the real one's interface, for the logic above it: server, envs, episodes, rewards.

The project's rule stands: a test double belongs only where the real thing cannot run. This is the
documented seam for tests of logic that needs no isolation (`corral serve`, the trainer environments,
the episode engine and its rewards) and that until now needed root for every run. It is never a
replacement for the isolation tests, which run real sandboxes: nothing here isolates anything (no
namespaces, seccomp, cgroups or network), and a program is whatever a handler says it is.

Fake: the filesystem (`FakeFS`, paths to bytes; only /workspace, /tmp and /root writable, as the real
tmpfs mounts) and the programs. A command line is parsed with bashlex and interpreted here: lists (`;`,
`&&`, `||`, `&`), pipes, `!`, subshells and groups, redirects (`>`, `>>`, `<`, `2>&1`, `>&2`, `&>`),
`$VAR`, `${VAR}`, `$?`, `$(...)`, quotes and assignments. Built in: echo, printf, true, false, `:`, pwd,
cd, export, exit, test/[, cat, ls, mkdir, rm, head, dirname, chmod, sleep, dd, nohup, tar -c/-x, and
bash/sh (-c LINE, FILE). A simple command goes to the first matching handler registered with `on()` (the
sandbox's, then the runtime's), else to a built-in, else fails as bash does (127, "command not found").
No globbing, word splitting, loops, conditionals, functions or here-documents (exit 2 says so). `cmd &`
runs at once and leaves the programs it started alive as background processes of its step until killed.

Real: every event goes through `Runtime.emit` (corral's rules, store and responder). A command line is
pre-checked by the rules as Sandbox._precheck does (refused: nothing runs); every program a command runs,
built-in or scripted (not shell builtins such as echo), is a `process/exec` event judged before it runs
(refused: 126, "Operation not permitted"); a handler's `Connect` is decided by the egress policy
(`net.policy.decide`) on the first bytes as `net.sniff.classify` reads them, a name resolved as corral's
DNS would (the runtime's static `hosts`, allowed names only). Events carry sandbox, episode, step, command
and tool call; what a background process does later (`FakeSandbox.cause`) is attributed to the step that
started it. Findings, containment (kill, end_episode, quarantine) and rewards follow as for a real sandbox.

Not modelled: isolation and limits (no OOM, process or output-rate limits beyond output_bytes), file
monitoring (a handler reports a FILE event itself if it needs one), CPU and GPU samples, links and modes,
images (a config's image is not pulled), the job announcements of interactive sessions. A refused
`Connect` ends its command with exit 1 and "Connection reset by peer", as a client sees corral's reset.
`sync_runtime()` gives the blocking wrappers (ToolEpisode, SandboxEnv, TRL) over a FakeRuntime.

    script = Script()
    script.on("python3 -I tests/run.py", lambda call: (0, "1 passed\\n", ""))   # (exit code, stdout, stderr)
    @script.on("./opt.sh*")
    def miner(call: Call) -> Reply:
        return Reply(0, "optimising\\n", effects=[Exec(["xmrig", "--donate-level", "1"], background=True),
                                                 Connect("203.0.113.5", 3333, b'{"method":"mining.subscribe"}\\n')])
    async with FakeRuntime(RuntimeConfig(state_dir=tmp), script=script) as rt:
        sb = await rt.create(episode_id="ep-1")      # a FakeSandbox: exec, sessions, files, reset, close...
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import posixpath
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.config import RuntimeConfig, SandboxConfig
from corral.detect import Detector
from corral.detect import load as load_rules
from corral.detect.command import input_texts, too_long
from corral.detect.command import split as split_command
from corral.errors import FileAccessError, SandboxClosed, SessionError
from corral.events import Event, EventKind, Verdict
from corral.net.policy import decide, name_allowed
from corral.net.sniff import classify
from corral.runtime import Runtime
from corral.sandbox import ExecResult, OutputChunk, Session
from corral.sandbox.attribution import StepStats
from corral.sandbox.boundary import INTERNAL_STEP
from corral.sandbox.fakeshell import (
    Call,
    Connect,
    Exec,
    FakeFS,
    FakeProcess,
    FsError,
    Reply,
    Script,
    _is_ip,
    _Out,
    _Shell,
)
from corral.sandbox.files import Files
from corral.sandbox.lifeline import check_open
from corral.sandbox.sessions import running_session
from corral.store import Store
from corral.sync import SyncRuntime


# -- the runtime ----------------------------------------------------------------------------------------------
class FakeRuntime(Runtime):
    """corral's Runtime, rules, store, responder and emit() as they are, without root: start() makes no
    instance lock, network namespace, nftables table, cgroups, gateway, DNS server or monitor."""

    def __init__(self, config: RuntimeConfig | None = None, *, store: Store | None = None,
                 script: Script | None = None) -> None:
        super().__init__(config, store=store)
        self.script = script or Script()
        self.on = self.script.on

    async def start(self) -> FakeRuntime:
        if not self.started:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            if self._store is None:
                self._store = Store(self.config.store_url or self.config.state_dir / "corral.db")
            self._store.start_writer(self.config.budgets)
            if self.config.detection:
                self.detector = Detector(load_rules(list(self.config.rule_files)), self.config.actions)
            self.instance, self.started = 0, True  # no instance slot: nothing of the host is named after it
        return self

    async def create(self, config: SandboxConfig | None = None, *, sandbox_id: str | None = None,
                     episode_id: str | None = None) -> FakeSandbox:  # type: ignore[override]
        """A FakeSandbox, ready at once (an image named in the config is not pulled: there is no root)."""
        sb = FakeSandbox(config, runtime=self, sandbox_id=sandbox_id, episode_id=episode_id)
        await self.adopt(sb)
        return sb

    async def adopt(self, sb: FakeSandbox) -> None:  # type: ignore[override]
        if not self.started:
            await self.start()
        if sb.id in self.sandboxes:
            raise ValueError(f"sandbox id {sb.id!r} is in use; choose another")
        sb._runtime, sb._adopted = self, True
        await sb._populate()
        self.sandboxes[sb.id] = sb  # type: ignore[assignment]
        self.emit(Event(kind=EventKind.SANDBOX, action="created", sandbox_id=sb.id, episode_id=sb.episode_id,
                        data={"warm": False, "ip": None, "uid": 0, "cgroups": False, "fake": True}))

    async def prewarm(self, config: SandboxConfig | None = None, size: int = 4) -> None:
        """Nothing to warm: a fake sandbox is made at once."""

    async def release(self, sb: Any) -> None:
        self.sandboxes.pop(sb.id, None)

    async def close(self) -> None:
        if self.started:
            await asyncio.gather(*(sb.close() for sb in list(self.sandboxes.values())), return_exceptions=True)
            await self.drain()
            if self._store is not None:
                self._store.close()
            self.started = False


def sync_runtime(config: RuntimeConfig | None = None, *, script: Script | None = None) -> SyncRuntime:
    """A SyncRuntime over a FakeRuntime (for ToolEpisode, SandboxEnv, the TRL environment); start() it."""
    rt = SyncRuntime(config)
    rt.async_runtime = FakeRuntime(config, script=script)
    return rt


# -- the sandbox ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Flight:
    """A command in flight: its future is resolved by the interpreter, or by whatever ends it first."""

    step: int
    session: str | None
    future: asyncio.Future
    task: asyncio.Task | None = None

    def end(self, result: tuple[int | None, str | None] | BaseException) -> None:
        if not self.future.done():
            (self.future.set_exception if isinstance(result, BaseException) else self.future.set_result)(result)
        if self.task is not None:
            self.task.cancel()


class FakeSandbox:
    """corral.sandbox.sandbox.Sandbox's public interface, same signatures and errors, over a FakeFS."""

    def __init__(self, config: SandboxConfig | None = None, *, runtime: FakeRuntime | None = None,
                 sandbox_id: str | None = None, episode_id: str | None = None) -> None:
        self.config = config or SandboxConfig()
        self._runtime, self._adopted = runtime, False
        self.id = sandbox_id or "sb-" + os.urandom(5).hex()
        self.episode_id = episode_id
        self.step, self.generation, self.first_step = 0, 0, 1  # steps count on across resets
        self.closed = self.frozen = False
        self.terminated: str | None = None
        self.created_at = time.time()
        self.net = self.cgroup = None
        self.uid = 0
        self.fs = FakeFS()
        self.script = Script()  # this sandbox's own handlers, tried before the runtime's
        self.on = self.script.on
        self._steps: dict[int, tuple[str, str | None, str | None]] = {}  # step -> command, episode, tool call
        self._stats: dict[int, StepStats] = {}
        self._sessions: dict[str, Session] = {}
        self._shells: dict[str, dict[str, Any]] = {}  # a session's shell state: env and cwd
        self._flights: set[_Flight] = set()
        self._procs: dict[int, FakeProcess] = {}
        self._resolved: dict[str, set[str]] = {}  # ip -> names this sandbox resolved to it

    # -- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    async def create(cls, config: SandboxConfig | None = None, *, runtime: FakeRuntime | None = None,
                     **kw: Any) -> FakeSandbox:
        if runtime is None:
            raise ValueError("a FakeSandbox needs its FakeRuntime: FakeSandbox.create(config, runtime=rt)")
        return await runtime.create(config, **kw)

    async def __aenter__(self) -> FakeSandbox:
        if not self._adopted and not self.closed:
            if self._runtime is None:
                raise ValueError("a FakeSandbox needs its FakeRuntime: FakeSandbox(config, runtime=rt)")
            await self._runtime.adopt(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def runtime(self) -> FakeRuntime:
        assert self._runtime is not None
        return self._runtime

    async def _populate(self) -> None:
        if self.config.workspace_template is not None:
            await self.upload(self.config.workspace_template, "/workspace")

    def _teardown(self) -> None:
        for fl in list(self._flights):
            fl.end(SandboxClosed(f"sandbox {self.id} was stopped while the command ran"))
        self._kill(lambda p: True)
        self._sessions.clear()
        self._shells.clear()

    async def reset(self) -> None:
        """Back to the initial workspace, every process and session gone; id, config and step count stay."""
        self._check_open(allow_terminated=True)
        t0 = time.perf_counter()
        self.generation += 1
        self.first_step = self.step + 1
        self._teardown()
        self.terminated, self.fs, self._resolved = None, FakeFS(), {}
        await self._populate()
        self._emit(Event(kind=EventKind.SANDBOX, action="reset", sandbox_id=self.id,
                         data={"duration": time.perf_counter() - t0}))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._teardown()
            if self._runtime is not None:
                await self._runtime.release(self)
            self._emit(Event(kind=EventKind.SANDBOX, action="closed", sandbox_id=self.id, step=self.step))

    def _check_open(self, *, allow_terminated: bool = False) -> None:
        check_open(self, allow_terminated=allow_terminated)

    async def freeze(self, reason: str = "") -> None:
        """Quarantine: processes stay as they are; commands still running end with the quarantine as error."""
        self.frozen = True
        self.generation += 1
        for fl in list(self._flights):
            fl.end((None, f"sandbox quarantined ({reason or 'by request'}): its processes are frozen for "
                          "inspection; call release() to let them run"))
            if fl.session is not None:
                await self.close_session(fl.session)
        self._emit(Event(kind=EventKind.SANDBOX, action="frozen", sandbox_id=self.id, reason=reason or None))

    async def release(self) -> None:
        self.frozen = False
        self.generation += 1
        self._emit(Event(kind=EventKind.SANDBOX, action="released", sandbox_id=self.id))

    async def end_episode(self, reason: str, finding: object | None = None) -> None:
        self.terminated = reason
        try:
            await self.kill_all()
        finally:
            self._emit(Event(kind=EventKind.SANDBOX, action="episode_ended", sandbox_id=self.id,
                             episode_id=self.episode_id, step=self.step, reason=reason))

    # -- processes ------------------------------------------------------------------------------------------
    def _kill(self, which: Callable[[FakeProcess], bool]) -> int:
        dead = [p for p in self._procs.values() if p.alive and which(p)]
        for p in dead:
            p.alive = False
        return len(dead)

    def processes(self) -> list[FakeProcess]:
        """The fake processes alive now: background programs, and those of commands running."""
        return [p for p in self._procs.values() if p.alive]

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def live_steps(self) -> list[int]:
        return sorted({p.step for p in self.processes() if p.step} | {f.step for f in self._flights if f.step})

    def busy(self) -> bool:
        return bool(self._flights or self.processes())

    async def kill_step(self, step: int) -> int:
        """A step's processes die; its running command ends killed (-9; in a session 137: the shell lives)."""
        for fl in [f for f in self._flights if f.step == step]:
            fl.end((137, None) if fl.session else (-9, None))
        return self._kill(lambda p: p.step == step)

    async def kill_steps(self) -> int:
        return sum([await self.kill_step(s) for s in self.live_steps()])

    async def kill_all(self) -> int:
        """Every process and session shell dies; commands running end killed."""
        for fl in list(self._flights):
            fl.end((None, "session shell exited with status -9") if fl.session else (-9, None))
        for s in self._sessions.values():
            s.alive = False
        self._sessions.clear()
        self._shells.clear()
        return self._kill(lambda p: True)

    def stats_for(self, step: int) -> StepStats:
        return self._stats.setdefault(step, StepStats())

    def step_stats(self, step: int) -> dict[str, float | int]:
        return self.stats_for(step).as_dict()

    # -- commands -------------------------------------------------------------------------------------------
    async def exec(self, cmd: str, *, timeout: float | None = None, env: dict[str, str] | None = None,
                   cwd: str | None = None, stdin: bytes | str | None = None,
                   on_output: Callable[[OutputChunk], None] | None = None,
                   max_output: int | None = None, tool_call_id: str | None = None,
                   _internal: bool = False) -> ExecResult:
        """Run `cmd` in a fresh shell: no state carries over."""
        self._check_open()
        shell = {"env": self._base_env(env), "cwd": self.fs.norm(cwd or self.config.workdir)}
        data = stdin.encode() if isinstance(stdin, str) else stdin or b""
        return await self._command(cmd, None, shell, timeout, data, on_output, max_output, tool_call_id, _internal)

    async def stream(self, cmd: str, **kw: Any) -> AsyncIterator[OutputChunk | ExecResult]:
        """Yield output chunks as they come (one per write of a program), then the ExecResult."""
        q: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.exec(cmd, on_output=q.put_nowait, **kw))
        task.add_done_callback(lambda _t: q.put_nowait(None))
        while (item := await q.get()) is not None:
            yield item
        yield await task

    def _base_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                "USER": "root", "LANG": "C.UTF-8", "TERM": "xterm", "SHELL": self.config.shell,
                "CORRAL_SANDBOX": self.id, **dict(self.config.env), **(extra or {})}

    def _precheck(self, cmd: str, step: int, session: str | None = None,
                  stdin: bytes | None = None) -> ExecResult | None:
        """As Sandbox._precheck: each program the line would run is judged before anything runs, with
        any text given on its standard input."""
        if self._runtime is None or self._runtime.detector is None:
            return None
        why = too_long(cmd)
        checks = [] if why else [(text, simple) for text in input_texts(cmd, stdin) or [None]
                                 for simple in split_command(cmd)]
        for text, simple in checks:
            ev = Event(kind=EventKind.COMMAND, action="check", sandbox_id=self.id, episode_id=self.episode_id,
                       step=step, command=cmd, argv=simple.argv,
                       data={"redirects": simple.redirects, "writes": simple.writes, "session": session,
                             "tool_call_id": self._steps[step][2], "protected": self.config.protected_paths,
                             **({"text": text} if text else {})})
            j = self._runtime.emit(ev, persist=False)
            if j is not None and j.blocks:
                why = (f"refused by rule {j.rule.id}: {j.rule.title}" if j.rule is not None else j.reason) or "refused"
                break
        if why is not None:
            self._emit(Event(kind=EventKind.COMMAND, action="refused", sandbox_id=self.id, step=step,
                             episode_id=self.episode_id, command=cmd, verdict=Verdict.DENY, reason=why))
            return ExecResult(exit_code=None, stdout_bytes=b"", stderr_bytes=b"", duration=0.0, step=step,
                              refused=True, error=why)
        return None

    async def _command(self, cmd: str, session: str | None, shell: dict[str, Any], timeout: float | None,
                       stdin: bytes, on_output: Callable[[OutputChunk], None] | None, max_output: int | None,
                       tool_call_id: str | None, internal: bool) -> ExecResult:
        step = INTERNAL_STEP
        if not internal:
            self.step = step = self.step + 1
            self._steps[step] = (cmd, self.episode_id, tool_call_id)
            if session is not None:
                self._sessions[session].last_step = step
            if (refusal := self._precheck(cmd, step, session, stdin)) is not None:
                return refusal
            self._emit(Event(kind=EventKind.COMMAND, action="start", sandbox_id=self.id, step=step, command=cmd,
                             episode_id=self.episode_id, data={"session": session, "tool_call_id": tool_call_id}))
        timeout = timeout if timeout is not None else self.config.limits.timeout
        out = _Out(max_output or self.config.limits.output_bytes, on_output,
                   session is not None and self._sessions[session].interactive)
        sh = _Shell(self, shell, out, step, cmd, internal)
        fl = _Flight(step, session, asyncio.get_running_loop().create_future())
        fl.task = asyncio.ensure_future(sh.top(cmd, stdin, session is not None))
        fl.task.add_done_callback(lambda t: t.cancelled() or fl.end(t.exception() or t.result()))
        self._flights.add(fl)
        t0, timed_out, error = time.perf_counter(), False, None
        try:
            code, error = await asyncio.wait_for(asyncio.shield(fl.future), timeout)
        except TimeoutError:
            timed_out, code = True, (137 if session else -9)
            error = f"timed out after {timeout:g}s; the command's whole process tree was killed"
            fl.task.cancel()
        except asyncio.CancelledError:  # the caller gave up: the command does not live on
            fl.task.cancel()
            if not internal:
                self._emit(Event(kind=EventKind.COMMAND, action="exit", sandbox_id=self.id, step=step, command=cmd,
                                 episode_id=self.episode_id,
                                 data={"exit_code": None, "interrupted": True, "session": session}))
            raise
        finally:
            self._flights.discard(fl)
            self._kill(lambda p: p.pid in sh.foreground)
        if session is not None and code is None and session in self._sessions:  # its shell is gone (exit)
            self._sessions.pop(session).alive = False
        res = ExecResult(exit_code=code, stdout_bytes=bytes(out.buf[1]), stderr_bytes=bytes(out.buf[2]),
                         duration=time.perf_counter() - t0, step=step, stdout_truncated=out.dropped[0] > 0,
                         stderr_truncated=out.dropped[1] > 0, timed_out=timed_out, error=error)
        if not internal:
            self._emit(Event(kind=EventKind.COMMAND, action="exit", sandbox_id=self.id, step=step, command=cmd,
                             episode_id=self.episode_id,
                             data={"exit_code": code, "duration": res.duration, "timed_out": timed_out,
                                   "stdout_bytes": len(out.buf[1]) + out.dropped[0],
                                   "stderr_bytes": len(out.buf[2]) + out.dropped[1], "truncated": res.truncated,
                                   "oom_killed": False, "pids_limit_hit": False, "error": error,
                                   "session": session, **self.step_stats(step)}))
        return res

    # -- sessions -------------------------------------------------------------------------------------------
    async def create_session(self, name: str = "default", *, env: dict[str, str] | None = None,
                             cwd: str | None = None, interactive: bool = False, user: str | None = None) -> Session:
        self._check_open()
        if user is not None and self.config.image is None:
            raise SessionError(f"session user {user!r}: only an image sandbox has users of its own; "
                               "run the sandbox on an image (SandboxConfig.image)")
        if name in self._sessions and self._sessions[name].alive:
            raise SessionError(f"session {name!r} already exists in sandbox {self.id}; close it first")
        s = self._sessions[name] = Session(self, name)  # type: ignore[arg-type]
        s.interactive = interactive
        self._shells[name] = {"env": self._base_env(env), "cwd": self.fs.norm(cwd or self.config.workdir)}
        return s

    async def run_in_session(self, name: str, cmd: str, *, timeout: float | None = None,
                             env: dict[str, str] | None = None, cwd: str | None = None,
                             on_output: Callable[[OutputChunk], None] | None = None,
                             max_output: int | None = None, tool_call_id: str | None = None) -> ExecResult:
        running_session(self, name)  # open, and the session alive
        shell = self._shells[name]
        if env or cwd:  # for this command only
            shell = {"env": {**shell["env"], **(env or {})}, "cwd": self.fs.norm(cwd or shell["cwd"])}
        return await self._command(cmd, name, shell, timeout, b"", on_output, max_output, tool_call_id, False)

    async def close_session(self, name: str) -> None:
        s = self._sessions.pop(name, None)
        self._shells.pop(name, None)
        if s is not None:
            s.alive = False

    def sessions(self) -> list[str]:
        return [n for n, s in self._sessions.items() if s.alive]

    # -- files ----------------------------------------------------------------------------------------------
    async def write_file(self, path: str, data: bytes | str, *, mode: int | None = None, as_step: bool = False,
                         tool_call_id: str | None = None) -> None:
        """corral's own write (no step, parents made), or with `as_step` the real one's command line as a step."""
        data = data.encode() if isinstance(data, str) else data
        if as_step:
            q = shlex.quote(path)
            chmod = f" && chmod {mode:o} -- {q}" if mode is not None else ""
            r = await self.exec(f"mkdir -p -- \"$(dirname -- {q})\" && cat > {q}{chmod}", stdin=data,
                                tool_call_id=tool_call_id)
            if r.exit_code != 0:
                raise FileAccessError(f"cannot write {path} in sandbox {self.id}: {r.error or r.stderr.strip()}")
            return
        self._check_open()
        try:
            self.fs.mkdir(posixpath.dirname(self.fs.norm(path)), parents=True)
            self.fs.write(self.fs.norm(path), data)
        except FsError as e:
            raise FileAccessError(f"cannot write {path} in sandbox {self.id}: {e}") from None

    read_file = Files.read_file  # `cat` through exec, as in a real sandbox

    async def upload(self, src: str | Path, dest: str) -> None:
        """A host file or directory into the sandbox; links are left out (the fake has none)."""
        src = Path(src)
        if not src.exists():
            raise FileAccessError(f"{src} does not exist on the host")
        if src.is_file():
            return await self.write_file(dest, src.read_bytes())
        self._check_open()
        for f in [src, *sorted(src.rglob("*"))]:
            target = self.fs.norm(posixpath.join(dest, f.relative_to(src).as_posix()))
            try:
                if f.is_dir() and not f.is_symlink():
                    self.fs.mkdir(target, parents=True)
                elif f.is_file() and not f.is_symlink():
                    self.fs.write(target, f.read_bytes())
            except FsError as e:
                raise FileAccessError(f"cannot write {target} in sandbox {self.id}: {e}") from None

    async def download(self, src: str, dest: str | Path, *, max_bytes: int = 256 << 20) -> list[str]:
        """A sandbox file or directory to the host; returns what was skipped (nothing: the fake has no links)."""
        self._check_open()
        dest, p = Path(dest), self.fs.norm(src)
        try:
            tree = self.fs.tree(p) if self.fs.is_dir(p) else [("", self.fs.read(p))]
        except FsError as e:
            raise FileAccessError(f"cannot download {src}: cat: {e}") from None
        if sum(len(data or b"") for _, data in tree) > max_bytes:
            raise FileAccessError(f"{src} is larger than max_bytes={max_bytes}")
        (dest if self.fs.is_dir(p) else dest.parent).mkdir(parents=True, exist_ok=True)
        for rel, data in tree:  # parents first
            if data is None:
                (dest / rel).mkdir(exist_ok=True)
            else:
                (dest / rel if rel else dest).write_bytes(data)
        return []

    # -- effects and attribution ----------------------------------------------------------------------------
    async def cause(self, effect: Exec | Connect | Event, *, pid: int) -> bool:
        """What live background process `pid` does now (it connects, say, steps after it started): attributed
        by lineage to the step that started it. False when corral refused it."""
        p = self._procs.get(pid)
        if p is None or not p.alive:
            raise ProcessLookupError(f"no live process {pid} in sandbox {self.id}")
        return self._cause(effect, p, p.step or INTERNAL_STEP, "/workspace")

    def attribute(self, ev: Event, sock: tuple[str, int] | None = None, pid: int | None = None,
                  group: tuple[str, int] | None = None) -> None:
        """As Sandbox.attribute: episode, step, command, tool call and process, here from fake process `pid`."""
        ev.sandbox_id = self.id
        if (p := self._procs.get(pid or -1)) is not None:
            ev.pid, ev.ppid, ev.exe, ev.argv, ev.step = p.pid, p.ppid, p.exe, p.argv, p.step or ev.step
        if ev.kind == EventKind.CONNECT and ev.action == "connect" and ev.step:
            self.stats_for(ev.step).connections += 1
        if ev.step in self._steps:
            ev.command, ev.episode_id, tool_call = self._steps[ev.step]  # type: ignore[index]
            if tool_call:
                ev.data.setdefault("tool_call_id", tool_call)
        ev.episode_id = ev.episode_id or self.episode_id

    def _spawn(self, argv: list[str], exe: str | None, step: int, parent: FakeProcess | None, cwd: str,
               internal: bool) -> FakeProcess | None:
        """A program about to run, judged as corral's exec watcher judges one: None when refused."""
        exe = exe or (self.fs.norm(argv[0], cwd) if "/" in argv[0] else f"/usr/bin/{argv[0]}")
        p = FakeProcess(1000 + len(self._procs), step or None, argv, exe, parent.pid if parent else None)
        self._procs[p.pid] = p
        if internal or self._runtime is None:
            return p
        ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id=self.id,
                   data={"cwd": cwd, "gpu_granted": self.config.gpu,
                         "parent_name": posixpath.basename(parent.argv[0]) if parent else "bash",
                         **({"protected": self.config.protected_paths} if self.config.protected_paths else {})})
        self.attribute(ev, pid=p.pid)
        if step:
            self.stats_for(step).processes += 1
        j = self._runtime.emit(ev)
        p.alive = not (j is not None and (j.errors or j.blocks))
        return p if p.alive else None

    def _cause(self, effect: Exec | Connect | Event, proc: FakeProcess | None, step: int, cwd: str) -> bool:
        if isinstance(effect, Exec):
            p = self._spawn(effect.argv, effect.exe, step, proc, cwd, False)
            if p is not None:
                p.alive = effect.background
            return p is not None
        if isinstance(effect, Connect):
            return self._connect(effect, proc, step)
        effect.step = effect.step or step or None
        self.attribute(effect, pid=proc.pid if proc else None)
        j = self._emit(effect)
        return not (j is not None and j.blocks)

    def _connect(self, c: Connect, proc: FakeProcess | None, step: int) -> bool:
        """As corral's gateway judges a connection: the policy, then the rules, on the first bytes."""
        ip, pid = c.host, proc.pid if proc else None
        if _is_ip(ip) and ipaddress.ip_address(ip).is_loopback:
            return True  # the sandbox's own loopback never reaches corral
        if not _is_ip(ip) and not (ip := self._resolve(c.host, pid, step)):
            return False
        names, sniff = self._resolved.get(ip, set()), classify(c.data)
        d = decide(self.config.egress, ip, c.port, names, sniff.name)
        ev = Event(kind=EventKind.CONNECT, action="connect", sandbox_id=self.id, dst_ip=ip, dst_port=c.port,
                   step=step or None, protocol=sniff.protocol, name=sniff.name or d.name or min(names, default=None),
                   verdict=Verdict.ALLOW if d.allow else Verdict.DENY, reason=d.reason,
                   bytes_up=None if d.allow else 0, bytes_down=None if d.allow else 0,
                   data={"first_bytes": len(c.data), "resolved": sorted(names),
                         **({"sniff": sniff.detail} if sniff.detail else {})})
        self.attribute(ev, pid=pid)
        self._emit(ev)
        if ev.verdict != Verdict.ALLOW:
            return False
        close = Event(kind=EventKind.CONNECT, action="close", sandbox_id=self.id, step=ev.step, dst_ip=ip,
                      dst_port=c.port, verdict=Verdict.ALLOW, bytes_up=len(c.data), bytes_down=len(c.response),
                      name=ev.name, protocol=ev.protocol, data={"connect_event": ev.id})
        self.attribute(close, pid=pid)
        self._emit(close)
        return True

    def _resolve(self, name: str, pid: int | None, step: int) -> str:
        """As corral's DNS answers: an allowed name from the runtime's static hosts; '' for NXDOMAIN."""
        name = name.rstrip(".").lower()
        allowed = self.config.egress.dns and name_allowed(self.config.egress, name)
        answers = list(self.runtime.config.hosts.get(name, [])) if allowed else []
        ev = Event(kind=EventKind.DNS, action="query", sandbox_id=self.id, name=name, protocol="dns",
                   verdict=Verdict.ALLOW if allowed else Verdict.DENY, step=step or None,
                   reason=("allowed name" if answers else "allowed name did not resolve") if allowed
                   else "name not allowed by the egress policy", data={"qtype": "A", "answers": answers})
        self.attribute(ev, pid=pid)
        self._emit(ev)
        for ip in answers if ev.verdict == Verdict.ALLOW else []:
            self._resolved.setdefault(ip, set()).add(name)
        return answers[0] if answers and ev.verdict == Verdict.ALLOW else ""

    def _emit(self, ev: Event) -> Any:
        return self._runtime.emit(ev) if self._runtime is not None else None


__all__ = ["Call", "Connect", "Exec", "FakeFS", "FakeRuntime", "FakeSandbox", "Reply", "Script", "sync_runtime"]
