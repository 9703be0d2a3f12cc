"""Egress decisions: given a destination, what the sandbox resolved, and what the client said.

Order: an explicit CIDR rule allows (it may open a private range on purpose); then the always-denied
ranges (private, loopback, link-local incl. cloud metadata, corral's own, host addresses); then a
domain rule allows an IP only if this sandbox resolved it through corral's DNS for an allowed name,
and a TLS SNI or HTTP Host, when present, must be such a name too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from corral.config import EgressPolicy

METADATA = ipaddress.ip_address("169.254.169.254")
ALWAYS_DENIED = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
    )
]


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str
    name: str | None = None  # the allowed name that justified the IP, if any


def decide(
    policy: EgressPolicy,
    ip: str,
    port: int,
    resolved_names: Iterable[str] = (),
    claimed_name: str | None = None,
    host_addresses: frozenset[str] = frozenset(),
) -> Decision:
    addr = ipaddress.ip_address(ip)
    for rule in policy.allow:
        net = rule.network
        if net is not None and addr in net and rule.port_ok(port):
            return Decision(True, f"allowed by rule {rule}")
    if addr == METADATA:
        return Decision(False, "cloud metadata address is denied unless a CIDR rule names it")
    if ip in host_addresses:
        return Decision(False, "the host's own address is denied unless a CIDR rule names it")
    for net in ALWAYS_DENIED:
        if addr.version == net.version and addr in net:
            return Decision(
                False, f"{net} (private/loopback/link-local/reserved) is denied unless a CIDR rule names it"
            )
    names = sorted(set(resolved_names))
    allowed = [n for n in names if any(r.matches_name(n) and r.port_ok(port) for r in policy.allow)]
    if not allowed:
        if names:
            return Decision(False, f"no rule allows {', '.join(names)} on port {port}")
        if any(r.domain for r in policy.allow):
            return Decision(False, "IP was not resolved through corral DNS for an allowed name")
        return Decision(False, "default deny: no rule allows this destination")
    if claimed_name is not None and not _is_ip(claimed_name) and claimed_name not in allowed:
        return Decision(False, f"SNI/Host {claimed_name!r} does not match the resolved name(s) {', '.join(allowed)}")
    return Decision(True, f"allowed name {allowed[0]}", allowed[0])


def name_allowed(policy: EgressPolicy, name: str) -> bool:
    return any(r.matches_name(name) for r in policy.allow)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def name_allowed_on(policy: EgressPolicy, name: str, port: int) -> bool:
    """A domain rule allows `name` on `port` (where a request says it goes next: CONNECT, absolute URL)."""
    return any(r.matches_name(name) and r.port_ok(port) for r in policy.allow)
