"""A dict that remembers only the most recently set keys: for per-sandbox memories (pids seen,
datagram rate limits, directory handles, downloads) that must not grow without bound however much
a sandbox does."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(dict[K, V]):
    """Setting a key makes it the newest; past `limit` keys, the oldest go."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.limit:
            del self[next(iter(self))]
