"""``VMState`` (VZ's ten states, in VZ order), ``Arch`` and the error tree."""

from __future__ import annotations

import enum
import platform

import pytest

import vzkit
from vzkit import errors
from vzkit._state import Arch, VMState, host_arch

VZ_ORDER = [
    "stopped",
    "running",
    "paused",
    "error",
    "starting",
    "pausing",
    "resuming",
    "stopping",
    "saving",
    "restoring",
]


def test_vm_state_has_exactly_the_ten_vz_states_in_order() -> None:
    assert issubclass(VMState, enum.StrEnum)
    assert [s.value for s in VMState] == VZ_ORDER
    assert [s.vz_value for s in VMState] == list(range(10))
    assert VMState.STOPPED.vz_value == 0
    assert VMState.RESTORING.vz_value == 9


@pytest.mark.parametrize(("value", "name"), list(enumerate(VZ_ORDER)))
def test_from_vz_value(value: int, name: str) -> None:
    state = VMState.from_vz_value(value)
    assert state == name
    assert state.vz_value == value


@pytest.mark.parametrize("value", [-1, 10, 99])
def test_from_vz_value_unknown(value: int) -> None:
    with pytest.raises(ValueError, match="unknown VZVirtualMachineState"):
        VMState.from_vz_value(value)


def test_transitional_states() -> None:
    stable = {VMState.STOPPED, VMState.RUNNING, VMState.PAUSED, VMState.ERROR}
    for state in VMState:
        assert state.is_transitional is (state not in stable)


def test_arch() -> None:
    assert [a.value for a in Arch] == ["x86_64", "aarch64"]
    assert Arch.parse(" AMD64 ") is Arch.X86_64
    assert Arch.parse("arm64") is Arch.AARCH64
    assert Arch.X86_64.debian == "amd64"
    assert Arch.AARCH64.debian == "arm64"
    with pytest.raises(vzkit.SpecError, match="unknown architecture 'sparc'"):
        Arch.parse("sparc")


def test_host_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert host_arch() is Arch.AARCH64
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert host_arch() is Arch.X86_64


# -- errors -----------------------------------------------------------------------------------

ALL_ERRORS = [
    errors.VzkitError,
    errors.SpecError,
    errors.ConfigError,
    errors.ArgumentError,
    errors.StateError,
    errors.UnsupportedError,
    errors.BackendUnavailableError,
    errors.SnapshotError,
    errors.GuestError,
    errors.VMError,
    errors.VMTimeoutError,
    errors.VMNotFoundError,
    errors.VMExistsError,
]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_everything_is_a_vzkit_error(cls: type[Exception]) -> None:
    assert issubclass(cls, errors.VzkitError)
    assert getattr(vzkit, cls.__name__) is cls


def test_tree() -> None:
    assert errors.VzkitError.__bases__ == (Exception,)
    assert issubclass(errors.SpecError, ValueError)
    assert issubclass(errors.ConfigError, ValueError)
    assert not issubclass(errors.SpecError, errors.ConfigError)
    assert not issubclass(errors.ConfigError, errors.SpecError)
    for cls in (
        errors.StateError,
        errors.UnsupportedError,
        errors.BackendUnavailableError,
        errors.SnapshotError,
        errors.GuestError,
        errors.VMError,
    ):
        assert cls.__bases__ == (errors.VzkitError,)
        assert not issubclass(cls, ValueError)
    assert issubclass(errors.VMTimeoutError, errors.VMError)
    assert issubclass(errors.VMNotFoundError, LookupError)
    assert errors.VMExistsError.__bases__ == (errors.VzkitError,)
    assert issubclass(errors.VMTimeoutError, TimeoutError)
    assert errors.ArgumentError.__bases__ == (errors.VzkitError, TypeError)


def test_errors_all() -> None:
    assert sorted(errors.__all__) == sorted(cls.__name__ for cls in ALL_ERRORS)


def test_docstring_draws_the_tree() -> None:
    doc = errors.__doc__
    assert doc is not None
    for cls in ALL_ERRORS:
        assert cls.__name__ in doc
    lines = doc.splitlines()
    root = next(i for i, line in enumerate(lines) if line.strip() == "VzkitError")
    end = next(i for i in range(root, len(lines)) if not lines[i].strip())
    tree = "\n".join(lines[root:end])  # the whole drawing (tests/unit/test_error_tree.py)
    for cls in ALL_ERRORS[1:]:
        assert f"── {cls.__name__}" in tree
    assert "SpecError (also ValueError)" in tree
    assert "ConfigError (also ValueError)" in tree


def test_unsupported_error_carries_backend_and_feature() -> None:
    err = errors.UnsupportedError("no 9p here", backend="vz", feature="9p")
    assert (str(err), err.backend, err.feature) == ("no 9p here", "vz", "9p")
    plain = errors.UnsupportedError("x")
    assert (plain.backend, plain.feature) == ("", "")


def test_errors_catchable_as_value_error() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        vzkit.parse_display_spec("nope")
    with pytest.raises(ValueError):  # noqa: PT011
        vzkit.LinuxVMConfig(cpus=0)
