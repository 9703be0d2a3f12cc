"""corral's DNS resolver for sandboxes: answers only names the sandbox's policy allows, remembers
every answer (so a raw-IP connection can be checked against what the sandbox resolved), and turns
every query into an event.

Each sandbox may ask `qps` queries per second: above that its queries are answered REFUSED at once
(nothing resolved, nothing judged) and one `dns/rate_limited` event per second says how many were,
so a flooding sandbox costs corral little and other sandboxes' lookups keep being answered. Any
error while answering is a SERVFAIL and a `degraded` event, never an answer let through."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
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
    def __init__(self, tenants: Tenants, resolve: Resolver, emit: Callable[[Event], object], ttl: int = 60,
                 qps: int = 100):
        self.tenants = tenants
        self.resolve = resolve
        self.emit = emit
        self.ttl = ttl
        self.qps = qps
        self.transport: asyncio.DatagramTransport | None = None
        self._answers = InFlight()
        self._rate: dict[str, list] = {}  # sandbox id -> [second it counts, queries, refused, recorded]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        tenant = self.tenants.get(addr[0])
        if tenant is None or self.transport is None:
            return
        if self._over_rate(tenant, data, addr):
            return
        self._answers.start(self._guarded(tenant, data, addr))

    def _over_rate(self, tenant, data: bytes, addr: tuple[str, int]) -> bool:
        """Count the query against its sandbox's second; above `qps`, answer REFUSED here, without a task."""
        now = int(time.monotonic())
        r = self._rate.get(tenant.sandbox_id)
        if r is None or r[0] != now:
            if len(self._rate) > 1024:  # forget the seconds past (sandboxes that went away)
                self._rate = {k: v for k, v in self._rate.items() if v[0] == now}
            r = self._rate[tenant.sandbox_id] = [now, 0, 0, False]
        r[1] += 1
        if r[1] <= self.qps:
            return False
        r[2] += 1
        assert self.transport is not None
        try:
            req = DNSRecord.parse(data)
            reply = req.reply()
            reply.header.rcode = RCODE.REFUSED
            self.transport.sendto(reply.pack(), addr)
            name = str(req.q.qname).rstrip(".").lower()
        except Exception:  # a malformed flood gets no answer at all
            name = None
        if not r[3]:  # one event per sandbox and second
            r[3] = True
            ev = Event(kind=EventKind.DNS, action="rate_limited", sandbox_id=tenant.sandbox_id, name=name,
                       verdict=Verdict.DENY, protocol="dns",
                       reason=f"more than {self.qps} DNS queries in a second: the rest of this second's are REFUSED",
                       data={"qps": self.qps, "src_port": addr[1]})
            tenant.attribute(ev, ("udp", addr[1]))
            self.emit(ev)
        return True

    async def _guarded(self, tenant, data: bytes, addr: tuple[str, int]) -> None:
        try:
            await self._answer(data, addr)
        except Exception as e:  # fail closed: SERVFAIL, and the error is an event
            log.exception("DNS answer failed")
            try:
                reply = DNSRecord.parse(data).reply()
                reply.header.rcode = RCODE.SERVFAIL
                if self.transport is not None:
                    self.transport.sendto(reply.pack(), addr)
            except Exception:
                pass
            try:
                self.emit(Event(kind=EventKind.SANDBOX, action="degraded", sandbox_id=tenant.sandbox_id,
                                reason=f"a DNS query could not be judged ({type(e).__name__}: {e}); it was refused"))
            except Exception:
                log.exception("recording a degraded DNS event failed")

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
