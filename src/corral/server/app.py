"""The HTTP app behind `corral serve`: ROCK's sandbox API in front of a corral runtime.

ROCK's Python SDK (`pip install rl-rock`, `rock.sdk.sandbox.client.Sandbox`) talks to
``{base_url}/apis/envs/sandbox/v1/<route>``; every route answers ROCK's envelope
``{"status": "Success"|"Failed", "message", "error", "result"}`` and the SDK parses ``result`` into its
own pydantic models. Routes implemented (all under that prefix):

    POST start_async    {image, image_os, memory, cpus, limit_cpus, num_gpus, sandbox_id, ...}
                        -> SandboxStartResponse {sandbox_id, host_name, host_ip, cpus, memory}
    GET  get_status     ?sandbox_id=&include_all_states= -> SandboxStatusResponse
    GET  is_alive       ?sandbox_id= -> IsAliveResponse {is_alive, message}
    POST execute        {sandbox_id, command: str|list, timeout, cwd, env} -> CommandResponse
    POST create_session {sandbox_id, session, startup_source, env_enable, env, remote_user}
    POST run_in_session {sandbox_id, session, command, check, timeout} -> BashObservation
    POST close_session  {sandbox_id, session}
    POST read_file      {sandbox_id, path, encoding, errors} -> ReadFileResponse {content}
    POST write_file     {sandbox_id, path, content} -> WriteFileResponse
    POST upload         multipart: file, target_path, sandbox_id -> UploadResponse
    POST stop           {sandbox_id}
    POST delete         {sandbox_id}

plus ``GET /health`` (no token) and ``GET /findings?sandbox_id=&after_id=`` (corral's own).

Authentication: every route but /health needs the server's token as ``Authorization: Bearer <token>``
or as ``XRL-Authorization: Bearer <token>`` (the header ROCK's SDK sends for
``SandboxConfig(extra_headers={"XRL-Authorization": "Bearer <token>"})`` or its deprecated
``xrl_authorization=<token>``). Each token is a tenant: a sandbox is only visible to the token that
started it; another token gets 404, exactly as for an id that never existed.

Mapping of ROCK's start request to corral's SandboxConfig (starting from the server's base config):

* ``image``: looked up in the server's ``images`` table (name -> rootfs directory, or None for the
  host's root). An image not in the table runs on the host's root filesystem, read-only (corral's
  default); the requested name is echoed back as ``image`` in get_status and the mapping actually
  used is in ``result.corral.rootfs``. Clients can never name host directories themselves.
* ``memory`` ("8g", "512m", bytes without unit) -> ``limits.memory_mb``;
  ``limit_cpus`` (else ``cpus``) -> ``limits.cpus``.
* ``num_gpus`` > 0 -> ``gpu=True``, only if the server allows GPUs; otherwise 400.
* ``auto_clear_seconds`` (the SDK sends 300): the sandbox is stopped after that many seconds without
  a request naming it (a command still running is not idleness); the server's ``idle_timeout_s``
  caps it, and applies alone when the client sends none. Its events and findings stay readable.
* ``image_os`` must be "linux". ``disk``, ``auto_archive/delete_seconds``,
  ``registry_*``, ``use_kata_runtime``, ``accelerator_type`` are accepted and ignored.
* ``sandbox_id``: the id the client will use; corral's own sandbox id (the one in its event store)
  is ``result.corral.sandbox_id`` and may differ.

corral's findings ride along where ROCK's models have room: every result object carries an extra
``corral`` key (``{"sandbox_id", "step", "refused", "findings": [...], ...}``) which the SDK's models
ignore; failed envelopes carry it at the top level. A command that corral's rules refuse runs
nothing and reports exit code 126 with the reason as ``failure_reason``.

Differences from ROCK: run_in_session's ``output`` is stdout followed by stderr (ROCK's pty merges them
as they come) with trailing newlines removed; ``check="raise"`` with a non-zero exit answers a Failed
envelope like ROCK; protocol errors are real HTTP codes (401, 404 unknown sandbox/session,
409 stopped sandbox or ended episode, 422 malformed request) with ROCK's envelope as the body, while
failures of the operation itself (file missing, command timed out) are ROCK's HTTP 200 Failed envelope;
``delete`` of an unknown id is 404, not ROCK's idempotent success.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.util
import re
import shlex
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.config import Limits, RuntimeConfig, SandboxConfig
from corral.errors import EpisodeEnded, FileAccessError, SandboxClosed, SandboxFrozen, SessionError
from corral.events import Finding
from corral.runtime import Runtime
from corral.sandbox.sandbox import ExecResult, Sandbox
from corral.server.config import ServeConfig, ServeConfigError

PREFIX = "/apis/envs/sandbox/v1"
OPENENV_PATH = "/openenv"  # where OpenEnv's server is mounted
MAX_UPLOAD = 64 << 20
REFUSED_EXIT = 126
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEM_MB = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}


# -- request models (ROCK's field names; unknown fields are ignored, as ROCK's server does) ----------
class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


SandboxId = Annotated[str, Field(min_length=1, max_length=64)]


class StartRequest(_Req):
    image: str = Field("python:3.11", min_length=1, max_length=512)
    image_os: str = "linux"
    memory: str = "8g"
    cpus: float = Field(2, gt=0, le=1024)
    limit_cpus: float | None = Field(None, gt=0, le=1024)
    num_gpus: float | None = Field(None, ge=0)
    sandbox_id: str | None = Field(None, pattern=_ID_RE)
    auto_clear_seconds: int | None = Field(None, ge=0)  # ROCK's SDK sends 300: stopped after that long idle


class CommandRequest(_Req):
    sandbox_id: SandboxId
    command: str | list[str]
    timeout: float | None = Field(1200, gt=0)
    env: dict[str, str] | None = None
    cwd: str | None = None


class _SessionReq(_Req):
    sandbox_id: SandboxId
    session: str = Field("default", min_length=1, max_length=128)


class CreateSessionRequest(_SessionReq):
    session_type: Literal["bash"] = "bash"
    startup_source: list[str] = []
    env_enable: bool = False
    env: dict[str, str] | None = None
    remote_user: str | None = None


class RunRequest(_SessionReq):
    action_type: Literal["bash"] = "bash"
    command: str
    check: Literal["silent", "raise", "ignore"] = "raise"
    timeout: float | None = Field(None, gt=0)


class CloseSessionRequest(_SessionReq):
    session_type: Literal["bash"] = "bash"


class ReadFileRequest(_Req):
    sandbox_id: SandboxId
    path: str = Field(min_length=1)
    encoding: str | None = None
    errors: str | None = None


class WriteFileRequest(_Req):
    sandbox_id: SandboxId
    path: str = Field(min_length=1)
    content: str


# -- server state --------------------------------------------------------------------------------------
@dataclass
class _Box:
    rock_id: str
    tenant: str
    sb: Sandbox
    image: str
    rootfs: str | None
    memory: str
    created: float = field(default_factory=time.time)
    stopped: float | None = None
    mark: int = 0  # id of the last finding reported in a response
    idle_limit: float | None = None  # seconds without a request before the reaper stops it
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # operations in flight: a long command is not idleness
    stop_reason: str | None = None

    @property
    def alive(self) -> bool:
        return self.stopped is None and not self.sb.closed


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, *, corral: dict | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.corral = corral


def _envelope(result: Any = None, *, failed: str | None = None, message: str | None = None,
              corral: dict | None = None) -> dict:
    out: dict[str, Any] = {"status": "Failed" if failed is not None else "Success", "message": message,
                           "error": failed, "result": result}
    if corral is not None:
        out["corral"] = corral
    return out


def _fail(status_code: int, message: str, corral: dict | None = None) -> JSONResponse:
    return JSONResponse(_envelope(failed=message, message=message, corral=corral), status_code=status_code)


def _finding_dict(f: Finding) -> dict:
    return f.model_dump(mode="json", include={"id", "ts", "rule_id", "title", "severity", "technique", "step",
                                              "command", "action", "sandbox_id"})


def _memory_mb(text: str) -> int:
    m = _MEM_RE.match(text)
    if not m:
        raise ApiError(422, f"memory {text!r} is not a size; write e.g. '8g', '512m' or a number of bytes")
    mb = int(float(m.group(1)) * _MEM_MB[m.group(2).lower()])
    if mb < 16:
        raise ApiError(422, f"memory {text!r} is below corral's minimum of 16m")
    return mb


class _Server:
    def __init__(self, config: ServeConfig, tokens: dict[str, str]) -> None:
        self.config = config
        self.tokens = tokens
        self.runtime: Runtime | None = None
        self.boxes: dict[str, dict[str, _Box]] = {}  # tenant -> rock id -> box
        self.deleted: dict[str, list[_Box]] = {}  # tenant -> deleted boxes (their findings stay readable)
        # sandboxes being created and OpenEnv sessions open, per tenant: they count against the quota
        # from the moment they are asked for, so concurrent requests cannot overshoot it
        self.held: dict[str, int] = {}
        self.reserved_ids: dict[str, set[str]] = {}
        self.host_name = socket.gethostname()

    def tenant_of(self, headers: Headers) -> str | None:
        for header in ("authorization", "xrl-authorization"):
            value = headers.get(header)
            if not value:
                continue
            scheme, _, cred = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                continue
            cred_b = cred.strip().encode()
            found = None
            for token, tenant in self.tokens.items():
                if hmac.compare_digest(cred_b, token.encode()):
                    found = tenant
            if found is not None:
                return found
        return None

    def in_use(self, tenant: str) -> int:
        return sum(b.alive for b in self.boxes.get(tenant, {}).values()) + self.held.get(tenant, 0)

    @contextlib.contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """One of the tenant's sandboxes for the duration (ApiError 429 past the quota). No await
        between the check and the count: the event loop cannot interleave another request there."""
        limit = self.config.max_sandboxes_per_tenant
        if self.in_use(tenant) >= limit:
            raise ApiError(429, f"this token already has {limit} sandboxes running or being created "
                                "(max_sandboxes_per_tenant, ROCK and OpenEnv together); stop or delete one first")
        self.held[tenant] = self.held.get(tenant, 0) + 1
        try:
            yield
        finally:
            self.held[tenant] -= 1

    def box(self, tenant: str, rock_id: str, *, running: bool = True, deleted: bool = False,
            touch: bool = True) -> _Box:
        b = self.boxes.get(tenant, {}).get(rock_id)
        if b is None and deleted:
            b = next((d for d in reversed(self.deleted.get(tenant, [])) if d.rock_id == rock_id), None)
        if b is None:
            raise ApiError(404, f"no sandbox {rock_id!r} for this token; start one with start_async")
        if touch:
            b.last_used = time.monotonic()
        if running and not b.alive:
            why = f" ({b.stop_reason})" if b.stop_reason else ""
            raise ApiError(409, f"sandbox {rock_id!r} is stopped{why}; start a new one", corral=self.corral(b))
        if running and b.sb.terminated:
            raise ApiError(409, f"sandbox {rock_id!r}: the episode was ended by a security finding "
                                f"({b.sb.terminated}); stop it and start a new one", corral=self.corral(b))
        return b

    def corral(self, b: _Box, r: ExecResult | None = None) -> dict:
        news = self.runtime.store.findings(sandbox_id=b.sb.id, after_id=b.mark) if self.runtime else []
        if news:
            b.mark = news[-1].id or b.mark
        out: dict[str, Any] = {"sandbox_id": b.sb.id, "findings": [_finding_dict(f) for f in news],
                               "episode_ended": b.sb.terminated}
        if r is not None:
            out.update(step=r.step, refused=r.refused, timed_out=r.timed_out, error=r.error,
                       truncated=r.truncated, oom_killed=r.oom_killed, duration=r.duration)
        return out

    def config_for(self, req: StartRequest) -> tuple[SandboxConfig, str | None]:
        if req.image_os.casefold() != "linux":
            raise ApiError(422, f"image_os {req.image_os!r} is not supported; corral runs linux sandboxes only")
        base = self.config.sandbox
        rootfs = self.config.images.get(req.image, base.rootfs)
        gpu = bool(req.num_gpus)
        if gpu and not self.config.allow_gpu:
            raise ApiError(422, "num_gpus > 0 but this server does not grant GPUs (start it with GPUs allowed)")
        limits = {**base.limits.model_dump(), "memory_mb": _memory_mb(req.memory),
                  "cpus": req.limit_cpus or req.cpus}
        try:
            cfg = base.model_copy(update={"limits": Limits(**limits), "rootfs": rootfs, "gpu": gpu or base.gpu})
        except ValidationError as e:
            raise ApiError(422, f"cannot map request to sandbox limits: {_problems(e.errors())}") from None
        return cfg, str(rootfs) if rootfs else None

    async def reap_idle(self, interval: float = 1.0) -> None:
        """Stop ROCK sandboxes nobody has used for their idle limit (a client that died leaves its
        sandboxes behind); their events and findings stay readable."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for boxes in list(self.boxes.values()):
                for b in list(boxes.values()):
                    if b.alive and not b.busy and b.idle_limit is not None and now - b.last_used > b.idle_limit:
                        with contextlib.suppress(Exception):  # one failure must not stop the reaper
                            await self.stop_box(b, f"idle for {b.idle_limit:g} s")

    async def stop_box(self, b: _Box, reason: str | None = None) -> None:
        if b.stopped is None:
            b.stopped, b.stop_reason = time.time(), reason
            await b.sb.close()

    async def close_all(self) -> None:
        # the runtime closes every sandbox it made: ROCK boxes and OpenEnv sessions alike
        if self.runtime is not None:
            await self.runtime.close()


class _TokenGate:
    """Every request but /health needs a known token; the tenant it names goes into the request's
    state. Plain ASGI rather than an http middleware, so WebSocket handshakes (OpenEnv's session
    protocol) are checked as well: Starlette's http middleware never sees them."""

    def __init__(self, app: ASGIApp, server: _Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        tenant = self.server.tenant_of(Headers(scope=scope))
        if tenant is not None:
            scope.setdefault("state", {})["tenant"] = tenant
            path = scope["path"]
            # an OpenEnv session (or HTTP reset) runs a sandbox while it lasts: it counts against the quota
            if path.startswith(f"{OPENENV_PATH}/") and (scope["type"] == "websocket"
                                                          or path == f"{OPENENV_PATH}/reset"):
                try:
                    with self.server.hold(tenant):
                        await self.app(scope, receive, send)
                except ApiError as e:
                    if scope["type"] == "websocket":
                        await receive()
                        await send({"type": "websocket.close", "code": 1013, "reason": e.message[:120]})
                    else:
                        await _fail(e.status_code, e.message)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # the handshake; closing before accepting answers it with HTTP 403
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong token"})
            return
        resp = _fail(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                          "(or 'XRL-Authorization: Bearer <token>')")
        resp.headers["WWW-Authenticate"] = "Bearer"
        await resp(scope, receive, send)


def _problems(errors: Sequence[Any]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def _tokens(token: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    if isinstance(token, str):
        token = [token]
    if isinstance(token, Mapping):
        out = {str(k): str(v) for k, v in token.items()}
    else:
        out = {t: "t-" + hashlib.sha256(t.encode()).hexdigest()[:12] for t in token}
    if not out or any(not t or t != t.strip() for t in out):
        raise ValueError("give at least one non-empty token without surrounding whitespace")
    return out


def create_app(config: ServeConfig | RuntimeConfig, token: str | Sequence[str] | Mapping[str, str]) -> FastAPI:
    """The service's app. `config`: a ServeConfig (or just a RuntimeConfig, everything else default).
    `token`: one token, several (one tenant each) or {token: tenant name}. The corral Runtime is
    created and started in the app's lifespan, on the server's event loop, and closed with every
    sandbox when the server shuts down (SIGTERM or Ctrl-C under uvicorn)."""
    if isinstance(config, RuntimeConfig):
        config = ServeConfig(runtime=config)
    srv = _Server(config, _tokens(token))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        srv.runtime = Runtime(config.runtime_config())  # token and config files hidden from sandboxes
        await srv.runtime.start()
        reaper = asyncio.get_running_loop().create_task(srv.reap_idle())
        try:
            yield
        finally:
            reaper.cancel()
            await srv.close_all()

    app = FastAPI(title="corral", lifespan=lifespan)
    app.state.corral = srv

    app.add_middleware(_TokenGate, server=srv)

    @app.exception_handler(ApiError)
    async def api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return _fail(exc.status_code, exc.message, exc.corral)

    @app.exception_handler(RequestValidationError)
    async def invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return _fail(422, f"invalid request: {_problems(exc.errors())}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _fail(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict:
        rt = srv.runtime
        return {"status": "ok" if rt is not None and rt.started else "starting"}

    @app.get("/findings")
    async def findings(request: Request, sandbox_id: str | None = None,
                       after_id: Annotated[int, Query(ge=0)] = 0) -> dict:
        assert srv.runtime is not None
        tenant = request.state.tenant
        if sandbox_id:
            boxes = [srv.box(tenant, sandbox_id, running=False, deleted=True)]
        else:
            boxes = [*srv.deleted.get(tenant, []), *srv.boxes.get(tenant, {}).values()]
        out = []
        for b in boxes:
            for f in srv.runtime.store.findings(sandbox_id=b.sb.id, after_id=after_id):
                out.append({**f.model_dump(mode="json"), "rock_sandbox_id": b.rock_id})
        out.sort(key=lambda d: d["id"] or 0)
        return {"findings": out}

    openenv = config.openenv.enabled
    if openenv is None:
        openenv = importlib.util.find_spec("openenv") is not None
    elif openenv and importlib.util.find_spec("openenv") is None:
        raise ServeConfigError("openenv.enabled is true but openenv-core is not installed: "
                               "pip install 'corral[openenv]', or set openenv.enabled: false (--no-openenv)")
    if openenv:
        # OpenEnv's session protocol over the same runtime, so its sandboxes are closed with the rest;
        # the token gate above already covers its WebSocket handshakes
        from corral.envs.openenv_env import create_openenv_app

        app.mount(OPENENV_PATH, create_openenv_app(
            runtime=lambda: srv.runtime, tasks=config.openenv.tasks, reward=config.openenv.reward,
            max_concurrent_envs=config.openenv.max_concurrent_envs))

    api = APIRouter(prefix=PREFIX)

    @api.post("/start_async")
    async def start_async(request: Request, req: StartRequest) -> dict:
        assert srv.runtime is not None
        tenant = request.state.tenant
        mine = srv.boxes.setdefault(tenant, {})
        reserved = srv.reserved_ids.setdefault(tenant, set())
        if req.sandbox_id and (req.sandbox_id in mine or req.sandbox_id in reserved):
            raise ApiError(409, f"sandbox id {req.sandbox_id!r} is in use; delete it or choose another")
        cfg, rootfs = srv.config_for(req)
        with srv.hold(tenant):
            if req.sandbox_id:
                reserved.add(req.sandbox_id)
            try:
                sb = await srv.runtime.create(cfg)
                rock_id = req.sandbox_id or sb.id
                b = _Box(rock_id, tenant, sb, req.image, rootfs, req.memory)
                limits = [t for t in (req.auto_clear_seconds, config.idle_timeout_s) if t]
                b.idle_limit = float(min(limits)) if limits else None
                mine[rock_id] = b
            finally:
                reserved.discard(req.sandbox_id or "")
        res = {"sandbox_id": rock_id, "host_name": srv.host_name, "host_ip": sb.net.ip if sb.net else None,
               "cpus": cfg.limits.cpus, "memory": req.memory, "corral": {**srv.corral(b), "rootfs": rootfs}}
        return _envelope(res)

    def status_of(b: _Box) -> dict:
        state = "running" if b.alive else "stopped"
        iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created))
        return {
            "sandbox_id": b.rock_id, "is_alive": b.alive, "state": state, "image": b.image,
            "status": {"sandbox": {"status": state,
                                   "message": b.sb.terminated or f"corral sandbox {b.sb.id}"}},
            "host_name": srv.host_name, "host_ip": b.sb.net.ip if b.sb.net else None,
            "cpus": b.sb.config.limits.cpus, "memory": b.memory, "create_time": iso, "start_time": iso,
            "stop_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.stopped)) if b.stopped else None,
            "corral": {**srv.corral(b), "rootfs": b.rootfs, "sessions": b.sb.sessions() if b.alive else []},
        }

    @api.get("/get_status")
    async def get_status(request: Request, sandbox_id: SandboxId, include_all_states: bool = False) -> dict:
        return _envelope(status_of(srv.box(request.state.tenant, sandbox_id, running=False)))

    @api.get("/is_alive")
    async def is_alive(request: Request, sandbox_id: SandboxId) -> dict:
        b = srv.box(request.state.tenant, sandbox_id, running=False)
        return _envelope({"is_alive": b.alive, "message": srv.host_name if b.alive else "stopped"})

    async def guarded(b: _Box, coro: Any) -> Any:
        b.busy += 1
        try:
            return await coro
        except (SandboxClosed, SandboxFrozen, EpisodeEnded) as e:
            raise ApiError(409, str(e), corral=srv.corral(b)) from None
        finally:
            b.busy -= 1
            b.last_used = time.monotonic()

    @api.post("/execute")
    async def execute(request: Request, req: CommandRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        cmd = req.command if isinstance(req.command, str) else shlex.join(req.command)
        if not cmd.strip():
            raise ApiError(422, "invalid request: command: must not be empty")
        r: ExecResult = await guarded(b, b.sb.exec(cmd, timeout=req.timeout, env=req.env, cwd=req.cwd))
        info = srv.corral(b, r)
        if r.timed_out:
            return _envelope(failed=f"command timed out after {req.timeout}s", message="execute command failed",
                             corral=info)
        code = REFUSED_EXIT if r.refused else r.exit_code
        stderr = r.error if r.refused else r.stderr
        return _envelope({"stdout": r.stdout, "stderr": stderr, "exit_code": code, "corral": info})

    @api.post("/create_session")
    async def create_session(request: Request, req: CreateSessionRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        if req.remote_user:
            raise ApiError(422, "remote_user is not supported: each corral sandbox runs as its own unprivileged user")
        if req.session in b.sb.sessions():
            raise ApiError(409, f"session {req.session!r} already exists in sandbox {req.sandbox_id}; close it first")
        try:
            await guarded(b, b.sb.create_session(req.session, env=req.env))
        except SessionError as e:
            raise ApiError(409, str(e)) from None
        outputs = []
        for src in req.startup_source:
            r = await guarded(b, b.sb.run_in_session(req.session, f"source {shlex.quote(src)}"))
            outputs.append(r.stdout + r.stderr)
            if r.exit_code != 0:
                return _envelope(failed=f"startup_source {src!r} failed: {r.error or r.stderr.strip()}",
                                 message="create session failed", corral=srv.corral(b, r))
        return _envelope({"session_type": "bash", "output": "".join(outputs), "corral": srv.corral(b)})

    @api.post("/run_in_session")
    async def run_in_session(request: Request, req: RunRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        if req.session not in b.sb.sessions():
            raise ApiError(404, f"no session {req.session!r} in sandbox {req.sandbox_id}; call create_session first")
        try:
            r = await guarded(b, b.sb.run_in_session(req.session, req.command, timeout=req.timeout))
        except SessionError as e:
            raise ApiError(404, str(e)) from None
        info = srv.corral(b, r)
        if r.timed_out:
            return _envelope(failed=f"timeout after {req.timeout} seconds while running command {req.command!r}",
                             message="run in session failed", corral=info)
        code = REFUSED_EXIT if r.refused else r.exit_code
        output = (r.error or "") if r.refused else (r.stdout + r.stderr).rstrip("\n")
        failure = r.error or ""
        if req.check == "raise" and code != 0:
            return _envelope(failed=f"Command {req.command!r} failed with exit code {code}. "
                                    f"Here is the output:\n{output!r}" + (f" ({failure})" if failure else ""),
                             message="run in session failed", corral=info)
        if req.check == "ignore":
            code = None
        return _envelope({"session_type": "bash", "output": output, "exit_code": code,
                          "failure_reason": failure, "expect_string": "", "corral": info})

    @api.post("/close_session")
    async def close_session(request: Request, req: CloseSessionRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        if req.session not in b.sb.sessions():
            raise ApiError(404, f"no session {req.session!r} in sandbox {req.sandbox_id}")
        await b.sb.close_session(req.session)
        return _envelope({"session_type": "bash", "corral": srv.corral(b)})

    @api.post("/read_file")
    async def read_file(request: Request, req: ReadFileRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        try:
            data = await guarded(b, b.sb.read_file(req.path, as_step=True))
        except FileAccessError as e:
            return _envelope(failed=str(e), message="read file failed", corral=srv.corral(b))
        try:
            content = data.decode(req.encoding or "utf-8", req.errors or "strict")
        except LookupError as e:
            raise ApiError(422, f"invalid request: encoding/errors: {e}") from None
        except UnicodeDecodeError as e:
            return _envelope(failed=f"{req.path} is not valid {e.encoding}: {e.reason}; pass errors='replace'",
                             message="read file failed", corral=srv.corral(b))
        return _envelope({"content": content, "corral": srv.corral(b)})

    @api.post("/write_file")
    async def write_file(request: Request, req: WriteFileRequest) -> dict:
        b = srv.box(request.state.tenant, req.sandbox_id)
        try:
            await guarded(b, b.sb.write_file(req.path, req.content, as_step=True))
        except FileAccessError as e:
            return _envelope({"success": False, "message": str(e)}, failed=str(e), message="write file failed",
                             corral=srv.corral(b))
        return _envelope({"success": True, "message": f"Successfully write content to file {req.path}",
                          "corral": srv.corral(b)})

    @api.post("/upload")
    async def upload(request: Request, file: Annotated[UploadFile, File()], target_path: Annotated[str, Form()],
                     sandbox_id: Annotated[SandboxId, Form()]) -> dict:
        b = srv.box(request.state.tenant, sandbox_id)
        if not target_path.strip():
            raise ApiError(422, "invalid request: target_path: must not be empty")
        data = await file.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise ApiError(413, f"upload is larger than {MAX_UPLOAD >> 20} MiB; split it or use execute")
        name = file.filename or ""
        try:
            await guarded(b, b.sb.write_file(target_path, data, as_step=True))
        except FileAccessError as e:
            return _envelope(failed=str(e), message="upload file failed", corral=srv.corral(b))
        return _envelope({"success": True, "message": f"Successfully uploaded file {name} to {target_path}",
                          "file_name": name, "corral": srv.corral(b)})

    @api.post("/stop")
    async def stop(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
        b = srv.box(request.state.tenant, sandbox_id, running=False)
        await srv.stop_box(b)
        return _envelope(f"{sandbox_id} stopped", corral=srv.corral(b))

    @api.post("/delete")
    async def delete(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
        b = srv.box(request.state.tenant, sandbox_id, running=False)
        await srv.stop_box(b)
        srv.boxes[request.state.tenant].pop(sandbox_id, None)
        srv.deleted.setdefault(request.state.tenant, []).append(b)
        return _envelope(f"{sandbox_id} deleted", corral=srv.corral(b))

    # ROCK's container-image and object-storage routes. A corral sandbox is namespaces over tmpfs,
    # not a container: there is no image to snapshot, nothing of a stopped sandbox to start again,
    # and no bucket. The SDK's restart(), archive(), commit() and its upload's storage-token probe
    # get a Failed envelope (as ROCK answers a refused request: the SDK drops the body of an HTTP
    # error) that says so and what to do instead.
    def unsupported(request: Request, sandbox_id: str, what: str) -> dict:
        # a refusal is not use: the idle clock and the findings not yet handed out stay as they were
        b = srv.box(request.state.tenant, sandbox_id, running=False, deleted=True, touch=False)
        return _envelope(failed=f"{what} (sandbox {sandbox_id!r})", message=what, corral={"sandbox_id": b.sb.id})

    @api.get("/get_token")
    async def get_token() -> dict:
        msg = "corral has no object storage: upload sends files straight into the sandbox"
        return _envelope(failed=msg, message=msg)

    @api.post("/restart")
    async def restart(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
        return unsupported(request, sandbox_id, "restart is not supported: a corral sandbox is not a container, "
                           "and stopping it ended its processes and freed its tmpfs; start a new one with "
                           "start_async and write or upload the files it needs")

    @api.post("/sandboxes/{sandbox_id}/archive")
    async def archive(request: Request, sandbox_id: SandboxId) -> dict:
        return unsupported(request, sandbox_id, "archive is not supported: a corral sandbox has no container "
                           "image or logs to upload; read the files you need before stopping it, and fetch "
                           "its findings from GET /findings (they outlive the sandbox)")

    @api.post("/commit")
    async def commit(request: Request, sandbox_id: Annotated[SandboxId, Body(embed=True)]) -> dict:
        return unsupported(request, sandbox_id, "commit is not supported: a corral sandbox is not a container "
                           "and has no image to push; give new sandboxes their files with write_file or upload")

    @api.get("/commit/{sandbox_id}")
    async def commit_status(request: Request, sandbox_id: SandboxId) -> dict:
        return unsupported(request, sandbox_id, "commit is not supported, so there is no commit status")

    app.include_router(api)
    return app


__all__ = ["PREFIX", "ApiError", "create_app"]
