"""Shared test settings: deterministic, database-free hypothesis runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("vzkit", derandomize=True, database=None, deadline=None)
settings.load_profile("vzkit")


def _children_of(pid: int) -> list[int]:
    """Live (non-zombie) child processes of ``pid``, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


@pytest.fixture(scope="session", autouse=True)
def no_orphans() -> Iterator[None]:
    """After the whole session, no process vzkit started may still be alive."""
    yield
    from vzkit._process import live_children, pid_alive

    leaked = {pid: name for pid, name in live_children().items() if pid_alive(pid)}
    assert not leaked, f"processes started by vzkit are still alive: {leaked}"
    assert not _children_of(os.getpid()), "child processes outlived the test session"
