"""Sizes with units: ``vzkit.parse_size`` and ``vzkit.format_size``."""

from __future__ import annotations

from pathlib import Path

import pytest

from vzkit import ConfigError, create_disk_image, format_size, parse_size

GIB = 1 << 30


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("2", 2 * GIB),
        ("0.5", GIB // 2),
        ("512m", 512 << 20),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("2g", 2 * GIB),
        ("2GB", 2 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("1t", 1 << 40),
        ("64k", 64 << 10),
        (" 3g ", 3 * GIB),
        (".5g", GIB // 2),
    ],
)
def test_parse_size(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


def test_a_plain_number_is_in_the_callers_unit() -> None:
    assert parse_size("300", unit="m") == 300 << 20
    assert parse_size("300b", unit="m") == 300


@pytest.mark.parametrize("text", ["", "g", "-1g", "1x", "1e3", "inf", "nan", "1 g g", "1,5g"])
def test_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--memory .* is not a size: give a number"):
        parse_size(text, what="--memory")


@pytest.mark.parametrize("text", ["0", "0g", "0.1b"])
def test_zero_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="must be more than zero"):
        parse_size(text)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(17, "17 B"), (2048, "2.0 KiB"), (512 << 20, "512.0 MiB"), (3 * GIB // 2, "1.5 GiB")],
)
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


def test_create_disk_image_in_bytes(tmp_path: Path) -> None:
    target = create_disk_image(tmp_path / "d.img", size_bytes=512 << 20)
    assert target.stat().st_size == 512 << 20
    with pytest.raises(ConfigError, match="multiple of 1 MiB"):
        create_disk_image(tmp_path / "e.img", size_bytes=1000)
    with pytest.raises(ConfigError, match="not both"):
        create_disk_image(tmp_path / "f.img", 1, size_bytes=GIB)
    assert not (tmp_path / "e.img").exists()
    assert not (tmp_path / "f.img").exists()
