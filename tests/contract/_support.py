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
