"""What follows a runtime's events and findings (metrics, traces): attached to one runtime at a time
through its subscriber hooks, which call on the event loop and must return at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from corral.events import Event, Finding
    from corral.runtime import Runtime


class Follower:
    """Subclasses define observe_event(event) and observe_finding(finding, event)."""

    _runtime: Runtime | None = None
    _unsubscribe: list[Callable[[], None]]

    def observe_event(self, ev: Event) -> None:
        raise NotImplementedError

    def observe_finding(self, f: Finding, ev: Event) -> None:
        raise NotImplementedError

    def attach(self, runtime: Runtime) -> Self:
        """Follow `runtime`'s events and findings from now on (one runtime at a time)."""
        if self._runtime is not None:
            raise ValueError(f"this {type(self).__name__} already follows a runtime; detach() first or make "
                             "another")
        self._runtime = runtime
        self._unsubscribe = [runtime.subscribe(self.observe_event), runtime.subscribe_findings(self.observe_finding)]
        return self

    def detach(self) -> None:
        for undo in getattr(self, "_unsubscribe", []):
            undo()
        self._unsubscribe, self._runtime = [], None
