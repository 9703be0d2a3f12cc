"""Blocking wrappers for code that is not async (scripts, notebooks, Gymnasium-style envs).

One event loop runs in a daemon thread per process; every call is submitted to it and waited for,
so sync and async users share the same runtime machinery.

    from corral.sync import SyncRuntime
    with SyncRuntime() as rt:
        with rt.create() as sb:
            print(sb.exec("echo hi").stdout)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from corral.config import RuntimeConfig, SandboxConfig
from corral.runtime import Runtime
from corral.sandbox.sandbox import ExecResult, Sandbox

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="corral-loop", daemon=True).start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on corral's background loop and wait for its result."""
    loop = _background_loop()
    if threading.current_thread().name == "corral-loop":
        raise RuntimeError("corral.sync called from corral's own loop; use the async API there")
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


class SyncSandbox:
    def __init__(self, sb: Sandbox) -> None:
        self.async_sandbox = sb

    @property
    def id(self) -> str:
        return self.async_sandbox.id

    @property
    def step(self) -> int:
        return self.async_sandbox.step

    def exec(self, cmd: str, **kw: Any) -> ExecResult:
        return run(self.async_sandbox.exec(cmd, **kw))

    def create_session(self, name: str = "default", **kw: Any) -> None:
        run(self.async_sandbox.create_session(name, **kw))

    def run_in_session(self, name: str, cmd: str, **kw: Any) -> ExecResult:
        return run(self.async_sandbox.run_in_session(name, cmd, **kw))

    def close_session(self, name: str) -> None:
        run(self.async_sandbox.close_session(name))

    def read_file(self, path: str, **kw: Any) -> bytes:
        return run(self.async_sandbox.read_file(path, **kw))

    def write_file(self, path: str, data: bytes | str, **kw: Any) -> None:
        run(self.async_sandbox.write_file(path, data, **kw))

    def upload(self, src: Any, dest: str) -> None:
        run(self.async_sandbox.upload(src, dest))

    def download(self, src: str, dest: Any, **kw: Any) -> list[str]:
        return run(self.async_sandbox.download(src, dest, **kw))

    def reset(self) -> None:
        run(self.async_sandbox.reset())

    def close(self) -> None:
        run(self.async_sandbox.close())

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncRuntime:
    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.async_runtime = Runtime(config)

    def start(self) -> SyncRuntime:
        run(self.async_runtime.start())
        return self

    def create(self, config: SandboxConfig | None = None, **kw: Any) -> SyncSandbox:
        return SyncSandbox(run(self.async_runtime.create(config, **kw)))

    @property
    def store(self):
        return self.async_runtime.store

    def close(self) -> None:
        run(self.async_runtime.close())

    def __enter__(self) -> SyncRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
