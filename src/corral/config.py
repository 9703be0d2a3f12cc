"""Typed configuration: sandbox limits, egress policy, runtime settings.

Everything is pydantic so a malformed config or policy file fails at load time with the field and
the fix, never halfway through a run.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.budget import Budgets
from corral.errors import ConfigError, PolicyError
from corral.events import Severity

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# mounted fresh inside every sandbox: a host path there would be hidden by the sandbox's own mount
SANDBOX_OWN_MOUNTS = ("/proc", "/dev", "/tmp", "/workspace", "/root")
# never shown to a sandbox: host sockets and runtime state (/run), the cgroup tree of every sandbox (/sys)
HOST_ONLY = ("/run", "/sys")

_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class EgressRule(BaseModel):
    """One allow rule: a domain (exact or ``*.suffix``) or a CIDR, optionally restricted to ports."""

    model_config = ConfigDict(frozen=True)

    domain: str | None = None
    cidr: str | None = None
    ports: tuple[int, int] | None = None  # inclusive range; None = any port

    @classmethod
    def parse(cls, text: str) -> EgressRule:
        """Parse ``example.com``, ``*.pypi.org:443``, ``10.0.0.0/8``, ``198.51.100.7:22``,
        ``[2001:db8::/32]:443`` or a port range ``host:8000-8100``."""
        raw = text.strip()
        if not raw:
            raise PolicyError("empty egress rule; write a domain, *.suffix, IP or CIDR, e.g. 'pypi.org:443'")
        host, ports = raw, None
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise PolicyError(f"egress rule {text!r}: unclosed '['; write e.g. '[2001:db8::/32]:443'")
            host, rest = raw[1:end], raw[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise PolicyError(f"egress rule {text!r}: expected ':PORT' after ']'")
                ports = _parse_ports(rest[1:], text)
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            ports = _parse_ports(port_text, text)
        try:
            net = ipaddress.ip_network(host, strict=False)
            return cls(cidr=str(net), ports=ports)
        except ValueError:
            pass
        domain = host.lower().rstrip(".")
        if not _DOMAIN_RE.match(domain) or domain.replace(".", "").replace("*", "").isdigit():
            raise PolicyError(
                f"egress rule {text!r}: {host!r} is neither a domain, '*.suffix', an IP nor a CIDR; "
                "examples: 'pypi.org', '*.example.com:443', '198.51.100.0/24', '203.0.113.5:22'"
            )
        return cls(domain=domain, ports=ports)

    @model_validator(mode="after")
    def _one_target(self) -> EgressRule:
        if (self.domain is None) == (self.cidr is None):
            raise ValueError("an egress rule names exactly one of 'domain' or 'cidr'")
        if self.ports is not None:
            lo, hi = self.ports
            if not (1 <= lo <= hi <= 65535):
                raise ValueError(f"port range {lo}-{hi} must lie within 1-65535 with low <= high")
        return self

    @property
    def network(self) -> IPNetwork | None:
        return ipaddress.ip_network(self.cidr) if self.cidr else None

    def port_ok(self, port: int) -> bool:
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def matches_name(self, name: str) -> bool:
        if self.domain is None:
            return False
        name = name.lower().rstrip(".")
        if self.domain.startswith("*."):
            return name.endswith(self.domain[1:])
        return name == self.domain

    def __str__(self) -> str:
        target = self.domain or self.cidr or "?"
        if self.ports is None:
            return target
        lo, hi = self.ports
        return f"{target}:{lo}" if lo == hi else f"{target}:{lo}-{hi}"


def _parse_ports(text: str, rule: str) -> tuple[int, int]:
    try:
        if "-" in text:
            lo, hi = (int(p) for p in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise PolicyError(f"egress rule {rule!r}: port {text!r} is not a number or range like 8000-8100") from None
    if not (1 <= lo <= hi <= 65535):
        raise PolicyError(f"egress rule {rule!r}: ports must lie within 1-65535 with low <= high")
    return lo, hi


class EgressPolicy(BaseModel):
    """Default-deny egress. Private, link-local, metadata and host addresses stay denied unless a
    CIDR rule names them explicitly; a domain rule never opens them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: tuple[EgressRule, ...] = ()
    dns: bool = True  # answer queries for allowed names; queries for others get NXDOMAIN
    first_bytes_timeout: float = Field(0.25, gt=0, le=10)  # wait this long for client-first bytes
    # A client-first unit (ClientHello, request head, banner or JSON line) once begun must be whole
    # within this time and size, or the connection is judged on what came (denied if domain-ruled).
    unit_timeout: float = Field(2.0, gt=0, le=60)
    unit_max_bytes: int = Field(65536, ge=1024, le=1 << 20)
    max_connections: int = Field(256, ge=1)  # concurrent gateway connections of one sandbox

    @field_validator("allow", mode="before")
    @classmethod
    def _parse_rules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        out = []
        for item in value or ():
            out.append(EgressRule.parse(item) if isinstance(item, str) else item)
        return tuple(out)

    @classmethod
    def allowing(cls, *rules: str) -> EgressPolicy:
        return cls(allow=tuple(EgressRule.parse(r) for r in rules))

    @classmethod
    def from_file(cls, path: str | Path) -> EgressPolicy:
        data = _load_yaml(path)
        data = data.get("egress", data) if isinstance(data, dict) else data
        return _validate(cls, data, path)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: Annotated[int, Field(ge=16)] = 1024
    cpus: Annotated[float, Field(gt=0, le=1024)] = 1.0
    pids: Annotated[int, Field(ge=8)] = 256
    workspace_mb: Annotated[int, Field(ge=1)] = 512
    tmp_mb: Annotated[int, Field(ge=1)] = 256
    output_bytes: Annotated[int, Field(ge=1024)] = 1 << 20  # per stream, per command
    timeout: Annotated[float, Field(gt=0)] = 120.0  # default wall clock per command
    open_files: Annotated[int, Field(ge=64)] = 4096


class SandboxConfig(BaseModel):
    """What a sandbox looks like. Equal configs share a warm pool.

    The sandbox's view of the host is minimal: /usr, /etc (its secrets masked: shadow, gshadow,
    sudoers, SSH host keys, TLS private keys, /etc/corral, ...), /bin, /sbin and /lib*, all
    read-only, and nothing of /home, /root, /srv, /opt, /var, /run, /mnt, /media or /sys's cgroups.
    ``host_paths`` adds host paths, each bound read-only at the same place (``host_paths:
    [/opt/conda, /data/models]``). They must be absolute and exist, and may not be the host's /,
    lie under the sandbox's own mounts (/proc, /dev, /tmp, /workspace, /root) or under /run or /sys
    (host sockets, runtime state, cgroups). corral's own state, stores, tokens and config files stay
    hidden inside them too; a unix socket inside one is reachable, so name none that hold sockets.
    With ``rootfs`` set the sandbox sees that directory's entries instead of the host's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: Limits = Limits()
    egress: EgressPolicy = EgressPolicy()
    rootfs: Path | None = None  # None: the host's root, read-only
    # an OCI image as the root (corral/images: pulled into the runtime's image store when missing; its
    # Env and shell apply), read-only; it takes the place of rootfs
    image: str | None = None
    workspace_template: Path | None = None  # copied into /workspace at create and reset
    env: tuple[tuple[str, str], ...] = ()
    gpu: bool = False  # bind the host's /dev/nvidia* nodes; off by default
    # globs of sandbox paths whose writes are findings (a task's verifier and tests, say)
    protected_paths: tuple[str, ...] = ()
    hostname: str = "corral"
    shell: str = "/bin/bash"
    workdir: str = "/workspace"  # where commands and sessions start (an image's WorkingDir, when it has one)
    run_as: str | None = None  # "uid:gid" commands run as, in an image sandbox (from the image's User)
    host_paths: tuple[Path, ...] = ()  # extra host paths the sandbox sees, read-only, at the same place

    @field_validator("env", mode="before")
    @classmethod
    def _env_items(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted((str(k), str(v)) for k, v in value.items()))
        return value

    @field_validator("rootfs", "workspace_template")
    @classmethod
    def _exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a directory; give an existing directory or leave it unset")
        return value

    @field_validator("host_paths")
    @classmethod
    def _host_paths(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(_host_path(p) for p in value))

    @classmethod
    def from_file(cls, path: str | Path) -> SandboxConfig:
        return _validate(cls, _load_yaml(path), path)


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _host_path(p: Path) -> Path:
    """An operator's extra visible host path, normalized; a ValueError says what is wrong with it."""
    if not p.is_absolute():
        raise ValueError(f"{p}: give an absolute host path, e.g. /opt/conda")
    norm = os.path.normpath(p)
    if norm == "/":
        raise ValueError(f"{p} is the whole host root; name the directories the sandbox needs")
    _refuse_place(p, norm)
    real = os.path.realpath(p)
    if not os.path.exists(real):
        raise ValueError(f"{p} does not exist on this host; create it or remove it from host_paths")
    if real == "/":
        raise ValueError(f"{p} leads to the whole host root; name the directories the sandbox needs")
    _refuse_place(p, real)
    if stat.S_ISSOCK(os.stat(real).st_mode):
        raise ValueError(f"{p} is a unix socket; sandboxes never reach host sockets")
    return Path(norm)


def _refuse_place(p: Path, where: str) -> None:
    for own in SANDBOX_OWN_MOUNTS:
        if _within(where, own):
            raise ValueError(f"{p} lies under {own}, one of the sandbox's own mounts (the host's would never "
                             "show there); put what the sandbox needs elsewhere, e.g. under /opt or /srv")
    for host in HOST_ONLY:
        if _within(where, host):
            raise ValueError(f"{p} lies under {host} (host sockets, runtime state, cgroups), which no sandbox "
                             "may see; copy what the sandbox needs elsewhere")


def load_yaml(path: str | Path, error: type[ConfigError] = ConfigError, what: str = "config") -> Any:
    """Parse a YAML file; a missing file or a syntax error raises `error` naming the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise error(f"{p}: cannot read {what} ({e.strerror}); check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{p}:{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None


def _load_yaml(path: str | Path) -> Any:
    return load_yaml(path) or {}


def _validate(cls: type[BaseModel], data: Any, path: str | Path) -> Any:
    try:
        return cls.model_validate(data)
    except PolicyError as e:
        raise PolicyError(f"{path}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


# an image's uid/gid k is stored on the host as STORAGE_UID_BASE + k (corral/images): a range that no
# host user and no sandbox is given, so nothing of an image belongs to anyone on the host
STORAGE_UID_BASE = 3_000_000_000
ID_RANGE = 65536
SANDBOX_UIDS = 1024 << 12  # instances x sandboxes per instance, one uid each, from uid_base
# image sandboxes get ID_RANGE ids each (sandbox/imageroot.py): slots from IMAGE_UID_BASE, below storage
IMAGE_UID_BASE = 1 << 31
IMAGE_SLOTS = (STORAGE_UID_BASE - IMAGE_UID_BASE) // ID_RANGE


_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class AlertSink(BaseModel):
    """Where findings at or above `min_severity` are POSTed as they happen (corral/observe/sinks.py):
    `webhook` (corral's finding JSON), `slack` (an incoming-webhook message) or `falco` (Falco's alert
    JSON, for falcosidekick's `/`). Delivery never holds up judging: a bounded queue of `queue_size`
    alerts per sink (the oldest dropped when full), `retries` tries more on errors, `timeout_s` each."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["webhook", "slack", "falco"]
    url: str
    min_severity: Severity = Severity.HIGH
    headers: dict[str, str] = Field(default_factory=dict)  # e.g. an Authorization token
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 1000

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
        except ValueError:
            raise ValueError(f"{value!r} has an invalid port; write e.g. 'http://falcosidekick:2801/'") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host; write e.g. "
                             "'https://hooks.slack.com/services/...' or 'http://falcosidekick:2801/'")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not an HTTP header name; use letters, digits and '-'")
            if "\r" in text or "\n" in text:
                raise ValueError(f"header {name!r}: a value may not contain line breaks")
        return value


class RuntimeConfig(BaseModel):
    """Settings of one corral runtime (one process serving many sandboxes)."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Path(".corral")
    store_url: str | None = None  # default: sqlite file in state_dir
    hosts: dict[str, list[str]] = Field(default_factory=dict)  # static DNS answers (test worlds)
    system_dns: bool = True  # resolve other allowed names with this machine's resolver
    uid_base: Annotated[int, Field(ge=65536, le=4_000_000_000)] = 1_500_000_000
    detection: bool = True  # judge every event with the rules
    rule_files: tuple[Path, ...] = ()  # loaded after corral's own rules: add, override, disable
    actions: dict[str, str] = Field(default_factory=dict)  # rule id or severity -> action override
    # Instance numbers (and so cgroup, nftables and link names, and uid ranges) are claimed by an
    # flock here: every runtime on a machine must use the same lock_dir, or two could take one number.
    lock_dir: Path = Path("/run/corral")
    # Host paths no sandbox sees (token and config files, say), besides those always hidden: every
    # live runtime's state_dir, store, lock_dir and rule files. A directory hides all beneath it.
    hidden_paths: tuple[Path, ...] = ()
    budgets: Budgets = Field(default_factory=Budgets)  # per-sandbox caps (corral/budget.py)
    # OCI images (corral/images): where pulled images are kept (sandboxes' users must be able to reach
    # it, so not under a private directory), a docker config.json with registry logins, and registries
    # (host:port) reached over plain HTTP
    image_dir: Path = Field(default_factory=lambda: Path(os.environ.get("CORRAL_IMAGE_DIR")
                                                         or "/var/cache/corral/images"))
    registry_auth_file: Path | None = None
    insecure_registries: tuple[str, ...] = ()
    # After a sandbox's first reset, launch its next deployment ahead, so that later resets swap it
    # in (milliseconds) instead of starting one: an idle second agent per such sandbox (its memory).
    reset_spare: bool = True
    # The in-sandbox agent: "native" (agent.c, built on first use; a few hundred KiB per sandbox),
    # "python" (agent.py; an interpreter per sandbox), "auto" (native where a C compiler is)
    agent: Literal["auto", "native", "python"] = "auto"
    # Sandbox networks (namespace, veth, addresses, routes) kept made ahead, so a create without a warm
    # sandbox does not wait for them (net/netpool.py); each is used once. 0 turns it off.
    net_pool: Annotated[int, Field(ge=0, le=256)] = 4
    # where findings are sent as they happen (webhook, Slack, falcosidekick): see AlertSink
    alerts: tuple[AlertSink, ...] = ()
    # The run its events and findings belong to (`corral runs`): a fresh id per Runtime unless given
    # (a resumed rollout gives its own again); the kind and a label say what started it.
    run_id: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")] = None
    run_kind: Literal["library", "run", "rollout", "demo", "serve", "bench", "shell"] = "library"
    run_label: str | None = None

    @field_validator("uid_base")
    @classmethod
    def _uids_apart(cls, value: int) -> int:
        if value < STORAGE_UID_BASE + ID_RANGE and value + SANDBOX_UIDS > IMAGE_UID_BASE:
            raise ValueError(f"uid_base {value} makes sandbox uids overlap the uids of image sandboxes and "
                             f"images ({IMAGE_UID_BASE}..{STORAGE_UID_BASE + ID_RANGE - 1}); choose one below "
                             f"{IMAGE_UID_BASE - SANDBOX_UIDS} or above {STORAGE_UID_BASE + ID_RANGE}")
        return value

    @classmethod
    def from_file(cls, path: str | Path) -> RuntimeConfig:
        return _validate(cls, _load_yaml(path), path)
