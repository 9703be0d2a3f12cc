"""The one typer app every command module registers on, and its --version."""

from __future__ import annotations

from typing import Annotated

import typer

from corral.cli.common import (
    out,
)

app = typer.Typer(
    name="corral",
    help="Run agent commands in isolated sandboxes with default-deny egress and attributed events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # help texts are plain text: "[default: STATE_DIR/corral.db]" is a default to show, not markup
    rich_markup_mode=None,
)




def _version(value: bool) -> None:
    if value:
        from corral import __version__

        out.print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print corral's version and exit.")] = False) -> None:
    """Run agent commands in isolated sandboxes with default-deny egress and attributed events."""
