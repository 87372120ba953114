"""``text=`` picks the type of a command's output for a type checker, as in ``subprocess``:
``bytes`` by default, ``str`` with ``text=True`` (mypy --strict on a snippet of user code)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mypy import api

import vzkit

SNIPPET = """
import vzkit, vzkit.aio

def f(vm: vzkit.VirtualMachine, avm: vzkit.aio.VirtualMachine, flag: bool) -> None:
    reveal_type(vzkit.run(["x"]).stdout)
    reveal_type(vzkit.run(["x"], text=True).stdout)
    reveal_type(vzkit.run(["x"], text=flag).stdout)
    reveal_type(vm.guest.run(["x"]).stderr)
    reveal_type(vm.guest.run("x", shell=True, text=True, input="s").stdout)
    with vzkit.start() as started:
        reveal_type(started)

async def g(avm: vzkit.aio.VirtualMachine) -> None:
    reveal_type((await vzkit.aio.run(["x"], text=True)).stdout)
    reveal_type((await avm.guest.run(["x"])).stdout)
    async with vzkit.aio.start() as started:
        reveal_type(started)
"""


def test_text_selects_str_or_bytes_for_mypy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = tmp_path / "user_code.py"
    snippet.write_text(textwrap.dedent(SNIPPET))
    # this source tree's vzkit, not whichever one the environment has installed
    monkeypatch.setenv("MYPYPATH", str(Path(vzkit.__file__).resolve().parents[1]))
    args = ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(snippet)]
    out, err, status = api.run(args)
    revealed = [line.partition("Revealed type is ")[2] for line in out.splitlines()]
    assert [r for r in revealed if r] == [
        '"bytes"',
        '"str"',
        '"Any"',
        '"bytes"',
        '"str"',
        '"vzkit._vm.VirtualMachine"',
        '"str"',
        '"bytes"',
        '"vzkit.aio.VirtualMachine"',
    ], out + err
    assert status == 0, out + err
