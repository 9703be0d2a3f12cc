"""`corral images pull|ls|rm|prune`: the local image store from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral.config import RuntimeConfig
from corral.images.store import ImageError, ImageStore, store_for

images_app = typer.Typer(help="OCI images: pull (skopeo), unpack once (umoci), list, remove, prune.",
                         no_args_is_help=True, rich_markup_mode=None)
console = Console()

StoreDir = Annotated[Path | None, typer.Option(
    "--image-dir", help="The image store [default: /var/cache/corral/images].")]
Insecure = Annotated[list[str] | None, typer.Option(
    "--insecure-registry", help="host:port of a registry reached over plain HTTP; repeat for more.")]
AuthFile = Annotated[Path | None, typer.Option(
    "--authfile", help="A docker config.json with registry logins.")]


def _store(image_dir: Path | None, insecure: list[str] | None = None, authfile: Path | None = None) -> ImageStore:
    cfg = RuntimeConfig(registry_auth_file=authfile, insecure_registries=tuple(insecure or ()))
    return store_for(cfg.model_copy(update={"image_dir": image_dir}) if image_dir else cfg)


def _fail(e: ImageError) -> None:
    console.print(f"[red]error:[/red] {e}")
    raise typer.Exit(1)


@images_app.command("pull")
def pull(name: Annotated[str, typer.Argument(help="e.g. python:3.11, registry:5000/ns/env:1, name@sha256:..., "
                                                  "oci:DIR[:TAG], docker-archive:FILE")],
         image_dir: StoreDir = None, insecure_registry: Insecure = None, authfile: AuthFile = None) -> None:
    """Pull an image into the store and unpack it (once per image)."""
    st = _store(image_dir, insecure_registry, authfile)
    try:
        with console.status(f"pulling {name}") as status:
            img = st.pull(name, on_line=lambda line: status.update(f"{name}: {line.strip()[:100]}"))
    except ImageError as e:
        _fail(e)
    console.print(f"{img.name} [bold]{img.short_id}[/bold] -> {img.rootfs}")


@images_app.command("ls")
def ls(image_dir: StoreDir = None) -> None:
    """The images in the store."""
    st = _store(image_dir)
    table = Table("name", "id", "size", "workdir", "user")
    for img in st.ls():
        table.add_row(img.name, img.short_id, f"{st.size(img) / 2**20:.1f} MiB", img.workdir or "", img.user or "")
    console.print(table)


@images_app.command("rm")
def rm(name: str, image_dir: StoreDir = None) -> None:
    """Forget an image name (`prune` then frees what no name uses)."""
    try:
        img = _store(image_dir).rm(name)
    except ImageError as e:
        _fail(e)
    console.print(f"removed {img.name} ({img.short_id})")


@images_app.command("prune")
def prune(image_dir: StoreDir = None) -> None:
    """Delete the unpacked files and blobs of images no name points at."""
    try:
        gone = _store(image_dir).prune()
    except ImageError as e:
        _fail(e)
    console.print(f"pruned {len(gone)} image(s)" + "".join(f"\n  {g}" for g in gone))
