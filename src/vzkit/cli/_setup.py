"""``vzkit config`` (validate options, print the config) and ``vzkit disk create``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click

from vzkit import DiskFormat, create_disk_image, format_size

from ._app import main
from ._errors import handle_errors
from ._options import SIZE, build_config, vm_options

__all__ = ["config_cmd", "disk", "disk_create"]


@main.command("config")
@vm_options
@click.option(
    "--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True
)
@click.option(
    "--save", "save_to", type=click.Path(path_type=Path, dir_okay=False), help="Also write it here."
)
@handle_errors
def config_cmd(fmt: str, save_to: Path | None, **opts: Any) -> None:
    """Validate VM options and print the resulting configuration."""
    cfg = build_config(**opts)
    click.echo(cfg.to_toml() if fmt == "toml" else cfg.to_json(), nl=False)
    if save_to is not None:
        cfg.save(save_to)


@main.group()
def disk() -> None:
    """Disk images."""


@disk.command("create")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("size", type=SIZE)
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in DiskFormat]),
    default="raw",
    show_default=True,
)
@handle_errors
def disk_create(path: Path, size: int, fmt: str) -> None:
    """Create a sparse disk image of SIZE (e.g. 20g, 512m; a plain number is GiB). An existing
    file is left untouched."""
    existed = path.exists()
    created = create_disk_image(path, format=fmt, size_bytes=size)
    if not existed:
        click.echo(f"created {created} ({format_size(size)})")
        return
    note = ""
    if fmt == "raw":  # a raw image's size is its file's size; qcow2 keeps it in its header
        have = created.stat().st_size
        if have != size:
            note = (
                f" ({format_size(have)}, not the {format_size(size)} asked for: an existing disk"
                " is never resized or overwritten; remove it or choose another path, or grow it"
                f" with 'truncate -s {size} {shlex.quote(str(created))}' and then its file"
                " system in the guest)"
            )
    click.echo(f"kept existing {created}{note}")
