"""Rosetta for Linux guests: x86_64 programs in an aarch64 guest on Apple silicon.

The framework shares Rosetta's directory (``VZLinuxRosettaDirectoryShare``, macOS 13+) as a
VirtioFS device; vzkit gives it the tag :data:`ROSETTA_TAG` and says so on the kernel command
line (``vzkit.rosetta=TAG``), and vzkit's guests mount it and register its ``rosetta`` with
binfmt_misc for x86_64 ELF programs (``image/init.sh``). Rosetta is installed separately from
macOS: :func:`rosetta_availability` tells, :func:`install_rosetta` asks macOS to install it
(the system shows its license to the user).
"""

from __future__ import annotations

import enum
from typing import Any

from ..._volume import VolumeMount, assign_volume_tags
from ...errors import ConfigError, UnsupportedError, VMTimeoutError
from ._nserror import nserror_to_exception
from ._objc import ErrorCompletionHandler, require_arm64, vz

__all__ = [
    "ROSETTA_TAG",
    "RosettaAvailability",
    "create_rosetta_device",
    "install_rosetta",
    "rosetta_availability",
    "rosetta_cmdline",
]

#: The VirtioFS tag of Rosetta's share in vzkit's guests.
ROSETTA_TAG = "vzkit-rosetta"
_API = "Rosetta (VZLinuxRosettaDirectoryShare)"
_INSTALL_HINT = (
    "install it with 'vzkit macos install-rosetta' (or 'softwareupdate --install-rosetta'), "
    "or drop rosetta"
)


class RosettaAvailability(enum.IntEnum):
    """``VZLinuxRosettaAvailability``."""

    NOT_SUPPORTED = 0
    NOT_INSTALLED = 1
    INSTALLED = 2


def rosetta_availability() -> RosettaAvailability:
    """Whether this Mac can share Rosetta with Linux guests (Apple silicon, macOS 13+)."""
    require_arm64(_API, "13.0")
    return RosettaAvailability(int(vz().VZLinuxRosettaDirectoryShare.availability()))


def install_rosetta(timeout: float | None = None) -> None:
    """Ask macOS to install Rosetta and wait (the system asks the user to agree to its
    license, so give ``timeout`` room); returns at once when it is installed already."""
    availability = rosetta_availability()
    if availability is RosettaAvailability.INSTALLED:
        return
    if availability is RosettaAvailability.NOT_SUPPORTED:
        raise UnsupportedError(
            "Rosetta is not supported on this Mac", backend="vz", feature="rosetta"
        )
    handler = ErrorCompletionHandler("install Rosetta")
    vz().VZLinuxRosettaDirectoryShare.installRosettaWithCompletionHandler_(handler.block)
    if not handler.wait(timeout):
        raise VMTimeoutError(
            f"Rosetta was not installed within {timeout} s (macOS may still be asking: "
            "answer its dialog, then try again)"
        )
    if handler.error is not None:
        raise nserror_to_exception(handler.error, "cannot install Rosetta")


def create_rosetta_device(volumes: tuple[VolumeMount, ...] = ()) -> Any:
    """The VirtioFS device sharing Rosetta under :data:`ROSETTA_TAG` (a share's tag may not
    take it). Raises :class:`~vzkit.ConfigError` when Rosetta is not installed (saying how
    to install it) and :class:`~vzkit.UnsupportedError` where it cannot run."""
    if any(v.tag == ROSETTA_TAG for v in assign_volume_tags(volumes)):
        raise ConfigError(f"the share tag {ROSETTA_TAG!r} is Rosetta's: give the share another")
    availability = rosetta_availability()
    if availability is RosettaAvailability.NOT_SUPPORTED:
        raise UnsupportedError(
            "Rosetta is not supported on this Mac", backend="vz", feature="rosetta"
        )
    if availability is RosettaAvailability.NOT_INSTALLED:
        raise ConfigError(f"Rosetta is not installed on this Mac: {_INSTALL_HINT}")
    v = vz()
    share, error = v.VZLinuxRosettaDirectoryShare.alloc().initWithError_(None)
    if share is None:
        raise nserror_to_exception(error, f"cannot share Rosetta ({_INSTALL_HINT})")
    device = v.VZVirtioFileSystemDeviceConfiguration.alloc().initWithTag_(ROSETTA_TAG)
    device.setShare_(share)
    return device


def rosetta_cmdline() -> str:
    """The kernel command-line word that has vzkit's guests register Rosetta."""
    return f"vzkit.rosetta={ROSETTA_TAG}"
