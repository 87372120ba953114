"""Saving and restoring through the facade, against a fake backend: atomicity at every step,
the metadata written, the config comparison, state guards and the many-from-one rule."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
from vzkit._diskcopy import copy_disk
from vzkit._state import VMState
from vzkit.backends import AgentVsock, BalloonInfo, Feature
from vzkit.backends._protocol import CapturedDisk, ProgressFn, StateListener, notify_state
from vzkit.snapshots import _record, _store
from vzkit.snapshots._record import MachineInfo

STATE_BYTES = b"machine-state:" + bytes(range(256)) * 64


class FakeMachine:
    """A machine whose 'VMM' is this object: state changes at once, state files are bytes."""

    def __init__(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> None:
        self.config = config
        self._on_state = on_state
        self._state = VMState.STOPPED
        self.blockers: list[str] = []
        self.fail_save: BaseException | None = None
        self.hang_save = False
        self.fail_capture: BaseException | None = None
        self.restored: list[tuple[Path, list[CapturedDisk]]] = []
        #: Set when a restore has built its VM and waits for the checksums (``verified``).
        self.built = threading.Event()
        self.state_written = b""
        self.set_aside: list[tuple[str, VMState]] = []  # prepare/finish_save and the state then
        self.before_restore: Callable[[], None] | None = None
        self.state_read = b""
        self.info = {"fake": "1", "accel": "fast"}
        self.hardware_asked = 0

    # lifecycle
    @property
    def state(self) -> VMState:
        return self._state

    def _set(self, new: VMState) -> None:
        old, self._state = self._state, new
        notify_state(self._on_state, old, new)

    @property
    def pid(self) -> int | None:
        return None

    @property
    def console_log_path(self) -> Path | None:
        return None

    @property
    def console_pty(self) -> str | None:
        return None

    @property
    def state_dir(self) -> Path:
        assert self.config.state_dir is not None
        return self.config.state_dir

    async def start(self) -> None:
        self._set(VMState.RUNNING)

    async def pause(self) -> None:
        self._set(VMState.PAUSED)

    async def resume(self) -> None:
        self._set(VMState.RUNNING)

    async def request_stop(self) -> None:
        self._set(VMState.STOPPED)

    async def force_stop(self) -> None:
        self._set(VMState.STOPPED)

    async def wait_stopped(self) -> VMState:
        return self._state

    def agent_console(self) -> socket.socket | None:
        return None  # no agent here

    def agent_vsock(self) -> AgentVsock | None:
        return None

    async def set_balloon_target(self, target_mb: int) -> None:
        pass

    async def balloon_info(self) -> BalloonInfo:
        return BalloonInfo(False, 0.0, 64)

    async def close(self) -> None:
        self._set(VMState.STOPPED)

    # snapshots
    def snapshot_blockers(self) -> list[str]:
        return list(self.blockers)

    def snapshot_info(self) -> dict[str, str]:
        return dict(self.info)

    async def hardware_mismatches(self, saved: Mapping[str, str]) -> list[str]:
        self.hardware_asked += 1
        return MachineInfo.from_items(dict(saved)).mismatches(MachineInfo.from_items(self.info))

    async def prepare_save(self) -> None:
        self.set_aside.append(("prepare", self._state))

    async def finish_save(self) -> None:
        self.set_aside.append(("finish", self._state))

    async def save_state(self, path: Path, progress: ProgressFn | None) -> None:
        assert self._state is VMState.PAUSED
        with open(path, "xb") as fh:
            fh.write(STATE_BYTES[:100])  # something partial is on disk when it fails
            if progress is not None:
                progress(100, len(STATE_BYTES))
            if self.hang_save:
                await asyncio.Event().wait()
            if self.fail_save is not None:
                raise self.fail_save
            fh.write(STATE_BYTES[100:] + self.state_written)

    async def capture_disks(self, directory: Path, prefix: str) -> list[CapturedDisk]:
        if self.config.disk_path is None:
            return []
        dst = directory / f"{prefix}disk0.raw"
        await copy_disk(self.config.disk_path, dst)
        if self.fail_capture is not None:
            raise self.fail_capture
        source = Path(os.path.realpath(self.config.disk_path))
        return [CapturedDisk("disk0", source, dst, vzkit.DiskFormat.RAW)]

    async def restore_state(
        self,
        path: Path,
        disks: Sequence[CapturedDisk],
        verified: Awaitable[None] | None = None,
    ) -> None:
        self.built.set()
        if verified is not None:
            await verified
        if self.before_restore is not None:
            self.before_restore()
        self.state_read = path.read_bytes()
        assert self.state_read.startswith(STATE_BYTES)
        # the path opens the checksummed file (/proc/self/fd/N here): record where it is
        self.restored.append((Path(os.path.realpath(path)), list(disks)))
        self._set(VMState.PAUSED)


class FakeBackend:
    name = "fake"

    def __init__(self, fanout: bool = True) -> None:
        feats = {Feature.LIFECYCLE, Feature.SNAPSHOTS}
        self.features = frozenset(feats | ({Feature.SNAPSHOT_FANOUT} if fanout else set()))

    def check_available(self) -> None:
        pass

    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> FakeMachine:
        return FakeMachine(config, on_state)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Callable[..., vzkit.VirtualMachine]]:
    yield from make_vms(tmp_path)


def make_vms(tmp_path: Path) -> Iterator[Callable[..., vzkit.VirtualMachine]]:
    """A factory of VMs on the fake backend sharing one kernel and disk; closes them after."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(1 << 20)
        fh.write(b"disk-data-v1")
    made: list[vzkit.VirtualMachine] = []

    def make(backend: FakeBackend | None = None, **overrides: Any) -> vzkit.VirtualMachine:
        settings: dict[str, Any] = {
            "kernel_path": kernel,
            "disk_path": disk,
            "state_dir": tmp_path / f"state{len(made)}",
        }
        cfg = vzkit.LinuxVMConfig(**{**settings, **overrides})
        vm = vzkit.VirtualMachine(cfg, backend=backend or FakeBackend())
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()


def machine(vm: vzkit.VirtualMachine) -> FakeMachine:
    m = vm._core.machine
    assert isinstance(m, FakeMachine)
    return m


def files(manager: vzkit.SnapshotManager) -> list[str]:
    return sorted(p.name for p in manager.snapshot_dir.iterdir())


def test_save_writes_state_disks_and_metadata(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    seen: list[tuple[int, int]] = []
    meta = manager.save(vm, "one", progress=lambda d, t: seen.append((d, t)))
    assert vm.state is VMState.RUNNING  # paused for the save, resumed after
    # Devices that cannot be saved are set aside while the VM still runs, and come back
    # once it runs again.
    assert machine(vm).set_aside == [("prepare", VMState.RUNNING), ("finish", VMState.RUNNING)]
    assert seen == [(100, len(STATE_BYTES))]
    assert meta.size == len(STATE_BYTES)
    data = json.loads(manager.meta_path("one").read_text())
    token = data["id"]
    assert files(manager) == sorted(["one.json", f"one.{token}.disk0.raw", "one.vmstate"])
    assert {"name", "created", "size", "vmState", "filePath"} <= set(data)
    assert (data["name"], data["size"], data["vmState"]) == ("one", len(STATE_BYTES), "running")
    assert data["filePath"] == str(manager.state_path("one"))
    assert data["backend"] == "fake"
    assert data["backendInfo"] == {"fake": "1", "accel": "fast"}
    assert data["format"] == 3
    assert data["configFingerprint"] == _record.fingerprint(data["machine"])
    assert data["machine"]["disk_path"] == str(tmp_path / "disk.raw")
    (disk,) = data["disks"]
    assert disk["file"] == f"one.{token}.disk0.raw"
    assert disk["format"] == "raw"
    image = manager.snapshot_dir / disk["file"]
    assert image.read_bytes() == (tmp_path / "disk.raw").read_bytes()
    assert image.stat().st_mode & 0o777 == 0o400

    vm.pause()
    manager.save(vm, "paused")
    assert vm.state is VMState.PAUSED  # a paused VM stays paused
    assert manager.get("paused").vm_state == "paused"


def _fail_replace_at(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.replace
    calls = {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(_store.os, "replace", replace)


FAULTS = {
    "disk full while saving state": lambda m, mp: setattr(
        m, "fail_save", OSError(errno.ENOSPC, "No space left on device")
    ),
    "VMM error while saving state": lambda m, mp: setattr(
        m, "fail_save", vzkit.VMError("QMP migrate failed: boom")
    ),
    "disk capture fails": lambda m, mp: setattr(
        m, "fail_capture", OSError(errno.ENOSPC, "No space left on device")
    ),
    "disk rename fails": lambda m, mp: _fail_replace_at(1, mp),
    "state rename fails": lambda m, mp: _fail_replace_at(2, mp),
    "metadata rename fails": lambda m, mp: _fail_replace_at(3, mp),
    "metadata write fails": lambda m, mp: mp.setattr(
        _store, "_write_new", _raise(OSError(errno.ENOSPC, "No space left on device"))
    ),
    "directory fsync fails": lambda m, mp: mp.setattr(
        _store, "fsync_dir", _raise(OSError(errno.EIO, "Input/output error"))
    ),
}


def _raise(exc: BaseException) -> Callable[..., None]:
    def fail(*args: Any) -> None:
        raise exc

    return fail


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failure_at_any_step_keeps_the_older_snapshot_and_leaves_nothing(
    setup: Callable[..., vzkit.VirtualMachine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    old = manager.save(vm, "snap")
    before = {name: (manager.snapshot_dir / name).read_bytes() for name in files(manager)}
    m = machine(vm)
    m.state_written = b"-newer"
    FAULTS[fault](m, monkeypatch)
    with pytest.raises(vzkit.SnapshotError, match="saving snapshot 'snap' failed"):
        manager.save(vm, "snap")
    monkeypatch.undo()
    assert vm.state is VMState.RUNNING
    assert m.set_aside[-2:] == [("prepare", VMState.RUNNING), ("finish", VMState.RUNNING)]
    after = {name: (manager.snapshot_dir / name).read_bytes() for name in files(manager)}
    assert after == before  # byte for byte the older snapshot, and nothing else
    assert manager.get("snap") == old
    vm.stop()
    manager.restore(vm, "snap")
    assert m.restored[-1][0] == manager.state_path("snap")


def test_a_failed_save_of_a_paused_vm_leaves_it_paused(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    vm.pause()
    machine(vm).fail_save = OSError(errno.ENOSPC, "No space left on device")
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    with pytest.raises(vzkit.SnapshotError, match="No space left on device"):
        manager.save(vm, "x")
    assert vm.state is VMState.PAUSED
    assert machine(vm).set_aside == [("prepare", VMState.PAUSED), ("finish", VMState.PAUSED)]
    assert files(manager) == []


def test_timeout_cancels_the_save_cleans_up_and_resumes(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    machine(vm).hang_save = True
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    with pytest.raises(vzkit.VMTimeoutError, match="saving snapshot 'slow'"):
        manager.save(vm, "slow", timeout=0.2)
    assert vm.state is VMState.RUNNING
    assert files(manager) == []


def test_save_refuses_unsaveable_devices_before_writing(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    machine(vm).blockers = ["vhost-user-fs (the VirtioFS share 'src' of '/src')"]
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    with pytest.raises(vzkit.SnapshotError, match=r"vhost-user-fs \(the VirtioFS share 'src'"):
        manager.save(vm, "x")
    assert not manager.snapshot_dir.exists()
    assert vm.state is VMState.RUNNING


def test_state_guards(setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path) -> None:
    vm = setup()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    with pytest.raises(vzkit.StateError, match="cannot save a VM that is stopped"):
        manager.save(vm, "x")
    vm.start()
    manager.save(vm, "x")
    with pytest.raises(vzkit.StateError, match="needs a stopped VM \\(it is running\\)"):
        manager.restore(vm, "x")
    with pytest.raises(vzkit.SnapshotError, match="invalid snapshot name"):
        manager.save(vm, "../x")
    vm.stop()
    restored = manager.restore(vm, "x")
    assert restored.name == "x"
    assert vm.state is VMState.PAUSED
    vm.resume()
    assert vm.state is VMState.RUNNING


def test_restore_into_a_different_config_names_every_difference(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "x")
    other = tmp_path / "other.raw"
    other.write_bytes(b"")
    wrong = setup(memory_gb=2.0, disk_path=other, cpus=3)
    with pytest.raises(vzkit.SnapshotError) as info:
        manager.restore(wrong, "x")
    assert str(info.value) == (
        "snapshot 'x' does not fit this VM's config: cpus: snapshot 2, this VM 3; "
        f"disk_path: snapshot {str(tmp_path / 'disk.raw')!r}, this VM {str(other)!r}; "
        "memory_mb: snapshot 1024, this VM 2048"
    )
    assert machine(wrong).restored == []
    assert wrong.state is VMState.STOPPED
    # The same files through a symlink are the same files: paths compare canonically.
    link = tmp_path / "link.raw"
    link.symlink_to(tmp_path / "disk.raw")
    same = setup(disk_path=link)
    manager.restore(same, "x")
    assert same.state is VMState.PAUSED
    ((_, disks),) = machine(same).restored
    assert [d.role for d in disks] == ["disk0"]
    assert disks[0].path.read_bytes() == (tmp_path / "disk.raw").read_bytes()


def test_restore_must_match_the_disk_format(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    raw = setup()
    raw.start()
    manager.save(raw, "raw")
    # raw is the default and left out: snapshots from before the field still fit raw disks
    assert "disk_format" not in json.loads(manager.meta_path("raw").read_text())["machine"]
    qcow2 = setup(disk_format="qcow2")
    qcow2.start()
    manager.save(qcow2, "qcow2")
    assert json.loads(manager.meta_path("qcow2").read_text())["machine"]["disk_format"] == "qcow2"
    with pytest.raises(vzkit.SnapshotError) as info:
        manager.restore(setup(disk_format="qcow2"), "raw")
    assert str(info.value) == (
        "snapshot 'raw' does not fit this VM's config: disk_format: snapshot None, this VM 'qcow2'"
    )
    with pytest.raises(vzkit.SnapshotError, match="disk_format: snapshot 'qcow2', this VM None"):
        manager.restore(setup(), "qcow2")
    manager.restore(setup(disk_format="qcow2"), "qcow2")


def test_restore_checks_backend_and_completeness(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "x")
    vm.stop()
    meta_path = manager.meta_path("x")
    data = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**data, "backend": "qemu"}))
    with pytest.raises(vzkit.SnapshotError, match="saved by the qemu backend; this VM uses fake"):
        manager.restore(vm, "x")
    meta_path.write_text(json.dumps({**data, "size": data["size"] + 1}))
    with pytest.raises(vzkit.SnapshotError, match="is incomplete"):
        manager.restore(vm, "x")
    seed_only = {k: data[k] for k in ("name", "created", "size", "vmState", "filePath")}
    meta_path.write_text(json.dumps(seed_only))
    with pytest.raises(vzkit.SnapshotError, match="no machine description"):
        manager.restore(vm, "x")
    meta_path.write_text(json.dumps(data))
    (manager.snapshot_dir / data["disks"][0]["file"]).unlink()
    with pytest.raises(vzkit.SnapshotError, match="missing its disk image"):
        manager.restore(vm, "x")
    assert machine(vm).restored == []


def test_one_snapshot_into_several_vms_needs_the_backend_feature(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    single = FakeBackend(fanout=False)
    vm = setup(single)
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "x")
    vm.stop()
    manager.restore(vm, "x")
    second = setup(single)
    with pytest.raises(vzkit.UnsupportedError, match="cannot restore one snapshot into several"):
        manager.restore(second, "x")
    vm.close()
    manager.restore(second, "x")  # the first one is gone: fine
    many = [setup() for _ in range(3)]
    for each in many:
        manager.restore(each, "x")
    assert {each.state for each in many} == {VMState.PAUSED}


def test_delete_removes_disks_too(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "x")
    manager.save(vm, "x.y")  # a name that extends another must not lose its files
    manager.delete("x")
    assert [m.name for m in manager.list()] == ["x.y"]
    token = json.loads(manager.meta_path("x.y").read_text())["id"]
    assert files(manager) == sorted([f"x.y.{token}.disk0.raw", "x.y.json", "x.y.vmstate"])


def test_async_twin(setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path) -> None:
    async def main() -> None:
        cfg = setup().config
        async with vzkit.aio.VirtualMachine(cfg, backend=FakeBackend()) as vm:
            await vm.start()
            manager = vzkit.aio.SnapshotManager(tmp_path / "vm")
            meta = await manager.save(vm, "a")
            assert [m.name for m in manager.list()] == ["a"]
            await vm.stop()
            assert (await manager.restore(vm, "a")).name == meta.name
            assert vm.state is VMState.PAUSED
            manager.delete("a")

    asyncio.run(main())


def test_which_backends_restore_one_snapshot_into_many() -> None:
    from vzkit.backends import qemu, vz

    assert Feature.SNAPSHOTS in qemu.BACKEND.features
    assert Feature.SNAPSHOT_FANOUT in qemu.BACKEND.features
    assert Feature.SNAPSHOTS in vz.BACKEND.features
    assert Feature.SNAPSHOT_FANOUT not in vz.BACKEND.features  # VZ: UnsupportedError


def test_a_restore_onto_other_hardware_is_refused_before_the_state_loads(
    setup: Callable[..., vzkit.VirtualMachine], tmp_path: Path
) -> None:
    """The hardware a restore would build (what ``snapshot_info()`` would report: machine
    type, CPU model...) must be the saved one; how it ran (``accel``) may differ. The machine
    is asked before it builds anything (``hardware_mismatches``, one seam on every backend)."""
    vm = setup()
    vm.start()
    manager = vzkit.SnapshotManager(tmp_path / "vm")
    manager.save(vm, "s")
    vm.stop()
    machine(vm).info = {"fake": "1", "accel": "slow"}  # another accelerator: fine
    manager.restore(vm, "s")
    assert vm.state is VMState.PAUSED
    vm.stop()
    machine(vm).info = {"fake": "2", "accel": "fast"}
    machine(vm).built.clear()
    with pytest.raises(vzkit.SnapshotError) as info:
        manager.restore(vm, "s")
    assert str(info.value) == (
        "snapshot 's' does not fit this VM's hardware: fake: snapshot '1', this machine '2'"
    )
    assert vm.state is VMState.STOPPED
    assert machine(vm).hardware_asked == 2
    assert not machine(vm).built.is_set()  # refused before the VM was built
    assert len(machine(vm).restored) == 1  # the first restore only: this one built nothing


def test_the_sync_and_async_managers_are_twins(tmp_path: Path) -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    sync_members = public(vzkit.SnapshotManager)
    assert sync_members == public(vzkit.aio.SnapshotManager)
    assert {"save", "restore", "list", "get", "delete", "state_path", "meta_path"} <= sync_members
    sync, aio = vzkit.SnapshotManager(tmp_path), vzkit.aio.SnapshotManager(tmp_path)
    assert vars(sync).keys() == vars(aio).keys()
    assert asyncio.iscoroutinefunction(vzkit.aio.SnapshotManager.save)
    assert asyncio.iscoroutinefunction(vzkit.aio.SnapshotManager.restore)
    assert not asyncio.iscoroutinefunction(vzkit.SnapshotManager.save)
