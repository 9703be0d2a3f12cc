"""Timers wrapped around a runtime's own functions, for the profilers (profile_create.py,
profile_phases.py): each call's milliseconds go to TIMES under a label. Imports nothing of corral, so a
profiler can time an older tree too (PYTHONPATH=OLD/src)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

TIMES: dict[str, list[float]] = {}


def timed(name: str, fn: Callable[..., Any], coro: bool) -> Callable[..., Any]:
    def note(t0: float) -> None:
        TIMES.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    if coro:
        @functools.wraps(fn)
        async def wrapped_async(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                note(t0)
        return wrapped_async

    @functools.wraps(fn)
    def wrapped(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            note(t0)
    return wrapped
