"""The `corral` command line: every command, one module per group
(cli/run.py, inspect.py, rollout.py, admin.py) on the app of cli/app.py.

The CLI only parses, renders and maps outcomes to exit codes; the work is done by the library
(Runtime, Sandbox, Store) and by corral.doctor / corral.gc, so everything here is also testable
without a terminal.

Exit codes: the command's own for `run`; 124 when it timed out; 128+N when a signal killed it;
2 for bad arguments, bad policies and unavailable isolation; 1 for `doctor` with a required
feature missing.
"""

from __future__ import annotations

# each module registers its commands on the app; `corral --help` lists them in this order
# isort: off
from corral.cli import run, inspect, rollout, admin  # noqa: F401
# isort: on
from corral.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
