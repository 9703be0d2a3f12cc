"""The live dashboard of `corral serve`: one self-contained page at /dashboard (inline CSS and script,
nothing fetched from anywhere else, so it works offline), a JSON snapshot, a Server-Sent Events stream,
and each episode's timeline one click away. All routes are GETs that only read.

    GET /dashboard                 the page (server/static/dashboard.html)
    GET /dashboard/api/state       JSON: sandboxes (state, episode, step, resource use), recent findings, runs
    GET /dashboard/stream          text/event-stream: findings, sandbox changes, resource samples
    GET /dashboard/episodes/{id}   an episode's (or a sandbox's) timeline: corral.report's HTML page

Authentication: the API's token, as everywhere (Authorization or XRL-Authorization header). A browser
cannot send a header when it navigates, so on /dashboard paths alone the gate (app.py) also accepts
  * ``?token=<token>``, compared in constant time like the header. On the page it answers with a
    redirect to the bare /dashboard that sets a cookie, so the token leaves the address bar at once; the
    gate takes it out of the request's query string before anything (an access log) reads it. The
    trade-off: the URL opened once still holds the token (shell and browser history), as a bookmark
    would; send the header (curl) where that matters.
  * the cookie ``corral_dashboard``: an HMAC of tenant and expiry under a key made per process, never the
    token; HttpOnly (no script reads it), SameSite=Strict (another site's page cannot make the browser
    send it), Path=/dashboard; valid COOKIE_S or until the server restarts.
Neither can start a sandbox or run a command anywhere: a leaked cookie or a forged request gains a view.

Tenants: with one tenant the dashboard shows the whole runtime. With several, a token sees only the
sandboxes it started through ROCK's API and their findings (OpenEnv sessions name no tenant, so only a
one-tenant dashboard shows them); the runs table counts over all tenants, as /metrics does.

Live updates (server/feed.py): a bounded queue per stream, fed by the runtime's subscriptions; a
client that falls behind loses findings past the bound, counted and told, and refetches the snapshot.

Everything an agent controls (commands, ids) reaches the page as JSON and is set with textContent, never
as markup; the page's Content-Security-Policy runs only its own script (a nonce), timelines none at all.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import html
import secrets
import time
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import Scope

from corral import report
from corral.server.feed import RECENT, Client, events, hub, sandbox_row, visibility

if TYPE_CHECKING:
    from corral.server.state import _Server

PATH = "/dashboard"
COOKIE = "corral_dashboard"
COOKIE_S = 12 * 3600
MAX_STREAMS = 32  # every stream's callbacks run inside each emit: their number is bounded
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY"}
_NO_SCRIPT = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
router = APIRouter()


# -- authentication (called by app.py's gate, for /dashboard paths only) ------------------------------
def is_dashboard(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")


def dashboard_tenant(srv: _Server, scope: Scope, tenant: str | None) -> str | None:
    """The tenant of a /dashboard request: a ``?token=`` (a wrong one refuses, whatever else came with
    it), else `tenant` (from the API's headers), else the cookie. The token is removed from the scope's
    query string in place: uvicorn's access log and every handler read that same scope."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    given = {v for k, v in pairs if k == "token"}
    if given:
        scope["query_string"] = urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
        found = _match(srv.tokens, given.pop()) if len(given) == 1 else None
        if found is not None:
            scope.setdefault("state", {})["dashboard_login"] = found
        return found
    if tenant is not None:
        return tenant
    value = cookie_parser(Headers(scope=scope).get("cookie", "")).get(COOKIE, "")
    expires, _, _mac = value.partition(".")
    if not expires.isdigit() or int(expires) < time.time():
        return None
    found = None
    for name in sorted(set(srv.tokens.values())):  # every tenant compared: no early exit to time
        if hmac.compare_digest(value.encode(), _cookie(srv, name, int(expires)).encode()):
            found = name
    return found


def _match(tokens: dict[str, str], given: str) -> str | None:
    found = None
    for token, tenant in tokens.items():
        if hmac.compare_digest(given.encode(), token.encode()):
            found = tenant
    return found


def _cookie(srv: _Server, tenant: str, expires: int) -> str:
    mac = hmac.new(hub(srv).key, f"{tenant}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def denied_page() -> Response:
    """401 for the dashboard: a page a person can read (the API answers JSON)."""
    body = ("<!doctype html><html><head><meta charset='utf-8'><title>corral: 401</title></head><body "
            "style='font:15px system-ui,sans-serif;margin:3em'><h1>401: missing or wrong token</h1><p>Open "
            "<code>/dashboard?token=&lt;token&gt;</code> with the token <code>corral serve</code> was started "
            "with, or send <code>Authorization: Bearer &lt;token&gt;</code>.</p></body></html>")
    return HTMLResponse(body, 401, headers={**_HEADERS, "WWW-Authenticate": "Bearer",
                                            "Content-Security-Policy": _NO_SCRIPT})


# -- routes -------------------------------------------------------------------------------------------------
@functools.cache
def _page() -> str:
    return resources.files("corral.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")


@router.get(PATH, include_in_schema=False)
async def page(request: Request) -> Response:
    srv: _Server = request.app.state.corral
    login = getattr(request.state, "dashboard_login", None)
    if login is not None:  # came with ?token=: trade it for the cookie and a URL without it
        base = request.scope.get("root_path", "") + PATH
        resp = RedirectResponse(base + (f"?{request.url.query}" if request.url.query else ""), 303, headers=_HEADERS)
        resp.set_cookie(COOKIE, _cookie(srv, login, int(time.time()) + COOKIE_S), max_age=COOKIE_S, path=base,
                        httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return resp
    nonce = secrets.token_urlsafe(16)
    csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return HTMLResponse(_page().replace("{{NONCE}}", nonce),
                        headers={**_HEADERS, "Content-Security-Policy": csp})


@router.get(f"{PATH}/api/state", include_in_schema=False)
async def state(request: Request) -> JSONResponse:
    srv: _Server = request.app.state.corral
    rt = srv.runtime
    assert rt is not None
    visible = visibility(srv, request.state.tenant)
    h = hub(srv)
    usage = await h.usage(rt)
    boxes = [{**sandbox_row(srv, sb), "usage": usage.get(sb.id)} for sb in list(rt.sandboxes.values())
             if visible(sb.id)]
    found = [f for f in reversed(await h.findings(rt)) if visible(f["sandbox_id"])]
    return JSONResponse({"run_id": rt.run_id, "now": time.time(), "sandboxes": boxes, "findings": found,
                         "runs": await h.runs(rt), "problem": h.problem, "recent_max": RECENT}, headers=_HEADERS)


@router.get(f"{PATH}/stream", include_in_schema=False)
async def stream(request: Request, after: int = 0) -> Response:
    srv: _Server = request.app.state.corral
    assert srv.runtime is not None
    if hub(srv).streams >= MAX_STREAMS:
        return JSONResponse({"error": f"{MAX_STREAMS} dashboard streams are open already"}, 429, headers=_HEADERS)
    last = request.headers.get("last-event-id", "")
    client = Client(visibility(srv, request.state.tenant))
    return StreamingResponse(events(srv, client, int(last) if last.isdigit() else after),
                             media_type="text/event-stream", headers={**_HEADERS, "X-Accel-Buffering": "no"})


@router.get(PATH + "/episodes/{subject:path}", include_in_schema=False)
async def episode(request: Request, subject: str) -> Response:
    srv: _Server = request.app.state.corral
    rt = srv.runtime
    assert rt is not None
    visible = visibility(srv, request.state.tenant)

    def render() -> str | None:
        if not visible(subject):
            # another tenant's server: an episode is shown only when every sandbox it ran in is this token's
            sids = {e.sandbox_id for e in rt.store.events(episode_id=subject)}
            if rt.store.events(sandbox_id=subject, limit=1) or not sids or not all(map(visible, sids)):
                return None
        try:
            return report.to_html(report.build(rt.store, subject))
        except report.ReportNotFound:
            return None

    page_html = await asyncio.to_thread(render)
    if page_html is None:
        return HTMLResponse(f"<!doctype html><meta charset='utf-8'><title>corral: not found</title><p>No episode "
                            f"or sandbox named <code>{html.escape(subject)}</code> (for this token).</p>", 404,
                            headers={**_HEADERS, "Content-Security-Policy": _NO_SCRIPT})
    return HTMLResponse(page_html, headers={**_HEADERS, "Content-Security-Policy": _NO_SCRIPT})


__all__ = ["COOKIE", "PATH", "dashboard_tenant", "denied_page", "is_dashboard", "router"]
