"""The guest's disk on the qemu backend: opened in its configured format, never probed, and
no file an image header names is ever opened (CVE-2008-2004 class). No VM boots here:
the machine's plan, the argv, and qemu-img on small images."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._disk import DiskImage
from vzkit.backends._protocol import CapturedDisk
from vzkit.backends.qemu import _argv, _discover, _machine, _migrate
from vzkit.backends.qemu._argv import Plan
from vzkit.backends.qemu._devices import build_argv
from vzkit.backends.qemu._machine import QemuMachine

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

CLUSTER = 64 << 10


def _qemu_img(*args: str) -> str:
    done = subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return done.stdout


def _hostile_header(tmp_path: Path, host_file: Path, *, data_file: bool = False) -> bytes:
    """The first cluster of a qcow2 image whose header names ``host_file`` as its backing
    file (or, with ``data_file``, as its external data file): what a guest could write."""
    image = tmp_path / "hostile.qcow2"
    if data_file:  # qemu-img create truncates the data file it names: keep its content
        content = host_file.read_bytes()
        _qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={host_file}", str(image), "64M")
        host_file.write_bytes(content)
    else:
        _qemu_img(
            "create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(image), "64M"
        )
    header = image.read_bytes()[:CLUSTER]
    image.unlink()
    return header


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret.txt"
    path.write_bytes(b"host secret\n")
    return path


@pytest.fixture(autouse=True)
def _no_qemu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's binary and accelerator are not what these tests are about."""
    monkeypatch.setattr(_discover, "find_qemu", lambda arch: Path("/usr/bin/qemu-system-x86_64"))
    monkeypatch.setattr(_discover, "select_accelerator", lambda *args: "tcg")


def _plan_argv(cfg: vzkit.LinuxVMConfig) -> list[str]:
    machine = QemuMachine(cfg, lambda old, new: None)
    host = asyncio.run(machine._probe())  # where a qcow2 naming another file is refused
    fds = _machine._RunFds(3, 4, vsock_device=False, agent_key=None, passt=None, tap=None)
    return build_argv(machine._plan(host, fds, None, ()))


def _blockdev(argv: list[str]) -> dict[str, Any]:
    (spec,) = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    node: dict[str, Any] = json.loads(spec)
    return node


def _config(tmp_path: Path, kernel: Path, disk: Path, **changes: Any) -> vzkit.LinuxVMConfig:
    return vzkit.LinuxVMConfig(
        arch="x86_64",
        kernel_path=kernel,
        disk_path=disk,
        state_dir=tmp_path / "vm",
        vsock=False,
        **changes,
    )


def test_a_raw_disk_holding_a_qcow2_header_is_attached_raw(
    tmp_path: Path, kernel: Path, host_file: Path
) -> None:
    disk = vzkit.create_disk_image(tmp_path / "disk.img", 1)
    with open(disk, "r+b") as fh:
        fh.write(_hostile_header(tmp_path, host_file))
    node = _blockdev(_plan_argv(_config(tmp_path, kernel, disk)))
    assert node == {
        "driver": "raw",
        "node-name": "disk0",
        "cache": {"direct": False},
        "file": {"driver": "file", "filename": str(disk)},
    }


def test_a_qcow2_disk_is_opened_without_a_backing_file(tmp_path: Path, kernel: Path) -> None:
    disk = vzkit.create_disk_image(tmp_path / "disk.qcow2", 1, format="qcow2")
    node = _blockdev(_plan_argv(_config(tmp_path, kernel, disk, disk_format="qcow2")))
    assert node == {
        "driver": "qcow2",
        "node-name": "disk0",
        "cache": {"direct": False},
        "file": {"driver": "file", "filename": str(disk)},
        "backing": None,
    }


@pytest.mark.parametrize("data_file", [False, True], ids=["backing-file", "data-file"])
def test_a_qcow2_disk_naming_another_file_is_refused_before_qemu(
    tmp_path: Path, kernel: Path, host_file: Path, data_file: bool
) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(_hostile_header(tmp_path, host_file, data_file=data_file))
    cfg = _config(tmp_path, kernel, disk, disk_format="qcow2")
    what = "an external data file" if data_file else "the backing file"
    with pytest.raises(vzkit.ConfigError) as info:
        _plan_argv(cfg)
    assert f"disk image {str(disk)!r} is a qcow2 image whose header names {what} " in str(
        info.value
    )
    assert str(host_file) in str(info.value)
    assert f"qemu-img convert -O qcow2 {disk} " in str(info.value)


def test_the_argv_escapes_nothing_in_json(tmp_path: Path, kernel: Path) -> None:
    weird = tmp_path / 'dir, "quoted" ünï'
    weird.mkdir()
    disk = vzkit.create_disk_image(weird / "disk,1.img", 1)
    node = _blockdev(_plan_argv(_config(tmp_path, kernel, disk)))
    assert node["file"]["filename"] == str(disk)


@pytest.mark.parametrize("fmt", [vzkit.DiskFormat.RAW, vzkit.DiskFormat.QCOW2])
def test_a_restored_overlay_gets_its_backing_from_the_command_line(
    tmp_path: Path, kernel: Path, fmt: vzkit.DiskFormat
) -> None:
    cfg = _config(tmp_path, kernel, vzkit.create_disk_image(tmp_path / "disk.img", 1))
    snap = Path(f"/snaps/.s.0123456789ab.disk0.{fmt.value}")
    plan = Plan(
        config=cfg,
        binary=Path("/q"),
        accel="tcg",
        qmp_fd=3,
        incoming=True,
        disk_override=Path("/state/restored-disk0.qcow2"),
        disk_backing=DiskImage(snap, fmt),
    )
    backing: dict[str, Any] = {
        "driver": fmt.value,
        "file": {"driver": "file", "filename": str(snap)},
        "read-only": True,
    }
    if fmt is vzkit.DiskFormat.QCOW2:
        backing["backing"] = None  # the snapshot's image has no backing of its own either
    assert _blockdev(_argv.disk_args(plan)) == {
        "driver": "qcow2",
        "node-name": "disk0",
        "cache": {"direct": False},
        "file": {"driver": "file", "filename": "/state/restored-disk0.qcow2"},
        "backing": backing,
    }
    with pytest.raises(ValueError, match="needs its backing image"):
        _argv.disk_args(Plan(config=cfg, binary=Path("/q"), accel="tcg", qmp_fd=3,
                        disk_override=Path("/state/o.qcow2")))  # fmt: skip


def _info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        _qemu_img("info", "--output=json", "-f", "qcow2", "--backing-chain", str(path))
    )
    return info


def test_the_overlay_names_no_backing_file_and_a_hostile_snapshot_disk_is_refused(
    tmp_path: Path, kernel: Path, host_file: Path
) -> None:
    cfg = _config(tmp_path, kernel, vzkit.create_disk_image(tmp_path / "disk.img", 1))
    machine = QemuMachine(cfg, lambda old, new: None)
    base = tmp_path / "snap.disk0.raw"
    base.write_bytes(b"base")
    os.truncate(base, 3 * 512 + 1)  # not whole sectors: the overlay rounds up, as QEMU does
    overlay = asyncio.run(
        _migrate.prepare_disks(machine, [CapturedDisk("disk0", base, base, vzkit.DiskFormat.RAW)])
    )
    assert overlay == machine.state_dir / _migrate.OVERLAY_NAME
    assert machine.disk_backing == DiskImage(base, vzkit.DiskFormat.RAW)
    info = _info(overlay)
    assert info[0]["virtual-size"] == 4 * 512
    assert "backing-filename" not in info[0]
    assert overlay.stat().st_mode & 0o777 == 0o600
    # a snapshot whose qcow2 disk names a host file is refused before qemu-img runs
    hostile = tmp_path / "snap.disk0.qcow2"
    hostile.write_bytes(_hostile_header(tmp_path, host_file))
    before = overlay.stat().st_mtime_ns
    with pytest.raises(vzkit.SnapshotError, match="names the backing file"):
        asyncio.run(
            _migrate.prepare_disks(
                machine, [CapturedDisk("disk0", hostile, hostile, vzkit.DiskFormat.QCOW2)]
            )
        )
    assert machine.disk_backing is None
    assert overlay.stat().st_mtime_ns == before


def test_flattening_follows_only_the_backing_it_is_given(tmp_path: Path, host_file: Path) -> None:
    """An overlay whose header names a host file is flattened over the backing vzkit gives,
    with that backing's own backing switched off: the host file's bytes never get in."""
    base = tmp_path / "snap.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    payload = tmp_path / "payload.raw"
    payload.write_bytes(b"from the snapshot".ljust(512, b"\0"))
    _qemu_img("convert", "-f", "raw", "-O", "qcow2", str(payload), str(base))
    # base's header is now re-pointed at host_file: a flatten reading headers would use it
    overlay = tmp_path / "overlay.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(host_file), "-F", "raw", str(overlay), "512")
    dst = tmp_path / "flat.qcow2"
    asyncio.run(_migrate._flatten(overlay, DiskImage(base, vzkit.DiskFormat.QCOW2), dst))
    raw = tmp_path / "flat.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(dst), str(raw))
    assert raw.read_bytes()[:17] == b"from the snapshot"
    assert b"host secret" not in raw.read_bytes()
    assert "backing-filename" not in _info(dst)[0]


def test_capture_uses_the_configured_format_without_reading_the_disk(
    tmp_path: Path, kernel: Path, host_file: Path
) -> None:
    disk = vzkit.create_disk_image(tmp_path / "disk.img", 1)
    with open(disk, "r+b") as fh:
        fh.write(_hostile_header(tmp_path, host_file))
    machine = QemuMachine(_config(tmp_path, kernel, disk), lambda old, new: None)
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (captured,) = asyncio.run(_migrate.capture_disks(machine, snaps, ".s.0123456789ab."))
    assert captured.format is vzkit.DiskFormat.RAW
    assert captured.path.name == ".s.0123456789ab.disk0.raw"


def test_image_node_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        _argv.image_node(DiskImage(Path("/a\x00b"), vzkit.DiskFormat.RAW))
