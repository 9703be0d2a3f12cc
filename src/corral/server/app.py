"""The HTTP app behind `corral serve`: ROCK's sandbox API (server/rock.py) and, when openenv-core is
installed, OpenEnv's session protocol, in front of one corral runtime; a token per tenant.

Besides ROCK's routes (under server.state.PREFIX): ``GET /health`` (no token),
``GET /findings?sandbox_id=&after_id=`` (corral's own) and ``GET /metrics`` (Prometheus, observe/metrics.py;
the same token, which a scrape config sends as ``authorization: {type: Bearer, credentials: <token>}``).
``GET /dashboard`` is a live dashboard for a browser (server/dashboard.py), which alone also takes the
token as ``?token=`` and then a cookie.

Authentication: every route but /health needs the server's token as ``Authorization: Bearer <token>``
or as ``XRL-Authorization: Bearer <token>`` (the header ROCK's SDK sends for
``SandboxConfig(extra_headers={"XRL-Authorization": "Bearer <token>"})`` or its deprecated
``xrl_authorization=<token>``). Each token is a tenant: a sandbox is only visible to the token that
started it; another token gets 404, exactly as for an id that never existed.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from corral.config import RuntimeConfig
from corral.observe.metrics import Metrics
from corral.runtime import Runtime
from corral.server.config import ServeConfig, ServeConfigError
from corral.server.dashboard import dashboard_tenant, denied_page, is_dashboard
from corral.server.dashboard import router as dashboard_router
from corral.server.rock import router as rock_router
from corral.server.state import PREFIX, ApiError, _fail, _problems, _Server

OPENENV_PATH = "/openenv"  # where OpenEnv's server is mounted


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
        dashboard = scope["type"] == "http" and is_dashboard(scope["path"])
        if dashboard:
            # a browser's credentials (?token=, then a cookie) count on the dashboard's read-only pages only
            tenant = dashboard_tenant(self.server, scope, tenant)
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
        if dashboard:  # a page a person reads
            await denied_page()(scope, receive, send)
            return
        resp = _fail(401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                          "(or 'XRL-Authorization: Bearer <token>')")
        resp.headers["WWW-Authenticate"] = "Bearer"
        await resp(scope, receive, send)


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


def create_app(config: ServeConfig | RuntimeConfig, token: str | Sequence[str] | Mapping[str, str], *,
               runtime_factory: Callable[[RuntimeConfig], Runtime] = Runtime) -> FastAPI:
    """The service's app. `config`: a ServeConfig (or just a RuntimeConfig, everything else default).
    `token`: one token, several (one tenant each) or {token: tenant name}. The corral Runtime is
    created (by `runtime_factory`: a FakeRuntime in logic tests) and started in the app's lifespan,
    on the server's event loop, and closed with every sandbox when the server shuts down (SIGTERM or
    Ctrl-C under uvicorn)."""
    if isinstance(config, RuntimeConfig):
        config = ServeConfig(runtime=config)
    srv = _Server(config, _tokens(token))
    metrics = Metrics()  # the app's own registry: two apps in one process never share counters
    otel = config.otel
    if otel is not None:  # refused now, naming the extra to install, rather than at the first episode
        from corral.observe.otel import OtelUnavailable, Tracing, require_sdk

        try:
            require_sdk(exporter=True)
        except OtelUnavailable as e:
            raise ServeConfigError(f"otel is configured but {e}; or remove otel: from the config") from None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        srv.runtime = runtime_factory(config.runtime_config())  # token and config files hidden from sandboxes
        await srv.runtime.start()
        metrics.attach(srv.runtime)
        # traces (observe/otel.py): an episode a trace, a step a span, sent from the exporter's thread
        tracing = None
        reaper = asyncio.get_running_loop().create_task(srv.reap_idle())
        try:
            tracing = Tracing.otlp(otel.endpoint, otel.service_name, runtime=srv.runtime) if otel is not None else None
            yield
        finally:
            reaper.cancel()
            await srv.close_all()
            metrics.detach()
            if tracing is not None:  # what the closes ended goes out before the server exits
                await tracing.aclose()

    app = FastAPI(title="corral", lifespan=lifespan)
    app.state.corral = srv
    app.state.metrics = metrics

    app.add_middleware(_TokenGate, server=srv)

    def rock(r: Request) -> bool:  # ROCK's routes answer failures as ROCK does (see state._fail)
        return r.url.path.startswith(f"{PREFIX}/")

    @app.exception_handler(ApiError)
    async def api_error(r: Request, exc: ApiError) -> JSONResponse:
        return _fail(exc.status_code, exc.message, exc.corral, rock=rock(r))

    @app.exception_handler(RequestValidationError)
    async def invalid(r: Request, exc: RequestValidationError) -> JSONResponse:
        return _fail(422, f"invalid request: {_problems(exc.errors())}", rock=rock(r))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _fail(exc.status_code, str(exc.detail), rock=rock(r) and exc.status_code != 404)

    @app.get("/health")
    async def health() -> dict:
        rt = srv.runtime
        return {"status": "ok" if rt is not None and rt.started else "starting"}

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        # counts over every tenant, with no sandbox ids, commands or destinations in them (see observe/)
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

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

    app.include_router(rock_router)
    app.include_router(dashboard_router)
    return app


__all__ = ["PREFIX", "ApiError", "create_app"]
