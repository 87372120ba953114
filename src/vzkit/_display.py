"""Display configurations and their ``WxH[@PPI]`` spec strings (the seed's ``DisplayConfig``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import SpecError

__all__ = [
    "DEFAULT_PPI",
    "DisplayConfig",
    "DisplayList",
    "default_display_config",
    "default_linux_display_config",
    "parse_display_spec",
]

DEFAULT_PPI = 144
MIN_WIDTH, MAX_WIDTH = 640, 7680
MIN_HEIGHT, MAX_HEIGHT = 480, 4320

# ASCII digits only: ``\d`` would also accept other scripts' digits (e.g. Arabic-Indic).
_SPEC_RE = re.compile(r"([0-9]+)x([0-9]+)(?:@([0-9]+))?")
# More digits than this is out of any range (and keeps int() clear of its 4300-digit limit).
_MAX_DIGITS = 9


@dataclass(frozen=True, slots=True, kw_only=False)
class DisplayConfig:
    """One display: size in pixels and density in pixels per inch."""

    width: int
    height: int
    ppi: int = DEFAULT_PPI

    def __post_init__(self) -> None:
        _check_bounds(self.width, self.height, self.ppi, str(self.as_tuple()))

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.ppi)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}@{self.ppi}"


def _check_bounds(width: object, height: object, ppi: object, spec: str) -> None:
    for name, value in (("width", width), ("height", height), ("PPI", ppi)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(f"display {spec!r}: {name} must be an integer, got {value!r}")
    assert isinstance(width, int)
    assert isinstance(height, int)
    assert isinstance(ppi, int)
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise SpecError(
            f"display {spec!r}: width {width} is out of range ({MIN_WIDTH}-{MAX_WIDTH})"
        )
    if not MIN_HEIGHT <= height <= MAX_HEIGHT:
        raise SpecError(
            f"display {spec!r}: height {height} is out of range ({MIN_HEIGHT}-{MAX_HEIGHT})"
        )
    if ppi <= 0:
        raise SpecError(f"display {spec!r}: PPI must be positive, got {ppi}")


_PRESETS: dict[str, DisplayConfig] = {
    "4k": DisplayConfig(3840, 2160),
    "uhd": DisplayConfig(3840, 2160),
    "1080p": DisplayConfig(1920, 1080),
    "fhd": DisplayConfig(1920, 1080),
    "720p": DisplayConfig(1280, 720),
    "hd": DisplayConfig(1280, 720),
    "retina": DisplayConfig(2560, 1600, 227),
}

_FORMS = "WxH, WxH@PPI, or a preset (" + ", ".join(_PRESETS) + ")"


def default_display_config() -> DisplayConfig:
    """The seed's default display: 1920x1200 at 144 PPI."""
    return DisplayConfig(1920, 1200)


def default_linux_display_config() -> DisplayConfig:
    """The seed's default display for Linux guests: 1920x1080 at 144 PPI."""
    return DisplayConfig(1920, 1080)


def parse_display_spec(spec: str) -> DisplayConfig:
    """Parse ``WxH``, ``WxH@PPI`` or a preset (``4k``, ``1080p``, ``720p``, ``retina``, ...).

    Surrounding whitespace is ignored and matching is case-insensitive.
    """
    if not isinstance(spec, str):
        raise SpecError(f"display spec must be a string, got {type(spec).__name__}")
    text = spec.strip().lower()
    if not text:
        raise SpecError(f"empty display spec; expected {_FORMS}")
    preset = _PRESETS.get(text)
    if preset is not None:
        return preset
    match = _SPEC_RE.fullmatch(text)
    if match is None:
        raise SpecError(f"invalid display spec {spec!r}; expected {_FORMS}")
    for name, digits in (("width", match[1]), ("height", match[2]), ("PPI", match[3])):
        if digits is not None and len(digits.lstrip("0")) > _MAX_DIGITS:
            shown = digits if len(digits) <= 12 else digits[:12] + "..."
            raise SpecError(f"display {spec[:40]!r}: {name} {shown} is out of range")
    width, height = int(match[1]), int(match[2])
    ppi = int(match[3]) if match[3] is not None else DEFAULT_PPI
    _check_bounds(width, height, ppi, spec)
    return DisplayConfig(width, height, ppi)


class DisplayList:
    """Collects repeated ``--display`` options (the seed's ``DisplaySlice``).

    :meth:`set` parses and appends one spec; ``str()`` joins the specs with commas. The
    command-line glue (a click callback, an argparse action) is in :mod:`vzkit.cli`.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[DisplayConfig] = ()) -> None:
        self._items: list[DisplayConfig] = list(items)

    def set(self, value: str) -> None:
        """Parse one spec and append it (the seed's ``Set``)."""
        self._items.append(parse_display_spec(value))

    def __str__(self) -> str:
        return ",".join(str(d) for d in self._items)

    def __repr__(self) -> str:
        return f"DisplayList([{', '.join(repr(d) for d in self._items)}])"

    def __iter__(self) -> Iterator[DisplayConfig]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> DisplayConfig:
        return self._items[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DisplayList):
            return self._items == other._items
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_tuple(self) -> tuple[DisplayConfig, ...]:
        return tuple(self._items)
