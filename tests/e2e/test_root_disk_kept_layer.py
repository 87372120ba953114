"""A kept root layer (``RootDisk.layer``) on qemu: what a VM wrote is there for the next VM of
the same config (stopped, closed, a new ``VirtualMachine``, each with its own temporary state
dir); the base is never written; a second VM on a layer in use is refused by QEMU's lock; a
restore into a config with a kept layer gives the layer the snapshot's content, and what the
restored VM writes then is kept too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._disk import standalone_qcow2_size
from vzkit.image import BaseImage, rootfs_base

from .conftest import VMFactory
from .test_root_disks import BUSYBOX_ONLY, make_tree, sha256


def _sh(vm: vzkit.VirtualMachine, script: str) -> str:
    proc = vm.guest.run([BUSYBOX_ONLY, "sh", "-c", script], timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def _settings(vms: VMFactory, tmp_path: Path) -> tuple[BaseImage, Path, dict[str, Any]]:
    tree = make_tree(tmp_path / "tree", vms.images["x86_64"])
    base = rootfs_base(tree, cache_dir=tmp_path / "cache")
    kept = tmp_path / "vm" / "root.qcow2"
    kept.parent.mkdir()
    settings = {
        "root_disk": vzkit.RootDisk(base=base.path, digest=base.digest, layer=kept),
        "console": vzkit.ConsoleMode.LOG,
    }
    return base, kept, settings


def _boot(vms: VMFactory, settings: dict[str, Any]) -> vzkit.VirtualMachine:
    vm = vms.create(**settings)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    return vm


def test_a_kept_layer_keeps_what_the_vm_wrote(vms: VMFactory, tmp_path: Path) -> None:
    base, kept, settings = _settings(vms, tmp_path)
    before = sha256(base.path)
    first = _boot(vms, settings)
    _sh(first, "echo kept across VMs > /root/kept; sync")
    first.stop(timeout=30)
    first.close()
    assert standalone_qcow2_size(kept) == base.path.stat().st_size  # left by close
    assert oct(kept.stat().st_mode & 0o777) == oct(0o600)

    second = _boot(vms, settings)
    assert second.config == first.config
    assert _sh(second, "cat /root/kept; cat /etc/marker") == "kept across VMs\nfrom the image\n"
    third = vms.create(**settings)
    with pytest.raises(vzkit.VzkitError, match='Failed to get "write" lock'):
        third.start(timeout=60)  # QEMU's image locking: one VM per layer
    third.close()  # a failed start's close leaves the layer too
    assert _sh(second, "cat /root/kept") == "kept across VMs\n"  # still running, unharmed
    second.stop(timeout=30)
    second.close()
    assert kept.exists()
    # Another process, from the config as a named VM's vm.json keeps it (to_json/from_json).
    saved = tmp_path / "vm" / "config.json"
    saved.write_text(second.config.to_json())
    proc = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(saved)], capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == "kept across VMs\n"
    assert sha256(base.path) == before  # the base is never written


#: A VM in a new process, on the config file named by argv[1]: it prints /root/kept.
_OTHER_PROCESS = """
import sys, vzkit
cfg = vzkit.LinuxVMConfig.from_json(open(sys.argv[1]).read())
with vzkit.VirtualMachine(cfg, backend="qemu") as vm:
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    proc = vm.guest.run(["/bin/busybox", "cat", "/root/kept"], timeout=60)
    sys.stdout.write(proc.stdout.decode())
    vm.stop(timeout=30)
"""


def test_a_restore_into_a_kept_layer_keeps_on_from_the_snapshot(
    vms: VMFactory, tmp_path: Path
) -> None:
    base, kept, settings = _settings(vms, tmp_path)
    manager = vzkit.SnapshotManager(tmp_path / "snapshots")
    vm = _boot(vms, settings)
    _sh(vm, "echo in-the-snapshot > /root/marker; sync")
    manager.save(vm, "s", timeout=120)
    _sh(vm, "echo after-the-save > /root/later; sync")  # kept in the layer, not in "s"
    busy = vms.create(**settings)
    with pytest.raises(vzkit.SnapshotError, match="a VM is running on it"):
        manager.restore(busy, "s", timeout=120)  # the layer would be replaced under vm
    busy.close()
    assert _sh(vm, "cat /root/later") == "after-the-save\n"
    vm.stop(timeout=30)
    vm.close()

    restored = vms.create(**settings)
    manager.restore(restored, "s", timeout=120)
    restored.resume(timeout=30)
    assert _sh(restored, "cat /root/marker; ls /root") == "in-the-snapshot\nmarker\n"
    argv = restored._core.machine.argv  # type: ignore[attr-defined]
    (chain,) = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert chain["backing"]["driver"] == "raw"  # a copy of the captured layer, over the base
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]  # the copy is in place
    _sh(restored, "echo after-the-restore > /root/new; sync")
    manager.save(restored, "s2", timeout=120)  # the kept layer, captured again
    restored.stop(timeout=30)
    restored.close()

    again = _boot(vms, settings)  # a cold boot on the kept layer
    assert _sh(again, "cat /root/marker /root/new; ls /root") == (
        "in-the-snapshot\nafter-the-restore\nmarker\nnew\n"
    )
    again.stop(timeout=30)
    # "s2" (saved from the kept layer after its rename) into a VM with a layer of its run
    plain = {**settings, "root_disk": vzkit.RootDisk(base=base.path, digest=base.digest)}
    other = vms.create(**plain)
    manager.restore(other, "s2", timeout=120)
    other.resume(timeout=30)
    assert _sh(other, "cat /root/new") == "after-the-restore\n"
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
