"""`corral serve`'s configuration: one YAML file, every key of which a CLI flag can override.

    host: 127.0.0.1
    port: 8080
    token_file: /etc/corral/tokens      # one token per line (a tenant each); or CORRAL_SERVE_TOKEN
    max_sandboxes_per_tenant: 64
    idle_timeout_s: 1800                # a ROCK sandbox without requests this long is stopped (0: never)
    images: {python:3.11: /srv/rootfs/py311, ubuntu:22.04: null}   # null: the host's root, read-only
    allow_gpu: false
    pull_images: false                  # other image names: pulled from their registry (corral images)
    image_aliases: {python:3.11: "registry.local:5000/python:3.11"}   # what to pull for a name
    max_cpus: 16                        # the largest sandbox a client may ask for (as ROCK's max_allowed_spec)
    max_memory_mb: 65536
    runtime: {state_dir: /var/lib/corral, rule_files: [/etc/corral/rules.yaml]}   # RuntimeConfig
    sandbox: {limits: {memory_mb: 2048, cpus: 2}, egress: {allow: ["pypi.org:443"]}}  # SandboxConfig
    openenv: {enabled: true, tasks: /srv/tasks, max_concurrent_envs: 32}
    otel: {endpoint: "http://127.0.0.1:4318/v1/traces", service_name: corral}   # traces (corral[otel])

Tokens are never read from the YAML file itself, which tends to be shared and checked in. The
token file must be readable by its owner only (``chmod 600``): corral serve refuses it otherwise.
Neither file, nor the rule files, is ever visible inside a sandbox.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from corral.agent.reward import RewardConfig
from corral.config import RuntimeConfig, SandboxConfig, _validate, load_yaml
from corral.errors import ConfigError

TOKEN_ENV = "CORRAL_SERVE_TOKEN"


class ServeConfigError(ConfigError):
    """The service's configuration or its tokens are unusable."""


class OpenEnvSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None  # mounted at /openenv; None: when openenv-core is installed
    tasks: Path | None = None  # task directory [default: corral's examples/tasks]
    max_concurrent_envs: Annotated[int, Field(ge=1, le=4096)] = 32
    reward: RewardConfig = Field(default_factory=RewardConfig)


class OtelSettings(BaseModel):
    """OpenTelemetry traces (corral/observe/otel.py) sent to an OTLP/HTTP collector; needs corral[otel]."""

    model_config = ConfigDict(extra="forbid")
    endpoint: Annotated[str, Field(pattern=r"^https?://\S+$")] = "http://127.0.0.1:4318/v1/traces"
    service_name: Annotated[str, Field(min_length=1)] = "corral"


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    token_file: Path | None = None
    max_sandboxes_per_tenant: Annotated[int, Field(ge=1)] = 64
    idle_timeout_s: Annotated[float, Field(ge=0)] = 1800  # a ROCK sandbox unused this long is stopped; 0: never
    images: dict[str, Path | None] = Field(default_factory=dict)
    allow_gpu: bool = False
    # names the images table does not list are OCI images, pulled into the runtime's image store (a
    # failed pull fails the start with the registry's reason); off: they run on the host's root
    pull_images: bool = False
    # with pull_images: a client's image name -> the image reference pulled for it (a local registry's
    # or an OCI layout's copy of python:3.11, say)
    image_aliases: dict[str, str] = Field(default_factory=dict)
    # the largest sandbox a client may ask for (ROCK's max_allowed_spec); a request above is refused with
    # ROCK's message. Within it, a CPU quota above this machine's CPUs is granted as all of them.
    max_cpus: Annotated[float, Field(gt=0)] = 16
    max_memory_mb: Annotated[int, Field(ge=16)] = 64 << 10
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    openenv: OpenEnvSettings = Field(default_factory=OpenEnvSettings)
    otel: OtelSettings | None = None  # None: no traces
    _source: Path | None = PrivateAttr(None)  # the YAML file this came from

    @classmethod
    def from_file(cls, path: str | Path) -> ServeConfig:
        cfg = _validate(cls, load_yaml(path, ServeConfigError, "service config") or {}, path)
        cfg._source = Path(path)
        for name, root in cfg.images.items():
            if root is not None and not root.is_dir():
                raise ServeConfigError(f"{path}: images.{name}: {root} is not a directory; give a root "
                                       "filesystem directory, or null for the host's root")
        return cfg

    def runtime_config(self) -> RuntimeConfig:
        """The runtime's settings, with the token file and this config file hidden from every sandbox."""
        extra = [p for p in (self.token_file, self._source) if p is not None]
        update: dict = {"hidden_paths": (*self.runtime.hidden_paths, *extra)}
        if self.runtime.run_kind == "library":  # a serve session is a run of its own (`corral runs`)
            update.update(run_kind="serve", run_label=self.runtime.run_label or f"serve {self.host}:{self.port}")
        return self.runtime.model_copy(update=update)

    def tokens(self) -> list[str]:
        """Every accepted token: the token file's lines ('#' starts a comment) and $CORRAL_SERVE_TOKEN."""
        tokens: list[str] = []
        if self.token_file is not None:
            tokens += [line.split("#", 1)[0].strip() for line in _read_private(self.token_file).splitlines()]
        if os.environ.get(TOKEN_ENV, "").strip():
            tokens.append(os.environ[TOKEN_ENV].strip())
        tokens = [t for t in tokens if t]
        if not tokens:
            raise ServeConfigError(f"corral serve needs at least one token: set {TOKEN_ENV}, or give a token "
                                   "file (--token-file or token_file:) with one token per line")
        short = [t for t in tokens if len(t) < 16]
        if short:
            raise ServeConfigError(f"{len(short)} token(s) are shorter than 16 characters; use long random "
                                   "tokens, e.g. from 'python -c \"import secrets; print(secrets.token_urlsafe())\"'")
        return list(dict.fromkeys(tokens))


def _read_private(path: Path) -> str:
    """A secret file's text, refused when its group or others may read, write or run it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # the mode of what was opened, not of a later swap
            if mode & 0o077:
                raise ServeConfigError(
                    f"token file {path} is open to its group or to others (mode {stat.filemode(mode)}, "
                    f"{mode & 0o777:03o}); make it readable by its owner only: chmod 600 {path}")
            return f.read().decode()
    except OSError as e:
        raise ServeConfigError(f"token file {path}: {e.strerror}; check the path") from None
    except UnicodeDecodeError:
        raise ServeConfigError(f"token file {path} is not text; write one token per line") from None
