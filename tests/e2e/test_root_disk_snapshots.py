"""Snapshots of guests on a root disk (qemu, x86_64): a file written under /root survives a
save and a restore; VMs restored from one snapshot write their own layers; a restored VM saved
again gives a snapshot of its own (its layer committed into a copy of the snapshot's); a base
that changed is refused before QEMU starts.

One guest boots cold for the module (the ``origin``) on a busybox tree made into a cached base
(``rootfs_base``); every other VM here is restored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._disk import standalone_qcow2_size
from vzkit.image import BaseImage, GuestImage, rootfs_base

from .conftest import VMFactory
from .test_root_disks import BUSYBOX_ONLY, make_tree


class Origin:
    """The module's one cold-booted VM, its base and its snapshot ``s``."""

    def __init__(self, root: Path, base: BaseImage, manager: vzkit.SnapshotManager) -> None:
        self.root, self.base, self.manager = root, base, manager
        self.vm: vzkit.VirtualMachine

    def settings(self, name: str, **changes: Any) -> dict[str, Any]:
        return {
            "root_disk": vzkit.RootDisk(base=self.base.path, digest=self.base.digest),
            "console": vzkit.ConsoleMode.LOG,
            "state_dir": self.root / name,
            **changes,
        }


def _sh(vm: vzkit.VirtualMachine, script: str) -> str:
    proc = vm.guest.run([BUSYBOX_ONLY, "sh", "-c", script], timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def origin(
    guest_images: dict[str, GuestImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Origin]:
    root = tmp_path_factory.mktemp("rsnap")
    tree = make_tree(root / "tree", guest_images["x86_64"])
    base = rootfs_base(tree, cache_dir=root / "cache")
    factory = VMFactory(guest_images)
    manager = vzkit.SnapshotManager(root / "vm")
    try:
        o = Origin(root, base, manager)
        o.vm = factory.create(**o.settings("origin"))
        o.vm.start(timeout=60)
        o.vm.guest.wait_ready(120)
        _sh(o.vm, "echo from-origin > /root/marker; sync")
        meta = manager.save(o.vm, "s", timeout=120)
        assert meta.vm_state == "running"
        _sh(o.vm, "echo after-the-save > /root/later; sync")  # not in the snapshot
        yield o
    finally:
        print(factory.report())
        factory.close()


def _restore(
    origin: Origin, vms: VMFactory, name: str, snapshot: str = "s"
) -> vzkit.VirtualMachine:
    vm = vms.create(**origin.settings(name))
    origin.manager.restore(vm, snapshot, timeout=120)
    assert vm.state is vzkit.VMState.PAUSED
    vm.resume(timeout=30)
    return vm


def _record(origin: Origin, name: str = "s") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(origin.manager.meta_path(name).read_text())
    return data


def test_a_file_under_root_survives_save_and_restore(origin: Origin, vms: VMFactory) -> None:
    record = _record(origin)
    assert record["format"] == 4
    assert record["rootDisk"] == {
        "base": str(origin.base.path),
        "format": "raw",
        "digest": origin.base.digest,  # the cache's, not hashed again
    }
    (layer,) = [d for d in record["disks"] if d["role"] == "root"]
    captured = origin.manager.snapshot_dir / layer["file"]
    assert stat.S_IMODE(captured.stat().st_mode) == 0o400
    assert stat.S_IMODE(origin.manager.snapshot_dir.stat().st_mode) == 0o700
    assert standalone_qcow2_size(captured) == origin.base.size  # names no backing file
    vm = _restore(origin, vms, "one")
    assert _sh(vm, "cat /root/marker; ls /root") == "from-origin\nmarker\n"
    assert _sh(vm, "echo 3 > /proc/sys/vm/drop_caches; cat /root/marker") == "from-origin\n"
    argv = vm._core.machine.argv  # type: ignore[attr-defined]
    (chain,) = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert chain["file"]["filename"] == str(vm.state_dir / "root-layer.qcow2")
    assert chain["backing"]["driver"] == "qcow2"  # the captured layer, every format stated
    assert chain["backing"]["file"]["filename"] == str(captured)
    assert chain["backing"]["read-only"] is True
    assert chain["backing"]["backing"] == {
        "driver": "raw",
        "file": {"driver": "file", "filename": str(origin.base.path)},
        "read-only": True,
    }


def test_two_vms_from_one_snapshot_write_their_own_layers(origin: Origin, vms: VMFactory) -> None:
    (layer,) = [d for d in _record(origin)["disks"] if d["role"] == "root"]
    captured = origin.manager.snapshot_dir / layer["file"]
    before = hashlib.sha256(captured.read_bytes()).hexdigest()
    base_before = hashlib.sha256(origin.base.path.read_bytes()).hexdigest()
    pair = [_restore(origin, vms, f"fan{i}") for i in range(2)]
    assert pair[0].pid != pair[1].pid
    for i, vm in enumerate(pair):
        _sh(vm, f"echo vm{i} > /root/own; echo changed-by-{i} > /root/marker; sync")
    for i, vm in enumerate(pair):
        out = _sh(vm, "echo 3 > /proc/sys/vm/drop_caches; cat /root/own /root/marker")
        assert out == f"vm{i}\nchanged-by-{i}\n"
        vm.stop(timeout=30)
    pair[0].start(timeout=60)  # a cold boot of a restored VM keeps its chain: what it wrote
    pair[0].guest.wait_ready(120)
    assert _sh(pair[0], "cat /root/own /root/marker") == "vm0\nchanged-by-0\n"
    pair[0].stop(timeout=30)
    assert hashlib.sha256(captured.read_bytes()).hexdigest() == before  # opened read-only
    assert hashlib.sha256(origin.base.path.read_bytes()).hexdigest() == base_before
    # The origin never saw any of it, nor the restored VMs the origin's later writes.
    assert _sh(origin.vm, "cat /root/marker /root/later") == "from-origin\nafter-the-save\n"


def test_a_restored_vm_saved_again_keeps_both_layers(origin: Origin, vms: VMFactory) -> None:
    vm = _restore(origin, vms, "again")
    _sh(vm, "echo second > /root/second; sync")
    origin.manager.save(vm, "s2", timeout=120)
    _sh(vm, "echo after > /root/second; sync")
    vm.stop(timeout=30)
    record = _record(origin, "s2")
    assert record["rootDisk"]["digest"] == origin.base.digest
    (layer,) = [d for d in record["disks"] if d["role"] == "root"]
    # One standalone layer over the base: the snapshot does not depend on 's'.
    assert standalone_qcow2_size(origin.manager.snapshot_dir / layer["file"]) > 0
    later = _restore(origin, vms, "from-s2", "s2")
    assert _sh(later, "cat /root/marker /root/second") == "from-origin\nsecond\n"


def test_a_changed_base_is_refused_before_qemu_starts(origin: Origin, vms: VMFactory) -> None:
    tree = origin.root / "tree"
    (tree / "etc/marker").write_text("the tree changed\n")
    try:
        changed = rootfs_base(tree, cache_dir=origin.root / "cache")
    finally:
        (tree / "etc/marker").write_text("from the image\n")
    assert changed.digest != origin.base.digest
    root_disk = vzkit.RootDisk(base=changed.path, digest=changed.digest)
    vm = vms.create(**origin.settings("changed", root_disk=root_disk))
    with pytest.raises(vzkit.SnapshotError) as info:
        origin.manager.restore(vm, "s", timeout=120)
    message = str(info.value)
    assert f"saved on the root disk base {str(origin.base.path)!r} ({origin.base.digest}" in message
    assert str(changed.path) in message
    assert "the same --rootfs tree" in message
    assert vm.state is vzkit.VMState.STOPPED
    assert vm.pid is None
    assert not (origin.root / "changed" / "root-layer.qcow2").exists()


def test_cli_save_and_run_from_the_snapshot_with_rootfs(origin: Origin, tmp_path: Path) -> None:
    """``vzkit snapshot save --rootfs`` then ``vzkit run --rootfs --from-snapshot`` and
    ``vzkit snapshot restore --rootfs``: the tree gives the same cached base, by digest."""
    cli = [sys.executable, "-m", "vzkit.cli"]
    opts = ["--rootfs", str(origin.root / "tree"), "--network", "none", "--backend", "qemu"]
    vm_dir = tmp_path / "vm"

    def vzkit(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*cli, *args], capture_output=True, timeout=300, check=False)

    script = "echo warm > /root/m; sync"
    save = vzkit("snapshot", "save", *opts, str(vm_dir), "warm", BUSYBOX_ONLY, "sh", "-c", script)
    assert save.returncode == 0, save.stderr.decode()
    assert b"saved warm" in save.stdout
    run = vzkit(
        "run", *opts, "--from-snapshot", "warm", "--vm-dir", str(vm_dir), "--",
        BUSYBOX_ONLY, "cat", "/root/m",
    )  # fmt: skip
    assert (run.returncode, run.stdout) == (0, b"warm\n"), run.stderr.decode()
    restore = vzkit(
        "snapshot", "restore", *opts, str(vm_dir), "warm", BUSYBOX_ONLY, "cat", "/root/m"
    )
    assert (restore.returncode, restore.stdout) == (0, b"warm\n"), restore.stderr.decode()
    other = origin.root / "other-tree"
    shutil.copytree(origin.root / "tree", other, symlinks=True)
    (other / "etc/marker").write_text("another image\n")
    opts[1] = str(other)
    wrong = vzkit("run", *opts, "--from-snapshot", "warm", "--vm-dir", str(vm_dir), "true")
    assert wrong.returncode == 125
    assert b"saved on the root disk base" in wrong.stderr
