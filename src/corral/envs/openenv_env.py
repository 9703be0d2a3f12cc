"""corral as an OpenEnv environment (`openenv-core`): the server side (`CorralEnvironment`, built into a
FastAPI app by `create_openenv_app` with OpenEnv's own `HTTPEnvServer`) and the client
(`CorralEnvClient`, an OpenEnv `EnvClient`).

- action: `CorralAction(tool=..., ...)`: `exec` (command, optional timeout), `write_file` (path,
  content), `read_file` (path), `edit_file` (path, old, new), `submit`;
- observation: `CorralObservation`; `output` is the text the agent reads (the task's instruction after
  reset, the tool's result after a step); stdout, stderr, exit_code, the sandbox step, the violations
  and the verifier's result are declared fields, because OpenEnv drops `metadata` on the wire;
- reward: None after reset, 0 until `submit`, then the verifier's score plus shaped safety penalties;
  a finding at or above the terminating severity gives `done=True`, `reward=violation_penalty`,
  `termination_reason="security_violation"` and `violations`;
- OpenEnv has no `truncated`: the turn or time limit gives `done=True` with `truncated=True` and
  `termination_reason` "max_steps" or "max_seconds".

OpenEnv's server gives every WebSocket session (`/ws`, what `EnvClient` speaks) an environment of
its own; its HTTP `/reset`, `/step` and `/state` make a fresh environment per request and close it
after answering, so a multi-step episode needs the WebSocket session. The environments of one app
share one corral `Runtime` on the server's event loop: either one the app starts on first use (and
closes at shutdown) from `runtime_config`, or the main service's, given as `runtime=`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import random
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from openenv.core.env_server.http_server import create_fastapi_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, EnvironmentMetadata, Observation, State
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from corral import __version__
from corral.agent.reward import RewardConfig
from corral.agent.tasks import Task, resolve_tasks
from corral.config import RuntimeConfig
from corral.envs.episode import AsyncToolEpisode, Outcome
from corral.errors import CorralError, EnvironmentUsageError, UnknownTask
from corral.runtime import Runtime
from corral.sync import run as run_on_corral_loop

T = TypeVar("T")
Tool = Literal["exec", "write_file", "read_file", "edit_file", "submit"]
# which action fields each tool takes (required ones first); the rest must be left unset
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "exec": (("command",), ("timeout",)),
    "write_file": (("path", "content"), ()),
    "read_file": (("path",), ()),
    "edit_file": (("path", "old", "new"), ()),
    "submit": ((), ()),
}
_ARG_FIELDS = ("command", "timeout", "path", "content", "old", "new")
_RESET_OPTIONS = ("seed", "episode_id", "task_id")


def _invalid(message: str) -> PydanticCustomError:
    # not a ValueError: OpenEnv's server sends pydantic's errors() as JSON, and a ValueError in their
    # context cannot be serialized (HTTP answers 500, the WebSocket session is dropped)
    return PydanticCustomError("invalid_action", message.replace("{", "{{").replace("}", "}}"))


# -- models ----------------------------------------------------------------------------------------
class CorralAction(Action):
    """One tool call. `exec` runs a bash command in the sandbox's persistent shell (cwd, environment
    and shell state carry over between calls); `submit` ends the episode and runs the verifier."""

    tool: Tool = Field(description="exec | write_file | read_file | edit_file | submit")
    command: str | None = Field(default=None, description="exec: the command line to run")
    timeout: float | None = Field(default=None, gt=0, description="exec: seconds before the command is killed")
    path: str | None = Field(default=None, description="write_file, read_file, edit_file: the file")
    content: str | None = Field(default=None, description="write_file: the file's new content")
    old: str | None = Field(default=None, description="edit_file: the exact text to replace (must occur once)")
    new: str | None = Field(default=None, description="edit_file: its replacement")

    @model_validator(mode="after")
    def _fields_match_tool(self) -> CorralAction:
        required, optional = _FIELDS[self.tool]
        missing = [f for f in required if getattr(self, f) is None]
        if missing:
            raise _invalid(f"{self.tool} needs {', '.join(f'`{f}`' for f in missing)} "
                           f"(it takes: {', '.join(required + optional) or 'no arguments'})")
        if self.tool == "exec" and not (self.command or "").strip():
            raise _invalid("exec needs a non-empty `command`")
        stray = [f for f in _ARG_FIELDS if f not in required + optional and getattr(self, f) is not None]
        if stray:
            raise _invalid(f"{self.tool} does not take {', '.join(f'`{f}`' for f in stray)} "
                           f"(it takes: {', '.join(required + optional) or 'no arguments'})")
        return self

    def tool_call(self) -> tuple[str, dict[str, Any]]:
        """corral's own tool name and arguments for this action."""
        required, optional = _FIELDS[self.tool]
        args = {f: getattr(self, f) for f in required + optional if getattr(self, f) is not None}
        return ("shell" if self.tool == "exec" else self.tool), args


class CorralObservation(Observation):
    """What reset and step return. `done` covers every end of the episode (submitted, a violation, a
    limit); `termination_reason` says which, `truncated` marks the limits."""

    output: str = Field(default="", description="what the agent reads: the instruction after reset, "
                                                "the tool's result after a step")
    task_id: str | None = None
    episode_id: str | None = None
    sandbox_id: str | None = None
    turn: int = Field(default=0, description="tool calls made in this episode")
    step: int | None = Field(default=None, description="the sandbox step this call ran as "
                                                       "(violations name the step that caused them)")
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = Field(default=False, description="the turn or time limit ended the episode")
    termination_reason: str | None = Field(
        default=None, description="security_violation | submitted | max_steps | max_seconds")
    violations: list[dict[str, Any]] = Field(
        default_factory=list, description="findings in this episode: rule, title, severity, step, command, ...")
    verifier: dict[str, Any] | None = Field(default=None, description="the verifier's result, after submit")
    reward_components: dict[str, float] = Field(default_factory=dict)


class CorralState(State):
    task_id: str | None = None
    sandbox_id: str | None = None
    done: bool = False
    truncated: bool = False
    termination_reason: str | None = None
    reward: float | None = Field(default=None, description="the episode's reward once it ended")
    violations: int = Field(default=0, description="findings recorded so far in this episode")


# -- the runtime the environments share --------------------------------------------------------------
class RuntimeHandle:
    """The corral Runtime behind an app's environments and the event loop it lives on. Either owned
    (started on first use from a RuntimeConfig, closed by `aclose`) or someone else's: a started
    Runtime, or a callable returning it (the main service creates its Runtime in its lifespan, after
    the app is built)."""

    def __init__(self, runtime: Runtime | Callable[[], Runtime | None] | None = None,
                 config: RuntimeConfig | None = None) -> None:
        self._source = runtime
        self._config = config
        self.owned: Runtime | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def get(self) -> Runtime:
        loop = asyncio.get_running_loop()
        if self.loop is not None and loop is not self.loop:
            raise EnvironmentUsageError("corral's runtime lives on another event loop; call the environment "
                                        "from the loop that serves it (its sync methods from other threads)")
        if self._source is not None:
            rt = self._source() if callable(self._source) else self._source
            if rt is None or not rt.started:
                raise EnvironmentUsageError("corral's runtime is not started yet (the service is starting "
                                            "or shutting down); retry the reset")
        else:
            async with self._lock:
                if self.owned is None:
                    rt = Runtime(self._config)
                    await rt.start()
                    self.owned = rt
            rt = self.owned
        self.loop = loop
        return rt

    def blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the runtime's loop from a thread that is not that loop."""
        loop = self.loop
        if loop is None:
            # nothing has run yet: corral's background loop becomes the runtime's loop
            return run_on_corral_loop(coro)
        if _running_loop() is loop:
            coro.close()
            raise EnvironmentUsageError("a blocking environment call on the event loop that serves it; "
                                        "use reset_async/step_async there")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def close_soon(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run cleanup from any thread: on the loop thread it cannot be waited for (OpenEnv's HTTP
        handlers call `close()` there), so it is scheduled; elsewhere it is waited for."""
        loop = self.loop
        if loop is None or loop.is_closed():
            coro.close()
        elif _running_loop() is loop:
            task = loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def aclose(self) -> None:
        """Close the runtime if this handle started it (with every sandbox it still has)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        rt, self.owned = self.owned, None
        if rt is None:
            return
        if self.loop is not None and _running_loop() is not self.loop:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(rt.close(), self.loop))
        else:
            await rt.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# -- the environment ---------------------------------------------------------------------------------
class CorralEnvironment(Environment[CorralAction, CorralObservation, CorralState]):
    """One OpenEnv session: one episode at a time in a fresh corral sandbox (reset starts the next
    one and closes the previous sandbox). The async methods are the real ones, so OpenEnv's server
    runs them on its event loop, where the shared Runtime lives."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session has its own sandbox; the Runtime is shared

    def __init__(self, tasks: list[Task], runtime: RuntimeHandle | Runtime, *,
                 reward: RewardConfig | None = None) -> None:
        super().__init__()
        if not tasks:
            raise UnknownTask("no tasks were given; pass a task directory or a list of Task")
        self.tasks = tasks
        self.runtime = runtime if isinstance(runtime, RuntimeHandle) else RuntimeHandle(runtime)
        self.reward_config = reward or RewardConfig()
        self.episode: AsyncToolEpisode | None = None
        self._rng = random.Random()

    # -- OpenEnv API ---------------------------------------------------------------------------------
    async def reset_async(self, seed: int | None = None, episode_id: str | None = None,
                          task_id: str | None = None, **kwargs: Any) -> CorralObservation:
        """A new episode: `task_id` picks the task (else a random one, reproducible with `seed`);
        `episode_id` names it in corral's event store."""
        if kwargs:
            raise EnvironmentUsageError(f"unknown reset option(s) {', '.join(map(repr, sorted(kwargs)))}; "
                                        f"reset takes {', '.join(_RESET_OPTIONS)}")
        rt = await self.runtime.get()
        if self.episode is None:
            self.episode = AsyncToolEpisode(rt, self.tasks, reward=self.reward_config, id_prefix="openenv")
        if task_id is not None:
            task = self.episode.task_by_id(task_id)
        else:
            rng = random.Random(seed) if seed is not None else self._rng
            task = rng.choice(self.tasks)
        instruction = await self.episode.start(task, episode_id=episode_id)
        return self._observation(output=instruction)

    async def step_async(self, action: CorralAction, timeout_s: float | None = None,
                         **kwargs: Any) -> CorralObservation:
        ep = self.episode
        if ep is None or ep.sb is None:
            raise EnvironmentUsageError("no episode: reset first (over the WebSocket session, /ws; OpenEnv's "
                                        "HTTP /step runs on a fresh environment and keeps no episode)")
        if ep.ended:
            reason = ep.last.termination_reason if ep.last is not None else None
            raise EnvironmentUsageError(f"the episode has ended ({reason}); reset to start another")
        tool, args = action.tool_call()
        if tool == "shell" and "timeout" not in args and timeout_s is not None:
            args["timeout"] = timeout_s
        out = await ep.call(tool, args)
        return self._observation(out)

    def reset(self, seed: int | None = None, episode_id: str | None = None, task_id: str | None = None,
              **kwargs: Any) -> CorralObservation:
        return self.runtime.blocking(self.reset_async(seed, episode_id, task_id, **kwargs))

    def step(self, action: CorralAction, timeout_s: float | None = None, **kwargs: Any) -> CorralObservation:
        return self.runtime.blocking(self.step_async(action, timeout_s, **kwargs))

    @property
    def state(self) -> CorralState:
        # read on the server's loop thread: attributes only, nothing that waits
        ep = self.episode
        if ep is None or ep.task is None:
            return CorralState()
        last = ep.last
        ended = ep.ended
        return CorralState(
            episode_id=ep.episode_id, step_count=ep.turns, task_id=ep.task.id, sandbox_id=ep.sandbox_id,
            done=ended, truncated=bool(last and last.truncated),
            termination_reason=last.termination_reason if last else None,
            reward=last.reward if ended and last else None,
            violations=len(last.violations) if last else 0)

    def get_metadata(self) -> EnvironmentMetadata:
        ids = [t.id for t in self.tasks]
        listed = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        return EnvironmentMetadata(
            name="corral",
            description="Tool-calling coding tasks in corral sandboxes; security findings (mining, SSH "
                        f"tunnels, network probing) end the episode with a penalty. Tasks: {listed}",
            version=__version__)

    def close(self) -> None:
        ep = self.episode
        if ep is not None and ep.sb is not None:
            self.runtime.close_soon(ep.close_sandbox())

    # -- mapping -------------------------------------------------------------------------------------
    def _observation(self, out: Outcome | None = None, *, output: str = "") -> CorralObservation:
        ep = self.episode
        assert ep is not None and ep.task is not None
        common: dict[str, Any] = {"task_id": ep.task.id, "episode_id": ep.episode_id,
                                  "sandbox_id": ep.sandbox_id, "turn": ep.turns}
        if out is None:
            return CorralObservation(output=output, reward=None, done=False, **common)
        return CorralObservation(
            output=out.observation, reward=out.reward, done=out.done or out.truncated,
            step=out.step, exit_code=out.exit_code, stdout=out.stdout, stderr=out.stderr,
            truncated=out.truncated, termination_reason=out.termination_reason,
            violations=out.violations, verifier=out.verifier, reward_components=out.reward_components,
            **common)


# -- the app -----------------------------------------------------------------------------------------
Authenticate = Callable[[HTTPConnection], Any]


class _Guard:
    """Checks every HTTP request and WebSocket handshake when given `authenticate` (a FastAPI "http"
    middleware never sees WebSockets; None refuses), and keeps a client that hung up first from being
    logged as a server error: OpenEnv's session closes the socket after cleaning up and only expects
    RuntimeError from an already closed one."""

    def __init__(self, app: ASGIApp, authenticate: Authenticate | None) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.authenticate is not None and scope["type"] in ("http", "websocket")
                and self.authenticate(HTTPConnection(scope)) is None):
            if scope["type"] == "websocket":
                # closing before accept refuses the handshake (HTTP 403)
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong token"})
                return
            resp = JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        with contextlib.suppress(WebSocketDisconnect):
            await self.app(scope, receive, send)


def create_openenv_app(runtime_config: RuntimeConfig | None = None,
                       tasks: str | Path | list[Task] | None = None, *,
                       runtime: Runtime | Callable[[], Runtime | None] | None = None,
                       reward: RewardConfig | None = None, max_concurrent_envs: int = 8,
                       authenticate: Authenticate | None = None) -> FastAPI:
    """OpenEnv's FastAPI app (its `/ws` session protocol, `/reset`, `/step`, `/state`, `/schema`,
    `/metadata`, `/health`) for corral's tasks (a task directory, a list of Task, or the example tasks).

    `runtime`: the main service's Runtime (or a callable returning it) to share; without it the app
    starts its own from `runtime_config` on first reset and closes it at shutdown. A mounted app gets
    no startup or shutdown events: its owner calls `await app.state.corral_runtime.aclose()`.
    `authenticate(connection)`: checked on every request and WebSocket handshake; None refuses.
    Application errors (reset first, unknown task) answer HTTP 409/400 with a `detail`."""
    if runtime is not None and runtime_config is not None:
        raise EnvironmentUsageError("give either runtime (to share one) or runtime_config (to start one), not both")
    task_list = resolve_tasks(tasks)
    handle = RuntimeHandle(runtime, runtime_config)
    factory = functools.partial(CorralEnvironment, task_list, handle, reward=reward)
    app = create_fastapi_app(factory, CorralAction, CorralObservation, max_concurrent_envs=max_concurrent_envs)
    app.title = "corral OpenEnv environment"
    app.state.corral_runtime = handle
    app.router.on_shutdown.append(handle.aclose)

    @app.exception_handler(UnknownTask)
    async def unknown_task(_r: Request, exc: UnknownTask) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(EnvironmentUsageError)
    async def usage_error(_r: Request, exc: EnvironmentUsageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    app.add_middleware(_Guard, authenticate=authenticate)
    return app


# -- the client --------------------------------------------------------------------------------------
class OpenEnvServerError(CorralError, RuntimeError):
    """The environment server refused a message (invalid action, reset first, unknown task, ...).
    A RuntimeError, as OpenEnv's own client raises."""

    def __init__(self, message: str, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class CorralEnvClient(EnvClient[CorralAction, CorralObservation, CorralState]):
    """OpenEnv client for corral's environment, over one WebSocket session (one episode at a time):

        async with CorralEnvClient("http://127.0.0.1:8000/openenv", token="...") as env:
            r = await env.reset(task_id="fix-median")
            r = await env.step(CorralAction(tool="exec", command="ls"))
            ...
            r = await env.step(CorralAction(tool="submit"))   # r.done, r.reward

    `base_url` may carry a path prefix (an app mounted under /openenv). `token` is sent as
    `Authorization: Bearer <token>` on the handshake, `headers` as given. `message_timeout_s` must
    exceed the longest step (command timeout, verifier timeout). `.sync()` gives OpenEnv's blocking
    wrapper."""

    def __init__(self, base_url: str, *, token: str | None = None, headers: Mapping[str, str] | None = None,
                 message_timeout_s: float = 300.0, **kwargs: Any) -> None:
        # OpenEnv's 60 s default is shorter than one command (120 s by default) plus a verifier run, and
        # a reply that comes after the client gave up would be read as the answer to the next message
        super().__init__(base_url, message_timeout_s=message_timeout_s, **kwargs)
        self._headers = dict(headers or {})
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"

    async def connect(self) -> CorralEnvClient:
        # EnvClient.connect cannot send headers; this is it with them (and no proxy for loopback)
        if self._ws is not None:
            return self
        try:
            self._ws = await ws_connect(self._ws_url, open_timeout=self._connect_timeout,
                                        max_size=self._max_message_size, additional_headers=self._headers,
                                        proxy=None if _is_loopback(self._ws_url) else True)
        except Exception as e:
            raise ConnectionError(f"Failed to connect to {self._ws_url}: {e}") from e
        return self

    async def _send_and_receive(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            await self._send(message)
            response = await self._receive()
        except ConnectionClosed as e:
            # the server may have refused the session (capacity, a failed environment) and closed it
            # before this message went out; its reason is then the last message it sent
            ws, self._ws = self._ws, None
            try:
                assert ws is not None
                response = json.loads(await ws.recv())
            except Exception:
                raise OpenEnvServerError(f"the server closed the session ({e}); the next call opens a new "
                                         f"one (reset first)", code="SESSION_CLOSED") from e
        if response.get("type") == "error":
            data = response.get("data") or {}
            text = str(data.get("message") or "unknown error")
            errors = data.get("errors")
            if errors:
                text += ": " + "; ".join(
                    f"{'.'.join(map(str, e.get('loc', ()))) or 'action'}: {e.get('msg')}" for e in errors)
            raise OpenEnvServerError(f"server error {data.get('code', 'UNKNOWN')}: {text}",
                                     code=data.get("code"), details=data)
        return response

    def _step_payload(self, action: CorralAction | Mapping[str, Any]) -> dict[str, Any]:
        # a mapping goes as it is: the server validates it and says what is wrong
        if isinstance(action, Mapping):
            return dict(action)
        return action.model_dump(exclude_none=True)

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[CorralObservation]:
        fields = CorralObservation.model_fields
        obs = {k: v for k, v in (payload.get("observation") or {}).items() if k in fields}
        observation = CorralObservation(**obs, done=payload.get("done", False), reward=payload.get("reward"))
        return StepResult(observation=observation, reward=payload.get("reward"), done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> CorralState:
        return CorralState.model_validate(payload)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
