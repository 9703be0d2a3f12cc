"""Tasks started for an event still being decided (a connection the gateway is judging, a DNS answer,
a containment action). They are kept so that `drain()` can wait for them: a command that connected
just before it exited is judged after exec() returns, and its events must still be recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class InFlight:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float | None = 3.0) -> None:
        """Wait for the tasks in flight to finish: `timeout` seconds at most (None: as long as it takes)."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
