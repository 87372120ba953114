"""``docs/vz-parity.md`` lists every name of the seed's API reference (vendored next to this
file and parsed here) with a Python name that exists and a test that exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "vz-parity.md"

SEED = Path(__file__).with_name("seed") / "vzkit-v0.4.4.txt"  # vendored API reference
#: Exported struct fields that are functions (the seed's hook), listed like methods.
FUNCTION_FIELDS = ("VsockManager.DispatchFunc",)


def seed_names() -> list[str]:
    """Every constant, function, type and method the seed's API reference documents."""
    names: list[str] = []
    in_const = False
    for line in SEED.read_text(encoding="utf-8").splitlines():
        if line.startswith("const ("):
            in_const = True
            continue
        if in_const:
            if line.strip() == ")":
                in_const = False
            elif match := re.match(r"^\s+([A-Z]\w*)\s+(?:\w+\s+)?=", line):
                names.append(match[1])
            continue
        if match := re.match(r"^(?:func|type) ([A-Z]\w*)$", line):
            names.append(match[1])
        elif match := re.match(r"^func \(\*?(\w+)\) ([A-Z]\w*)$", line):
            names.append(f"{match[1]}.{match[2]}")
    return names + list(FUNCTION_FIELDS)


ROW = re.compile(r"^\| (.+?) \| (.+?) \| `([^`]+)` \|$")


def rows() -> list[tuple[str, str, str]]:
    """(what, Python names, test) of every table row, seed rows and the rest."""
    out = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match and match[1] not in ("Seed (Go)", "What"):
            out.append((match[1].strip("`"), match[2], match[3]))
    return out


def test_the_seed_reference_is_parsed_completely() -> None:
    names = seed_names()
    assert len(names) == len(set(names)) == 86
    for expected in ("RunLoopRunFinished", "NetworkModeVMNet", "BuildLinuxVMConfig", "Queue.Sync"):
        assert expected in names


def test_every_seed_name_has_a_row() -> None:
    listed = {seed for seed, _, _ in rows()}
    assert sorted(set(seed_names()) - listed) == []


def _resolve(dotted: str) -> object:
    prefix = {"vz": "vzkit.backends.vz", "vzkit": "vzkit", "socket": "socket"}
    head, _, rest = dotted.partition(".")
    module = prefix[head]
    obj: object = importlib.import_module(module)
    for part in rest.split("."):
        if not hasattr(obj, part) and isinstance(obj, type(importlib)):
            importlib.import_module(f"{obj.__name__}.{part}")  # a private submodule
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("seed", "python", "test"), rows(), ids=[r[0] for r in rows()])
def test_row_names_exist(seed: str, python: str, test: str) -> None:
    names = re.findall(r"`((?:vz|vzkit|socket)\.[\w.]+)`", python)
    assert names, f"{seed}: no Python name in {python!r}"
    for name in names:
        if name.endswith(".block"):  # an instance attribute
            continue
        _resolve(name)
    path, _, func = test.partition("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(func)}\(", source, re.M), test
