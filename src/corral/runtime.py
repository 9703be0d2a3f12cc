"""Runtime: the host side that sandboxes share. One per process is typical.

It owns the instance id (a lock under /run/corral that also tells `corral gc` whether its leftovers
belong to a live process), the gateway and DNS resolver, the nftables table, corral's cgroups, the
event store, and the warm pool of ready sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from corral.config import RuntimeConfig, SandboxConfig
from corral.detect import Detector
from corral.detect import load as load_rules
from corral.errors import IsolationUnavailable, StoreError
from corral.events import Event, EventKind, Finding, new_run_id
from corral.monitor import masquerade
from corral.monitor.gpu import GpuMonitor, NvmlBackend, resolve_from_cgroup
from corral.monitor.sampler import ProcessSampler
from corral.net import netns, nft
from corral.net.dns import DNSServer, static_resolver, system_resolver
from corral.net.gateway import Gateway, host_addresses
from corral.net.netpool import NetPool
from corral.net.tenants import Tenant, Tenants
from corral.pipeline import EventPath
from corral.respond import Responder
from corral.sandbox import rootfs
from corral.sandbox.cgroups import PREFIX, InstanceCgroups, discover
from corral.sandbox.imageroot import ImageRoots
from corral.sandbox.sandbox import Sandbox
from corral.store import Store

if TYPE_CHECKING:
    from corral.observe.sinks import Alerts

MAX_INSTANCES = 1024
MAX_SEQ = 4095
log = logging.getLogger("corral")
REFILL_DELAY = 0.2  # seconds between taking a pooled sandbox and starting its replacement


def lock_instance(lock_dir: Path, instance: int) -> int | None:
    """The instance's lock, held through the returned descriptor; None when a live runtime holds it."""
    fd = os.open(lock_dir / f"instance-{instance:03x}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Runtime(EventPath):
    _default: ClassVar[Runtime | None] = None
    _default_lock: ClassVar[asyncio.Lock | None] = None

    def __init__(self, config: RuntimeConfig | None = None, *, store: Store | None = None) -> None:
        self.config = config or RuntimeConfig()
        self._store = store
        # every event and finding it records carries this run's id; a run is a row of the store's runs
        self.run_id = self.config.run_id or new_run_id()
        self.instance = -1
        self._lock_fd: int | None = None
        self.tenants = Tenants()
        self.sandboxes: dict[str, Sandbox] = {}
        self._subscribers: list[Callable[[Event], None]] = []
        self._finding_subscribers: list[Callable[[Finding, Event], None]] = []
        self._free_seqs: list[int] = []
        self._image_roots: ImageRoots | None = None
        self._next_seq = 2
        self._nets: NetPool | None = None  # networks made ahead (net/netpool.py)
        self._pool: dict[SandboxConfig, list[Sandbox]] = {}
        self._pool_targets: dict[SandboxConfig, int] = {}
        self._building: dict[SandboxConfig, int] = {}
        self._refill_tasks: set[asyncio.Task] = set()
        self.cgroups: InstanceCgroups | None = None
        self.cgroup_problem: str | None = None
        self.gateway: Gateway | None = None
        self.dns_transport: asyncio.DatagramTransport | None = None
        self.dns: DNSServer | None = None
        self.detector: Detector | None = None
        self.sampler: ProcessSampler | None = None
        self.gpu_monitor: GpuMonitor | None = None
        self.responder = Responder(self)
        self.alerts: Alerts | None = None  # alert sinks (observe/sinks.py), when config.alerts names any
        self._degraded_at: dict[str, float] = {}
        self.started = False

    # -- start / stop ------------------------------------------------------------------------------
    @classmethod
    async def default(cls) -> Runtime:
        if cls._default_lock is None:
            cls._default_lock = asyncio.Lock()
        async with cls._default_lock:
            if cls._default is None or not cls._default.started:
                rt = cls()
                await rt.start()
                cls._default = rt
            return cls._default

    @property
    def store(self) -> Store:
        assert self._store is not None, "runtime not started"
        return self._store

    async def start(self) -> Runtime:
        if self.started:
            return self
        if os.geteuid() != 0:
            raise IsolationUnavailable("corral's runtime needs root (network namespaces, nftables, cgroups); "
                                       "run it as root or in a root container")
        self._acquire_instance()
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if self._store is None:
            self._store = Store(self.config.store_url or state / "corral.db")
        self._store.start_writer(self.config.budgets)
        self._store.start_run(self.run_id, self.config.run_kind, self.config.run_label)
        masquerade.DEFAULT.configure(self.config.budgets.hash_bytes, self.config.budgets.window_s)
        rootfs.register(self.config.lock_dir, self.instance, self._own_paths())
        if self.config.detection:
            self.detector = Detector(load_rules(list(self.config.rule_files)), self.config.actions)
            await asyncio.to_thread(self.detector.ruleset.warm)
        h = discover(f"{self.instance:03x}")
        if h.version is not None:
            # off the event loop: clearing a dead runtime's leftovers of this instance waits for its processes to die
            self.cgroups = await asyncio.to_thread(InstanceCgroups, h)
        self.cgroup_problem = h.problem
        self.gateway = Gateway(self.tenants, self.emit, await asyncio.to_thread(host_addresses))
        gw_port = await self.gateway.start()
        fallback = system_resolver if self.config.system_dns else None
        resolver = static_resolver(self.config.hosts, fallback)
        loop = asyncio.get_running_loop()
        self.dns_transport, self.dns = await loop.create_datagram_endpoint(
            lambda: DNSServer(self.tenants, resolver, self.emit, qps=self.config.budgets.dns_qps),
            local_addr=("0.0.0.0", 0))
        dns_port = self.dns_transport.get_extra_info("sockname")[1]
        await asyncio.to_thread(nft.install, self.instance, gw_port, dns_port)
        self._nets = NetPool(self.config.net_pool, self._make_net, self._alloc_seq, self._free_seqs.append)
        self._nets.refill()
        self.sampler = ProcessSampler(self)
        self.sampler.start()
        nvml_ok, _ = await asyncio.to_thread(NvmlBackend.available)  # nvmlInit can take seconds
        if nvml_ok and self.cgroups is not None:
            self.gpu_monitor = GpuMonitor(resolve=self._gpu_resolve, granted=self._gpu_granted,
                                          emit=self._gpu_emit, backend=NvmlBackend())
            self.gpu_monitor.start()
        if self.config.alerts:  # httpx is imported only by runtimes that send alerts
            from corral.observe.sinks import attach_sinks

            self.alerts = attach_sinks(self)
        self.started = True
        return self

    def _acquire_instance(self) -> None:
        lock_dir = self.config.lock_dir
        lock_dir.mkdir(parents=True, exist_ok=True)
        for i in random.sample(range(MAX_INSTANCES), MAX_INSTANCES):
            fd = lock_instance(lock_dir, i)
            if fd is None:
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.instance, self._lock_fd = i, fd
            return
        raise IsolationUnavailable(f"all {MAX_INSTANCES} corral instance slots in {lock_dir} are taken")

    async def close(self) -> None:
        """Close every sandbox and remove everything this runtime created."""
        if not self.started:
            return
        for t in list(self._refill_tasks):
            t.cancel()
        if self._nets is not None:
            await self._nets.close()
        if self.sampler is not None:
            await self.sampler.stop()
        if self.gpu_monitor is not None:
            await self.gpu_monitor.stop()
            self.gpu_monitor = None
        pooled = [sb for sbs in self._pool.values() for sb in sbs]
        self._pool.clear()
        self._pool_targets.clear()
        await asyncio.gather(*(sb.close() for sb in [*self.sandboxes.values(), *pooled]),
                             return_exceptions=True)
        await self.drain()  # events of connections and queries in flight are recorded, not lost
        if self.alerts is not None:  # what was judged goes out, within a grace period
            await self.alerts.close()
            self.alerts = None
        if self.gateway:
            self.gateway.kill()
        if self.dns_transport:
            self.dns_transport.close()
        with contextlib.suppress(IsolationUnavailable):
            await asyncio.to_thread(nft.remove, self.instance)
        if self.cgroups:
            await asyncio.to_thread(self.cgroups.remove)
        if self._image_roots is not None:
            await asyncio.to_thread(self._image_roots.close)
            self._image_roots = None
        if self._store is not None:
            with contextlib.suppress(StoreError):  # a failing store: its run just has no end
                self._store.end_run(self.run_id)
            self._store.close()
        if self._lock_fd is not None:
            rootfs.unregister(self.config.lock_dir, self.instance)
            os.ftruncate(self._lock_fd, 0)  # the pid goes with the lock: pids are reused
            os.close(self._lock_fd)
            self._lock_fd = None
        self.started = False
        if Runtime._default is self:
            Runtime._default = None

    async def __aenter__(self) -> Runtime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sandboxes ---------------------------------------------------------------------------------
    async def create(self, config: SandboxConfig | None = None, *, sandbox_id: str | None = None,
                     episode_id: str | None = None) -> Sandbox:
        """A ready sandbox: from the warm pool when one matches, else built now. A config naming an
        image gets that image's root (pulled first if the store lacks it; ImageError if it cannot be)."""
        config = config or SandboxConfig()
        t0 = time.perf_counter()
        config = await self._with_image(config)
        pool = self._pool.get(config)
        sb = pool.pop() if pool else None
        warm = sb is not None
        if sb is not None:
            self._refill(config)
            if sandbox_id:
                self._rename(sb, sandbox_id)
        else:
            sb = Sandbox(config, runtime=self, sandbox_id=sandbox_id)
            await self._build(sb)
        sb.episode_id = episode_id
        self.sandboxes[sb.id] = sb
        self.emit(Event(kind=EventKind.SANDBOX, action="created", sandbox_id=sb.id, episode_id=episode_id,
                        data={"warm": warm, "create_seconds": time.perf_counter() - t0,
                              "ip": sb.net.ip if sb.net else None, "uid": sb.uid,
                              "cgroups": sb.cgroup is not None}))
        return sb

    @property
    def image_roots(self) -> ImageRoots:
        if self._image_roots is None:
            base = self.config.image_dir.parent / f"roots-{self.instance:03x}"  # mounted only in the helper's view
            self._image_roots = ImageRoots(self.config.lock_dir, base)
        return self._image_roots

    async def _with_image(self, config: SandboxConfig) -> SandboxConfig:
        """The config with its image resolved (corral/images/config.py); as it is without one."""
        from corral.images import resolve_image, store_for

        return await resolve_image(config, store_for(self.config))

    async def adopt(self, sb: Sandbox) -> None:
        """Start a Sandbox object made with Sandbox(config) (the `async with` form)."""
        sb._runtime = self
        await self._build(sb)
        self.sandboxes[sb.id] = sb
        self.emit(Event(kind=EventKind.SANDBOX, action="created", sandbox_id=sb.id, episode_id=sb.episode_id,
                        data={"warm": False, "ip": sb.net.ip if sb.net else None, "uid": sb.uid}))

    def _rename(self, sb: Sandbox, new_id: str) -> None:
        if new_id in self.sandboxes:
            raise ValueError(f"sandbox id {new_id!r} is in use; choose another")
        sb.id = new_id
        if sb.net:
            t = self.tenants.get(sb.net.ip)
            if t:
                t.sandbox_id = new_id

    async def _build(self, sb: Sandbox) -> None:
        if not self.started:
            await self.start()
        if sb.id in self.sandboxes:
            raise ValueError(f"sandbox id {sb.id!r} is in use; choose another")
        sb.config = await self._with_image(sb.config)  # a Sandbox(config) made by the caller (adopt)
        made = self._nets.take() if self._nets is not None else None  # a network made ahead, if one is ready
        seq = made[0] if made is not None else self._alloc_seq()
        sb._seq = seq
        sb.net = made[1] if made is not None else None  # owned by the sandbox from here: _free returns it
        try:
            # an image sandbox owns a range of ids (its image's users), others one uid
            sb.uid = (self.image_roots.claim() if sb.config.image is not None
                      else self.config.uid_base + (self.instance << 12) + seq)
            if sb.net is None:
                sb.net = await asyncio.to_thread(self._make_net, seq)
            if self.cgroups is not None:
                sb.cgroup = await asyncio.to_thread(self.cgroups.sandbox, sb.id, sb.config.limits)
            self.tenants.add(Tenant(sb.id, sb.net.ip, sb.config.egress, sb.attribute))
            await sb._launch()
            await sb._populate()
        except BaseException:
            await self._free(sb)
            raise

    def _make_net(self, seq: int) -> netns.SandboxNet:
        return netns.create(self.instance, seq)

    def _alloc_seq(self) -> int:
        if self._free_seqs:
            return self._free_seqs.pop()
        if self._next_seq > MAX_SEQ:
            raise IsolationUnavailable(f"this runtime already has {MAX_SEQ - 1} sandboxes; close some first")
        self._next_seq += 1
        return self._next_seq - 1

    async def release(self, sb: Sandbox) -> None:
        """Called by Sandbox.close(): return its network, cgroup and sequence number."""
        self.sandboxes.pop(sb.id, None)
        await self._free(sb)

    async def _free(self, sb: Sandbox) -> None:
        if sb.net is not None:
            self.tenants.remove(sb.net.ip)
            net, sb.net = sb.net, None
            # Closing our handle frees the namespace once its processes are gone; the kernel then
            # deletes the veth pair with it (no netlink round trip, no lock).
            net.close()
        if sb.cgroup is not None:
            cg, sb.cgroup = sb.cgroup, None
            await asyncio.to_thread(cg.remove)
        if sb._seq:
            self._free_seqs.append(sb._seq)
            sb._seq = 0
        if self._image_roots is not None and sb.config.image is not None and sb.uid:
            await self._image_roots.drop(sb.uid)
            self._image_roots.release(sb.uid)

    # -- GPU monitor hooks ---------------------------------------------------------------------------
    def _gpu_resolve(self, pid: int) -> tuple[str, int | None] | None:
        found = resolve_from_cgroup(pid, instance=f"{self.instance:03x}")
        if found is None:
            return None
        name, step = found
        # a pooled sandbox may have been renamed; its cgroup keeps the name it was built under
        for sb in self.sandboxes.values():
            if sb.cgroup is not None and sb.cgroup.dirs[sb.cgroup.h.tracking].name == PREFIX + name:
                return sb.id, step
        return None

    def _gpu_granted(self, sandbox_id: str) -> tuple[bool, set[int] | None] | None:
        sb = self.sandboxes.get(sandbox_id)
        return None if sb is None else (sb.config.gpu, None)  # a grant covers the whole sandbox

    def _gpu_emit(self, ev: Event) -> None:
        sb = self.sandboxes.get(ev.sandbox_id)
        if sb is not None:
            sb.attribute(ev, pid=ev.pid)  # the step's command, episode and tool call
        self.emit(ev)

    def forget_dns(self, sb: Sandbox) -> None:
        if sb.net:
            t = self.tenants.get(sb.net.ip)
            if t:
                t.resolved.clear()

    def masked_paths(self) -> list[str]:
        """Host paths no sandbox may see: this runtime's own (state_dir, store, lock_dir, rule files,
        hidden_paths) and those every other live runtime sharing lock_dir registered at its start.
        The sandbox masks each wherever its view of the host would show it (sandbox/rootfs.py)."""
        return sorted(self._own_paths() | rootfs.registered(self.config.lock_dir))

    def _own_paths(self) -> set[str]:
        c = self.config
        out = {str(c.state_dir.resolve()), str(c.lock_dir), *map(str, c.rule_files), *map(str, c.hidden_paths)}
        engine = self._store.engine if self._store is not None else None
        if engine is not None and engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            out.update(rootfs.store_files(os.path.abspath(engine.url.database)))
        return out

    # -- warm pool ---------------------------------------------------------------------------------
    async def prewarm(self, config: SandboxConfig | None = None, size: int = 4) -> None:
        """Keep `size` ready sandboxes of this config; create() then takes one in ~1 ms."""
        config = await self._with_image(config or SandboxConfig())  # the key create() looks under
        self._pool_targets[config] = size
        pool = self._pool.setdefault(config, [])
        need = size - len(pool)
        if need > 0:
            built = await asyncio.gather(*(self._pooled(config) for _ in range(need)))
            pool.extend(built)

    async def _pooled(self, config: SandboxConfig) -> Sandbox:
        sb = Sandbox(config, runtime=self)
        await self._build(sb)
        return sb

    def _refill(self, config: SandboxConfig) -> None:
        # one builder per taken sandbox, counted while in flight, so the pool never overfills
        if len(self._pool.get(config, [])) + self._building.get(config, 0) >= self._pool_targets.get(config, 0):
            return
        self._building[config] = self._building.get(config, 0) + 1

        async def refill() -> None:
            try:
                # a moment later: the taken sandbox's first command then runs without a launch (two
                # processes starting, a cgroup migration) competing with it for the CPU
                await asyncio.sleep(REFILL_DELAY)
                self._pool.setdefault(config, []).append(await self._pooled(config))
            finally:
                self._building[config] -= 1

        task = asyncio.get_running_loop().create_task(refill())
        self._refill_tasks.add(task)
        task.add_done_callback(self._refill_tasks.discard)
