"""The seed's VM functions through completion handlers on the VM's queue, NSErrors mapped.

The stand-in VM runs every completion handler asynchronously on its queue and refuses any
call made elsewhere, so these tests also prove each function dispatches correctly.
"""

from __future__ import annotations

import io
import json
import logging
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.backends import vz as vzb
from vzkit.backends.vz._objc import vm_delegate
from vzkit.snapshots import SnapshotRecord, SnapshotStore
from vzkit.snapshots._files import check_digests
from vzkit.snapshots._record import FORMAT

from ._support import ARM64_IMAGE, FakeFactory
from .fakeobjc import FakeRuntime, guest_power_off, state_name

pytestmark = pytest.mark.contract
TIMEOUT = 5.0


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(ARM64_IMAGE)
    return path


def make_vm(
    tmp_path: Path, kernel: Path, **kw: Any
) -> tuple[vzb.Queue, Any, Any, vzkit.LinuxVMConfig]:
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, state_dir=tmp_path / "state", **kw)
    config = vzb.build_linux_vm_config(cfg)
    vzb.validate_config(config)
    queue = vzb.Queue("test.vm")
    return queue, vzb.create_vm(config, queue), config, cfg


def finish(handler: vzb.ErrorCompletionHandler) -> Exception | None:
    assert handler.wait(TIMEOUT), f"{handler!r} never fired"
    from vzkit.backends.vz._lifecycle import handler_error

    return handler_error(handler)


def test_start_pause_resume_stop_through_handlers(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    assert vzb.vm_state(queue, vm) is vzkit.VMState.STOPPED
    assert vzb.can_start(queue, vm)
    assert not vzb.can_stop(queue, vm)
    results: list[Exception | None] = []
    handler = vzb.start_vm(queue, vm, results.append)
    assert finish(handler) is None
    assert handler.done
    assert handler.error is None
    assert results == [None]
    assert vzb.vm_state(queue, vm) is vzkit.VMState.RUNNING
    assert (vzb.can_pause(queue, vm), vzb.can_stop(queue, vm)) == (True, True)
    assert vzb.can_request_stop(queue, vm)
    assert finish(vzb.pause_vm(queue, vm)) is None
    assert vzb.vm_state(queue, vm) is vzkit.VMState.PAUSED
    assert vzb.can_resume(queue, vm)
    assert finish(vzb.resume_vm(queue, vm)) is None
    assert finish(vzb.stop_vm(queue, vm)) is None
    assert vzb.vm_state(queue, vm) is vzkit.VMState.STOPPED
    history = vm._fk.extra["history"]
    assert history == [
        "Stopped",
        "Starting",
        "Running",
        "Pausing",
        "Paused",
        "Resuming",
        "Running",
        "Stopping",
        "Stopped",
    ]


def test_start_failure_reaches_the_completion_as_a_vzkit_error(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    fake.fail_next(
        "startWithCompletionHandler:",
        code=1,
        description="Internal Virtualization error.",
        reason="The virtual machine failed to start.",
    )
    results: list[Exception | None] = []
    error = finish(vzb.start_vm(queue, vm, results.append))
    assert isinstance(error, vzkit.VMError)
    assert str(error) == (
        "start the VM: Internal Virtualization error. (The virtual machine failed to start.)"
    )
    assert isinstance(results[0], vzkit.VMError)
    assert isinstance(error.__cause__, vzb.NSErrorDetails)
    assert vzb.vm_state(queue, vm) is vzkit.VMState.STOPPED


def test_invalid_transition_is_a_state_error(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    error = finish(vzb.pause_vm(queue, vm))
    assert isinstance(error, vzkit.StateError)
    assert "Invalid virtual machine state transition" in str(error)


def test_request_stop_lets_the_guest_power_off(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    with pytest.raises(vzkit.StateError, match="ask the guest to stop"):
        vzb.request_stop_vm(queue, vm)  # not running yet
    assert finish(vzb.start_vm(queue, vm)) is None
    vzb.request_stop_vm(queue, vm)
    fake.settle()
    assert vzb.vm_state(queue, vm) is vzkit.VMState.STOPPED


def test_a_completion_callback_that_raises_stays_in_python(
    fake: FakeRuntime, tmp_path: Path, kernel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)

    def broken(error: Exception | None) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR):
        assert finish(vzb.start_vm(queue, vm, broken)) is None
        fake.settle()
    assert "callback bug" in caplog.text  # logged; the stand-in saw no exception escape


def test_balloon_target_and_info(fake: FakeRuntime, tmp_path: Path, kernel: Path) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel, memory_gb=2)
    finish(vzb.start_vm(queue, vm))
    info = vzb.get_balloon_info(queue, vm)
    assert info == vzkit.BalloonInfo(True, 2.0, 128)
    vzb.set_balloon_target(queue, vm, 1.2345)
    info = vzb.get_balloon_info(queue, vm)
    assert info.target_gb * 1024 == 1264  # 1.2345 GiB rounded down to a whole MiB
    with pytest.raises(ValueError, match="positive"):
        vzb.set_balloon_target(queue, vm, 0)
    with pytest.raises(vzkit.ConfigError, match=r"127 MiB is below .* \(128 MiB\)"):
        vzb.set_balloon_target(queue, vm, 127 / 1024)  # the seed refuses it too
    assert vzb.get_balloon_info(queue, vm).target_gb * 1024 == 1264  # unchanged
    vzb.set_balloon_target(queue, vm, 128 / 1024)
    assert vzb.get_balloon_info(queue, vm).target_gb * 1024 == 128


def test_no_balloon_device(fake: FakeRuntime, tmp_path: Path, kernel: Path) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel, balloon=False)
    assert vzb.get_balloon_info(queue, vm) == vzkit.BalloonInfo(False, 0.0, 128)
    with pytest.raises(vzkit.UnsupportedError, match="no memory balloon"):
        vzb.set_balloon_target(queue, vm, 0.5)


def test_save_and_restore_machine_state(fake: FakeRuntime, tmp_path: Path, kernel: Path) -> None:
    queue, vm, config, cfg = make_vm(tmp_path, kernel)
    vzb.validate_save_restore_support(config)
    finish(vzb.start_vm(queue, vm))
    state_file = tmp_path / "vm.vzstate"
    error = finish(vzb.save_machine_state(queue, vm, state_file))
    assert isinstance(error, vzkit.StateError)  # must be paused first
    finish(vzb.pause_vm(queue, vm))
    assert finish(vzb.save_machine_state(queue, vm, state_file)) is None
    assert state_file.is_file()
    # Restore into a fresh VM built from the same config (same state dir: same machine id).
    config2 = vzb.build_linux_vm_config(cfg)
    queue2 = vzb.Queue("test.vm2")
    vm2 = vzb.create_vm(config2, queue2)
    assert finish(vzb.restore_machine_state(queue2, vm2, state_file)) is None
    assert vzb.vm_state(queue2, vm2) is vzkit.VMState.PAUSED
    # A different config (another CPU count) cannot take that state.
    other = vzb.build_linux_vm_config(cfg.replace(cpus=4))
    queue3 = vzb.Queue("test.vm3")
    vm3 = vzb.create_vm(other, queue3)
    error = finish(vzb.restore_machine_state(queue3, vm3, state_file))
    assert isinstance(error, vzkit.SnapshotError)
    assert "does not match" in str(error)


def test_save_restore_support_is_checked(fake: FakeRuntime, tmp_path: Path, kernel: Path) -> None:
    _, _, config, _ = make_vm(tmp_path, kernel)
    fake.knobs.save_restore_supported = False
    with pytest.raises(vzkit.UnsupportedError, match="cannot be saved"):
        vzb.validate_save_restore_support(config)


@pytest.mark.parametrize(
    ("macos", "arch", "message"),
    [
        ("13.5", "arm64", r"needs macOS 14\.0 or later \(this is macOS 13\.5\)"),
        ("15.0", "x86_64", r"needs Apple silicon"),
    ],
)
def test_save_restore_gated_by_version_and_arch(
    make_fake: FakeFactory, tmp_path: Path, kernel: Path, macos: str, arch: str, message: str
) -> None:
    make_fake(macos=macos, arch=arch)
    arch_name = "aarch64" if arch == "arm64" else "x86_64"
    queue, vm, config, _ = make_vm(tmp_path, kernel, arch=arch_name)
    with pytest.raises(vzb.MacOSVersionError, match=message):
        vzb.validate_save_restore_support(config)
    with pytest.raises(vzb.MacOSVersionError, match=message):
        vzb.save_machine_state(queue, vm, tmp_path / "x")
    with pytest.raises(vzb.MacOSVersionError, match=message):
        vzb.restore_machine_state(queue, vm, tmp_path / "x")


def _disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(1 << 20)
        fh.write(b"saved-content")
    return disk


def test_snapshot_save_and_restore_with_the_catalogue(
    fake: FakeRuntime, tmp_path: Path, kernel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vz code path saves through vzkit's one store, and what it wrote reads back with the
    shared reader: format, machine description, the captured disk and both checksums."""
    commits: list[str] = []
    real_commit = SnapshotStore.commit

    def commit(self: SnapshotStore, record: SnapshotRecord, *args: Any) -> None:
        commits.append(record.backend)
        real_commit(self, record, *args)

    monkeypatch.setattr(SnapshotStore, "commit", commit)
    disk = _disk(tmp_path)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, disk_path=disk, state_dir=tmp_path / "state")
    manager = vzkit.SnapshotManager(tmp_path / "vmdir")
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        with pytest.raises(vzkit.StateError, match="cannot save a VM that is stopped"):
            manager.save(vm, "s1")
        vm.start(timeout=TIMEOUT)
        meta = manager.save(vm, "s1", timeout=TIMEOUT, progress=lambda done, total: None)
        assert vm.state is vzkit.VMState.RUNNING  # paused, saved, resumed
    assert commits == ["vz"]
    assert meta.name == "s1"
    assert meta.vm_state == "running"
    sdir = manager.snapshot_dir
    assert not [p for p in sdir.iterdir() if p.name.startswith(".")]
    # the shared reader: the JSON parses as a record, and the store's checks pass
    raw = json.loads(manager.meta_path("s1").read_text())
    record = SnapshotRecord.from_json("s1", raw)
    assert SnapshotStore(sdir).checked("s1") == (meta, record)
    assert (record.format, record.backend, record.agent) == (FORMAT, "vz", False)
    assert record.info.items() == {"arch": cfg.arch.value, "machine": "linux"}
    (captured,) = record.disks
    assert (captured.role, captured.format, captured.source) == (
        "disk0",
        vzkit.DiskFormat.RAW,
        str(disk.resolve()),
    )
    assert (sdir / captured.file).read_bytes() == disk.read_bytes()
    opened = SnapshotStore(sdir).open_members(record, None, threading.Event())  # sizes
    try:
        check_digests(opened, "s1", threading.Event())  # and checksums
    finally:
        opened.close()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in sdir.iterdir()} == {
        "s1.vmstate": 0o400,
        "s1.json": 0o600,
        captured.file: 0o400,
    }
    assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
    # restore into a fresh VM: the captured disk comes back over the config's disk
    with open(disk, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"changed-after")
    vm2 = vzkit.VirtualMachine(cfg, backend=vzb.BACKEND)
    vm3 = vzkit.VirtualMachine(cfg.replace(state_dir=tmp_path / "s3"), backend=vzb.BACKEND)
    with vm2, vm3:
        assert manager.restore(vm2, "s1", timeout=TIMEOUT) == meta
        assert vm2.state is vzkit.VMState.PAUSED
        assert disk.read_bytes() == (sdir / captured.file).read_bytes()
        with pytest.raises(vzkit.StateError, match="needs a stopped VM"):
            manager.restore(vm2, "s1")
        with pytest.raises(vzkit.UnsupportedError, match="several running VMs") as info:
            manager.restore(vm3, "s1")  # VZ: one machine identity, no fan-out
        assert info.value.feature == "snapshot-fanout"
        with pytest.raises(vzkit.SnapshotError, match="no snapshot named 'nope'"):
            manager.restore(vm3, "nope")
        vm2.resume(timeout=TIMEOUT)
        assert vm2.state is vzkit.VMState.RUNNING


def test_failed_snapshot_save_leaves_nothing_and_resumes(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel, disk_path=_disk(tmp_path), state_dir=tmp_path / "state"
    )
    manager = vzkit.SnapshotManager(tmp_path / "vmdir")
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=TIMEOUT)
        fake.fail_next(
            "saveMachineStateToURL:completionHandler:", code=11, description="Disk full."
        )
        with pytest.raises(vzkit.SnapshotError, match="Disk full"):
            manager.save(vm, "s1")
        assert manager.list() == []
        assert list(manager.snapshot_dir.iterdir()) == []
        assert vm.state is vzkit.VMState.RUNNING


# -- plumbing: queues, handlers, run loops, NSError, NSData ------------------------------------


def test_queue_sync_returns_raises_and_reenters(fake: FakeRuntime) -> None:
    from .fakeobjc import current_queue

    queue = vzb.Queue("test.q")
    assert queue.sync(lambda: 41 + 1) == 42
    with pytest.raises(KeyError):
        queue.sync(lambda: {}["missing"])
    assert queue.sync(lambda: current_queue() is queue.queue)
    assert queue.sync(lambda: queue.sync(lambda: "inner")) == "inner"  # no deadlock
    assert queue.sync(queue.is_current)
    assert not queue.is_current()
    wrapped = vzb.Queue.wrap(queue.queue)
    assert wrapped.queue is queue.queue


def test_completion_handlers_run_by_the_framework_may_ask_the_vm(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    """A completion callback runs in the framework's block on the VM queue: asking the VM's
    state there runs inline (a dispatch_sync onto the queue it runs on would trap)."""
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    seen: list[object] = []

    def on_started(error: Exception | None) -> None:
        seen.append(queue.is_current())
        seen.append(vzb.vm_state(queue, vm))
        seen.append(vzb.can_stop(queue, vm))

    assert finish(vzb.start_vm(queue, vm, on_started)) is None
    fake.settle()
    assert seen == [True, vzkit.VMState.RUNNING, True]
    assert fake.violations == []


def test_delegate_callbacks_run_by_the_framework_may_ask_the_vm(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    seen: list[object] = []
    stopped = threading.Event()

    def on_stop() -> None:
        seen.append(vzb.vm_state(queue, vm))
        seen.append(vzb.can_start(queue, vm))
        stopped.set()

    delegate = vzb.retain(vm_delegate(on_stop, lambda error: None))
    queue.sync(lambda: vm.setDelegate_(delegate))
    finish(vzb.start_vm(queue, vm))
    guest_power_off(fake, vm)
    assert stopped.wait(TIMEOUT)
    assert seen == [vzkit.VMState.STOPPED, True]
    assert fake.violations == []


def test_is_current_only_on_its_own_queue(fake: FakeRuntime) -> None:
    import dispatch  # the stand-in's

    queue, other = vzb.Queue("test.own"), vzb.Queue("test.own")  # one label, two queues
    wrapped = vzb.Queue.wrap(queue.queue)
    seen: dict[str, bool] = {}
    done = threading.Event()

    def framework_block() -> None:  # not dispatched through a vzkit Queue
        seen.update(own=queue.is_current(), wrapped=wrapped.is_current())
        seen.update(other=other.is_current())
        done.set()

    dispatch.dispatch_async(queue.queue, framework_block)
    assert done.wait(TIMEOUT)
    assert seen == {"own": True, "wrapped": True, "other": False}
    assert other.sync(lambda: queue.is_current()) is False
    assert not queue.is_current()


def test_queue_async_logs_failures(fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    queue = vzb.Queue("test.async")
    ran = threading.Event()

    def work() -> None:
        ran.set()
        raise ValueError("async bug")

    queue.async_(work)
    assert ran.wait(TIMEOUT)
    fake.settle()
    assert "async bug" in caplog.text


def test_error_completion_handler_contract(fake: FakeRuntime) -> None:
    handler = vzb.ErrorCompletionHandler("thing")
    assert not handler.done
    assert handler.error is None
    assert handler.wait(0.01) is False
    seen: list[object] = []
    handler.add_done_callback(lambda h: seen.append(h.error))
    err = fake.nserror("VZErrorDomain", 4, "Bad transition.")
    handler.block(err)
    handler.block(None)  # a second call is ignored, not raised
    assert handler.wait(0)
    assert handler.done
    assert handler.error is err
    assert seen == [err]
    late: list[object] = []
    handler.add_done_callback(lambda h: late.append(h.error))
    assert late == [err]


def test_run_loop_helpers_drain_the_main_queue(fake: FakeRuntime) -> None:
    import dispatch

    assert vzb.run_run_loop_once() == vzb.RUN_LOOP_RUN_TIMED_OUT
    done: list[int] = []
    dispatch.dispatch_async(dispatch.dispatch_get_main_queue(), lambda: done.append(1))
    ticks: list[int] = []
    assert vzb.run_run_loop_until_done(lambda: bool(done), lambda: ticks.append(1), timeout=5)
    assert done == [1]
    assert ticks
    assert vzb.run_run_loop_until_done(lambda: False, timeout=0.02) is False
    dispatch.dispatch_async(dispatch.dispatch_get_main_queue(), lambda: done.append(2))
    vzb.run_run_loop_aggressively()
    assert done == [1, 2]
    assert vzb.run_run_loop_once() == vzb.RUN_LOOP_RUN_TIMED_OUT


def test_nserror_helpers(fake: FakeRuntime) -> None:
    inner = fake.nserror("NSPOSIXErrorDomain", 28, "No space left on device")
    err = fake.nserror(
        "VZErrorDomain",
        11,
        "Failed to save.",
        reason="The disk is full.",
        suggestion="Free some space.",
        underlying=[inner],
    )
    assert vzb.extract_nserror_message(err) == "Failed to save."
    assert vzb.extract_nserror_message(None) == ""
    text = vzb.format_nserror_detailed(err)
    assert text.splitlines()[:4] == [
        "Error Domain=VZErrorDomain Code=11",
        "  Description: Failed to save.",
        "  Failure reason: The disk is full.",
        "  Recovery suggestion: Free some space.",
    ]
    assert "  Underlying error:\n    Error Domain=NSPOSIXErrorDomain Code=28" in text
    assert vzb.format_nserror_detailed(None) == ""
    out = io.StringIO()
    vzb.print_nserror_detailed(err, file=out)
    assert out.getvalue() == text + "\n"


@pytest.mark.parametrize(
    ("domain", "code", "expected"),
    [
        ("VZErrorDomain", 2, vzkit.ConfigError),
        ("VZErrorDomain", 3, vzkit.StateError),
        ("VZErrorDomain", 4, vzkit.StateError),
        ("VZErrorDomain", 5, vzkit.ConfigError),
        ("VZErrorDomain", 10, vzkit.UnsupportedError),
        ("VZErrorDomain", 11, vzkit.SnapshotError),
        ("VZErrorDomain", 12, vzkit.SnapshotError),
        ("VZErrorDomain", 1, vzkit.VMError),
        ("NSPOSIXErrorDomain", 54, ConnectionRefusedError),
        ("NSPOSIXErrorDomain", 61, ConnectionRefusedError),
        ("NSCocoaErrorDomain", 260, vzkit.VMError),
    ],
)
def test_nserror_mapping(fake: FakeRuntime, domain: str, code: int, expected: type) -> None:
    from vzkit.backends.vz._nserror import nserror_to_exception

    exc = nserror_to_exception(fake.nserror(domain, code, "boom"), "do it")
    assert type(exc) is expected
    assert "do it: boom" in str(exc)
    assert isinstance(exc.__cause__, vzb.NSErrorDetails)


def test_nsdata_round_trip_and_retain(fake: FakeRuntime) -> None:
    data = vzb.nsdata_from_bytes(b"\x00vz\xff")
    assert vzb.nsdata_to_bytes(data) == b"\x00vz\xff"
    assert vzb.nsdata_to_bytes(vzb.nsdata_from_bytes(b"")) == b""
    assert vzb.nsdata_to_bytes(None) == b""
    import weakref

    class Thing:
        pass

    thing = Thing()
    ref = weakref.ref(thing)
    assert vzb.retain(thing) is thing
    del thing
    assert ref() is not None
    vzb.release(ref())
    assert ref() is None


def test_state_names_match_vmstate(fake: FakeRuntime, tmp_path: Path, kernel: Path) -> None:
    queue, vm, _, _ = make_vm(tmp_path, kernel)
    assert state_name(fake, vm) == "Stopped"
    finish(vzb.start_vm(queue, vm))
    guest_power_off(fake, vm)
    fake.settle()
    assert vzb.vm_state(queue, vm) is vzkit.VMState.STOPPED


def test_a_root_disk_snapshot_captures_the_vms_own_layer(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    """vz: the root disk's layer (the VM's own copy of the base) is captured as a whole raw
    image (role ``root``), the base recorded by digest, and a restore copies it back as the
    restored VM's layer; the base is never written, and another base is refused."""
    base = _disk(tmp_path)
    base_bytes = base.read_bytes()
    digest = "sha256:" + "12" * 32
    root = vzkit.RootDisk(base=base, digest=digest)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, root_disk=root, state_dir=tmp_path / "state")
    manager = vzkit.SnapshotManager(tmp_path / "vmdir")
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=TIMEOUT)
        layer = tmp_path / "state" / "root-layer.img"
        with open(layer, "r+b") as fh:  # what the guest wrote into its own layer
            fh.seek(2 << 20)
            fh.write(b"written-by-the-guest")
        manager.save(vm, "r", timeout=TIMEOUT)
        written = layer.read_bytes()
    record = SnapshotRecord.from_json("r", json.loads(manager.meta_path("r").read_text()))
    assert record.format == 4
    assert record.root is not None
    assert (record.root.base, record.root.digest) == (str(base.resolve()), digest)
    (captured,) = record.disks
    assert (captured.role, captured.format) == ("root", vzkit.DiskFormat.RAW)
    image = manager.snapshot_dir / captured.file
    assert image.read_bytes() == written
    assert stat.S_IMODE(image.stat().st_mode) == 0o400
    assert not layer.exists()  # deleted at close
    # The same state dir: VZ ties a saved state to its disks' paths (the stand-in refuses
    # another), and the layer's path is in the state dir.
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm2:
        manager.restore(vm2, "r", timeout=TIMEOUT)
        assert vm2.state is vzkit.VMState.PAUSED
        assert layer.read_bytes() == written  # the snapshot's layer, not a fresh clone
        assert stat.S_IMODE(layer.stat().st_mode) == 0o600
        vm2.resume(timeout=TIMEOUT)
    assert base.read_bytes() == base_bytes
    other = cfg.replace(
        root_disk=vzkit.RootDisk(base=base, digest="sha256:" + "34" * 32),
        state_dir=tmp_path / "other",
    )
    with vzkit.VirtualMachine(other, backend=vzb.BACKEND) as vm3:
        with pytest.raises(vzkit.SnapshotError, match="saved on the root disk base"):
            manager.restore(vm3, "r", timeout=TIMEOUT)
        assert not (tmp_path / "other" / "root-layer.img").exists()


def test_a_kept_root_layer_outlives_the_vm_and_takes_a_snapshots_content(
    fake: FakeRuntime, tmp_path: Path, kernel: Path
) -> None:
    """vz, ``RootDisk.layer``: the VM's copy of the base is made at the kept path at the
    first start and attached there, left at close, reused (not cloned again) by the next VM
    of the same config, captured by a save, and given the snapshot's content by a restore."""
    base = _disk(tmp_path)
    base_bytes = base.read_bytes()
    kept = tmp_path / "vm" / "root.img"
    kept.parent.mkdir()
    root = vzkit.RootDisk(base=base, digest="sha256:" + "12" * 32, layer=kept)
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, root_disk=root, state_dir=tmp_path / "state")
    manager = vzkit.SnapshotManager(tmp_path / "vmdir")

    def write(data: bytes) -> None:  # what the guest writes into its layer
        with open(kept, "r+b") as fh:
            fh.seek(3 << 20)
            fh.write(data)

    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=TIMEOUT)
        machine: Any = vm._core.machine
        disks = machine._vz_config.storageDevices()
        assert str(disks[0].attachment().URL().path()) == str(kept)
        assert kept.read_bytes() == base_bytes
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert not (tmp_path / "state" / "root-layer.img").exists()
        write(b"first-run")
        vm.stop(timeout=TIMEOUT)
    assert kept.exists()  # never deleted by vzkit
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=TIMEOUT)
        assert kept.read_bytes()[3 << 20 : (3 << 20) + 9] == b"first-run"  # not cloned again
        write(b"saved-run")
        manager.save(vm, "k", timeout=TIMEOUT)
        saved = kept.read_bytes()
        write(b"later-run")
    record = SnapshotRecord.from_json("k", json.loads(manager.meta_path("k").read_text()))
    (captured,) = record.disks
    assert (manager.snapshot_dir / captured.file).read_bytes() == saved
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        manager.restore(vm, "k", timeout=TIMEOUT)
        assert kept.read_bytes() == saved  # the snapshot's content, at the kept path
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        vm.resume(timeout=TIMEOUT)
    assert kept.read_bytes() == saved
    assert base.read_bytes() == base_bytes
    gone = cfg.replace(root_disk=vzkit.RootDisk(base=base, layer=tmp_path / "no-dir" / "r.img"))
    with (
        vzkit.VirtualMachine(gone, backend=vzb.BACKEND) as vm,
        pytest.raises(vzkit.ConfigError, match="does not exist: create it"),
    ):
        vm.start(timeout=TIMEOUT)
