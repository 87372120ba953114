"""Snapshots of VMs on a root disk: the record (``rootDisk``, metadata format 4, a ``root``
layer), the base's digest (the cache's, or the file's content checksum) checked before the
backend reads anything, hostile records, and the qemu side's chain and capture."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._disk import DiskFormat, DiskImage, RootDisk, create_disk_image, standalone_qcow2_size
from vzkit.backends._protocol import CapturedDisk, StateListener
from vzkit.backends.qemu import _rootlayer
from vzkit.backends.qemu._argv import Plan
from vzkit.backends.qemu._devices import build_argv
from vzkit.snapshots import SnapshotRecord

from .test_snapshot_hostile import _nonzero_digest, _refused, _resign
from .test_snapshot_ops import FakeBackend, FakeMachine, machine, make_vms

Factory = Callable[..., vzkit.VirtualMachine]
CACHE_DIGEST = "sha256:" + "ab" * 32


class RootMachine(FakeMachine):
    """The fake machine, capturing a root disk's layer (an empty standalone qcow2) too."""

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        out = await super().capture_disks(directory, prefix)
        root = self.config.root_disk
        if root is not None:
            dst = directory / f"{prefix}root.qcow2"
            create_disk_image(dst, size_bytes=1 << 20, format="qcow2")
            source = Path(os.path.realpath(root.base))
            out.insert(0, CapturedDisk("root", source, dst, DiskFormat.QCOW2))
        return out


class RootBackend(FakeBackend):
    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> FakeMachine:
        return RootMachine(config, on_state)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    with open(path, "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(2 << 20)
        fh.write(b"the base's data")
    return path


@pytest.fixture
def setup(tmp_path: Path, base: Path) -> Iterator[Factory]:
    """VMs on the fake backend with a root disk over ``base`` (``digest=`` as given)."""
    vms = make_vms(tmp_path)
    make = next(vms)

    def rooted(
        digest: str = CACHE_DIGEST, backend: FakeBackend | None = None, **overrides: Any
    ) -> vzkit.VirtualMachine:
        overrides.setdefault("root_disk", RootDisk(base=base, digest=digest))
        return make(backend or RootBackend(), **overrides)

    yield rooted
    next(vms, None)  # closes them


def _saved(setup: Factory, tmp_path: Path, digest: str = CACHE_DIGEST) -> Any:
    vm = setup(digest)
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "s")
    vm.stop()
    return manager


def _data(manager: vzkit.SnapshotManager) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manager.meta_path("s").read_text())
    return data


def _write(manager: vzkit.SnapshotManager, data: dict[str, Any]) -> None:
    path = manager.meta_path("s")
    path.unlink()
    path.write_text(json.dumps(data))


def test_the_record_names_the_base_and_round_trips(
    setup: Factory, tmp_path: Path, base: Path
) -> None:
    manager = _saved(setup, tmp_path)
    data = _data(manager)
    token = data["id"]
    assert data["format"] == 4
    assert data["rootDisk"] == {"base": str(base), "format": "raw", "digest": CACHE_DIGEST}
    assert [(d["role"], d["file"]) for d in data["disks"]] == [
        ("root", f"s.{token}.root.qcow2"),
        ("disk0", f"s.{token}.disk0.raw"),
    ]
    assert data["machine"]["root_disk"] == {
        "format": "raw", "device": "/dev/vda", "fstype": "ext4", "init": "agent",
    }  # fmt: skip
    record = SnapshotRecord.from_json("s", data)
    assert record.root is not None
    assert record.root.digest == CACHE_DIGEST
    assert record.to_json() == data
    assert sorted(p.name for p in manager.snapshot_dir.iterdir()) == sorted(
        ["s.json", "s.vmstate", f"s.{token}.root.qcow2", f"s.{token}.disk0.raw"]
    )
    vm = setup()
    manager.restore(vm, "s")
    ((_, disks),) = machine(vm).restored
    assert [d.role for d in disks] == ["root", "disk0"]
    manager.delete("s")  # the root layer goes with it
    assert list(manager.snapshot_dir.iterdir()) == []


def test_another_base_is_refused_before_the_backend_is_called(
    setup: Factory, tmp_path: Path, base: Path
) -> None:
    manager = _saved(setup, tmp_path)
    vm = setup("sha256:" + "cd" * 32)
    message = _refused(vm, manager, "saved on the root disk base")
    assert message == (
        f"snapshot 's' was saved on the root disk base {str(base)!r} ({CACHE_DIGEST}), but this "
        f"VM's base {str(base)!r} is sha256:{'cd' * 32}: its root disk layer only fits the base "
        "it was saved on. Restore with that base (the same --rootfs tree or image, unchanged), "
        "or boot on this one and save the snapshot again"
    )
    assert not machine(vm).built.is_set()  # nothing was built
    no_digest = setup("")
    _refused(no_digest, manager, r"this VM's base .* is a base without a digest")


def test_a_base_without_a_digest_is_hashed_and_checked_before_the_state_is_read(
    setup: Factory, tmp_path: Path, base: Path
) -> None:
    manager = _saved(setup, tmp_path, digest="")
    recorded = _data(manager)["rootDisk"]["digest"]
    assert recorded == _nonzero_digest(base.read_bytes())
    vm = setup("")
    manager.restore(vm, "s")
    assert len(machine(vm).restored) == 1
    with open(base, "r+b") as fh:  # the base changes under the snapshot
        fh.seek(3 << 20)
        fh.write(b"changed")
    changed = setup("")
    message = _refused(changed, manager, "saved on the root disk base")
    assert f"this VM's base {str(base)!r} is {_nonzero_digest(base.read_bytes())}" in message
    assert machine(changed).state_read == b""  # QEMU's part: nothing saved was read
    assert machine(changed).restored == []
    base.unlink()  # after the VM's config was made (which checks that it exists)
    gone = _refused(changed, manager, "that file no longer exists")
    assert f"this VM's base {str(base)!r} is missing" in gone


def test_a_root_disk_snapshot_fits_only_a_vm_with_one(setup: Factory, tmp_path: Path) -> None:
    manager = _saved(setup, tmp_path)
    plain = setup(root_disk=None)
    _refused(plain, manager, r"does not fit this VM's config: root_disk: snapshot \{")
    data = _data(manager)  # a record that hides its root disk from the comparison
    del data["machine"]["root_disk"]
    data["configFingerprint"] = vzkit.snapshots._record.fingerprint(data["machine"])
    _write(manager, data)
    _refused(plain, manager, r"the snapshot has one over .*, this VM has none")
    assert machine(plain).restored == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["rootDisk"].update(base="relative/base.img"), r"'rootDisk.base' must be"),
        (lambda d: d["rootDisk"].update(base="/srv/../etc/shadow"), r"'rootDisk.base' must be"),
        (lambda d: d["rootDisk"].update(base="//host/base"), r"'rootDisk.base' must be"),
        (lambda d: d["rootDisk"].update(base="/a\x1b[2Jb"), r"'rootDisk.base' must be"),
        (lambda d: d["rootDisk"].update(base=7), r"'rootDisk.base' must be a string"),
        (lambda d: d["rootDisk"].update(format="vmdk"), r"'rootDisk.format' must be one of"),
        (lambda d: d["rootDisk"].update(digest="md5:00"), r"'rootDisk.digest' must be"),
        (lambda d: d["rootDisk"].pop("digest"), r"'rootDisk.digest' is missing"),
        (lambda d: d.pop("rootDisk"), r"'rootDisk' is missing"),
        (lambda d: d.update(format=3), r"'rootDisk' needs metadata format 4, not 3"),
        (lambda d: d.update(disks=d["disks"][1:]), r"'disks' has no 'root' disk"),
        (lambda d: d["disks"][0].update(file="../root.qcow2"), r"'disks\[0\].file' must be"),
    ],
)
def test_hostile_root_disk_records_are_refused(
    setup: Factory,
    tmp_path: Path,
    change: Callable[[dict[str, Any]], object],
    message: str,
) -> None:
    manager = _saved(setup, tmp_path)
    data = _data(manager)
    change(data)
    _write(manager, data)
    with pytest.raises(vzkit.SnapshotError, match=message):
        manager.get("s")
    vm = setup()
    _refused(vm, manager, message)
    assert machine(vm).restored == []


def test_a_base_path_in_the_record_is_never_opened(
    setup: Factory, tmp_path: Path, base: Path
) -> None:
    """A hostile author names a host file as the base, with that file's own checksum: the
    restore hashes the base of the VM's own config, never the file the record names."""
    manager = _saved(setup, tmp_path, digest="")
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"a host file")
    data = _data(manager)
    data["rootDisk"].update(base=str(decoy), digest=_nonzero_digest(decoy.read_bytes()))
    _resign(manager, data)
    _write(manager, data)
    vm = setup("")
    _refused(vm, manager, f"this VM's base {str(base)!r} is sha256-nonzero-1m:")
    assert machine(vm).restored == []


# -- the qemu side ---------------------------------------------------------------------------


def test_a_restored_run_gives_qemu_the_whole_chain_node_by_node(base: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=kernel, root_disk=RootDisk(base=base), state_dir=tmp_path / "s"
    )
    captured = DiskImage(Path("/snap/s.0123456789ab.root.qcow2"), DiskFormat.QCOW2)
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"),
        root_layer=Path("/state/root-layer.qcow2"), root_backing=captured,
    )  # fmt: skip
    argv = build_argv(plan)
    (root,) = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert root == {
        "driver": "qcow2",
        "node-name": "root0",
        "cache": {"direct": False},
        "file": {"driver": "file", "filename": "/state/root-layer.qcow2"},
        "backing": {
            "driver": "qcow2",  # the snapshot's layer: its header's names are not followed
            "file": {"driver": "file", "filename": str(captured.path)},
            "read-only": True,  # shared by every VM restored from the snapshot
            "backing": {
                "driver": "raw",  # the config's base, in its stated format
                "file": {"driver": "file", "filename": str(base)},
                "read-only": True,
            },
        },
    }


def _qemu_io(spec: dict[str, object], *commands: str) -> None:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, f"json:{json.dumps(spec)}"], check=True, capture_output=True)


def _chain(*images: tuple[Path, str]) -> dict[str, object]:
    """A ``json:`` chain, top first, every format stated; only the top is writable."""
    node: dict[str, object] | None = None
    for index, (path, fmt) in enumerate(reversed(images)):
        this: dict[str, object] = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
        if fmt == "qcow2":
            this["backing"] = node
        if index < len(images) - 1:
            this["read-only"] = True
        node = this
    assert node is not None
    return node


def _read(spec: dict[str, object], out: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", f"json:{json.dumps(spec)}", "-O", "raw", str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


def test_capturing_a_restored_runs_layer_commits_both_layers(base: Path, tmp_path: Path) -> None:
    """The save of a restored VM: its layer over the snapshot's over the base becomes one
    standalone layer over the base, zeros written over the base's data included."""
    with open(base, "r+b") as fh:
        fh.seek(0)
        fh.write(b"B" * (3 << 20))
    size = base.stat().st_size
    captured, layer = tmp_path / "captured.qcow2", tmp_path / "layer.qcow2"
    for path in (captured, layer):
        create_disk_image(path, size_bytes=size, format="qcow2")
    _qemu_io(_chain((captured, "qcow2"), (base, "raw")), "write -P 0x43 0 64k", "write -z 1M 64k")
    _qemu_io(
        _chain((layer, "qcow2"), (captured, "qcow2"), (base, "raw")),
        "write -P 0x44 2M 64k",
        "write -z 64k 64k",
    )
    expected = _read(_chain((layer, "qcow2"), (captured, "qcow2"), (base, "raw")), tmp_path / "e")
    dst = tmp_path / "snap" / ".s.0123456789ab.root.qcow2"
    dst.parent.mkdir()
    how = asyncio.run(
        _rootlayer.capture(
            layer, DiskImage(base, DiskFormat.RAW), DiskImage(captured, DiskFormat.QCOW2), dst,
            tmp_path / "qemu.log",
        )
    )  # fmt: skip
    assert how == "committed"
    assert standalone_qcow2_size(dst) == size  # names no backing file
    assert oct(dst.stat().st_mode & 0o777) == oct(0o400)
    assert sorted(p.name for p in dst.parent.iterdir()) == [dst.name]  # no copy left over
    got = _read(_chain((dst, "qcow2"), (base, "raw")), tmp_path / "g")
    assert got == expected
    assert got[1 << 20 : (1 << 20) + 16] == bytes(16)  # zeros over the base's "B"s kept
    assert got[64 << 10 : (64 << 10) + 16] == bytes(16)
    assert got[2 << 20 : (2 << 20) + 2] == b"DD"
    again = tmp_path / "snap" / "plain.qcow2"  # a VM that was not restored: a copy
    how = asyncio.run(
        _rootlayer.capture(layer, DiskImage(base, DiskFormat.RAW), None, again, tmp_path / "l")
    )
    assert how in ("reflink", "sparse")
    assert again.read_bytes() == layer.read_bytes()


def test_a_restore_refuses_root_layers_that_do_not_fit(base: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vzkit.backends.qemu import _migrate

    layer = tmp_path / "s.0123456789ab.root.qcow2"
    create_disk_image(layer, size_bytes=1 << 20, format="qcow2")  # not the base's 4 MiB
    state = tmp_path / "state"
    state.mkdir()
    m: Any = SimpleNamespace(
        config=SimpleNamespace(root_disk=RootDisk(base=base)),
        root_layer=None, root_backing=None, state_dir=state, stderr_path=tmp_path / "log",
    )  # fmt: skip

    def prepare(*disks: CapturedDisk) -> None:
        asyncio.run(_migrate.prepare_root(m, disks))

    as_raw = CapturedDisk("root", base, layer, DiskFormat.RAW)
    with pytest.raises(vzkit.SnapshotError, match="root disk layer is raw; the qemu backend"):
        prepare(as_raw)
    with pytest.raises(vzkit.SnapshotError, match=r"\(0 in the snapshot, a root disk here\)"):
        prepare()
    captured = CapturedDisk("root", base, layer, DiskFormat.QCOW2)
    with pytest.raises(vzkit.SnapshotError, match="does not have the size of the base"):
        prepare(captured)
    assert list(state.iterdir()) == []  # no layer made
    m.config = SimpleNamespace(root_disk=None)
    with pytest.raises(vzkit.SnapshotError, match=r"\(1 in the snapshot, no root disk here\)"):
        prepare(captured)


def test_a_backend_that_captures_no_root_layer_saves_nothing(
    setup: Factory, tmp_path: Path, base: Path
) -> None:
    vm = setup(backend=FakeBackend())  # the plain fake: it captures disk0 only
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    with pytest.raises(vzkit.SnapshotError, match="the backend captured no root disk layer"):
        manager.save(vm, "s")
    assert vm.state is vzkit.VMState.RUNNING  # resumed
    assert list(manager.snapshot_dir.iterdir()) == []  # nothing left behind
