"""Sandbox networks made ahead of the sandboxes that will use them.

A sandbox's network (its namespace, veth pair, addresses and routes: net/netns.py) takes ~15 ms of
netlink round trips alone and several times that while other sandboxes start, and nothing in it depends
on the sandbox: so a few are kept ready, and a create without a warm sandbox takes one instead of
making it. Each is used once: a closed sandbox's network goes with it (its sockets, conntrack entries
and neighbours are the last tenant's), and the pool makes a new one in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from corral.net.netns import SandboxNet

log = logging.getLogger("corral.netpool")
REFILL_DELAY = 0.05  # seconds after a take before the pool makes its replacement


class NetPool:
    """Up to `size` networks, each with the sequence number it was made for. `make(seq)` builds one
    (blocking: run in a thread), `alloc()` and `free(seq)` hand out and take back sequence numbers."""

    def __init__(self, size: int, make: Callable[[int], SandboxNet], alloc: Callable[[], int],
                 free: Callable[[int], None]) -> None:
        self.size = size
        self._make, self._alloc, self._free = make, alloc, free
        self._ready: list[tuple[int, SandboxNet]] = []
        self._filling: asyncio.Task | None = None
        self.closed = False

    def take(self) -> tuple[int, SandboxNet] | None:
        """A ready network and its sequence number, or None (the caller makes one); refills behind, a
        moment later: making one (pyroute2 is Python, holding the GIL) would slow the very create that
        took it, whose own set-up runs in threads."""
        got = self._ready.pop() if self._ready else None
        self.refill(delay=REFILL_DELAY)
        return got

    def refill(self, delay: float = 0.0) -> None:
        if self.closed or self.size <= 0 or (self._filling is not None and not self._filling.done()):
            return
        if len(self._ready) < self.size:
            self._filling = asyncio.get_running_loop().create_task(self._fill(delay))

    async def _fill(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        while not self.closed and len(self._ready) < self.size:
            seq = 0
            try:
                seq = self._alloc()
                net = await asyncio.to_thread(self._make, seq)
            except Exception as e:
                # sandboxes still make their own (and say why if they cannot): the pool only saves time
                if seq:
                    self._free(seq)
                log.warning("corral: could not make a network ahead (%s); sandboxes make their own", e)
                return
            if self.closed:
                net.close()
                self._free(seq)
                return
            self._ready.append((seq, net))

    async def close(self) -> None:
        self.closed = True
        if self._filling is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filling
        for seq, net in self._ready:
            net.close()
            self._free(seq)
        self._ready.clear()
