"""Every error corral raises on purpose is a CorralError subclass whose message says what to do."""

from __future__ import annotations


class CorralError(Exception):
    """Base class: catch this to handle any corral failure."""


class ConfigError(CorralError, ValueError):
    """A SandboxConfig, EgressPolicy or policy file is malformed."""


class PolicyError(ConfigError):
    """An egress rule cannot be parsed."""


class IsolationUnavailable(CorralError):
    """A required isolation feature (bubblewrap, namespaces, nftables) is missing on this machine."""


class SandboxError(CorralError):
    """A sandbox operation failed."""


class SandboxClosed(SandboxError):
    """The sandbox was closed (or its init process died); create a new one."""


class SandboxFrozen(SandboxError):
    """The sandbox is quarantined; release it before running commands."""


class EpisodeEnded(SandboxError):
    """A security finding ended this sandbox's episode; reset() starts a new one."""


class CommandTimeout(SandboxError):
    """Raised only by callers that ask for it; exec() itself reports timeouts in its result."""


class SessionError(SandboxError):
    """A persistent shell session is missing or died."""


class FileAccessError(SandboxError):
    """A path given to read_file/write_file/upload/download is outside the sandbox or unreadable."""


class StoreError(CorralError):
    """The event store cannot be opened or written."""


class EnvironmentUsageError(CorralError):
    """A trainer-facing environment was used out of order (a tool before reset, after close)."""


class UnknownTask(EnvironmentUsageError, ValueError):
    """A task id that the environment's task set does not have."""
