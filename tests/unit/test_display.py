"""Display configs, ``WxH[@PPI]`` specs, presets and the repeated-spec list (its click and
argparse glue: tests/unit/test_cli_display.py)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vzkit import (
    DisplayConfig,
    DisplayList,
    SpecError,
    default_display_config,
    default_linux_display_config,
    parse_display_spec,
)

widths = st.integers(min_value=640, max_value=7680)
heights = st.integers(min_value=480, max_value=4320)
ppis = st.integers(min_value=1, max_value=100_000)


def test_display_config_defaults_and_str() -> None:
    cfg = DisplayConfig(1920, 1080)
    assert cfg.ppi == 144
    assert str(cfg) == "1920x1080@144"
    assert str(DisplayConfig(2560, 1600, 227)) == "2560x1600@227"


def test_display_config_is_frozen() -> None:
    cfg = DisplayConfig(1920, 1080)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 800  # type: ignore[misc]


def test_defaults() -> None:
    assert default_display_config() == DisplayConfig(1920, 1200, 144)
    assert default_linux_display_config() == DisplayConfig(1920, 1080, 144)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("4k", (3840, 2160, 144)),
        ("uhd", (3840, 2160, 144)),
        ("1080p", (1920, 1080, 144)),
        ("fhd", (1920, 1080, 144)),
        ("720p", (1280, 720, 144)),
        ("hd", (1280, 720, 144)),
        ("retina", (2560, 1600, 227)),
    ],
)
def test_presets(spec: str, expected: tuple[int, int, int]) -> None:
    assert parse_display_spec(spec) == DisplayConfig(*expected)
    assert parse_display_spec(f"  {spec.upper()}\t") == DisplayConfig(*expected)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1920x1080", DisplayConfig(1920, 1080, 144)),
        ("1920X1080", DisplayConfig(1920, 1080, 144)),
        ("  800x600  ", DisplayConfig(800, 600, 144)),
        ("1920x1080@96", DisplayConfig(1920, 1080, 96)),
        ("\n2560X1440@220 ", DisplayConfig(2560, 1440, 220)),
        ("1024x768@1", DisplayConfig(1024, 768, 1)),
    ],
)
def test_wxh_forms(spec: str, expected: DisplayConfig) -> None:
    assert parse_display_spec(spec) == expected


@pytest.mark.parametrize(
    ("width", "height"),
    [(640, 480), (7680, 4320), (640, 4320), (7680, 480)],
)
def test_bounds_are_inclusive(width: int, height: int) -> None:
    assert parse_display_spec(f"{width}x{height}") == DisplayConfig(width, height)
    assert DisplayConfig(width, height).as_tuple() == (width, height, 144)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("639x480", "width 639 is out of range (640-7680)"),
        ("7681x480", "width 7681 is out of range (640-7680)"),
        ("640x479", "height 479 is out of range (480-4320)"),
        ("640x4321", "height 4321 is out of range (480-4320)"),
        ("1920x1080@0", "PPI must be positive, got 0"),
        ("0x0", "width 0 is out of range"),
    ],
)
def test_out_of_range(spec: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_display_spec(spec)
    assert fragment in str(info.value)
    assert repr(spec) in str(info.value)


def test_exact_message_for_garbage() -> None:
    with pytest.raises(SpecError) as info:
        parse_display_spec("huge")
    assert str(info.value) == (
        "invalid display spec 'huge'; expected WxH, WxH@PPI, or a preset "
        "(4k, uhd, 1080p, fhd, 720p, hd, retina)"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "huge",
        "1920",
        "1920x",
        "x1080",
        "1920x1080@",
        "1920x1080@-5",
        "-1920x1080",
        "1920 x 1080",
        "1920*1080",
        "1920x1080@144@144",
        "1920.5x1080",
        "4k@144",
        "\u0661\u0669\u0662\u0660x\u0661\u0660\u0668\u0660",  # Arabic-Indic digits
        "9" * 5000 + "x1080",
        "1920x1080@" + "9" * 5000,
    ],
)
def test_garbage_raises_spec_error_which_is_value_error(spec: str) -> None:
    with pytest.raises(SpecError):
        parse_display_spec(spec)
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        parse_display_spec(spec)


def test_non_string_spec() -> None:
    with pytest.raises(SpecError):
        parse_display_spec(1920)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((639, 480), "width"),
        ((640, 4321), "height"),
        ((640, 480, 0), "PPI"),
        ((640, 480, -1), "PPI"),
        ((640.0, 480), "integer"),
        ((True, 480), "integer"),
    ],
)
def test_constructor_validates(args: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        DisplayConfig(*args)  # type: ignore[arg-type]


@settings(max_examples=150)
@given(widths, heights, ppis)
def test_str_parse_round_trip(width: int, height: int, ppi: int) -> None:
    cfg = DisplayConfig(width, height, ppi)
    assert parse_display_spec(str(cfg)) == cfg


@settings(max_examples=100)
@given(
    widths,
    heights,
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(["x", "X"]),
)
def test_parse_str_round_trip_default_ppi(width: int, height: int, pad: str, sep: str) -> None:
    cfg = parse_display_spec(f"{pad}{width}{sep}{height}{pad}")
    assert cfg == DisplayConfig(width, height)
    assert str(cfg) == f"{width}x{height}@144"


@settings(max_examples=100)
@given(st.text(max_size=20))
def test_arbitrary_text_parses_or_raises_spec_error(text: str) -> None:
    try:
        cfg = parse_display_spec(text)
    except SpecError:
        return
    assert parse_display_spec(str(cfg)) == cfg


# -- DisplayList ------------------------------------------------------------------------------


def test_display_list_set_str_and_sequence() -> None:
    displays = DisplayList()
    displays.set("4k")
    displays.set("800x600@96")
    assert len(displays) == 2
    assert displays[0] == DisplayConfig(3840, 2160)
    assert list(displays) == [DisplayConfig(3840, 2160), DisplayConfig(800, 600, 96)]
    assert str(displays) == "3840x2160@144,800x600@96"
    assert displays.to_tuple() == (DisplayConfig(3840, 2160), DisplayConfig(800, 600, 96))
    assert displays == DisplayList([DisplayConfig(3840, 2160), DisplayConfig(800, 600, 96)])
    with pytest.raises(SpecError):
        displays.set("nope")
    assert len(displays) == 2
