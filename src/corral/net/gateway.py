"""The transparent egress gateway: every TCP connection a sandbox makes ends here first.

For each connection: recover the original destination (SO_ORIGINAL_DST), hold the client's first
unit until it is whole (reassemble.py: a ClientHello across records, a request head, a banner or
JSON line, under a deadline and a size bound), classify it, decide by policy, record an event, and
only then, if allowed, connect upstream and relay. A denied connection never opens an upstream
socket, so zero bytes leave. A client that says nothing within `first_bytes_timeout` (a server-first
protocol) is decided on its destination alone; its first unit is judged when it comes.

Judging does not stop at the first unit (inspect.py): every request on an HTTP connection, the
CONNECT and absolute-form targets it names, and a mining or SSH line later in any other stream are
judged before their bytes go on. The relay (relay.py) runs on the event loop with no thread per
connection; each sandbox has a cap on concurrent connections, and the accept loop outlives running
out of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.config import EgressPolicy
from corral.events import Event, EventKind, Verdict
from corral.inflight import InFlight
from corral.net.inspect import Denied, Inspector, Unit
from corral.net.policy import Decision, decide, name_allowed_on
from corral.net.relay import relay, reset
from corral.net.tenants import Tenant, Tenants

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
FIRST_READ = 1 << 16
CONNECT_TIMEOUT = 10.0
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
HEALTH_SANDBOX = "corral-gateway"  # the sandbox id of events about the gateway itself
REFUSAL_EVENT_EVERY = 1.0  # seconds: over-cap refusals of one sandbox are recorded this often at most


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def raise_nofile_limit() -> int:
    """Raise this process's descriptor soft limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("corral gateway: could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
        return soft
    return hard


@dataclass
class _Conn:
    tenant: Tenant
    ev: Event  # the connection's first event (its attribution is copied to later ones)
    dst_ip: str
    dst_port: int
    cidr: bool  # allowed by a CIDR rule: names do not matter, content still does
    emitted: bool = False
    seen: set[tuple[str | None, str | None]] = field(default_factory=set)


class Gateway:
    def __init__(self, tenants: Tenants, emit: Callable[[Event], object], host_addresses: frozenset[str]):
        self.tenants = tenants
        self.emit = emit
        self.host_addresses = host_addresses
        self.listener: socket.socket | None = None
        self.port = 0
        self.nofile = 0
        self._task: asyncio.Task | None = None
        self._conns: set[socket.socket] = set()
        self._handlers = InFlight()  # connections being decided: drain() waits for these
        self._relays: set[asyncio.Task] = set()  # connections relaying: they may live for hours
        self._active: dict[str, int] = {}  # sandbox id -> connections held now
        self._refused: dict[str, list[float]] = {}  # sandbox id -> [refusals not yet recorded, last record]
        self.accept_failures = 0

    async def start(self, port: int = 0) -> int:
        self.nofile = raise_nofile_limit()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4096)
        s.setblocking(False)
        self.listener = s
        self.port = s.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(), name="corral-gateway")
        return self.port

    @property
    def accepting(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while self.listener is not None:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.listener is None:
                    return  # closed by kill()
                # Out of descriptors (or kernel memory): the pending connection stays queued. Back
                # off and retry, never exit: every tenant's egress depends on this loop.
                backoff = min(max(backoff * 2, 0.05), 1.0)
                self._accept_failed(e, backoff)
                await asyncio.sleep(backoff)
                continue
            if backoff:
                backoff = 0.0
                self._health("recovered", f"accepting again after {self.accept_failures} failed accepts")
                self.accept_failures = 0
            self._handlers.start(self._handle(conn, addr))

    def _accept_failed(self, e: BaseException, backoff: float) -> None:
        self.accept_failures += 1
        if self.accept_failures == 1:  # one event per episode of trouble, not one per retry
            code = errno.errorcode.get(e.errno, "") if isinstance(e, OSError) and e.errno else ""
            self._health("degraded", f"accept failed: {code} {e}; backing off {backoff:g} s and retrying",
                         {"errno": code, "open_file_limit": self.nofile})

    def _health(self, action: str, reason: str, data: dict | None = None) -> None:
        log.warning("corral gateway %s: %s", action, reason)
        with contextlib.suppress(Exception):  # recording may fail for the very reason we report
            self.emit(Event(kind=EventKind.CONNECT, action=action, sandbox_id=HEALTH_SANDBOX, reason=reason,
                            data={"component": "gateway", **(data or {})}))

    async def drain(self) -> None:
        """Let connection handlers still deciding finish, so their events are recorded."""
        await self._handlers.drain()

    def kill(self) -> None:
        """Stop abruptly, as a crash would: the listener goes; in-flight relays are cut."""
        listener, self.listener = self.listener, None
        if self._task:
            self._task.cancel()
        for t in list(self._relays):
            t.cancel()
        if listener:
            listener.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    close = kill

    # -- one connection ----------------------------------------------------------------------------
    async def _handle(self, client: socket.socket, addr: tuple[str, int]) -> None:
        tenant = self.tenants.get(addr[0])
        if tenant is None:
            client.close()
            return
        try:
            dst_ip, dst_port = original_dst(client)
        except OSError:
            client.close()
            return
        ev = Event(kind=EventKind.CONNECT, action="connect", sandbox_id=tenant.sandbox_id,
                   dst_ip=dst_ip, dst_port=dst_port, data={"src_port": addr[1]})
        # Attribute while the client socket surely still exists (before we read or decide).
        tenant.attribute(ev, ("tcp", addr[1]))
        sid = tenant.sandbox_id
        if self._active.get(sid, 0) >= tenant.policy.max_connections:
            self._refuse(tenant, ev, client)
            return
        self._active[sid] = self._active.get(sid, 0) + 1
        self._conns.add(client)
        handed_over = False
        try:
            handed_over = await self._decide_and_connect(tenant, client, addr, ev, dst_ip, dst_port)
        finally:
            if not handed_over:
                self._release(sid, client)
                client.close()

    def _release(self, sid: str, *socks: socket.socket) -> None:
        for s in socks:
            self._conns.discard(s)
        n = self._active.get(sid, 1) - 1
        if n > 0:
            self._active[sid] = n
        else:
            self._active.pop(sid, None)

    def _refuse(self, tenant: Tenant, ev: Event, client: socket.socket) -> None:
        reset(client)
        now = asyncio.get_running_loop().time()
        pending = self._refused.setdefault(tenant.sandbox_id, [0, -REFUSAL_EVENT_EVERY])
        pending[0] += 1
        if now - pending[1] < REFUSAL_EVENT_EVERY:
            return
        cap = tenant.policy.max_connections
        ev.verdict, ev.bytes_up, ev.bytes_down = Verdict.DENY, 0, 0
        ev.reason = f"over this sandbox's cap of {cap} concurrent connections (egress.max_connections)"
        ev.data.update({"refused": int(pending[0]), "cap": cap})
        pending[0], pending[1] = 0, now
        self._record(ev)

    async def _decide_and_connect(self, tenant: Tenant, client: socket.socket, addr: tuple[str, int], ev: Event,
                                  dst_ip: str, dst_port: int) -> bool:
        loop = asyncio.get_running_loop()
        policy = tenant.policy
        conn = _Conn(tenant, ev, dst_ip, dst_port, cidr=_cidr_allows(policy, dst_ip, dst_port))
        insp = Inspector(lambda u: self._judge(conn, u), policy.unit_max_bytes)
        out = b""
        client_done = False
        start = loop.time()
        try:
            while not conn.emitted:
                now = loop.time()
                pending = insp.pending_since is not None
                deadline = insp.pending_since + policy.unit_timeout if pending else start + policy.first_bytes_timeout
                left = deadline - now
                if left <= 0:
                    if not pending:
                        break  # it says nothing first: a server-first protocol, or an idle client
                    out += insp.expire(f"unfinished after {policy.unit_timeout:g} s")
                    continue
                try:
                    data = await asyncio.wait_for(loop.sock_recv(client, FIRST_READ), left)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    client_done = True
                    out += insp.expire("the client stopped sending before the unit ended")
                    break
                out += insp.feed(data, loop.time())
        except Denied:
            reset(client)
            return False
        if not conn.emitted:
            d = decide(policy, dst_ip, dst_port, tenant.resolved.get(dst_ip, set()), None, self.host_addresses)
            if not self._record_first(conn, None, d, 0):
                reset(client)
                return False
        upstream: socket.socket | None = None
        try:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # EMFILE here is a failed connect
            upstream.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(upstream, (dst_ip, dst_port)), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as e:
            self._record(self._later(conn, action="connect_failed", verdict=Verdict.ALLOW, bytes_up=0, bytes_down=0,
                                     reason=f"upstream unreachable: {_errtext(e)}"))
            if upstream is not None:
                upstream.close()
            reset(client)
            return False
        self._conns.add(upstream)
        task = loop.create_task(self._relay(conn, client, upstream, insp, out, client_done, addr))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return True

    async def _relay(self, conn: _Conn, client: socket.socket, upstream: socket.socket, insp: Inspector,
                     first: bytes, client_done: bool, addr: tuple[str, int]) -> None:
        up = down = 0
        try:
            up, down, _ = await relay(client, upstream, insp, first, conn.tenant.policy.unit_timeout, client_done)
        finally:
            self._release(conn.tenant.sandbox_id, client, upstream)
            ev = conn.ev
            self._record(self._later(conn, action="close", verdict=Verdict.ALLOW, bytes_up=up, bytes_down=down,
                                     name=ev.name, protocol=ev.protocol,
                                     data={"connect_event": ev.id, "src_port": addr[1]}))

    # -- judging units -----------------------------------------------------------------------------
    def _judge(self, conn: _Conn, unit: Unit) -> bool:
        """The Inspector's judge: decide a unit, record it, and say whether its bytes may go on."""
        try:
            if unit.incomplete is not None:
                if conn.cidr and unit.stage == "first" and unit.tunnel is None:
                    # a CIDR rule allows the destination whatever it is called; what comes next is scanned
                    d = Decision(True, f"allowed by CIDR rule (first unit: {unit.incomplete})")
                else:
                    d = Decision(False, f"{unit.sniff.protocol} unit refused: {unit.incomplete}")
            else:
                d = self._decide_unit(conn, unit)
        except Exception as e:  # a rule or parser that raises denies: fail closed
            log.exception("corral gateway: judging a unit failed")
            d = Decision(False, f"judging failed: {type(e).__name__}: {e}")
        if not conn.emitted:
            return self._record_first(conn, unit, d, unit.size)
        key = (unit.sniff.protocol, unit.sniff.name)
        if d.allow and (key in conn.seen or key == ("unknown", None)):
            # the same protocol and name as judged before on this connection, or nothing recognisable
            # (a server-first protocol's client talking): the connection's first event says it all
            return True
        conn.seen.add(key)
        ev = self._later(conn, action="connect", verdict=Verdict.ALLOW if d.allow else Verdict.DENY,
                         reason=d.reason, protocol=unit.sniff.protocol,
                         name=unit.sniff.name or d.name or conn.ev.name,
                         bytes_up=None if d.allow else 0, bytes_down=None if d.allow else 0)
        ev.data.update(_unit_data(unit))
        ev.data["connect_event"] = conn.ev.id
        return self._record(ev) and ev.verdict == Verdict.ALLOW

    def _decide_unit(self, conn: _Conn, unit: Unit) -> Decision:
        tenant, policy = conn.tenant, conn.tenant.policy
        claimed = unit.sniff.name
        if unit.tunnel is not None:
            host, port = unit.tunnel
            d = Decision(True, f"inside CONNECT {host}:{port}")
            if claimed and claimed != host:
                d = self._judge_named(tenant, claimed, port)
        else:
            names = tenant.resolved.get(conn.dst_ip, set())
            d = decide(policy, conn.dst_ip, conn.dst_port, names, claimed, self.host_addresses)
        head = unit.head
        if d.allow and head is not None:
            if head.problems:
                d = Decision(False, "ambiguous HTTP request: " + "; ".join(head.problems))
            elif head.named is not None:
                named = self._judge_named(tenant, *head.named)
                d = named if not named.allow else d
        return d

    def _judge_named(self, tenant: Tenant, host: str, port: int) -> Decision:
        """A host a request names (absolute-form, CONNECT, SNI in a tunnel): where it asks to go next."""
        if _is_ip(host):
            return decide(tenant.policy, host, port, tenant.resolved.get(host, set()), None, self.host_addresses)
        if name_allowed_on(tenant.policy, host, port):
            return Decision(True, f"allowed name {host}", host)
        return Decision(False, f"the request names {host}:{port}, which no rule allows")

    def _record_first(self, conn: _Conn, unit: Unit | None, d: Decision, size: int) -> bool:
        ev, tenant = conn.ev, conn.tenant
        names = tenant.resolved.get(conn.dst_ip, set())
        sniff = unit.sniff if unit is not None else None
        conn.emitted = True
        ev.protocol = sniff.protocol if sniff else "none"
        claimed = sniff.name if sniff else None
        ev.name = claimed or d.name or (sorted(names)[0] if names else None)
        ev.verdict = Verdict.ALLOW if d.allow else Verdict.DENY
        ev.reason = d.reason
        ev.data.update({"first_bytes": size, "resolved": sorted(names)})
        if claimed:
            ev.data["claimed_name"] = claimed
        if sniff is not None and sniff.detail:
            ev.data["sniff"] = sniff.detail
        if unit is not None:
            ev.data.update(_unit_data(unit))
        if not d.allow:
            ev.bytes_up, ev.bytes_down = 0, 0
        conn.seen.add((ev.protocol, claimed))
        ok = self._record(ev)  # the rules may turn an allowed connection into a denied one
        if ev.verdict == Verdict.DENY:
            ev.bytes_up, ev.bytes_down = 0, 0
        return ok and ev.verdict == Verdict.ALLOW

    def _later(self, conn: _Conn, **fields: object) -> Event:
        """Another event of this connection, attributed as its first event was."""
        ev = conn.ev
        base: dict[str, object] = {
            "sandbox_id": ev.sandbox_id, "episode_id": ev.episode_id, "step": ev.step, "command": ev.command,
            "pid": ev.pid, "exe": ev.exe, "argv": ev.argv, "dst_ip": conn.dst_ip, "dst_port": conn.dst_port,
            "data": {"connect_event": ev.id},
        }
        base.update(fields)
        return Event(kind=EventKind.CONNECT, **base)  # type: ignore[arg-type]

    def _record(self, ev: Event) -> bool:
        """Record an event; False if it could not be (the caller then denies: fail closed)."""
        try:
            self.emit(ev)
            return True
        except Exception as e:
            log.exception("corral gateway: recording a %s event failed", ev.action)
            ev.verdict, ev.reason = Verdict.DENY, f"could not be recorded ({type(e).__name__}): denied"
            return False


def _unit_data(unit: Unit) -> dict:
    data: dict = {"unit": unit.index, "stage": unit.stage}
    if unit.incomplete:
        data["incomplete"] = unit.incomplete
    if unit.tunnel:
        data["tunnel"] = f"{unit.tunnel[0]}:{unit.tunnel[1]}"
    if unit.head is not None:
        data["http"] = {"method": unit.head.method, "target": unit.head.target}
    if unit.sniff.detail:
        data["sniff"] = unit.sniff.detail
    return data


def _cidr_allows(policy: EgressPolicy, ip: str, port: int) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(r.network is not None and addr in r.network and r.port_ok(port) for r in policy.allow)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _errtext(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno)) + f" ({e.strerror})"
    return str(e)


def host_addresses() -> frozenset[str]:
    """Every address of the namespace corral runs in: a sandbox must not reach host services."""
    out = set()
    with contextlib.suppress(OSError):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for a in ipr.get_addr():
                ip = a.get_attr("IFA_ADDRESS")
                if ip:
                    out.add(str(ipaddress.ip_address(ip)))
    return frozenset(out)
