"""corral: the secure environment layer for autonomous agents."""

import logging

from corral.config import EgressPolicy, EgressRule, Limits, RuntimeConfig, SandboxConfig
from corral.detect import Detector, RuleError
from corral.errors import (
    CommandTimeout,
    ConfigError,
    CorralError,
    EpisodeEnded,
    FileAccessError,
    IsolationUnavailable,
    PolicyError,
    SandboxClosed,
    SandboxError,
    SandboxFrozen,
    SessionError,
    StoreError,
)
from corral.events import Event, EventKind, Finding, Severity, Verdict
from corral.runtime import Runtime
from corral.sandbox import ExecResult, OutputChunk, Sandbox, Session
from corral.store import Store

__version__ = "0.1.0"

# A library stays quiet unless its user configures logging (the CLI shows findings itself).
logging.getLogger("corral").addHandler(logging.NullHandler())

__all__ = [
    "CommandTimeout",
    "ConfigError",
    "CorralError",
    "Detector",
    "EgressPolicy",
    "EgressRule",
    "EpisodeEnded",
    "Event",
    "EventKind",
    "ExecResult",
    "FileAccessError",
    "Finding",
    "IsolationUnavailable",
    "Limits",
    "OutputChunk",
    "PolicyError",
    "RuleError",
    "Runtime",
    "RuntimeConfig",
    "Sandbox",
    "SandboxClosed",
    "SandboxConfig",
    "SandboxError",
    "SandboxFrozen",
    "Session",
    "SessionError",
    "Severity",
    "Store",
    "StoreError",
    "Verdict",
]
