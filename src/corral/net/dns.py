"""corral's DNS resolver for sandboxes: answers only names the sandbox's policy allows, remembers
every answer (so a raw-IP connection can be checked against what the sandbox resolved), and turns
every query into an event."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.dns import DNSError

from corral.events import Event, EventKind, Verdict
from corral.inflight import InFlight
from corral.net.policy import name_allowed
from corral.net.tenants import Tenants

log = logging.getLogger(__name__)
Resolver = Callable[[str], Awaitable[list[str]]]


def static_resolver(hosts: dict[str, list[str]], fallback: Resolver | None = None) -> Resolver:
    table = {k.lower().rstrip("."): list(v) for k, v in hosts.items()}

    async def resolve(name: str) -> list[str]:
        if name in table:
            return table[name]
        return await fallback(name) if fallback else []

    return resolve


async def system_resolver(name: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({i[4][0] for i in infos})


class DNSServer(asyncio.DatagramProtocol):
    def __init__(self, tenants: Tenants, resolve: Resolver, emit: Callable[[Event], object], ttl: int = 60):
        self.tenants = tenants
        self.resolve = resolve
        self.emit = emit
        self.ttl = ttl
        self.transport: asyncio.DatagramTransport | None = None
        self._answers = InFlight()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._answers.start(self._answer(data, addr))

    async def drain(self) -> None:
        """Let answers in flight finish, so their events are recorded."""
        await self._answers.drain()

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        tenant = self.tenants.get(addr[0])
        if tenant is None or self.transport is None:
            return
        try:
            req = DNSRecord.parse(data)
        except (DNSError, Exception):
            ev = Event(kind=EventKind.DNS, action="malformed", sandbox_id=tenant.sandbox_id,
                       verdict=Verdict.DENY, reason="malformed DNS packet", data={"bytes": len(data)})
            tenant.attribute(ev, None)
            self.emit(ev)
            return
        reply = req.reply()
        q = req.q
        name = str(q.qname).rstrip(".").lower()
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        answers: list[str] = []
        if not tenant.policy.dns or not name_allowed(tenant.policy, name):
            verdict, reason = Verdict.DENY, "name not allowed by the egress policy"
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            verdict, reason = Verdict.ALLOW, "allowed name"
            if q.qtype in (QTYPE.A, QTYPE.ANY):
                answers = await self.resolve(name)
                for ip in answers:
                    reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
                if not answers:
                    reply.header.rcode = RCODE.NXDOMAIN
                    reason = "allowed name did not resolve"
                tenant.remember(name, answers)
            # AAAA and other types: an empty NOERROR answer; sandboxes have no IPv6 egress.
        ev = Event(kind=EventKind.DNS, action="query", sandbox_id=tenant.sandbox_id, name=name,
                   verdict=verdict, reason=reason, protocol="dns",
                   data={"qtype": qtype, "answers": answers, "src_port": addr[1]})
        tenant.attribute(ev, ("udp", addr[1]))
        self.emit(ev)
        if ev.verdict == Verdict.DENY and verdict == Verdict.ALLOW:  # a rule blocked an allowed name
            reply = req.reply()
            reply.header.rcode = RCODE.NXDOMAIN
            tenant.forget(name)
        self.transport.sendto(reply.pack(), addr)
