"""The macOS-only commands of ``vzkit``: ``codesign`` and ``macos install``/``info``/``latest``.

Like the rest of the CLI they parse, call the library (the vz backend's public names) and
render; library errors become exit codes here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vzkit.errors import UnsupportedError

from ._app import main
from ._errors import handle_errors as _handle_errors
from ._options import SizeType

__all__ = ["codesign_cmd", "macos_group"]


#: Listed everywhere (the docs name them), marked where they cannot run.
_MACOS = sys.platform == "darwin"
_ELSEWHERE = "" if _MACOS else "[macOS only] "


@main.command(
    "codesign",
    short_help=f"{_ELSEWHERE}Ad-hoc sign the Python interpreter for the Virtualization framework.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a signed copy of this interpreter here.",
)
@click.option("--venv", is_flag=True, help="Sign this virtualenv's bin/python in place.")
@click.option(
    "--undo", is_flag=True, help="Put back the bin/python (and aliases) that --venv replaced."
)
@_handle_errors
def codesign_cmd(output: Path | None, venv: bool, undo: bool) -> None:
    """Ad-hoc sign the Python interpreter with com.apple.security.virtualization.

    macOS lets only entitled executables create VMs. With --venv the virtualenv's python
    (a symlink to the base interpreter) becomes a signed copy, its library links kept; the
    base stays untouched and the original python is kept for --undo.
    """
    from vzkit.backends import vz

    if not _MACOS:
        raise UnsupportedError(
            f"codesign is for macOS, where only entitled executables may create VMs; on"
            f" {sys.platform} nothing needs signing (the qemu backend runs as is: 'vzkit doctor')",
            backend="vz",
            feature="codesign",
        )
    if undo:
        if output is not None:
            raise click.UsageError(
                "--undo puts back a virtualenv's python; a copy made with --output is a plain"
                " file: delete it"
            )
        _undo(vz.venv_python())
        return
    if (output is None) == (not venv):
        raise click.UsageError("give exactly one of --output PATH or --venv")
    target = vz.venv_python() if venv else output
    assert target is not None
    signed = vz.sign_interpreter(target, keep_original=venv)
    click.echo(f"signed {signed} (ad hoc) with {vz.ENTITLEMENT}")
    if venv:
        for alias in vz.repoint_venv_aliases(signed):
            click.echo(f"{alias.name} now runs {signed.name}")
        click.echo("scripts of this virtualenv (vzkit included) can now create VMs")
        click.echo("'vzkit codesign --undo' puts the original python back")
    else:
        click.echo(f"run your VM scripts with: {signed} script.py")


def _undo(python: Path) -> None:
    from vzkit.backends import vz

    for entry in vz.restore_venv_python(python):
        click.echo(f"restored {entry}")
    click.echo("this virtualenv's python is the original again")


@main.group("macos", short_help=f"{_ELSEWHERE}macOS guests (Apple silicon, vz backend).")
def macos_group() -> None:
    """macOS guests (Apple silicon, vz backend)."""


@macos_group.command("info")
@click.argument("ipsw", type=click.Path(path_type=Path, dir_okay=False))
@_handle_errors
def macos_info(ipsw: Path) -> None:
    """What a local restore image (.ipsw) installs and needs on this Mac."""
    from vzkit.backends import load_backend
    from vzkit.backends.vz import load_restore_image, restore_image_info

    load_backend("vz")
    info = restore_image_info(load_restore_image(ipsw))
    click.echo(f"macOS {info.macos_version} ({info.build_version})")
    click.echo(f"needs at least {info.min_cpus} CPUs and {info.min_memory_mb} MiB of memory")


@macos_group.command("install")
@click.argument("ipsw", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--cpus", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--memory",
    "memory_gb",
    type=SizeType(in_gb=True),
    default="8g",
    show_default=True,
    help="e.g. 8g, 6144m.",
)
@click.option(
    "--disk-size",
    "disk_size_gb",
    type=SizeType(in_gb=True),
    default="64g",
    show_default=True,
    help="Whole GiB, e.g. 64g.",
)
@click.option("--force", is_flag=True, help="Replace an existing install in VM_DIR.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@_handle_errors
def macos_install(
    ipsw: Path,
    vm_dir: Path,
    cpus: int,
    memory_gb: float,
    disk_size_gb: float,
    force: bool,
    timeout: float | None,
) -> None:
    """Install macOS from IPSW into VM_DIR (disk, auxiliary storage, hardware model and
    machine identifier are kept there); boot it with VirtualMachine(MacVMConfig(...))."""
    from vzkit import MacVMConfig
    from vzkit._progress import Progress  # the library's progress line (a known exception)
    from vzkit.backends import load_backend
    from vzkit.backends.vz import install_macos

    load_backend("vz")
    if not float(disk_size_gb).is_integer():
        raise click.BadParameter("the disk is a whole number of GiB", param_hint="--disk-size")
    cfg = MacVMConfig(vm_dir=vm_dir, cpus=cpus, memory_gb=memory_gb, disk_size_gb=int(disk_size_gb))
    steps = 1000
    with Progress("installing macOS", total=steps) as bar:

        def progress(fraction: float) -> None:
            bar.advance(max(0, int(fraction * steps) - bar.done))

        info = install_macos(cfg, ipsw, progress=progress, timeout=timeout, force=force)
    click.echo(f"installed macOS {info.macos_version} ({info.build_version}) in {cfg.vm_dir}")


@macos_group.command("install-rosetta")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@_handle_errors
def macos_install_rosetta(timeout: float | None) -> None:
    """Install Rosetta for Linux guests (--rosetta): macOS asks you to agree to its license."""
    from vzkit.backends import load_backend, vz

    load_backend("vz")
    if vz.rosetta_availability() is vz.RosettaAvailability.INSTALLED:
        click.echo("Rosetta is installed")
        return
    click.echo("asking macOS to install Rosetta (answer its dialog)")
    vz.install_rosetta(timeout=timeout)
    click.echo("Rosetta is installed: aarch64 guests run x86_64 programs with --rosetta")


@macos_group.command("latest")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Give up after this.")
@_handle_errors
def macos_latest(timeout: float) -> None:
    """Show the newest macOS restore image this Mac supports (asks Apple's catalogue):
    version, build, what it needs and where to download it. Nothing is downloaded."""
    from vzkit.backends import load_backend, vz

    load_backend("vz")
    latest = vz.fetch_latest_restore_image(timeout=timeout)
    click.echo(f"macOS {latest.macos_version} ({latest.build_version})")
    click.echo(f"needs {latest.min_cpus} CPUs and {latest.min_memory_mb} MiB of memory")
    click.echo(latest.url)
