"""Shared fixtures. The whole suite runs inside a private network namespace of its own
(`make test` wraps pytest in `unshare --net --mount`); it refuses to run anywhere else, so that no
test can ever send a packet to the machine's real network."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from corral import EgressPolicy, Limits, Runtime, RuntimeConfig, SandboxConfig
from corral import testworld as tw
from corral.rollout.taskworld import TASK_FILES
from corral.testworld import World


def _in_private_netns() -> bool:
    """A namespace the suite made for itself starts with loopback only (the machine's has a NIC)."""
    with open("/proc/self/net/dev") as f:
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    return names == ["lo"]


def pytest_configure(config: pytest.Config) -> None:
    if not _in_private_netns() and not os.environ.get("CORRAL_TEST_NETNS_OK"):
        raise pytest.UsageError(
            "corral's tests must run in a private network namespace; use 'make test' "
            "(or: unshare --net --mount -- sh -c 'ip link set lo up && pytest')"
        )


# Addresses of the fake world (documentation and private ranges only).
PKG = ("198.51.100.10", 80, "pkg.example.com")
OTHER = ("198.51.100.11", 80, "other.example.com")
POOL = ("203.0.113.5", 3333, "pool.example.net")
TLS = ("203.0.113.6", 443, "secure.example.org")
SSH = ("203.0.113.7", 22, "ssh.example.org")
INTERNAL = ("10.20.0.5", 80, "internal.example.com")
METADATA = ("169.254.169.254", 80, None)


@pytest.fixture(scope="session", autouse=True)
def image_store() -> Iterator[Path]:
    """The suite's own image store (reachable by sandbox users, as the default one is), removed after."""
    import shutil

    d = Path(f"/var/cache/corral/test-images-{os.getpid()}")
    os.environ["CORRAL_IMAGE_DIR"] = str(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    w = World()
    w.start()
    # one world for the whole session (worlds share the documentation addresses and their routes):
    # pkg.example.com also serves the example tasks' files
    w.serve(*PKG[:2], tw.http_files({**TASK_FILES, "/": b"package index\n"}), name=PKG[2])
    w.serve(*OTHER[:2], tw.http_ok(b"other\n"), name=OTHER[2])
    w.serve(*POOL[:2], tw.stratum_pool, name=POOL[2])
    w.serve(*TLS[:2], tw.sink, name=TLS[2])
    w.serve(*SSH[:2], tw.ssh_banner, name=SSH[2])
    w.serve(*INTERNAL[:2], tw.http_ok(b"internal secrets\n"), name=INTERNAL[2])
    w.serve(*METADATA[:2], tw.http_ok(b'{"AccessKeyId": "AKIA-TEST"}\n'))
    w.serve("198.51.100.30", 7, tw.echo, name="echo.example.com")
    yield w
    w.close()


@pytest_asyncio.fixture(scope="session")
async def runtime(world: World, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runtime]:
    state = tmp_path_factory.mktemp("corral-state")
    rt = Runtime(RuntimeConfig(state_dir=state, hosts=world.hosts, system_dns=False))
    await rt.start()
    yield rt
    await rt.close()


@pytest_asyncio.fixture
async def sb_factory(runtime: Runtime) -> AsyncIterator:
    made = []

    async def make(config: SandboxConfig | None = None, **kw):
        sb = await runtime.create(config, **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        await sb.close()


def allow(*rules: str, **limits) -> SandboxConfig:
    return SandboxConfig(egress=EgressPolicy.allowing(*rules), limits=Limits(**limits) if limits else Limits())


def add_rule(monkeypatch, ruleset, rule) -> None:
    """A rule made in the test, judged beside the shipped ones for the test's duration (in the full
    list and in the detector's per-kind index, which `rule.scope` selects: None for every event)."""
    active = ruleset.active
    monkeypatch.setattr(ruleset, "active", lambda: [*active(), rule])
    # the per-kind index is built from active() on first use: a fresh one for the test's duration, so
    # the rule neither outlives the test in the index nor is counted twice
    for memo in ("_by_kind", "_compiled", "_by_program"):
        monkeypatch.setattr(ruleset, memo, {}, raising=False)


async def findings_for(runtime, sb, rule=None, wait=10.0):
    """The sandbox's findings (of `rule`, if given), once there are any or `wait` seconds passed."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        got = [f for f in runtime.store.findings(sandbox_id=sb.id) if rule is None or f.rule_id == rule]
        if got or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.05)


async def eventually(cond, what: str, timeout: float = 20.0):
    """Poll cond() until it returns something truthy (its value is returned) or fail naming `what`.
    Events made by background processes and worker threads land when they land: tests wait for a
    condition, never for a fixed time, and the generous deadline costs nothing when all goes well."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def py(code: str) -> str:
    """A shell command running Python code inside the sandbox."""
    import shlex

    return f"python3 -c {shlex.quote(code)}"


def connect_cmd(ip_or_name: str, port: int, payload: bytes = b"", read: bool = True) -> str:
    return py(
        "import socket,sys\n"
        f"s=socket.create_connection(({ip_or_name!r},{port}),timeout=5)\n"
        f"s.sendall({payload!r})\n"
        + ("data=s.recv(65536)\nprint('RECV', len(data)); sys.stdout.write(data.decode(errors='replace'))\n"
           if read else "")
    )


@pytest.fixture
def host_server() -> Iterator[tuple[str, int]]:
    """A TCP server on this namespace's loopback, standing for a service on the host."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()
    s.close()



@contextmanager
def serve_app(app) -> Iterator[str]:
    """A real uvicorn server for an ASGI app on a free loopback port, lifespan included; yields its URL
    and checks on the way out that it shut down."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert t.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(30)
        assert not t.is_alive(), "server did not shut down"
