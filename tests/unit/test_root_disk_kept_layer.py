"""A root disk's kept layer (``RootDisk.layer``): the config field (validation, round-trips,
not compared by snapshots), the checks before reuse, and each backend's layer: made at the
first start, reused by later ones, never deleted; a restore's copy taking its place."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import vzkit
from vzkit import LinuxVMConfig, RootDisk
from vzkit._disk import DiskFormat, create_disk_image, kept_layer_exists, standalone_qcow2_size
from vzkit._fsutil import link_new
from vzkit.backends._protocol import CapturedDisk
from vzkit.backends.qemu import _migrate, _rootlayer
from vzkit.backends.vz import _rootclone  # no PyObjC: plain file copies
from vzkit.errors import ConfigError
from vzkit.snapshots._match import config_diff, machine_fields

BASE_SIZE = 4 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    with open(path, "wb") as fh:
        fh.truncate(BASE_SIZE)
        fh.seek(2 << 20)
        fh.write(b"the base's data")
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"k")
    return path


def _chain(layer: Path, base: Path) -> dict[str, object]:
    """``layer`` over the raw ``base`` as QEMU's machine opens it, every format stated."""
    return {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": str(layer)},
        "backing": {
            "driver": "raw",
            "file": {"driver": "file", "filename": str(base)},
            "read-only": True,
        },
    }


def _qemu_io(layer: Path, base: Path, *commands: str) -> str:
    """Run qemu-io on ``layer`` over the raw ``base``."""
    spec = _chain(layer, base)
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    proc = subprocess.run(
        [*argv, f"json:{json.dumps(spec)}"], check=True, capture_output=True, text=True
    )
    return proc.stdout


# -- the config ------------------------------------------------------------------------------


def test_the_layer_is_an_absolute_path_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert RootDisk(base=Path("/b")).layer is None
    assert RootDisk(base=Path("/b"), layer="rel/l.qcow2").layer == tmp_path / "rel/l.qcow2"  # type: ignore[arg-type]
    assert RootDisk(base=Path("/b"), layer=Path("~/l")).layer == tmp_path / "home/l"
    for bad in (3, "a\x00b", b"/bytes"):
        with pytest.raises(ConfigError, match="root disk layer must be a path or None"):
            RootDisk(base=Path("/b"), layer=bad)  # type: ignore[arg-type]
    for directory in ("", ".", "/", "/var/", "/var/.", "/var/.."):
        with pytest.raises(ConfigError, match="must name a file, not a directory"):
            RootDisk(base=Path("/b"), layer=directory)  # type: ignore[arg-type]
    for same in ("/d/base.img", "/d/./base.img", "/d/x/../base.img"):
        with pytest.raises(ConfigError, match="is the base itself, which is never written"):
            RootDisk(base=Path("/d/base.img"), layer=same)  # type: ignore[arg-type]


def test_the_layer_round_trips_and_snapshots_do_not_compare_it(
    base: Path, kernel: Path, tmp_path: Path
) -> None:
    kept = tmp_path / "vm" / "root-layer.qcow2"
    cfg = LinuxVMConfig(
        arch="x86_64", kernel_path=kernel, root_disk=RootDisk(base=base, layer=kept)
    )
    assert cfg.to_dict()["root_disk"]["layer"] == str(kept)
    assert LinuxVMConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert LinuxVMConfig.from_json(cfg.to_json()) == cfg
    assert LinuxVMConfig.from_toml(cfg.to_toml()) == cfg
    plain = cfg.replace(root_disk=RootDisk(base=base))
    assert "layer" not in plain.to_dict()["root_disk"]  # written only when set
    assert LinuxVMConfig.from_json(plain.to_json()).root_disk == RootDisk(base=base)
    # a snapshot of either restores into the other: the layer is per VM, like the state dir
    assert config_diff(machine_fields(plain), cfg) == []
    kept.parent.mkdir()
    kept.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"root_disk\.layer is disk_path"):
        cfg.replace(disk_path=kept)


# -- the checks before reuse -----------------------------------------------------------------


def test_what_a_kept_layer_may_be(base: Path, tmp_path: Path) -> None:
    layer = tmp_path / "vm" / "layer"

    def exists(path: Path) -> bool:
        return kept_layer_exists(RootDisk(base=base, layer=path))

    with pytest.raises(ConfigError, match=r"directory of the root disk's layer .* create it"):
        exists(layer)
    layer.parent.mkdir()
    assert exists(layer) is False  # the start makes it
    layer.mkdir()
    with pytest.raises(ConfigError, match="is not a regular file: point layer at a file"):
        exists(layer)
    layer.rmdir()
    os.link(base, layer)
    with pytest.raises(ConfigError, match=r"is the base .* under another name"):
        exists(layer)
    layer.unlink()
    (tmp_path / "link").symlink_to(base)
    with pytest.raises(ConfigError, match=r"is the base .* under another name"):
        exists(tmp_path / "link")
    layer.write_bytes(b"x")
    layer.chmod(0o644)
    assert exists(layer) is True
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600  # guest data: made private again


# -- qemu --------------------------------------------------------------------------------------


def test_qemu_makes_a_kept_layer_once_and_reuses_it(base: Path, tmp_path: Path) -> None:
    kept = tmp_path / "vm" / "root.qcow2"
    kept.parent.mkdir()
    root = RootDisk(base=base, layer=kept)
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "qemu.log"
    assert asyncio.run(_rootlayer.open_layer(state, root, log)) == kept
    assert standalone_qcow2_size(kept) == BASE_SIZE  # names no backing file; the base's size
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert list(state.iterdir()) == []  # nothing of the run's in the state dir
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]  # no temporary left
    _qemu_io(kept, base, "write -P 0x5a 1M 64k")  # what the guest wrote
    inode = kept.stat().st_ino
    _rootlayer.remove_layer(kept, root)  # close: a kept layer is never deleted
    assert asyncio.run(_rootlayer.open_layer(state, root, log)) == kept  # the next start
    assert kept.stat().st_ino == inode
    assert "pattern verification failed" not in _qemu_io(kept, base, "read -P 0x5a 1M 64k")
    assert "read 65536/65536" in _qemu_io(kept, base, "read -P 0x5a 1M 64k")
    # a layer of the run is still deleted at close
    run = asyncio.run(_rootlayer.open_layer(state, RootDisk(base=base), log))
    assert run == state / _rootlayer.LAYER_NAME
    _rootlayer.remove_layer(run, RootDisk(base=base))
    assert not run.exists()


@pytest.mark.parametrize(
    ("make", "message", "cause"),
    [
        (
            lambda p, b: p.write_bytes(bytes(BASE_SIZE)),
            "is not a standalone qcow2 image",
            "no qcow2 header",
        ),
        (
            lambda p, b: create_disk_image(p, size_bytes=1 << 20, format="qcow2"),
            f"has a virtual size of {1 << 20} bytes, the base {BASE_SIZE}",
            "",
        ),
        (
            lambda p, b: subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(b), str(p)],
                check=True,
            ),
            "is not a standalone qcow2 image",
            "names the backing file",
        ),
    ],
    ids=["raw", "other-size", "backing-file"],
)
def test_qemu_refuses_a_kept_layer_it_did_not_make_for_this_base(
    base: Path, tmp_path: Path, make: Any, message: str, cause: str
) -> None:
    kept = tmp_path / "layer.qcow2"
    make(kept, base)
    before = kept.read_bytes()
    root = RootDisk(base=base, layer=kept)
    with pytest.raises(ConfigError, match=message) as info:
        asyncio.run(_rootlayer.open_layer(tmp_path, root, tmp_path / "log"))
    assert "point layer at another file" in str(info.value)
    assert "disk_format" not in str(info.value)  # advice for a disk, not for a layer
    assert cause in str(info.value.__cause__ or "")
    assert kept.read_bytes() == before  # left as it was


def test_an_exclusive_create_leaves_a_file_that_is_there(tmp_path: Path) -> None:
    """Two starts racing: the second's new layer never replaces the first's."""
    dest = tmp_path / "layer.qcow2"
    dest.write_bytes(b"the first start's layer")
    with pytest.raises(FileExistsError):
        asyncio.run(
            _rootlayer.create_qcow2(dest, 1 << 20, tmp_path / "log", "the layer", exclusive=True)
        )
    assert dest.read_bytes() == b"the first start's layer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.qcow2", "log"]


def _restoring_machine(base: Path, kept: Path, state: Path, log: Path) -> Any:
    cfg = SimpleNamespace(root_disk=RootDisk(base=base, layer=kept))
    return SimpleNamespace(
        config=cfg, root_layer=kept, root_backing=None, state_dir=state, stderr_path=log
    )


def test_a_qemu_restore_puts_a_copy_of_the_snapshots_layer_in_place(
    base: Path, tmp_path: Path
) -> None:
    kept, captured = tmp_path / "vm" / "root.qcow2", tmp_path / "snap.root.qcow2"
    kept.parent.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    for path in (kept, captured):
        create_disk_image(path, size_bytes=BASE_SIZE, format="qcow2")
    _qemu_io(kept, base, "write -P 0x11 0 64k")  # what the VM wrote before the restore
    _qemu_io(captured, base, "write -P 0x22 0 64k")  # what the snapshot holds
    captured.chmod(0o400)
    snap = captured.read_bytes()
    m = _restoring_machine(base, kept, state, tmp_path / "log")
    disk = CapturedDisk("root", base, captured, DiskFormat.QCOW2)
    asyncio.run(_migrate.prepare_root(m, [disk]))
    assert m.root_backing is None  # the copy stands over the base alone
    assert m.root_layer == kept.with_name(f".{kept.name}.restore-{os.getpid()}")
    assert m.root_layer.read_bytes() == snap
    assert stat.S_IMODE(m.root_layer.stat().st_mode) == 0o600
    assert "read 65536/65536" in _qemu_io(kept, base, "read -P 0x11 0 64k")  # untouched yet
    assert list(state.iterdir()) == []
    _migrate.keep_restored_root(m)  # the state has loaded
    assert m.root_layer == kept
    assert kept.read_bytes() == snap
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    assert captured.read_bytes() == snap  # the snapshot's file is never written


def test_a_failed_qemu_restore_leaves_the_kept_layer_as_it_was(base: Path, tmp_path: Path) -> None:
    kept, captured = tmp_path / "root.qcow2", tmp_path / "snap.root.qcow2"
    for path in (kept, captured):
        create_disk_image(path, size_bytes=BASE_SIZE, format="qcow2")
    _qemu_io(kept, base, "write -P 0x11 0 64k")
    before = kept.read_bytes()
    m = _restoring_machine(base, kept, tmp_path, tmp_path / "log")
    asyncio.run(_migrate.prepare_root(m, [CapturedDisk("root", base, captured, DiskFormat.QCOW2)]))
    assert m.root_layer != kept
    _migrate.drop_restored_root(m)  # e.g. QEMU refused the state
    assert m.root_layer is None
    assert kept.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img", kept.name, captured.name]
    m.root_layer = kept  # a failure after the copy took its place keeps it
    _migrate.drop_restored_root(m)
    assert kept.exists()


def test_a_qemu_restore_refuses_a_kept_layer_a_running_vm_writes(
    base: Path, tmp_path: Path
) -> None:
    """Putting the restore's copy in place under a running VM would lose what it writes next:
    the layer QEMU (here qemu-io, the same block layer) holds is refused before any copy."""
    kept, captured = tmp_path / "root.qcow2", tmp_path / "snap.root.qcow2"
    for path in (kept, captured):
        create_disk_image(path, size_bytes=BASE_SIZE, format="qcow2")
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", f"json:{json.dumps(_chain(kept, base))}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.write("length\n")  # answered once the image is open, and locked
        holder.stdin.flush()
        assert "4 MiB" in holder.stdout.readline()
        m = _restoring_machine(base, kept, tmp_path, tmp_path / "log")
        disk = CapturedDisk("root", base, captured, DiskFormat.QCOW2)
        busy = r"a VM is running on it \(QEMU holds its lock\)\. Stop the VM"
        with pytest.raises(vzkit.SnapshotError, match=busy) as info:
            asyncio.run(_migrate.prepare_root(m, [disk]))
        assert str(kept) in str(info.value)
        assert m.root_layer is None
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["base.img", kept.name, captured.name]  # no copy made
    finally:
        holder.communicate("quit\n", timeout=30)
    asyncio.run(_migrate.prepare_root(m, [disk]))  # free again: the restore goes on
    assert m.root_layer is not None
    assert m.root_layer.exists()


# -- vz ------------------------------------------------------------------------------------------


def test_vz_makes_a_kept_layer_once_and_reuses_it(base: Path, tmp_path: Path) -> None:
    kept = tmp_path / "vm" / "root.img"
    kept.parent.mkdir()
    root = RootDisk(base=base, layer=kept)
    state = tmp_path / "state"
    state.mkdir()
    assert _rootclone.open_layer(root, state) == kept
    assert kept.read_bytes() == base.read_bytes()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert list(state.iterdir()) == []
    with open(kept, "r+b") as fh:  # what the guest wrote
        fh.seek(1 << 20)
        fh.write(b"written by the guest")
    written = kept.read_bytes()
    _rootclone.remove_layer(kept, root)  # close
    assert _rootclone.open_layer(root, state) == kept  # the next start
    assert kept.read_bytes() == written
    assert _rootclone.restore_target(root, state) == kept
    qcow2 = create_disk_image(
        tmp_path / "vm" / "from-qemu.qcow2", size_bytes=BASE_SIZE, format="qcow2"
    )
    with pytest.raises(ConfigError, match=rf"is \d+ bytes and the base {BASE_SIZE}"):
        _rootclone.open_layer(RootDisk(base=base, layer=qcow2), state)
    run = _rootclone.open_layer(RootDisk(base=base), state)
    assert run == state / _rootclone.LAYER_NAME
    _rootclone.remove_layer(run, RootDisk(base=base))
    assert not run.exists()
    with pytest.raises(FileExistsError):
        _rootclone.clone_base(base, kept, exclusive=True)
    assert kept.read_bytes() == written
    assert sorted(p.name for p in kept.parent.iterdir()) == ["from-qemu.qcow2", kept.name]


def test_link_new_on_a_file_system_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    first, second, dest = tmp_path / "first", tmp_path / "second", tmp_path / "dest"
    first.write_bytes(b"first")
    link_new(first, dest)
    assert (dest.read_bytes(), first.exists()) == (b"first", False)
    second.write_bytes(b"second")
    with pytest.raises(FileExistsError):
        link_new(second, dest)
    assert (dest.read_bytes(), second.exists()) == (b"first", True)  # the caller's to delete
