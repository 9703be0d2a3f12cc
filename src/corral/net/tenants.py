"""What the network layer knows about a sandbox: looked up by the sandbox's source IP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.config import EgressPolicy
from corral.events import Event


@dataclass
class Tenant:
    sandbox_id: str
    ip: str
    policy: EgressPolicy
    # Fills in episode/step/command/pid for an event from the sandbox socket ("tcp"|"udp", sport).
    attribute: Callable[[Event, tuple[str, int] | None], None]
    resolved: dict[str, set[str]] = field(default_factory=dict)  # ip -> names resolved via corral DNS
    extra: dict[str, Any] = field(default_factory=dict)

    def remember(self, name: str, ips: list[str]) -> None:
        for ip in ips:
            self.resolved.setdefault(ip, set()).add(name)

    def forget(self, name: str) -> None:
        for names in self.resolved.values():
            names.discard(name)


class Tenants:
    def __init__(self) -> None:
        self._by_ip: dict[str, Tenant] = {}

    def add(self, t: Tenant) -> None:
        self._by_ip[t.ip] = t

    def remove(self, ip: str) -> None:
        self._by_ip.pop(ip, None)

    def get(self, ip: str) -> Tenant | None:
        return self._by_ip.get(ip)
