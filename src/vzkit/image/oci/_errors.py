"""The errors of :mod:`vzkit.image.oci` (drawn in :mod:`vzkit.errors`' tree)."""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import GuestError
from .._download import DownloadError

__all__ = ["ImageFormatError", "PlatformError", "RegistryAuthError", "RegistryError"]


class ImageFormatError(GuestError, ValueError):
    """An image, layout, archive, manifest, config or layer is malformed or unsafe (the message
    names the file or blob and what is wrong with it)."""


class PlatformError(ImageFormatError):
    """The image has no manifest for the asked platform; ``available`` lists the ones it has
    (``linux/amd64``, ``linux/arm64/v8``, ...)."""

    def __init__(self, message: str, *, available: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.available = tuple(available)


class RegistryError(DownloadError):
    """A registry answered with an error or broke the distribution protocol (``.url``,
    ``.status``; ``.code`` the registry's own error code, e.g. ``MANIFEST_UNKNOWN``)."""

    def __init__(
        self, message: str, *, url: str, status: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.code = code


class RegistryAuthError(RegistryError):
    """The registry refused the credentials, or wants credentials and none were found."""
