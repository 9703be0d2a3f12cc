"""`corral serve`'s dashboard in a real headless Chromium (Debian's, driven by Playwright): what a person
sees updates live as a sandbox mines, an agent's markup stays text, and the browser's credentials open
the dashboard and nothing else. The threats: a command line or id the agent wrote is HTML and script; a
token in a URL leaks through logs; a cookie that could drive the API would turn any page into a client."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from corral import Runtime, RuntimeConfig
from corral.events import Event, EventKind, Finding, Severity
from corral.server import create_app
from corral.server.app import PREFIX
from corral.server.feed import CMD_MAX, QUEUE_MAX, Client, clip, hub
from tests.conftest import serve_app

TOKEN = "tok-dash-" + "d" * 20
OTHER = "tok-other-" + "o" * 20
CHROMIUM = "/usr/bin/chromium"
# The screenshots go to a results folder: the README's (benchmarks/results/screenshots) when
# CORRAL_SCREENSHOTS names it, else one under /tmp, so a test run leaves the checkout as it was.
SHOTS = Path(os.environ.get("CORRAL_SCREENSHOTS") or "/tmp/corral-test-screenshots")
# the agent's text, written to be markup: it must reach the page as these exact characters
PAYLOAD = """<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">"""
MINER = f"echo '{PAYLOAD}'; cp /bin/sleep /tmp/xmrig; /tmp/xmrig 3"
EPISODE = 'ep-"><img src=x onerror="window.__pwned=3">'


@dataclass
class Served:
    base: str
    app: object
    loop: asyncio.AbstractEventLoop
    runtime: Runtime

    def run(self, coro, timeout: float = 60):
        """A coroutine on the server's event loop (the runtime lives there), from this test's thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def _serve(world, state: Path, tokens) -> Iterator[Served]:
    made: dict = {}

    def factory(cfg: RuntimeConfig) -> Runtime:  # called in the lifespan, on the server's loop
        made["loop"], made["rt"] = asyncio.get_running_loop(), Runtime(cfg)
        return made["rt"]

    app = create_app(RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False), tokens,
                     runtime_factory=factory)
    with serve_app(app) as base:
        yield Served(base, app, made["loop"], made["rt"])


@pytest.fixture(scope="module")
def served(world, tmp_path_factory) -> Iterator[Served]:
    with _serve(world, tmp_path_factory.mktemp("dash-state"), TOKEN) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install 'corral[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM}: Debian's chromium package is missing (apt-get install chromium; `make test` "
                    "installs it)")
    with sync_api.sync_playwright() as p:
        # as root a browser cannot use its own sandbox; the suite's network namespace holds loopback only
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                              "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()  # its streams end with it, before the server shuts down


def _expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # a shared, busy machine: events land when they land
    return expect


def test_a_miner_appears_live_and_its_markup_stays_text(served, context):
    expect = _expect()
    rt, base = served.runtime, served.base
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    resp = page.goto(f"{base}/dashboard?token={TOKEN}")
    assert resp is not None and resp.status == 200
    assert page.url == f"{base}/dashboard", "the token must leave the address bar"
    (cookie,) = context.cookies()
    assert cookie["name"] == "corral_dashboard" and TOKEN not in cookie["value"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    expect(page.locator("#status")).to_have_attribute("data-state", "live")
    page.evaluate("window.__marker = 'the same page'")  # a reload would take it away

    sb = served.run(rt.create(episode_id=EPISODE))
    try:
        row = page.locator(f"#sandboxes tr[data-sandbox-id='{sb.id}']")
        served.run(sb.exec("echo hello"))
        expect(row.locator("td.step")).to_have_text("1")
        expect(row).to_contain_text("running")
        expect(row).to_contain_text(EPISODE)

        served.run(sb.exec(MINER))  # refused: it never mines, and the finding names step 2
        found = page.locator("#findings tbody tr[data-rule='miner-binary']").first
        expect(found).to_be_visible()
        expect(found).to_have_class(re.compile(r"\bnew\b"))  # pushed by the stream, not loaded with the page
        expect(found.locator("code.cmd")).to_have_text(MINER)  # every character, as text
        expect(found).to_contain_text("critical")
        expect(found.locator("td").nth(4)).to_have_text("2")
        expect(row.locator("td.step")).to_have_text("2")
        assert page.evaluate("window.__marker") == "the same page"
        # shown, not run: no element the payload names exists, no handler fired
        assert page.evaluate("window.__pwned") is None
        assert page.locator("main img").count() == 0 and page.locator("script").count() == 1
        expect(row.locator("td").nth(4)).to_contain_text(" s")  # resource use sampled from its cgroup
        expect(row.locator("td").nth(5)).to_contain_text("MB")
        expect(page.locator(f"#run-list [data-run-id='{rt.run_id}']")).to_contain_text("miner-binary")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "dashboard.png"), full_page=True)

        found.get_by_role("link", name=EPISODE).click()  # the episode's timeline
        page.wait_for_url(re.compile(r"/dashboard/episodes/"))
        expect(page.locator("body")).to_contain_text("miner-binary")
        expect(page.locator("body")).to_contain_text("/tmp/xmrig")
        assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
        page.screenshot(path=str(SHOTS / "episode.png"), full_page=True)
    finally:
        served.run(sb.close())
    assert not errors, errors


def test_the_browser_needs_the_token_and_its_cookie_opens_only_the_dashboard(served, browser, caplog):
    base = served.base
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        for url in ("/dashboard", "/dashboard?token=wrong", f"/dashboard?token={TOKEN[:-1]}", "/dashboard/stream",
                    "/dashboard/episodes/anything"):
            resp = page.goto(base + url)
            assert resp is not None and resp.status == 401, url
            assert "missing or wrong token" in page.inner_text("body")
        assert ctx.cookies() == []
        page.goto(f"{base}/dashboard?token={TOKEN}")
        (cookie,) = ctx.cookies()
    finally:
        ctx.close()
    jar = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    expires, _, mac = cookie["value"].partition(".")
    with httpx.Client(base_url=base, timeout=30) as c:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/dashboard/api/state").status_code == 401
        assert c.get("/dashboard/api/state", headers=bearer).status_code == 200
        assert c.get("/dashboard/api/state", params={"token": TOKEN}).status_code == 200
        # a wrong ?token= refuses even beside a good header
        assert c.get("/dashboard/api/state", params={"token": "nope"}, headers=bearer).status_code == 401
        assert c.get("/dashboard/api/state", headers=jar).status_code == 200
        for forged in (f"{int(expires) + 1}.{mac}", f"{expires}.{'0' * len(mac)}", TOKEN, "1.x"):
            r = c.get("/dashboard/api/state", headers={"Cookie": f"{cookie['name']}={forged}"})
            assert r.status_code == 401, forged
        # the browser's credentials open the dashboard only: never the API, which runs commands
        assert c.get("/findings", headers=jar).status_code == 401
        assert c.get("/findings", params={"token": TOKEN}).status_code == 401
        assert c.post(f"{PREFIX}/start_async", json={"image": "x"}, headers=jar).status_code == 401
        assert c.post(f"{PREFIX}/start_async?token={TOKEN}", json={"image": "x"}).status_code == 401
        # the token never reaches the access log, whatever its level
        access = logging.getLogger("uvicorn.access")
        level = access.level
        access.setLevel(logging.INFO)
        try:
            with caplog.at_level(logging.INFO, logger="uvicorn.access"):
                access.addHandler(caplog.handler)
                try:
                    assert c.get("/dashboard/api/state", params={"token": TOKEN, "x": "1"}).status_code == 200
                finally:
                    access.removeHandler(caplog.handler)
        finally:
            access.setLevel(level)
        logged = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
        assert any("/dashboard/api/state?x=1" in m for m in logged), logged
        assert not any(TOKEN in m for m in logged), logged


def test_a_stream_unsubscribes_when_its_client_goes(served):
    rt = served.runtime
    before = (len(rt._subscribers), len(rt._finding_subscribers))
    with httpx.Client(base_url=served.base, timeout=30) as c, c.stream(
            "GET", "/dashboard/stream", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        seen = set()
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.add(line[7:])
            if "usage" in seen:
                break
        assert {"sandboxes", "usage"} <= seen
        assert hub(served.app.state.corral).streams == 1
        assert len(rt._finding_subscribers) == before[1] + 1
    _until(lambda: hub(served.app.state.corral).streams == 0, "the stream to end when its client left")
    assert (len(rt._subscribers), len(rt._finding_subscribers)) == before


def _until(cond, what: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_slow_client_drops_and_counts_instead_of_growing():
    # the callbacks as Runtime.emit calls them; put_nowait and set() need no running loop
    c = Client(lambda _sid: True)
    f = Finding(rule_id="r", title="t", severity=Severity.HIGH, sandbox_id="sb-1", command="x")
    ev = Event(kind=EventKind.PROCESS, action="exec", sandbox_id="sb-1")
    for i in range(QUEUE_MAX + 7):
        c.on_finding(f.model_copy(update={"id": i + 1}), ev)
    assert c.findings.qsize() == QUEUE_MAX and c.dropped == 7
    # state changes are coalesced per sandbox; a callback never raises into Runtime.emit
    for _ in range(1000):
        c.on_event(Event(kind=EventKind.COMMAND, action="start", sandbox_id="sb-1"))
    c.on_event(Event(kind=EventKind.CONNECT, action="connect", sandbox_id="sb-2"))  # not a state change
    assert c.dirty == {"sb-1"}
    broken = Client(lambda _sid: 1 / 0)
    broken.on_event(Event(kind=EventKind.SANDBOX, action="created", sandbox_id="sb-3"))


def test_a_long_command_is_cut_visibly():
    long = "a" * (CMD_MAX + 50)
    assert clip(long) == "a" * CMD_MAX + "… (+50 characters)"
    assert clip("short") == "short" and clip(None) is None


def test_each_tenant_sees_only_its_own_sandboxes(world, tmp_path):
    with _serve(world, tmp_path, [TOKEN, OTHER]) as s:
        mine, theirs = ({"Authorization": f"Bearer {t}"} for t in (TOKEN, OTHER))
        with httpx.Client(base_url=s.base, timeout=60) as c:
            r = c.post(f"{PREFIX}/start_async", json={"image": "python:3.11", "sandbox_id": "dash-1"},
                       headers=mine).json()
            sid = r["result"]["corral"]["sandbox_id"]
            c.post(f"{PREFIX}/execute", json={"sandbox_id": "dash-1", "command": MINER}, headers=mine)
            state = c.get("/dashboard/api/state", headers=mine).json()
            assert [b["id"] for b in state["sandboxes"]] == [sid] and state["sandboxes"][0]["name"] == "dash-1"
            assert {f["rule_id"] for f in state["findings"]} == {"miner-binary"}
            assert state["findings"][0]["command"] == MINER  # JSON carries the text; the page sets it as text
            other = c.get("/dashboard/api/state", headers=theirs).json()
            assert other["sandboxes"] == [] and other["findings"] == []
            assert c.get(f"/dashboard/episodes/{sid}", headers=theirs).status_code == 404
            page = c.get(f"/dashboard/episodes/{sid}", headers=mine)
            assert page.status_code == 200 and "miner-binary" in page.text
            assert "script-src" not in page.headers["content-security-policy"]  # a timeline runs no script
            c.post(f"{PREFIX}/delete", json={"sandbox_id": "dash-1"}, headers=mine)
