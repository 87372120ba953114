"""Fixtures for the contract tests: a strict stand-in for PyObjC, installed per test.

``fake`` simulates macOS 15.0 on Apple silicon; ``make_fake(macos=..., arch=...)`` builds
others (or a runtime from mutated API data). Every runtime is installed into ``sys.modules``
for the test only, and at teardown the test fails if any contract violation was recorded,
even one the code under test swallowed. Tests that provoke violations on purpose consume
them with :func:`take_violations`.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ._support import API, FakeFactory
from .fakeobjc import FakeRuntime, installed


def _simulate_host(monkeypatch: pytest.MonkeyPatch, macos: str, arch: str) -> None:
    monkeypatch.setattr(platform, "mac_ver", lambda *a, **k: (macos, ("", "", ""), arch))
    monkeypatch.setattr(platform, "machine", lambda: arch)


@pytest.fixture
def make_fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFactory]:
    """Build and install a runtime: ``make_fake(macos="13.0", arch="x86_64", data=None)``.

    Only one runtime is installed at a time (the latest).
    """
    runtimes: list[FakeRuntime] = []
    with ExitStack() as stack:

        def factory(
            macos: str = "15.0", arch: str = "arm64", data: dict[str, Any] | None = None
        ) -> FakeRuntime:
            api = API if data is None else None
            rt = FakeRuntime(api, macos=macos, arch=arch, data=data)
            stack.enter_context(installed(rt))
            _simulate_host(monkeypatch, macos, arch)
            runtimes.append(rt)
            return rt

        yield factory
    problems = [v for rt in runtimes for v in rt.violations]
    if problems:
        pytest.fail("contract violations:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def fake(make_fake: FakeFactory) -> FakeRuntime:
    """macOS 15.0 on Apple silicon, with the host facts in ``fake.knobs``."""
    return make_fake()
