"""The typed message protocol between corral and its in-sandbox agent (agent.py).

One JSON object per SEQPACKET message. The agent is a single stdlib-only file copied into every
sandbox, so it cannot import this module: this is the host's typed view of the same messages, and
`decode` checks each message the agent sends against it before anything acts on it. A message that
does not fit (unknown op, missing or mistyped field) is not guessed at: the channel treats the
agent as lost, which ends the episode (fail closed).

Requests (host -> agent) carry an `id`: a command's (``c<n>``), a session's (``s:<name>``) or a
staged child's (``stage:<n>``). Replies (agent -> host) name the same id.
"""

from __future__ import annotations

import json
from typing import Literal, NotRequired, TypedDict

from corral.errors import SandboxError


class ProtocolError(SandboxError):
    """The agent sent a message that is not part of the protocol."""


# -- host -> agent -----------------------------------------------------------------------------------
class Exec(TypedDict):
    op: Literal["exec"]
    id: str
    cmd: str
    env: NotRequired[dict[str, str]]
    cwd: NotRequired[str | None]
    stage: NotRequired[str | None]  # a staged child already in the step's cgroup, to run it at once
    stdin: NotRequired[bool]
    max_output: NotRequired[int]


class Stage(TypedDict):
    op: Literal["stage"]
    id: str


class Go(TypedDict):
    op: Literal["go"]
    id: str


class Kill(TypedDict):
    op: Literal["kill"]
    id: str
    sig: int


class SessionNew(TypedDict):
    op: Literal["session_new"]
    id: str
    env: dict[str, str]
    cwd: str | None
    shell: str
    interactive: bool
    user: NotRequired[str | None]


class SessionRun(TypedDict):
    op: Literal["session_run"]
    id: str
    sid: str  # the session's id
    cmd: str
    env: dict[str, str] | None
    cwd: str | None
    max_output: int
    merge: bool  # stderr into stdout, as a terminal shows them (ROCK's interactive sessions)


class Stdin(TypedDict):
    op: Literal["stdin"]
    id: str
    data: str  # base64
    eof: bool


class SessionClose(TypedDict):
    op: Literal["session_close"]
    id: str


class Put(TypedDict):
    op: Literal["put"]
    id: str
    path: str
    kind: str  # "file", "dir" or "symlink"
    mode: int
    target: str | None
    data: str  # base64, the first piece
    eof: bool


class PutData(TypedDict):
    op: Literal["put_data"]
    id: str
    data: str  # base64
    eof: bool


Request = Exec | Stage | Go | Kill | SessionNew | SessionRun | Stdin | SessionClose | Put | PutData


# -- agent -> host -----------------------------------------------------------------------------------
class Ready(TypedDict):
    """The agent runs, its exec filter installed: the filter's notification fd rides along."""
    op: Literal["ready"]
    pid: int


class Spawned(TypedDict):
    """A child was forked and waits (for `go`, or an exec naming its stage) until corral placed it."""
    op: Literal["spawned"]
    id: str


class Out(TypedDict):
    op: Literal["out"]
    id: str
    fd: Literal[1, 2]
    data: str  # base64


class Exit(TypedDict):
    op: Literal["exit"]
    id: str
    code: int | None
    error: NotRequired[str | None]
    dropped: NotRequired[dict[str, int]]
    rusage: NotRequired[dict[str, float]]


class SessionExit(TypedDict):
    op: Literal["session_exit"]
    id: str
    code: NotRequired[int | None]


class Error(TypedDict):
    op: Literal["error"]
    id: str | None
    error: str


Reply = Ready | Spawned | Out | Exit | SessionExit | Error

# what each reply must carry, and of which type (bool is no int here: JSON true is not a pid)
_REPLY_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"pid": (int,)},
    "spawned": {"id": (str,)},
    "out": {"id": (str,), "fd": (int,), "data": (str,)},
    "exit": {"id": (str,), "code": (int, type(None))},
    "session_exit": {"id": (str,)},
    "error": {"id": (str, type(None)), "error": (str,)},
}
_OPTIONAL: dict[str, dict[str, tuple[type, ...]]] = {
    "exit": {"error": (str, type(None)), "dropped": (dict, type(None)), "rusage": (dict, type(None))},
}


def encode(msg: Request) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> Reply:
    """A reply from the agent, checked field by field; ProtocolError when it is not one."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the agent sent a message that is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"the agent sent {type(msg).__name__}, not a message object")
    op = msg.get("op")
    fields = _REPLY_FIELDS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise ProtocolError(f"the agent sent an unknown message op {op!r}")
    for name, types in fields.items():
        if name not in msg or not _typed(msg[name], types):
            raise ProtocolError(f"the agent's {op!r} message lacks a valid {name!r} (got {msg.get(name)!r})")
    for name, types in _OPTIONAL.get(op, {}).items():
        if name in msg and not _typed(msg[name], types):
            raise ProtocolError(f"the agent's {op!r} message has an invalid {name!r} ({msg[name]!r})")
    if op == "out" and msg["fd"] not in (1, 2):
        raise ProtocolError(f"the agent's output message names fd {msg['fd']!r}, not 1 or 2")
    return msg  # type: ignore[return-value]


def _typed(value: object, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
