"""`corral serve`'s state: the tenants' sandboxes behind ROCK's API, the envelope every route answers
with, and the errors that become HTTP statuses. Routes live in server/rock.py, the app in server/app.py."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import Headers

from corral.config import Limits, SandboxConfig
from corral.events import Finding
from corral.images.store import is_local_source
from corral.runtime import Runtime
from corral.sandbox.sandbox import ExecResult, Sandbox
from corral.server.config import ServeConfig

if TYPE_CHECKING:
    from corral.server.rock import StartRequest

PREFIX = "/apis/envs/sandbox/v1"
OPENENV_PATH = "/openenv"  # where OpenEnv's server is mounted
MAX_UPLOAD = 64 << 20
REFUSED_EXIT = 126
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEM_MB = {"": 1 / (1 << 20), "k": 1 / 1024, "m": 1, "g": 1024, "t": 1 << 20}


# -- server state --------------------------------------------------------------------------------------
@dataclass
class _Box:
    rock_id: str
    tenant: str
    sb: Sandbox
    image: str
    rootfs: str | None
    memory: str
    created: float = field(default_factory=time.time)
    stopped: float | None = None
    mark: int = 0  # id of the last finding reported in a response
    idle_limit: float | None = None  # seconds without a request before the reaper stops it
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # operations in flight: a long command is not idleness
    stop_reason: str | None = None
    deleted: bool = False
    cpus: float | None = None  # as asked for (the quota granted is the sandbox's config)
    running_sessions: set[str] = field(default_factory=set)  # sessions with a command in flight
    session_used: dict[str, float] = field(default_factory=dict)  # session -> when its last command ended

    @property
    def alive(self) -> bool:
        return self.stopped is None and not self.sb.closed


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, *, corral: dict | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.corral = corral


def _envelope(result: Any = None, *, failed: str | None = None, message: str | None = None,
              corral: dict | None = None) -> dict:
    out: dict[str, Any] = {"status": "Failed" if failed is not None else "Success", "message": message,
                           "error": failed, "result": result}
    if corral is not None:
        out["corral"] = corral
    return out


def _fail(status_code: int, message: str, corral: dict | None = None, *, rock: bool = False) -> JSONResponse:
    """A Failed envelope. `rock`: answered as ROCK answers a refused or failed request, HTTP 200 with
    `result.code` (4000 the request, 5000 the server): ROCK's SDK raises on any other status without
    reading the body, so the reason would never reach its user. The HTTP status corral means is in
    `corral.http_status`."""
    if not rock:
        return JSONResponse(_envelope(failed=message, message=message, corral=corral), status_code=status_code)
    result = {"code": 5000 if status_code >= 500 else 4000, "exit_code": None, "failure_reason": message}
    info = {**(corral or {}), "http_status": status_code}
    return JSONResponse(_envelope(result, failed=message, message=message, corral=info), status_code=200)


def _finding_dict(f: Finding) -> dict:
    return f.model_dump(mode="json", include={"id", "ts", "rule_id", "title", "severity", "technique", "step",
                                              "command", "action", "sandbox_id"})


def _host_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def _memory_mb(text: str) -> int:
    m = _MEM_RE.match(text)
    if not m:
        raise ApiError(422, f"memory {text!r} is not a size; write e.g. '8g', '512m' or a number of bytes")
    mb = int(float(m.group(1)) * _MEM_MB[m.group(2).lower()])
    if mb < 16:
        raise ApiError(422, f"memory {text!r} is below corral's minimum of 16m")
    return mb


class _Server:
    def __init__(self, config: ServeConfig, tokens: dict[str, str]) -> None:
        self.config = config
        self.tokens = tokens
        self.runtime: Runtime | None = None
        self.boxes: dict[str, dict[str, _Box]] = {}  # tenant -> rock id -> box
        self.deleted: dict[str, list[_Box]] = {}  # tenant -> deleted boxes (their findings stay readable)
        # sandboxes being created and OpenEnv sessions open, per tenant: they count against the quota
        # from the moment they are asked for, so concurrent requests cannot overshoot it
        self.held: dict[str, int] = {}
        self.reserved_ids: dict[str, set[str]] = {}
        self.host_name = socket.gethostname()

    def tenant_of(self, headers: Headers) -> str | None:
        for header in ("authorization", "xrl-authorization"):
            value = headers.get(header)
            if not value:
                continue
            scheme, _, cred = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not cred.strip():
                continue
            cred_b = cred.strip().encode()
            found = None
            for token, tenant in self.tokens.items():
                if hmac.compare_digest(cred_b, token.encode()):
                    found = tenant
            if found is not None:
                return found
        return None

    def in_use(self, tenant: str) -> int:
        return sum(b.alive for b in self.boxes.get(tenant, {}).values()) + self.held.get(tenant, 0)

    @contextlib.contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """One of the tenant's sandboxes for the duration (ApiError 429 past the quota). No await
        between the check and the count: the event loop cannot interleave another request there."""
        limit = self.config.max_sandboxes_per_tenant
        if self.in_use(tenant) >= limit:
            raise ApiError(429, f"this token already has {limit} sandboxes running or being created "
                                "(max_sandboxes_per_tenant, ROCK and OpenEnv together); stop or delete one first")
        self.held[tenant] = self.held.get(tenant, 0) + 1
        try:
            yield
        finally:
            self.held[tenant] -= 1

    def find(self, tenant: str, rock_id: str) -> _Box | None:
        """The tenant's sandbox by its client id, running or stopped; None if it has none (deleted)."""
        return self.boxes.get(tenant, {}).get(rock_id)

    def box(self, tenant: str, rock_id: str, *, running: bool = True, deleted: bool = False,
            touch: bool = True) -> _Box:
        b = self.boxes.get(tenant, {}).get(rock_id)
        if b is None and deleted:
            b = next((d for d in reversed(self.deleted.get(tenant, [])) if d.rock_id == rock_id), None)
        if b is None:
            raise ApiError(404, f"Sandbox {rock_id} not found (for this token); start one with start_async")
        if touch:
            b.last_used = time.monotonic()
        if running and not b.alive:
            why = f" ({b.stop_reason})" if b.stop_reason else ""
            raise ApiError(409, f"sandbox {rock_id!r} is stopped{why}; start a new one", corral=self.corral(b))
        if running and b.sb.terminated:
            raise ApiError(409, f"sandbox {rock_id!r}: the episode was ended by a security finding "
                                f"({b.sb.terminated}); stop it and start a new one", corral=self.corral(b))
        return b

    def corral(self, b: _Box, r: ExecResult | None = None) -> dict:
        news = self.runtime.store.findings(sandbox_id=b.sb.id, after_id=b.mark) if self.runtime else []
        if news:
            b.mark = news[-1].id or b.mark
        out: dict[str, Any] = {"sandbox_id": b.sb.id, "findings": [_finding_dict(f) for f in news],
                               "episode_ended": b.sb.terminated}
        if r is not None:
            out.update(step=r.step, refused=r.refused, timed_out=r.timed_out, error=r.error,
                       truncated=r.truncated, oom_killed=r.oom_killed, duration=r.duration)
        return out

    def config_for(self, req: StartRequest) -> tuple[SandboxConfig, str | None]:
        if req.image_os.casefold() != "linux":
            raise ApiError(422, f"image_os {req.image_os!r} is not supported; corral runs linux sandboxes only")
        base = self.config.sandbox
        rootfs = self.config.images.get(req.image, base.rootfs)
        # a name the images table does not list: an OCI image from a registry, when the server pulls them
        image = (self.config.image_aliases.get(req.image, req.image)
                 if self.config.pull_images and req.image not in self.config.images else None)
        if image is not None and req.image not in self.config.image_aliases and is_local_source(req.image):
            # a client names registry images only: a host path (oci:/..., docker-archive:/...) would have
            # corral, as root, read whatever file or directory of the host the client points at
            raise ApiError(400, f"image {req.image!r} names a path on the server; clients name registry images "
                                "(python:3.11, registry:5000/ns/name:tag); the operator can map a name to a "
                                "local image with image_aliases")
        gpu = bool(req.num_gpus)
        if gpu and not self.config.allow_gpu:
            raise ApiError(422, "num_gpus > 0 but this server does not grant GPUs (start it with GPUs allowed)")
        cpus, memory_mb = req.limit_cpus or req.cpus, _memory_mb(req.memory)
        if cpus > self.config.max_cpus:
            raise ApiError(400, f"Requested CPUs {cpus:g} exceed the maximum allowed {self.config.max_cpus:g}")
        if memory_mb > self.config.max_memory_mb:
            raise ApiError(400, f"Requested memory {req.memory} exceed the maximum allowed "
                                f"{self.config.max_memory_mb}m")
        # a quota above the machine's CPUs means all of them
        limits = {**base.limits.model_dump(), "memory_mb": memory_mb, "cpus": min(cpus, float(_host_cpus()))}
        try:
            cfg = base.model_copy(update={"limits": Limits(**limits), "rootfs": None if image else rootfs,
                                          "image": image, "gpu": gpu or base.gpu})
        except ValidationError as e:
            raise ApiError(422, f"cannot map request to sandbox limits: {_problems(e.errors())}") from None
        return cfg, str(rootfs) if rootfs else None

    async def reap_idle(self, interval: float = 1.0) -> None:
        """Stop ROCK sandboxes nobody has used for their idle limit (a client that died leaves its
        sandboxes behind); their events and findings stay readable."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for boxes in list(self.boxes.values()):
                for b in list(boxes.values()):
                    if b.alive and not b.busy and b.idle_limit is not None and now - b.last_used > b.idle_limit:
                        with contextlib.suppress(Exception):  # one failure must not stop the reaper
                            await self.stop_box(b, f"idle for {b.idle_limit:g} s")

    async def stop_box(self, b: _Box, reason: str | None = None) -> None:
        if b.stopped is None:
            b.stopped, b.stop_reason = time.time(), reason
            await b.sb.close()

    async def close_all(self) -> None:
        # the runtime closes every sandbox it made: ROCK boxes and OpenEnv sessions alike
        if self.runtime is not None:
            await self.runtime.close()


def _problems(errors: Sequence[Any]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


