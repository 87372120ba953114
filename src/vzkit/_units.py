"""Sizes with units, as users write them: ``512m``, ``2g``, ``1G``, ``1.5GiB``, ``2``.

Binary multiples, as docker's ``--memory`` and ``truncate -s`` read them (``1g`` is 2**30
bytes); a number without a unit is in the unit the caller names (GiB for memory and disks).
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

__all__ = ["format_size", "parse_size"]

_SHIFT = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|(b))?", re.IGNORECASE)


def parse_size(text: str, *, unit: str = "g", what: str = "size") -> int:
    """``text`` in bytes: a positive number with an optional unit (k, m, g, t; any case,
    optionally followed by ``b`` or ``ib``); without one, in ``unit``. Raises
    :class:`~vzkit.errors.ConfigError` naming ``what`` and the accepted forms."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{what} {text!r} is not a size: give a number with an optional unit, e.g. 512m, "
            f"2g, 1.5G (a plain number is in {unit.upper()}iB)"
        )
    number, prefix, plain_bytes = match.groups()
    value = float(number) * (1 << _SHIFT[(prefix or plain_bytes or unit).lower()])
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{what} {text!r} must be more than zero")
    return round(value)


def format_size(nbytes: int) -> str:
    """``nbytes`` for people: ``512.0 MiB``, ``2.0 GiB``, ``17 B``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    for name, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {name}"
    raise AssertionError("unreachable")  # pragma: no cover
