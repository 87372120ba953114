"""Snapshots on the qemu backend with the default guest: save, restore, many-from-one, faults.

One guest boots cold for the whole module (the ``origin``); every other VM here is restored
from its snapshot, which is itself part of what is tested. The guests have vsock (the agent
runs over it): the device is unplugged around each save and a fresh one plugged in after it and
after each restore; the origin's ``relay`` on vsock port 5000 lives in the snapshot's memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._process import live_children
from vzkit.image import GuestImage

from .conftest import VMFactory

DISK_MARK_OFFSET = 4096 * 3  # where the tests write into the raw disk


class Origin:
    """The module's one cold-booted VM and its snapshot ``base``."""

    def __init__(self, root: Path, vm: vzkit.VirtualMachine, manager: vzkit.SnapshotManager):
        self.root, self.vm, self.manager = root, vm, manager

    def settings(self, name: str) -> dict[str, Any]:
        return _settings(self.root, name)


def _settings(root: Path, name: str) -> dict[str, Any]:
    """The VM config overrides every VM here shares (the state dir is each VM's own)."""
    return {
        "console": vzkit.ConsoleMode.LOG,
        "disk_path": root / "disk.raw",
        "state_dir": root / name,
    }


def _sh(vm: vzkit.VirtualMachine, script: str) -> str:
    proc = vm.guest.run(["sh", "-c", script], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()


def _vsock_echo(vm: vzkit.VirtualMachine, data: bytes, timeout: float = 30) -> bytes:
    """Through the guest's relay on vsock port 5000 (``cat``), once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = vm.vsock.connect(5000, timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # poll interval
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def _read_disk_mark(vm: vzkit.VirtualMachine, *, drop_caches: bool) -> str:
    drop = "echo 3 > /proc/sys/vm/drop_caches; " if drop_caches else ""
    skip = DISK_MARK_OFFSET // 512
    return _sh(vm, f"{drop}dd if=/dev/vda bs=512 skip={skip} count=1 2>/dev/null | tr -d '\\0'")


def _write_disk_mark(vm: vzkit.VirtualMachine, text: str) -> None:
    skip = DISK_MARK_OFFSET // 512
    _sh(vm, f"printf '%-500s' '{text}' | dd of=/dev/vda bs=512 seek={skip} count=1 conv=notrunc")
    _sh(vm, "sync")


@pytest.fixture(scope="module")
def origin(
    guest_images: dict[str, GuestImage], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Origin]:
    root = tmp_path_factory.mktemp("snap")
    vzkit.create_disk_image(root / "disk.raw", 1)
    factory = VMFactory(guest_images)
    manager = vzkit.SnapshotManager(root / "vm")
    try:
        o = Origin(root, factory.create(**_settings(root, "origin")), manager)
        o.vm.start(timeout=60)
        o.vm.guest.wait_ready(120)
        _sh(o.vm, "echo from-origin > /tmp/marker")
        relay = "/bin/vzkit-agent relay --listen-vsock 5000 --exec cat"
        _sh(o.vm, f"setsid {relay} </dev/null >/dev/null 2>&1 &")
        assert _vsock_echo(o.vm, b"before") == b"before"
        _write_disk_mark(o.vm, "disk-at-base")
        meta = manager.save(o.vm, "base", timeout=120)
        assert meta.vm_state == "running"
        assert o.vm.state is vzkit.VMState.RUNNING
        yield o
    finally:
        print(factory.report())
        factory.close()


def _restore(
    origin: Origin, vms: VMFactory, name: str, snapshot: str = "base"
) -> vzkit.VirtualMachine:
    vm = vms.create(**origin.settings(name))
    origin.manager.restore(vm, snapshot, timeout=120)
    assert vm.state is vzkit.VMState.PAUSED
    vm.resume(timeout=30)
    return vm


def _snapshot_files(manager: vzkit.SnapshotManager) -> list[str]:
    return sorted(p.name for p in manager.snapshot_dir.iterdir())


def test_round_trip_memory_disk_and_clock(origin: Origin, vms: VMFactory) -> None:
    assert _sh(origin.vm, "cat /tmp/marker") == "from-origin\n"  # the origin ran on after the save
    assert _vsock_echo(origin.vm, b"origin after its save") == b"origin after its save"
    vm = _restore(origin, vms, "rt")
    assert _sh(vm, "cat /tmp/marker") == "from-origin\n"
    assert vm._core.agent.transport == "vsock"  # the agent over the fresh vsock device
    assert _vsock_echo(vm, b"restored") == b"restored"
    assert _read_disk_mark(vm, drop_caches=True).strip() == "disk-at-base"

    # Save again from the restored VM (its disk is an overlay: the capture flattens it), then
    # change memory and disk, and come back.
    _sh(vm, "echo before-save > /tmp/marker2")
    _write_disk_mark(vm, "disk-before-save")
    open_before = vm.vsock.connect(5000, timeout=10)  # a connection open across the save
    meta = origin.manager.save(vm, "rt")
    open_before.settimeout(10)
    try:  # it ended with the unplugged device (docs/snapshots.md): EOF or a reset
        assert open_before.recv(1) == b""
    except ConnectionResetError:
        pass
    open_before.close()
    assert meta.size > 1 << 20
    assert vm.state is vzkit.VMState.RUNNING
    _sh(vm, "echo after-save > /tmp/after")
    _write_disk_mark(vm, "disk-after-save")
    vm.stop(timeout=20)
    time.sleep(3)  # time passing on purpose, not synchronisation: the guest clock must catch
    # up with these 3 s after the restore
    origin.manager.restore(vm, "rt")
    vm.resume()
    assert _sh(vm, "cat /tmp/marker2") == "before-save\n"
    assert _sh(vm, "ls /tmp/after 2>/dev/null || echo gone") == "gone\n"
    assert _read_disk_mark(vm, drop_caches=False).strip() == "disk-before-save"  # page cache
    assert _read_disk_mark(vm, drop_caches=True).strip() == "disk-before-save"  # the disk
    guest_now = int(_sh(vm, "date +%s"))
    assert abs(guest_now - time.time()) < 2.5
    # The user's disk was never written by the restored runs: the origin's write is there.
    with open(origin.root / "disk.raw", "rb") as fh:
        fh.seek(DISK_MARK_OFFSET)
        assert fh.read(12) == b"disk-at-base"


def test_twenty_save_restore_cycles(origin: Origin, vms: VMFactory) -> None:
    vm = _restore(origin, vms, "cycles")
    for i in range(20):
        _sh(vm, f"echo {i} > /tmp/cycle")
        origin.manager.save(vm, "cycle")
        _sh(vm, "echo changed > /tmp/cycle")
        if i % 2:
            vm.stop(timeout=20)
        else:
            vm.close()  # a fresh VM object each other round
            vm = vms.create(**origin.settings("cycles"))
        origin.manager.restore(vm, "cycle")
        vm.resume()
        assert _sh(vm, "cat /tmp/cycle") == f"{i}\n", f"cycle {i}"
        assert _vsock_echo(vm, b"cycle %d" % i) == b"cycle %d" % i
    names = _snapshot_files(origin.manager)
    assert not [n for n in names if n.startswith(".")]  # no temporary file left
    ours = [n for n in names if n.startswith("cycle.")]
    disks = [n for n in ours if n.endswith(".disk0.qcow2")]  # a restored run's disk, flattened
    assert len(disks) == 1  # the replaced snapshots' disks are gone
    flattened = origin.manager.snapshot_dir / disks[0]
    assert flattened.stat().st_mode & 0o777 == 0o400  # guest data: owner-only, read-only
    assert sorted(ours) == sorted(["cycle.json", "cycle.vmstate", *disks])


def test_four_vms_from_one_snapshot(origin: Origin, vms: VMFactory) -> None:
    image = origin.manager.snapshot_dir / next(
        d["file"] for d in dict(origin.manager.get("base").extra)["disks"]
    )
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    t0 = time.monotonic()
    fleet = [vms.create(**origin.settings(f"fleet{i}")) for i in range(4)]
    for vm in fleet:
        origin.manager.restore(vm, "base", timeout=120)
    for vm in fleet:
        vm.resume()
    pids = {vm.pid for vm in fleet}
    assert len(pids) == 4
    for i, vm in enumerate(fleet):
        _sh(vm, f"echo vm{i} > /tmp/marker")
        _write_disk_mark(vm, f"disk-of-vm{i}")
    elapsed = time.monotonic() - t0
    for i, vm in enumerate(fleet):
        assert _sh(vm, "cat /tmp/marker") == f"vm{i}\n"
        assert _vsock_echo(vm, b"vm%d" % i) == b"vm%d" % i  # each its own vsock device
        assert _read_disk_mark(vm, drop_caches=True).strip() == f"disk-of-vm{i}"
        assert (vm.state_dir / "restored-disk0.qcow2").is_file()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    print(f"4 VMs restored and written to in {elapsed:.2f} s")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_save_into_a_full_file_system_fails_cleanly(
    origin: Origin, vms: VMFactory, small_fs: Path
) -> None:
    vm = origin.vm
    manager = vzkit.SnapshotManager(small_fs / "vm")
    with pytest.raises(vzkit.SnapshotError, match="No space left on device"):
        manager.save(vm, "full", timeout=120)
    assert vm.state is vzkit.VMState.RUNNING
    assert _sh(vm, "cat /tmp/marker") == "from-origin\n"
    assert _snapshot_files(manager) == []
    assert manager.list() == []
    assert shutil.disk_usage(small_fs).used < 1 << 20


def test_vmm_killed_during_save_cleans_up_and_keeps_the_older_snapshot(
    origin: Origin, vms: VMFactory
) -> None:
    vm = _restore(origin, vms, "victim")
    _sh(vm, "echo first > /tmp/which")
    first = origin.manager.save(vm, "kill")
    _sh(vm, "echo second > /tmp/which")
    pid = vm.pid
    assert pid is not None

    def kill_vmm(done: int, total: int) -> None:
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(vzkit.SnapshotError, match="VMM exited"):
        origin.manager.save(vm, "kill", progress=kill_vmm)
    assert vm.state is vzkit.VMState.ERROR
    assert pid not in live_children()
    assert not [n for n in _snapshot_files(origin.manager) if n.startswith(".")]
    kept = origin.manager.get("kill")
    assert dict(kept.extra)["id"] == dict(first.extra)["id"]
    assert kept.size == first.size
    again = _restore(origin, vms, "victim2", snapshot="kill")
    assert _sh(again, "cat /tmp/which") == "first\n"


def test_restore_into_an_incompatible_config_fails_before_anything_starts(
    origin: Origin, vms: VMFactory, tmp_path: Path
) -> None:
    other_disk = tmp_path / "other.raw"
    vzkit.create_disk_image(other_disk, 1)
    settings = {**origin.settings("wrong"), "memory_gb": 0.75, "disk_path": other_disk}
    vm = vms.create(**settings)
    before = dict(live_children())
    with pytest.raises(vzkit.SnapshotError) as info:
        origin.manager.restore(vm, "base")
    message = str(info.value)
    assert "does not fit this VM's config" in message
    assert "memory_mb: snapshot 512, this VM 768" in message
    assert f"disk_path: snapshot {str(origin.root / 'disk.raw')!r}" in message
    assert live_children() == before
    assert vm.state is vzkit.VMState.STOPPED
    assert not (origin.root / "wrong" / "restored-disk0.qcow2").exists()
    # Paused or running VMs cannot be restored into; stopped ones cannot be saved.
    with pytest.raises(vzkit.StateError, match="needs a stopped VM"):
        origin.manager.restore(origin.vm, "base")
    with pytest.raises(vzkit.StateError, match="must be running or paused"):
        origin.manager.save(vm, "nope")


def test_restore_with_another_cpu_model_is_refused_before_anything_starts(
    origin: Origin, vms: VMFactory
) -> None:
    """Issue 20: the resolved CPU model is recorded (backendInfo) and checked; the config's
    ``cpu_model`` names the saved one to restore."""
    data = json.loads(origin.manager.meta_path("base").read_text())
    saved_cpu = data["backendInfo"]["cpu"]
    assert saved_cpu == ("host" if data["backendInfo"]["accel"] == "kvm" else "max")
    assert data["backendInfo"]["machine"] == "q35"
    other = "Nehalem"
    vm = vms.create(**origin.settings("othercpu"), cpu_model=other)
    before = dict(live_children())
    with pytest.raises(vzkit.SnapshotError) as info:
        origin.manager.restore(vm, "base")
    assert str(info.value) == (
        "snapshot 'base' does not fit this VM's hardware: it was saved with CPU model "
        f"{saved_cpu!r}, this VM would run {other!r} (set cpu_model={saved_cpu!r} in its "
        "config to restore it)"
    )
    assert live_children() == before
    assert vm.state is vzkit.VMState.STOPPED
    assert not (origin.root / "othercpu" / "restored-disk0.qcow2").exists()
    same = vms.create(**origin.settings("samecpu"), cpu_model=saved_cpu)  # named: it fits
    origin.manager.restore(same, "base", timeout=120)
    same.resume(timeout=30)
    assert _sh(same, "cat /tmp/marker") == "from-origin\n"


def test_an_altered_state_file_of_a_real_snapshot_is_refused_before_qemu_reads_it(
    origin: Origin, vms: VMFactory
) -> None:
    """A copy of ``base`` under another name, one byte of its state file flipped: the restore
    is refused by the checksum, which runs while QEMU starts and before QEMU is handed the
    state (``restore_state(verified=)``); QEMU and the overlay it got are gone after."""
    sdir = origin.manager.snapshot_dir
    data = json.loads(origin.manager.meta_path("base").read_text())
    (disk,) = data["disks"]
    data["name"] = "tampered"
    disk["file"] = disk["file"].replace("base.", "tampered.", 1)
    os.link(sdir / f"base.{data['id']}.disk0.raw", sdir / disk["file"])
    state = bytearray((sdir / "base.vmstate").read_bytes())
    state[len(state) // 2] ^= 0x01
    (sdir / "tampered.vmstate").write_bytes(bytes(state))
    origin.manager.meta_path("tampered").write_text(json.dumps(data))
    vm = vms.create(**origin.settings("tampered"))
    before = dict(live_children())
    try:
        with pytest.raises(vzkit.SnapshotError, match="is damaged: the checksum of"):
            origin.manager.restore(vm, "tampered")
        assert live_children() == before
        assert vm.state is vzkit.VMState.STOPPED
        assert not (origin.root / "tampered" / "restored-disk0.qcow2").exists()
        modes = {p.name: p.stat().st_mode & 0o777 for p in sdir.iterdir() if "base" in p.name}
        assert modes == {"base.json": 0o600, "base.vmstate": 0o400, disk["file"].replace(
            "tampered.", "base.", 1): 0o400}  # fmt: skip
        assert sdir.stat().st_mode & 0o777 == 0o700
        assert len(data["stateSha256"]) == 64
        assert disk["digest"].startswith("sha256-nonzero-1m:")
    finally:
        origin.manager.delete("tampered")


def test_cli_save_then_run_from_the_snapshot(
    tmp_path: Path, guest_images: dict[str, GuestImage]
) -> None:
    cli = [sys.executable, "-m", "vzkit.cli"]
    config = tmp_path / "vm.toml"
    vzkit.default_guest_config("x86_64").save(config)
    opts = ["--config", str(config), "--network", "none", "--backend", "qemu"]
    vm_dir = tmp_path / "vm"
    save = subprocess.run(
        [*cli, "snapshot", "save", *opts, str(vm_dir), "warm", "sh", "-c", "echo warm > /tmp/m"],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert save.returncode == 0, save.stderr.decode()
    assert b"saved warm" in save.stdout
    run = subprocess.run(
        [*cli, "run", *opts, "--from-snapshot", "warm", "--vm-dir", str(vm_dir), "cat", "/tmp/m"],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert (run.returncode, run.stdout) == (0, b"warm\n"), run.stderr.decode()
    restore = subprocess.run(
        [*cli, "snapshot", "restore", *opts, "--boot-timeout", "120", str(vm_dir), "warm",
         "cat", "/tmp/m"],
        capture_output=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert (restore.returncode, restore.stdout) == (0, b"warm\n"), restore.stderr.decode()
    wrong = subprocess.run(
        [*cli, "run", *opts, "--memory", "2", "--from-snapshot", "warm", "--vm-dir", str(vm_dir),
         "true"],
        capture_output=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert wrong.returncode == 125
    assert b"memory_mb: snapshot" in wrong.stderr
