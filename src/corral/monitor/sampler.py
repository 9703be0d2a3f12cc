"""Samples the CPU and memory of every sandbox process once a second.

Feeds per-step accounting (CPU seconds, peak memory) and emits a `process/sample` event for a
process that used at least `hot_cpu` percent of a core over the last interval (at most one every
`hot_every` seconds per process), which rules like "sustained CPU" judge. An idle sandbox costs three
small file reads per interval: its agent's state (a stopped agent ends the episode) and its task
count against the tasks corral itself keeps in it. The processes sampled are read from the cgroups
of the sandbox's steps and sessions, not from a record of which commands left some behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.events import Event, EventKind

if TYPE_CHECKING:
    from corral.runtime import Runtime
    from corral.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class _Seen:
    ticks: int
    step: int | None
    last_hot: float = 0.0
    first: float = 0.0


class ProcessSampler:
    def __init__(self, runtime: Runtime, interval: float = 1.0, hot_cpu: float = 50.0, hot_every: float = 5.0):
        self.runtime = runtime
        self.interval = interval
        self.hot_cpu = hot_cpu
        self.hot_every = hot_every
        self._seen: dict[tuple[str, int, int], _Seen] = {}  # (sandbox, pid, starttime)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="corral-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sample_once()
            except Exception:  # the sampler must never stop the runtime
                log.exception("process sampler failed; continuing")

    def sample_once(self) -> None:
        now = time.time()
        live: set[tuple[str, int, int]] = set()
        for sb in list(self.runtime.sandboxes.values()):
            if sb.closed or sb.frozen:
                continue
            sb.check_agent()
            if sb.cgroup is None or not sb.busy():
                continue
            for step, pids in sb.live_processes():
                for pid in pids:
                    self._sample(sb, step, pid, now, live)
        for key in [k for k in self._seen if k not in live]:
            del self._seen[key]

    def _sample(self, sb: Sandbox, step: int | None, pid: int, now: float, live: set) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return
        ticks, start, rss_kb = int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21]) * PAGE_KB
        key = (sb.id, pid, start)
        live.add(key)
        seen = self._seen.get(key)
        stats = sb.stats_for(step) if step is not None else None  # None: a session that ran nothing yet
        if stats is not None:
            stats.peak_rss_kb = max(stats.peak_rss_kb, rss_kb)
        if seen is None:
            self._seen[key] = _Seen(ticks, step, first=now)
            if stats is not None:
                stats.cpu_sampled += ticks / TICK
            return
        delta = ticks - seen.ticks
        seen.ticks = ticks
        if stats is not None:
            stats.cpu_sampled += delta / TICK
        percent = 100.0 * delta / TICK / self.interval
        if percent >= self.hot_cpu and now - seen.last_hot >= self.hot_every:
            seen.last_hot = now
            ev = Event(kind=EventKind.PROCESS, action="sample", sandbox_id=sb.id,
                       data={"cpu_percent": round(percent, 1), "rss_mb": round(rss_kb / 1024, 1),
                             "age": round(now - seen.first, 1), "cpu_seconds": round(ticks / TICK, 2),
                             "task_comm": _comm(pid)})
            sb.attribute(ev, pid=pid)
            self.runtime.emit(ev)


def _comm(pid: int) -> str | None:
    """The name the process gives itself now (prctl(PR_SET_NAME) changes it after exec)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None
