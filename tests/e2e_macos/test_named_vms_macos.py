"""Named VMs on a real Mac, on every backend: the supervisor owns the VM (on vz the
``VZVirtualMachine`` lives in it), another process reaches it by name, stop leaves nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit.backends import KNOWN_BACKENDS

from .conftest import MacVMs


@pytest.mark.parametrize("backend", KNOWN_BACKENDS)
def test_a_named_vm_is_reached_from_another_process(
    macvms: MacVMs, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VZKIT_HOME", str(tmp_path / "home"))
    cfg = macvms.config(backend, state_dir=None)
    vm = vzkit.create(cfg, "mac1", backend=backend, timeout=120)
    try:
        vm.guest.wait_ready(timeout=180)
        vm.close()
        other = subprocess.run(
            [sys.executable, "-c",
             "import vzkit\nwith vzkit.connect('mac1') as vm:\n"
             "    print(vm.guest.run(['sh', '-c', 'echo $((6*7))'], text=True).stdout)"],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() == "42"
        (info,) = vzkit.list_vms()
        assert info.state is vzkit.VMState.RUNNING
        with vzkit.connect("mac1") as again:
            again.stop(timeout=60)
        assert vzkit.list_vms()[0].state is vzkit.VMState.STOPPED
    finally:
        vzkit.remove_vm("mac1", force=True)
