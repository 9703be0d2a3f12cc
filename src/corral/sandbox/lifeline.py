"""Whether corral's in-sandbox agent is still there, and if not, why.

The agent is PID 1 of the sandbox's pid namespace, not dumpable, and without capabilities, so no
command can kill, stop or trace it. If it is lost all the same (killed from the host, stopped by
a debugger, a bug, the memory limit), the sandbox can no longer run, watch or report commands,
and the episode must end with the reason: these helpers name it.
"""

from __future__ import annotations

import signal
from typing import Any

from corral.errors import EpisodeEnded, SandboxClosed, SandboxFrozen

AGENT_LOST = "corral agent lost"
STOPPED_STATES = {"T": "stopped by a signal", "t": "stopped by a tracer"}


def agent_state(pid: int) -> str | None:
    """The one-letter scheduler state of host pid `pid` (R, S, D, T, t, Z, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[-1].split()
    return fields[0].decode() if fields else None


def stopped(state: str | None) -> str | None:
    """Why a process in `state` is not running, if it is stopped."""
    return STOPPED_STATES.get(state or "")


def describe_exit(returncode: int | None) -> tuple[str, str, dict[str, int]]:
    """(cause, detail, data) for the agent's end, from bwrap's exit status: bwrap passes on its
    child's status, as 128 + N when the child was killed by signal N."""
    if returncode is None:
        return "exited", "it closed its connection to corral", {}
    if returncode < 0:  # bwrap itself was killed
        return "killed", f"its bwrap was killed by signal {-returncode} ({_signame(-returncode)})", {
            "signal": -returncode}
    if returncode > 128:
        n = returncode - 128
        return "killed", f"killed by signal {n} ({_signame(n)})", {"signal": n}
    return "exited", f"exited with status {returncode}", {"exit_status": returncode}


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def check_open(sb: Any, *, allow_terminated: bool = False) -> None:
    """Raise what a command on this sandbox (a Sandbox, or the fake one) must meet: closed, quarantined,
    or its episode ended (unless `allow_terminated`: reset() may start the next one)."""
    if sb.terminated and allow_terminated and not (sb.closed or sb.frozen):
        return
    if sb.closed:
        raise SandboxClosed(f"sandbox {sb.id} is closed; create a new one")
    if sb.frozen:
        raise SandboxFrozen(f"sandbox {sb.id} is quarantined; call release() before running commands")
    if sb.terminated:
        why = "" if sb.terminated.startswith(AGENT_LOST) else " by a security finding"
        raise EpisodeEnded(f"sandbox {sb.id}: the episode was ended{why} ({sb.terminated}); "
                           "call reset() to start a new episode")
