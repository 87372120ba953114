"""Options shared by several commands, and the callbacks that turn spec strings into values.

A malformed spec (display, volume, network, port) becomes click's usage error for that option
(argparse's, for :class:`DisplayAction`), with the library's own sentence.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vzkit import (
    MIN_MEMORY_MB,
    Arch,
    ConsoleMode,
    DiskFormat,
    DisplayConfig,
    DisplayList,
    LinuxVMConfig,
    parse_disk_spec,
    parse_network_mode,
    parse_port_spec,
    parse_size,
    parse_volume_spec,
)
from vzkit._config import MAX_CPUS, MAX_MEMORY_GB  # the bounds in --help (a known exception)
from vzkit.errors import SpecError

from ._errors import F

__all__ = ["SIZE", "DisplayAction", "SizeType", "build_config", "display_callback", "vm_options"]


if TYPE_CHECKING:  # generic from click 8.2; subscripting it at run time needs 8.2
    _ParamType = click.ParamType[float]
else:
    _ParamType = click.ParamType


class SizeType(_ParamType):
    """A size with an optional unit (``512m``, ``2g``, ``1G``; a plain number is GiB), as
    bytes (``in_gb``: as GiB, a float)."""

    name = "size"

    def __init__(self, *, in_gb: bool = False) -> None:
        self.in_gb = in_gb

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # a default given as a number of GiB
        if not isinstance(value, str):
            return value
        try:
            nbytes = parse_size(value, what=param.opts[0] if param and param.opts else "size")
        except ValueError as err:  # ConfigError: the library's sentence
            self.fail(str(err), param, ctx)
        return nbytes / (1 << 30) if self.in_gb else nbytes


SIZE = SizeType()


def _spec_callback(
    parse: Callable[[str], Any],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return parse(value)
        except SpecError as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from err

    return callback


def display_callback(
    ctx: click.Context | None, param: click.Parameter | None, values: Iterable[str] | None
) -> tuple[DisplayConfig, ...]:
    """A click callback for a ``multiple=True`` ``--display`` option: specs → displays.

    A bad spec becomes ``click.BadParameter`` (click's usage error, exit code 2).
    """
    out = DisplayList()
    for value in values or ():
        try:
            out.set(value)
        except SpecError as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from err
    return out.to_tuple()


class DisplayAction(argparse.Action):
    """``parser.add_argument("--display", action=DisplayAction)`` for argparse programs.

    Each occurrence appends to a :class:`~vzkit.DisplayList` stored on the namespace; a bad
    spec becomes an ordinary argparse usage error.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        if not isinstance(current, DisplayList):
            current = DisplayList()
            setattr(namespace, self.dest, current)
        try:
            current.set(str(values))
        except SpecError as err:
            parser.error(f"{option_string or self.dest}: {err}")


def vm_options(func: F) -> F:
    """The options that describe a Linux VM, shared by ``config``, ``run`` and ``snapshot``."""
    options = [
        click.option(
            "--cpus",
            type=click.IntRange(1, MAX_CPUS),
            help="Virtual CPUs (default 1 for vzkit's guest, 2 with --kernel or --config).",
        ),
        click.option(
            "--memory",
            "memory_gb",
            type=SizeType(in_gb=True),
            help=(
                f"Memory, {MIN_MEMORY_MB}m-{MAX_MEMORY_GB}g, e.g. 512m or 2g; a plain number is"
                " GiB (default 512m for vzkit's guest, 1g with --kernel or --config)."
            ),
        ),
        click.option(
            "--arch", type=click.Choice([a.value for a in Arch]), help="Guest architecture."
        ),
        click.option(
            "--kernel",
            "kernel_path",
            type=click.Path(path_type=Path),
            help="Kernel for direct boot.",
        ),
        click.option(
            "--initrd", "initrd_path", type=click.Path(path_type=Path), help="Initial ramdisk."
        ),
        click.option("--cmdline", help="Kernel command line."),
        click.option(
            "--disk", "disk_path", type=click.Path(path_type=Path), help="Main disk image."
        ),
        click.option(
            "--disk-format",
            type=click.Choice([f.value for f in DiskFormat]),
            help="Format of --disk (default raw; never guessed from the disk's content).",
        ),
        click.option(
            "--iso", "iso_path", type=click.Path(path_type=Path), help="ISO attached read-only."
        ),
        click.option(
            "--add-disk",
            "disks",
            multiple=True,
            metavar="PATH|NBD_URL[,bus=virtio|nvme|usb][,format=F][,ro]",
            callback=_spec_callback(parse_disk_spec),
            help="Another disk after --disk and --iso (repeatable): an image file or an "
            "nbd:// export, on a virtio (default), NVMe or USB mass-storage bus.",
        ),
        click.option(
            "--state-dir", type=click.Path(path_type=Path), help="Per-VM state directory."
        ),
        click.option(
            "--volume",
            "-v",
            "volumes",
            multiple=True,
            metavar="HOST[:GUEST_PATH|:TAG][:ro|rw]",
            callback=_spec_callback(parse_volume_spec),
            help="Share a host directory (repeatable): HOST:/data[:ro] mounts it at /data in "
            "the guest; HOST[:TAG][:ro] at /mnt/TAG (TAG defaults to the directory's name).",
        ),
        click.option(
            "--network",
            metavar="MODE",
            callback=_spec_callback(parse_network_mode),
            help="nat (default; the guest cannot reach the host's loopback services), "
            "nat:host-loopback (it can, at 10.0.2.2), none, vmnet, host-only or bridged:IFACE.",
        ),
        click.option(
            "--add-network",
            "networks",
            multiple=True,
            metavar="MODE",
            callback=_spec_callback(parse_network_mode),
            help="Another NIC after --network's (repeatable), as --network takes it (not none).",
        ),
        click.option(
            "--publish",
            "-p",
            "publish",
            multiple=True,
            metavar="[ADDR:]HOST:GUEST[/tcp|udp]",
            callback=_spec_callback(parse_port_spec),
            help="Forward a host port (127.0.0.1 unless ADDR) to the guest (repeatable; "
            "without nat, through the guest agent).",
        ),
        click.option(
            "--display",
            "displays",
            multiple=True,
            metavar="SPEC",
            callback=display_callback,
            help="WxH[@PPI] or 4k/1080p/720p/retina (repeatable); implies --graphics.",
        ),
        click.option(
            "--graphics/--headless", default=None, help="Attach a display (default headless)."
        ),
        click.option(
            "--gui/--no-gui",
            default=None,
            help="Show the display: a window (vz; closing it stops the VM), or a VNC "
            "endpoint (qemu); implies --graphics.",
        ),
        click.option(
            "--rosetta/--no-rosetta",
            default=None,
            help="Run x86_64 Linux programs in an aarch64 guest with Apple's Rosetta (vz).",
        ),
        click.option(
            "--sound/--no-sound",
            default=None,
            help="Virtio sound output to the host's speakers (vz; the qemu backend refuses it).",
        ),
        click.option(
            "--console",
            type=click.Choice([c.value for c in ConsoleMode]),
            help="Serial console target.",
        ),
        click.option(
            "--accel",
            "accelerator",
            metavar="NAME",
            help="Accelerator: kvm, hvf, tcg (default: best that works).",
        ),
        click.option(
            "--cpu",
            "cpu_model",
            metavar="MODEL",
            help="Guest CPU as QEMU's -cpu takes it, e.g. max, cortex-a72 (default: host under "
            "kvm/hvf, else max; neoverse-n1 for aarch64).",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Start from a TOML/JSON config file; options override it.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(config_file: Path | None, graphics: bool | None, **opts: Any) -> LinuxVMConfig:
    """Merge a config file (if any) with the options that were given."""
    base = LinuxVMConfig.load(config_file) if config_file is not None else None
    changes = {k: v for k, v in opts.items() if v is not None and v != ()}
    if graphics is not None:
        changes["headless"] = not graphics
    elif changes.get("displays"):
        changes["headless"] = False
    if base is None:
        return LinuxVMConfig(**changes)
    return base.replace(**changes)
