"""``NSError`` at the boundary: read once into plain data, then mapped onto vzkit's errors.

Only NSError's own accessors are used (``domain``, ``code``, ``userInfo``,
``localizedDescription``, ``localizedFailureReason``, ``localizedRecoverySuggestion``,
``underlyingErrors``); this module imports no framework.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from ...errors import (
    ConfigError,
    SnapshotError,
    StateError,
    UnsupportedError,
    VMError,
    VzkitError,
)

__all__ = [
    "VZ_ERROR_DOMAIN",
    "NSErrorDetails",
    "NSErrorInfo",
    "extract_nserror_message",
    "format_nserror_detailed",
    "nserror_info",
    "nserror_to_exception",
    "print_nserror_detailed",
]

VZ_ERROR_DOMAIN = "VZErrorDomain"
POSIX_DOMAIN = "NSPOSIXErrorDomain"

# VZErrorCode values (Apple's VZError.h).
_CONFIG_CODES = frozenset({2, 5})  # invalid configuration, invalid disk image
_STATE_CODES = frozenset({3, 4})  # invalid state, invalid state transition
_NOT_SUPPORTED = 10
_SNAPSHOT_CODES = frozenset({11, 12})  # save, restore
#: POSIX codes a vsock connect reports for "nobody listens" (macOS ECONNRESET, ECONNREFUSED).
REFUSED_POSIX_CODES = frozenset({54, 61})
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class NSErrorInfo:
    """An ``NSError``'s fields as plain Python data."""

    domain: str
    code: int
    description: str
    failure_reason: str | None = None
    recovery_suggestion: str | None = None
    user_info: tuple[tuple[str, str], ...] = ()
    underlying: tuple[NSErrorInfo, ...] = ()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def nserror_info(error: Any, _depth: int = 0) -> NSErrorInfo | None:
    """Read an ``NSError`` (``None`` gives ``None``)."""
    if error is None:
        return None
    try:
        raw_info = error.userInfo()
        items = sorted((str(k), str(v)) for k, v in dict(raw_info or {}).items())
    except Exception:  # an odd userInfo must not hide the error itself
        items = []
    underlying: list[NSErrorInfo] = []
    if _depth < _MAX_DEPTH:
        for inner in error.underlyingErrors() or ():
            info = nserror_info(inner, _depth + 1)
            if info is not None:
                underlying.append(info)
    return NSErrorInfo(
        domain=str(error.domain()),
        code=int(error.code()),
        description=str(error.localizedDescription()),
        failure_reason=_text(error.localizedFailureReason()),
        recovery_suggestion=_text(error.localizedRecoverySuggestion()),
        user_info=tuple(items),
        underlying=tuple(underlying),
    )


def extract_nserror_message(error: Any) -> str:
    """The localized description of an ``NSError``; ``""`` for ``None``."""
    if error is None:
        return ""
    return str(error.localizedDescription())


def _format(info: NSErrorInfo, indent: str) -> list[str]:
    lines = [f"{indent}Error Domain={info.domain} Code={info.code}"]
    lines.append(f"{indent}  Description: {info.description}")
    if info.failure_reason:
        lines.append(f"{indent}  Failure reason: {info.failure_reason}")
    if info.recovery_suggestion:
        lines.append(f"{indent}  Recovery suggestion: {info.recovery_suggestion}")
    if info.user_info:
        lines.append(f"{indent}  User info:")
        lines.extend(f"{indent}    {key}: {value}" for key, value in info.user_info)
    for inner in info.underlying:
        lines.append(f"{indent}  Underlying error:")
        lines.extend(_format(inner, indent + "    "))
    return lines


def format_nserror_detailed(error: Any) -> str:
    """Every detail of an ``NSError`` on several lines (``""`` for ``None``): domain, code,
    description, failure reason, recovery suggestion, user info and underlying errors."""
    info = error if isinstance(error, NSErrorInfo) else nserror_info(error)
    if info is None:
        return ""
    return "\n".join(_format(info, ""))


def print_nserror_detailed(error: Any, file: TextIO | None = None) -> None:
    """Print :func:`format_nserror_detailed` (to stdout unless ``file`` is given)."""
    text = format_nserror_detailed(error)
    if text:
        print(text, file=file if file is not None else sys.stdout)


class NSErrorDetails(VzkitError):
    """The ``NSError`` behind a vzkit error, kept as ``__cause__`` with all its fields."""

    def __init__(self, info: NSErrorInfo) -> None:
        super().__init__(format_nserror_detailed(info))
        self.info = info


def nserror_to_exception(error: Any, what: str) -> Exception:
    """The vzkit error for an ``NSError`` reported by ``what`` (``__cause__`` set to an
    :class:`NSErrorDetails` carrying the NSError's fields)."""
    info = nserror_info(error)
    if info is None:
        return VMError(f"{what} failed without an error description")
    message = f"{what}: {info.description}"
    if info.failure_reason and info.failure_reason not in info.description:
        message += f" ({info.failure_reason})"
    exc: Exception
    if info.domain == VZ_ERROR_DOMAIN and info.code in _CONFIG_CODES:
        exc = ConfigError(message)
    elif info.domain == VZ_ERROR_DOMAIN and info.code in _STATE_CODES:
        exc = StateError(message)
    elif info.domain == VZ_ERROR_DOMAIN and info.code == _NOT_SUPPORTED:
        exc = UnsupportedError(message, backend="vz", feature=what)
    elif info.domain == VZ_ERROR_DOMAIN and info.code in _SNAPSHOT_CODES:
        exc = SnapshotError(message)
    elif info.domain == POSIX_DOMAIN and info.code in REFUSED_POSIX_CODES:
        exc = ConnectionRefusedError(info.code, message)
    else:
        exc = VMError(message)
    exc.__cause__ = NSErrorDetails(info)
    return exc
