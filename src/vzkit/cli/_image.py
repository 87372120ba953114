"""``vzkit image build/pull/list/inspect/rm/prune``: the default guest (kernel + initramfs with
the agent), Debian images (root disks, ``docs/images.md``) and OCI images (``docs/oci.md``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from vzkit import Arch, format_size

from ._app import main
from ._errors import handle_errors

__all__ = [
    "image",
    "image_build",
    "image_inspect",
    "image_list",
    "image_prune",
    "image_pull",
    "image_rm",
]


@main.group()
def image() -> None:
    """Guest images: the default guest (kernel + initramfs with the vzkit agent), Debian
    root disks (vzkit image build debian) and OCI images (vzkit image pull REF)."""


def _is_default(ref: str | None) -> bool:
    return ref in (None, "default")


@image.command("build")
@click.argument("ref", required=False, metavar="[REF]")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Default: the host's.")
@click.option(
    "--packages",
    metavar="P1,P2",
    multiple=True,
    help="Debian images: packages to add, with their dependencies (comma-separated, repeatable).",
)
@click.option(
    "--deb-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Default guest: use pre-downloaded .deb files instead of downloading them.",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "apt", "mirror", "deb-dir"]),
    help="Default guest: where packages come from: apt-get download, a Debian mirror, or "
    "--deb-dir. Default: $VZKIT_DEB_SOURCE, else apt when available, else the mirror.",
)
@click.option(
    "--mirror",
    metavar="URL",
    help="Debian mirror to download from (implies --source mirror). "
    "Default: $VZKIT_DEBIAN_MIRROR, else https://deb.debian.org/debian.",
)
@click.option("--refresh", is_flag=True, help="Default guest: look for newer packages first.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_build(
    ref: str | None,
    arch: str | None,
    packages: tuple[str, ...],
    deb_dir: Path | None,
    source: str | None,
    mirror: str | None,
    refresh: bool,
    as_json: bool,
) -> None:
    """Build (or find in the cache) an image: REF is 'default' (the default guest, when REF
    is left out) or debian[:bookworm].

    \b
      vzkit image build
      vzkit image build debian --packages jq,curl
    """
    if not _is_default(ref):
        if deb_dir is not None or source is not None or refresh:
            raise click.UsageError("--deb-dir, --source and --refresh are for the default guest")
        _build_debian(str(ref), arch, packages, mirror, as_json)
        return
    if packages:
        raise click.UsageError("--packages is for Debian images (vzkit image build debian)")
    from vzkit.image import default_image, image_trust

    if (source == "deb-dir") != (deb_dir is not None) and source is not None:
        raise click.UsageError("--source deb-dir goes with --deb-dir DIR (and only with it)")
    if source == "deb-dir":
        source = None
    built = default_image(arch, deb_dir=deb_dir, refresh=refresh, source=source, mirror=mirror)
    if as_json:
        info = {
            "kernel": str(built.kernel),
            "initrd": str(built.initrd),
            "version": built.kernel_version,
            "trust": image_trust(built.kernel.parent),
        }
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"kernel  {built.kernel}\ninitrd  {built.initrd}\nversion {built.kernel_version}")
    click.echo(f"trust   {image_trust(built.kernel.parent)}")


def _build_debian(
    ref: str, arch: str | None, packages: tuple[str, ...], mirror: str | None, as_json: bool
) -> None:
    from vzkit import build_debian_image

    names = [name for item in packages for name in item.split(",")]
    built = build_debian_image(ref, arch=arch, packages=names, mirror=mirror)
    if as_json:
        click.echo(json.dumps(built.to_dict(), indent=2))
        return
    click.echo(f"image   {built.name}\narch    {built.arch}\ndigest  {built.digest}")
    click.echo(f"path    {built.path}\nsize    {format_size(built.size)} "
               f"({format_size(built.allocated)} on disk)")  # fmt: skip


@image.command("pull")
@click.argument("ref")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Default: the host's.")
@click.option(
    "--platform",
    metavar="OS/ARCH[/VARIANT]",
    help="Pick this entry of a multi-arch image (e.g. linux/arm64) instead of --arch's.",
)
@click.option(
    "--insecure-registry",
    is_flag=True,
    help="Reach the registry over plain HTTP (e.g. a registry on 127.0.0.1 for tests).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_pull(
    ref: str, arch: str | None, platform: str | None, insecure_registry: bool, as_json: bool
) -> None:
    """Pull an OCI image and make it a root disk (converted once per image).

    REF is a reference in skopeo's syntax: NAME[:TAG][@DIGEST] (Docker Hub's short names),
    docker://HOST[:PORT]/REPO[:TAG], oci:DIR[:NAME], oci-archive:FILE[:NAME] or
    docker-archive:FILE. Credentials come from $REGISTRY_AUTH_FILE, containers' auth.json
    or ~/.docker/config.json ('skopeo login' / 'docker login' write them).

    \b
      vzkit image pull python:3.12-slim
      vzkit image pull --insecure-registry docker://127.0.0.1:5000/app:1
      vzkit image pull oci-archive:app.tar
    """
    from vzkit.image.oci import pull_image

    if arch is not None and platform is not None:
        raise click.UsageError("give --arch or --platform, not both")
    pulled = pull_image(ref, arch=arch, platform=platform, insecure=insecure_registry)
    if as_json:
        click.echo(json.dumps(pulled.to_dict(), indent=2))
        return
    click.echo(f"image   {pulled.name}\narch    {pulled.arch}\ndigest  {pulled.digest}")
    click.echo(f"path    {pulled.path}\nsize    {format_size(pulled.size)} "
               f"({format_size(pulled.allocated)} on disk)")  # fmt: skip


def _human(nbytes: int) -> str:
    """A size for a table column: ``5.7KiB`` (one word, so the columns split on spaces)."""
    return format_size(nbytes).replace(" ", "")


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit} ago"
    return "just now"


def _rows() -> list[dict[str, Any]]:
    from vzkit.image import image_trust, list_debian_images, list_images
    from vzkit.image.oci import list_oci_images

    rows: list[dict[str, Any]] = [
        {
            "kind": "default",
            "image": directory.name,
            "path": str(directory),
            "arch": img.arch,
            "kernel_version": img.kernel_version,
            "initrd_bytes": img.initrd.stat().st_size,
            "trust": image_trust(directory),
        }
        for directory, img in list_images()
    ]
    for deb in list_debian_images():
        rows.append({"kind": "debian", "image": deb.name, **deb.to_dict()})
    for oci in list_oci_images():
        rows.append({"kind": "oci", "image": oci.name, **oci.to_dict()})
    return rows


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_list(as_json: bool) -> None:
    """List cached images: the default guest's (newest first), then Debian and OCI images
    (root disks; most recently used first).

    TRUST says how the default guest's packages were verified: verified (mirror, signed
    Release checked), apt (apt-get download), unsigned (mirror, no signature check), local
    (--deb-dir) or unknown.
    """
    rows = _rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no images (vzkit image build makes one)")
        return
    defaults = [r for r in rows if r["kind"] == "default"]
    debians = [r for r in rows if r["kind"] in ("debian", "oci")]
    if defaults:
        click.echo(f"{'IMAGE':<28} {'ARCH':<8} {'KERNEL':<22} {'INITRD':>10}  TRUST")
        for r in defaults:
            click.echo(
                f"{r['image']:<28} {r['arch']:<8} {r['kernel_version']:<22} "
                f"{_human(r['initrd_bytes']):>10}  {r['trust']}"
            )
    if debians:
        if defaults:
            click.echo()
        click.echo(f"{'IMAGE':<28} {'ARCH':<8} {'DIGEST':<14} {'SIZE':>10} {'ON DISK':>10}  USED")
        debians.sort(key=lambda r: float(r["last_used"]), reverse=True)
        for r in debians:
            click.echo(
                f"{r['name']:<28} {r['arch']:<8} {r['digest'][7:19]:<14} "
                f"{_human(r['size']):>10} {_human(r['allocated']):>10}  "
                f"{_ago(r['last_used'])}"
            )


def _find(ref: str, arch: str | None) -> Any:
    """The cached Debian or OCI image ``ref`` names (an OCI reference in any of its forms)."""
    from vzkit.errors import SpecError
    from vzkit.image import find_debian_image
    from vzkit.image.oci import find_oci_image, parse_reference

    try:
        found: Any = find_debian_image(ref, arch=arch)
    except SpecError:  # not a Debian image's name: an OCI image's, maybe
        found = None
    if found is None:
        found = find_oci_image(ref, arch=arch)
    if found is None and not ref.startswith("debian"):
        try:
            found = find_oci_image(str(parse_reference(ref)), arch=arch)
        except SpecError:
            pass
    if found is None:
        raise click.UsageError(f"no cached image {ref!r} (see 'vzkit image list')")
    return found


@image.command("inspect")
@click.argument("ref")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Default: any.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_inspect(ref: str, arch: str | None, as_json: bool) -> None:
    """Show a cached image: REF is debian[:SUITE][+P1,P2] (the newest such build), an OCI
    image's reference (as pulled) or a digest prefix."""
    from vzkit.image.oci import OciImage

    found = _find(ref, arch)
    info = found.to_dict()
    oci = isinstance(found, OciImage)
    if not oci:
        manifest = found.directory / "manifest.json"
        info["installed"] = [
            f"{p['name']}={p['version']}" for p in json.loads(manifest.read_text())["packages"]
        ]
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    keys = ("name", "arch", "digest", "path", "package_count", "build_s")
    if oci:
        keys = ("name", "arch", "digest", "manifest_digest", "path", "convert_s")
    for key in keys:
        click.echo(f"{key:<14}{info[key]}")
    if oci:
        for ref_ in found.refs[1:]:
            click.echo(f"{'also':<14}{ref_}")
        shown = {
            "entrypoint": " ".join(found.entrypoint or ()) or "-",
            "cmd": " ".join(found.cmd or ()) or "-",
            "workdir": found.working_dir or "/",
            "user": found.user or "root",
            "ports": " ".join(found.exposed_ports) or "-",
        }
        for key, value in shown.items():
            click.echo(f"{key:<14}{value}")
        for item in found.env:
            click.echo(f"{'env':<14}{item}")
    click.echo(f"{'size':<14}{format_size(found.size)} ({format_size(found.allocated)} on disk)")
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.created))
    click.echo(f"{'created':<14}{created}\n{'last used':<14}{_ago(found.last_used)}")


@image.command("rm")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Only this arch.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_rm(refs: tuple[str, ...], arch: str | None, as_json: bool) -> None:
    """Delete cached images: each REF (debian[:SUITE][+P1,P2], an OCI image's reference, a
    digest prefix, or 'default' for the default guest's); without REF, every cached image
    (of --arch)."""
    from vzkit.image import remove_debian_image, remove_images
    from vzkit.image.oci import OciImage, remove_oci_image

    removed: list[str] = []
    if not refs:
        removed += [str(path) for path in remove_images(arch=arch)]
    for ref in refs:
        if ref == "default":
            removed += [str(path) for path in remove_images(arch=arch, default_only=True)]
            continue
        found = _find(ref, arch)
        if isinstance(found, OciImage):
            remove_oci_image(found)
        else:
            remove_debian_image(found)
        removed.append(f"{found.name} ({found.arch}, {found.short_digest})")
    if as_json:
        click.echo(json.dumps({"removed": removed}, indent=2))
        return
    for item in removed:
        click.echo(f"removed {item}")


@image.command("prune")
@click.option(
    "--unused-days",
    type=click.FloatRange(min=0),
    metavar="N",
    help="Delete the Debian and OCI images no VM booted for N days (default: only those a "
    "newer build or pull of the same name replaced).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def image_prune(unused_days: float | None, as_json: bool) -> None:
    """Delete Debian and OCI images that are not needed: replaced by a newer build of the
    same image or a newer pull of the same tag (default), or not used for --unused-days N; and
    leftovers of interrupted builds."""
    from vzkit.image import prune_debian_images
    from vzkit.image.oci import prune_oci_images

    removed: list[Any] = [*prune_debian_images(unused_days=unused_days),
                          *prune_oci_images(unused_days=unused_days)]  # fmt: skip
    freed = sum(found.allocated for found in removed)
    if as_json:
        info = {"removed": [found.to_dict() for found in removed], "freed_bytes": freed}
        click.echo(json.dumps(info, indent=2))
        return
    for found in removed:
        click.echo(f"removed {found.name} ({found.arch}, {found.short_digest})")
    click.echo(f"{len(removed)} image(s) removed, {format_size(freed)} freed")
