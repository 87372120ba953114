"""The root disk in the config, on the kernel command line and in QEMU's argv; its layer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

import vzkit
from vzkit import DiskFormat, LinuxVMConfig, RootDisk, RootInit
from vzkit._disk import root_cmdline, standalone_qcow2_size
from vzkit.backends.qemu import _rootlayer
from vzkit.backends.qemu._argv import Plan, kernel_cmdline
from vzkit.backends.qemu._devices import build_argv, migration_blockers
from vzkit.errors import ConfigError
from vzkit.image import _image


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("vmlinuz", "initrd.img", "base.img", "data.img"):
        path = tmp_path / name
        path.write_bytes(b"x")
        out[name] = path
    with open(out["base.img"], "wb") as fh:
        fh.truncate(3 << 20)
    return out


def _config(files: dict[str, Path], **changes: object) -> LinuxVMConfig:
    settings: dict[str, object] = {
        "arch": "x86_64",
        "kernel_path": files["vmlinuz"],
        "initrd_path": files["initrd.img"],
        "cmdline": "console=ttyS0",
        "root_disk": RootDisk(base=files["base.img"]),
    }
    settings.update(changes)
    return LinuxVMConfig(**settings)  # type: ignore[arg-type]


def test_root_cmdline_words() -> None:
    assert RootDisk(base=Path("/b")).cmdline_words() == "root=/dev/vda rootfstype=ext4"
    image = RootDisk(base=Path("/b"), device="LABEL=root", fstype="xfs", init="image")
    assert image.init is RootInit.IMAGE
    assert image.cmdline_words() == "root=LABEL=root rootfstype=xfs vzkit.init=image"
    assert root_cmdline("/dev/vda1") == "root=/dev/vda1"
    assert root_cmdline("UUID=0a1b-2c3d", "ext4") == "root=UUID=0a1b-2c3d rootfstype=ext4"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device": "/dev/vda1 init=/bin/sh"}, "is not /dev/NAME"),
        ({"device": "vda1"}, "is not /dev/NAME"),
        ({"fstype": "ext4,x"}, "not a type name"),
        ({"init": "systemd"}, "root disk:"),
        ({"format": "vmdk"}, "root disk:"),
        ({"digest": "sha256:" + "A" * 64}, "root disk digest must be"),
        ({"digest": "md5:00"}, "root disk digest must be"),
    ],
)
def test_bad_root_disks_are_refused(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RootDisk(base=Path("/b"), **changes)  # type: ignore[arg-type]


def test_config_checks_and_round_trips(files: dict[str, Path]) -> None:
    cfg = _config(files, disk_path=files["data.img"])
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg
    assert "digest" not in cfg.to_dict()["root_disk"]  # written only when known
    digest = "sha256:" + "0f" * 32
    known = cfg.replace(root_disk=RootDisk(base=files["base.img"], digest=digest))
    assert known.to_dict()["root_disk"]["digest"] == digest
    assert LinuxVMConfig.from_toml(known.to_toml()) == known
    with pytest.raises(ConfigError, match="root_disk needs direct boot"):
        LinuxVMConfig(arch="x86_64", root_disk=RootDisk(base=files["base.img"]))
    with pytest.raises(ConfigError, match=r"root_disk.base: .* does not exist"):
        _config(files, root_disk=RootDisk(base=files["base.img"].with_name("gone")))


def _plan(cfg: LinuxVMConfig, layer: Path | None) -> Plan:
    return Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"),
        root_layer=layer,
    )  # fmt: skip


def test_root_disk_lowering(files: dict[str, Path]) -> None:
    cfg = _config(files, disk_path=files["data.img"])
    plan = _plan(cfg, Path("/state/root-layer.qcow2"))
    argv = build_argv(plan)
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    root, data = blockdevs
    assert root == {
        "driver": "qcow2",
        "node-name": "root0",
        "cache": {"direct": False},
        "file": {"driver": "file", "filename": "/state/root-layer.qcow2"},
        "backing": {
            "driver": "raw",  # the stated format, never probed
            "file": {"driver": "file", "filename": str(files["base.img"])},
            "read-only": True,
        },
    }
    assert data["node-name"] == "disk0"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[:2] == [
        "virtio-blk-pci,drive=root0,id=root0-dev",  # the first disk: /dev/vda
        "virtio-blk-pci,drive=disk0,id=disk0-dev",
    ]
    assert kernel_cmdline(plan) == "console=ttyS0 root=/dev/vda rootfstype=ext4"
    assert migration_blockers(plan) == []  # a save captures its layer (_rootlayer.capture)
    with pytest.raises(ValueError, match="copy-on-write layer"):
        build_argv(_plan(cfg, None))


def test_a_qcow2_base_opens_no_backing_of_its_own(files: dict[str, Path]) -> None:
    cfg = _config(files, root_disk=RootDisk(base=files["base.img"], format=DiskFormat.QCOW2))
    argv = build_argv(_plan(cfg, Path("/s/l.qcow2")))
    root = json.loads(argv[argv.index("-blockdev") + 1])
    assert root["backing"]["driver"] == "qcow2"
    assert root["backing"]["backing"] is None


def test_the_layer_is_private_standalone_and_fast(files: dict[str, Path], tmp_path: Path) -> None:
    root = RootDisk(base=files["base.img"])
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "qemu.log"
    t0 = time.monotonic()
    layer = asyncio.run(_rootlayer.create_layer(state, root, log))
    elapsed = time.monotonic() - t0
    assert layer == state / _rootlayer.LAYER_NAME
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600
    assert standalone_qcow2_size(layer) == 3 << 20  # names no backing file; the base's size
    assert sorted(p.name for p in state.iterdir()) == [_rootlayer.LAYER_NAME]
    assert elapsed < 5  # measured 15 ms (docs/images.md); generous on a loaded machine
    _rootlayer.remove_layer(layer)
    assert not layer.exists()


def test_default_guest_config_with_a_root_on_the_disk(files: dict[str, Path]) -> None:
    cfg = vzkit.default_guest_config(
        "x86_64",
        root="/dev/vda1",
        kernel_path=files["vmlinuz"],
        cmdline="console=ttyS0",
        disk_path=files["data.img"],
    )
    assert cfg.cmdline == "console=ttyS0 root=/dev/vda1"
    assert cfg.root_disk is None
    image = _image.default_guest_config(
        "x86_64", root="/dev/vda1", init="image", kernel_path=files["vmlinuz"],
        disk_path=files["data.img"],
    )  # fmt: skip
    assert image.cmdline == "root=/dev/vda1 vzkit.init=image"
    with pytest.raises(ConfigError, match="no disk_path"):
        vzkit.default_guest_config("x86_64", root="/dev/vda1", kernel_path=files["vmlinuz"])
    with pytest.raises(ConfigError, match="not both"):
        vzkit.default_guest_config("x86_64", root="/dev/vda", rootfs=files["base.img"].parent)


def test_default_guest_config_with_a_rootfs(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("t\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache" / "vzkit"))
    cfg = vzkit.default_guest_config("x86_64", rootfs=tree, kernel_path=files["vmlinuz"])
    assert cfg.root_disk is not None
    assert cfg.root_disk.base.name == "root.img"
    assert cfg.root_disk.base.is_relative_to(tmp_path / "cache")
    digest = json.loads((cfg.root_disk.base.parent / "disk.json").read_text())["digest"]
    assert cfg.root_disk.digest == digest  # the cache's: a snapshot records it
    with pytest.raises(ConfigError, match="init must be"):
        vzkit.default_guest_config("x86_64", rootfs=tree, init="x", kernel_path=files["vmlinuz"])


def test_the_vz_layer_is_a_private_writable_copy(files: dict[str, Path], tmp_path: Path) -> None:
    from vzkit.backends.vz import _rootclone  # no PyObjC: a plain file copy

    base = files["base.img"]
    with open(base, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"data")
    base.chmod(0o600)
    dest = tmp_path / "state" / _rootclone.LAYER_NAME
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    assert _rootclone.clone_base(base, dest) in ("reflink", "sparse")  # clonefile on macOS
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert dest.read_bytes() == base.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [_rootclone.LAYER_NAME]
    _rootclone.remove_layer(dest)
    assert not dest.exists()


def test_a_users_rootfs_is_roots_in_the_guest(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``default_guest_config(rootfs=...)`` run by a user (uid 1234 here, as if) squashes
    that user's files to root; run by root, owners stay."""
    from vzkit.image import _rootdisk

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.lchown(tree / "etc/passwd", 1234, 4321)
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    owners = {}
    for uid in (0, 1234):
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)
        monkeypatch.setattr(os, "getgid", lambda uid=uid: 4321 if uid else 0)
        cfg = vzkit.default_guest_config("x86_64", rootfs=tree, kernel_path=files["vmlinuz"])
        assert cfg.root_disk is not None
        debugfs = _rootdisk.find_e2fsprogs()[1]
        out = subprocess.run(
            [debugfs, "-R", "stat /etc/passwd", str(cfg.root_disk.base)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        owners[uid] = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out).groups()  # type: ignore[union-attr]
    assert owners == {0: ("1234", "4321"), 1234: ("0", "0")}
