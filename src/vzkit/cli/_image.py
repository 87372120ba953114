"""``vzkit image build/list/rm``: the default guest image (kernel + initramfs with the agent)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vzkit import Arch

from ._app import main
from ._errors import handle_errors

__all__ = ["image", "image_build", "image_list", "image_rm"]


@main.group()
def image() -> None:
    """The default guest image (kernel + initramfs with the vzkit agent)."""


@image.command("build")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Default: the host's.")
@click.option(
    "--deb-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Use pre-downloaded .deb files instead of downloading them.",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "apt", "mirror", "deb-dir"]),
    help="Where packages come from: apt-get download, a Debian mirror, or --deb-dir. "
    "Default: $VZKIT_DEB_SOURCE, else apt when available, else the mirror.",
)
@click.option(
    "--mirror",
    metavar="URL",
    help="Debian mirror to download from (implies --source mirror). "
    "Default: $VZKIT_DEBIAN_MIRROR, else https://deb.debian.org/debian.",
)
@click.option("--refresh", is_flag=True, help="Look for newer packages first.")
@handle_errors
def image_build(
    arch: str | None, deb_dir: Path | None, source: str | None, mirror: str | None, refresh: bool
) -> None:
    """Build (or find in the cache) the default guest image."""
    from vzkit.image import default_image, image_trust

    if (source == "deb-dir") != (deb_dir is not None) and source is not None:
        raise click.UsageError("--source deb-dir goes with --deb-dir DIR (and only with it)")
    if source == "deb-dir":
        source = None
    built = default_image(arch, deb_dir=deb_dir, refresh=refresh, source=source, mirror=mirror)
    click.echo(f"kernel  {built.kernel}\ninitrd  {built.initrd}\nversion {built.kernel_version}")
    click.echo(f"trust   {image_trust(built.kernel.parent)}")


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_list(as_json: bool) -> None:
    """List cached guest images, newest first.

    TRUST says how the packages were verified: verified (mirror, signed Release checked),
    apt (apt-get download), unsigned (mirror, no signature check), local (--deb-dir) or
    unknown.
    """
    from vzkit.image import image_trust, list_images

    rows = [
        {
            "image": directory.name,
            "path": str(directory),
            "arch": img.arch,
            "kernel_version": img.kernel_version,
            "initrd_bytes": img.initrd.stat().st_size,
            "trust": image_trust(directory),
        }
        for directory, img in list_images()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no images (vzkit image build makes one)")
        return
    click.echo(f"{'IMAGE':<28} {'ARCH':<8} {'KERNEL':<22} {'INITRD':>10}  TRUST")
    for r in rows:
        click.echo(
            f"{r['image']:<28} {r['arch']:<8} {r['kernel_version']:<22} "
            f"{r['initrd_bytes']:>10}  {r['trust']}"
        )


@image.command("rm")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Only this arch.")
@handle_errors
def image_rm(arch: str | None) -> None:
    """Delete cached guest images."""
    from vzkit.image import remove_images

    for path in remove_images(arch=arch):
        click.echo(f"removed {path}")
