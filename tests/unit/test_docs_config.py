"""``docs/config.md`` against the config classes: every dataclass field of each class it lists
has a row in that class's table, every row names a real field, and a default shown for a field
with a plain default is that default. Also every ``VZKIT_*`` variable the library reads is on
the page, and the two sets of defaults it states are the code's."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from pathlib import Path

import pytest

import vzkit
from vzkit.image import default_guest_config

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"
CLASSES = {
    cls.__name__: cls
    for cls in (
        vzkit.LinuxVMConfig,
        vzkit.VolumeMount,
        vzkit.NetworkConfig,
        vzkit.PortForward,
        vzkit.DisplayConfig,
        vzkit.RootDisk,
        vzkit.ProcessDefaults,
    )
}
HEADING = re.compile(r"^## `(\w+)`$")
ROW = re.compile(r"^\| `(\w+)` \| (.+?) \| (.+?) \| (.+) \|$")


def _tables(text: str) -> dict[str, dict[str, str]]:
    """Class name -> {field: its default cell}, from the table under ``## `ClassName```."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            match = HEADING.match(line)
            current = tables.setdefault(match[1], {}) if match else None
            continue
        row = ROW.match(line)
        if current is not None and row:
            assert row[1] not in current, f"two rows for {row[1]}"
            current[row[1]] = row[3]
    return tables


TABLES = _tables(DOC.read_text(encoding="utf-8"))


def _shown(value: object) -> str:
    """A default as the page writes it: a Python value, strings and enums in double quotes."""
    if isinstance(value, enum.Enum):
        return json.dumps(value.value)
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def test_the_page_lists_each_class() -> None:
    assert sorted(TABLES) == sorted(CLASSES)
    assert "memory_gb" in TABLES["LinuxVMConfig"]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_field_has_a_row_and_every_row_a_field(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(CLASSES[name])}
    assert sorted(fields - set(TABLES[name])) == [], f"document these in docs/config.md ({name})"
    assert sorted(set(TABLES[name]) - fields) == [], f"rows for fields {name} does not have"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_defaults_shown_are_the_fields_defaults(name: str) -> None:
    checked = 0
    for f in dataclasses.fields(CLASSES[name]):
        cell = TABLES[name][f.name]
        if f.default is dataclasses.MISSING:
            if f.default_factory is dataclasses.MISSING:
                assert cell == "(required)", f.name
            continue
        first = re.match(r"`([^`]*)`", cell)
        assert first is not None, (f.name, cell)
        assert first[1] == _shown(f.default), (f.name, cell)
        checked += 1
    assert checked


def test_the_default_guest_differs_as_the_page_says(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"")
    guest = default_guest_config(kernel_path=kernel)  # no image build for this
    plain = vzkit.LinuxVMConfig(kernel_path=kernel)
    text = DOC.read_text(encoding="utf-8")
    assert f"| `cpus` | {plain.cpus} | {guest.cpus} |" in text
    assert f"| `memory_gb` | {plain.memory_gb:.1f} (1 GiB) | {guest.memory_gb} (512 MiB) |" in text
    assert (plain.cpus, plain.memory_gb, guest.cpus, guest.memory_gb) == (2, 1.0, 1, 0.5)


def test_every_variable_the_library_reads_is_on_the_page() -> None:
    read = set()
    for path in (ROOT / "src" / "vzkit").rglob("*.py"):
        read |= set(re.findall(r"\bVZKIT_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    read.add("VZKIT_QEMU_AARCH64")  # VZKIT_QEMU_{arch}, formatted per architecture
    text = DOC.read_text(encoding="utf-8")
    missing = sorted(v for v in read if f"`{v}`" not in text)
    assert missing == [], "document these variables in docs/config.md"
