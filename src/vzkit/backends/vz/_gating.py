"""macOS version gating: this host's version (also under an old-SDK interpreter, which
``platform.mac_ver()`` tells "10.16"), and :class:`MacOSVersionError` naming the version an
API of the Virtualization framework needs. Imports no PyObjC."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess

from ...errors import UnsupportedError

__all__ = [
    "MIN_MACOS",
    "MacOSVersionError",
    "is_arm64",
    "macos_version",
    "require_arm64",
    "require_macos",
]

log = logging.getLogger(__name__)

#: The oldest macOS the backend drives (``VZGenericPlatformConfiguration``, VirtioFS).
MIN_MACOS = (12, 0)

# -- macOS version gating ----------------------------------------------------------------------


def _fmt(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def _parse(text: str) -> tuple[int, int]:
    major, _, rest = text.partition(".")
    minor = rest.partition(".")[0]
    return (int(major), int(minor or 0))


class MacOSVersionError(UnsupportedError):
    """An API of the Virtualization framework needs a newer macOS (or Apple silicon).

    ``required`` is the macOS version that introduced it, ``current`` this host's (``None``
    off macOS). ``backend`` is ``"vz"`` and ``feature`` names the API.
    """

    def __init__(
        self,
        api: str,
        required: tuple[int, int],
        current: tuple[int, int] | None,
        *,
        reason: str = "",
    ) -> None:
        here = f"macOS {_fmt(current)}" if current is not None else "not macOS"
        message = reason or f"{api} needs macOS {_fmt(required)} or later (this is {here})"
        super().__init__(message, backend="vz", feature=api)
        self.api = api
        self.required = required
        self.current = current


#: What ``platform.mac_ver()`` says to an interpreter built against an SDK older than macOS
#: 11: the system's compatibility version, not the real one (``SYSTEM_VERSION_COMPAT``).
_COMPAT_VERSION = "10.16"
_real_version: dict[str, tuple[int, int] | None] = {}


def _sw_vers() -> str | None:
    """``sw_vers -productVersion``, run outside the compatibility mode (it links a new SDK)."""
    env = {**os.environ, "SYSTEM_VERSION_COMPAT": "0"}
    try:
        done = subprocess.run(
            ["sw_vers", "-productVersion"], capture_output=True, env=env, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("ascii", "replace").strip() or None


def _from_darwin(release: str) -> tuple[int, int] | None:
    """The macOS major version of a Darwin kernel release (20 is macOS 11, ..., 24 is 15,
    25 is 26); the minor is left 0, as Darwin's minors do not always match macOS's."""
    try:
        darwin = int(release.partition(".")[0])
    except ValueError:
        return None
    if darwin < 20:
        return None
    return (darwin - 9 if darwin <= 24 else darwin + 1, 0)


def _uncompat_version() -> tuple[int, int] | None:
    if _COMPAT_VERSION not in _real_version:
        text = _sw_vers()
        version = None
        if text and not text.startswith(_COMPAT_VERSION):
            with contextlib.suppress(ValueError):
                version = _parse(text)
        if version is None:
            version = _from_darwin(os.uname().release)
        if version is not None:
            log.debug("macOS %s (platform.mac_ver() says %s)", _fmt(version), _COMPAT_VERSION)
        _real_version[_COMPAT_VERSION] = version
    return _real_version[_COMPAT_VERSION]


def macos_version() -> tuple[int, int] | None:
    """This host's macOS version as ``(major, minor)``, or ``None`` when it is not macOS.

    An interpreter built against an old SDK is told "10.16" by ``platform.mac_ver()``; then
    the version comes from ``sw_vers`` (once), or failing that the Darwin kernel's release.
    """
    text = platform.mac_ver()[0]
    if not text:
        return None
    if text == _COMPAT_VERSION or text.startswith(_COMPAT_VERSION + "."):
        return _uncompat_version()
    try:
        return _parse(text)
    except ValueError:
        return None


def require_macos(version: str, api: str) -> None:
    """Raise :class:`MacOSVersionError` unless this is macOS ``version`` or later."""
    required = _parse(version)
    current = macos_version()
    if current is None or current < required:
        raise MacOSVersionError(api, required, current)


def is_arm64() -> bool:
    return platform.machine() == "arm64"


def require_arm64(api: str, version: str) -> None:
    """Raise :class:`MacOSVersionError` unless this is Apple silicon on macOS ``version``+."""
    require_macos(version, api)
    if not is_arm64():
        raise MacOSVersionError(
            api,
            _parse(version),
            macos_version(),
            reason=f"{api} needs Apple silicon (this Mac is {platform.machine()})",
        )
