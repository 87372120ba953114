"""Shared helpers of the contract tests (importable by test modules, unlike conftest)."""

from __future__ import annotations

from collections.abc import Callable

from .fakeobjc import FakeRuntime, load_api

API = load_api()  # parsed once; runtimes share it unless a test passes mutated data

FakeFactory = Callable[..., FakeRuntime]


def take_violations(rt: FakeRuntime) -> list[str]:
    """Return and clear the violations recorded so far (for tests that expect some)."""
    found = list(rt.violations)
    rt.violations.clear()
    return found


#: The smallest arm64 Linux ``Image`` the vz backend accepts as a kernel: its 64-byte header
#: with the magic ``ARM\x64`` at offset 0x38 (the stand-in host is Apple silicon).
ARM64_IMAGE = bytes(0x38) + b"ARM\x64" + bytes(4)
