"""The core owns every guard: the same wrong-state call refuses the same way on every backend.

Each scenario runs behind the facade against both backends' real machines: the qemu one over
a stand-in QEMU that speaks QMP (``test_vm_facade.FAKE_QEMU``), the vz one over the strict
PyObjC stand-in of the contract tests (macOS 15 on Apple silicon). Both must raise the same
exception class with the same sentence, in the same order, and end in the same states. A
machine with a guard of its own (another class or sentence) fails this test.

Also here: the backend protocols are small and structural (both machines implement every
capability their backend declares, with the protocols' parameter names), and a backend that
declares a feature its machine lacks is refused with UnsupportedError, not an AttributeError.
"""

from __future__ import annotations

import inspect
import platform
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit._vmcore import _GUARDS, core_of
from vzkit.backends import (
    AgentStream,
    BalloonCapable,
    Feature,
    Machine,
    SnapshotCapable,
    StateListener,
    VsockCapable,
)
from vzkit.backends._protocol import MacBackend
from vzkit.backends.qemu import BACKEND as QEMU
from vzkit.backends.qemu._machine import QemuMachine
from vzkit.backends.vz import BACKEND as VZ
from vzkit.backends.vz import VzMachine

from ..contract._support import API, ARM64_IMAGE
from ..contract.fakeobjc import FakeRuntime, installed
from .test_vm_facade import FAKE_QEMU

Outcome = tuple[str, str, str]  # (call, exception class or "ok", message)
S = vzkit.VMState


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(ARM64_IMAGE)  # the vz backend reads its header; qemu is faked
    return path


@pytest.fixture
def qemu_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    monkeypatch.setenv("VZKIT_QEMU_X86_64", str(script))
    monkeypatch.setenv("FAKE_QEMU_MODE", "obedient")


@pytest.fixture
def vz_stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    rt = FakeRuntime(API, macos="15.0", arch="arm64")
    with installed(rt):
        monkeypatch.setattr(platform, "mac_ver", lambda *a, **k: ("15.0", ("", "", ""), "arm64"))
        monkeypatch.setattr(platform, "machine", lambda: "arm64")
        yield rt
    assert rt.violations == [], "the vz machine broke the API contract"


def _config(kernel: Path, state_dir: Path, arch: str = "x86_64", **kw: Any) -> vzkit.LinuxVMConfig:
    return vzkit.LinuxVMConfig(
        arch=arch,  # type: ignore[arg-type]
        kernel_path=kernel,
        memory_gb=0.5,
        state_dir=state_dir,
        **kw,
    )


def _try(out: list[Outcome], call: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except vzkit.VzkitError as err:
        out.append((call, type(err).__name__, str(err)))
    else:
        out.append((call, "ok", ""))


def _scenario(backend: object, arch: str, kernel: Path, tmp_path: Path) -> list[Outcome]:
    """Every guarded call in a state that refuses it, on a stopped, running, paused and
    closed VM; the transitions in between must work."""
    out: list[Outcome] = []
    snapshots = vzkit.SnapshotManager(tmp_path / "vm")

    # A stopped VM with every device: nothing but start (and the harmless stop) may run.
    cfg = _config(kernel, tmp_path / "stopped", arch, vsock=True)
    vm = vzkit.VirtualMachine(cfg, backend=backend)  # type: ignore[arg-type]
    _try(out, "pause", vm.pause)
    _try(out, "resume", vm.resume)
    _try(out, "request_stop", vm.request_stop)
    _try(out, "balloon", lambda: vm.balloon.set_target_gb(0.25))
    _try(out, "vsock_connect", lambda: vm.vsock.connect(5000, timeout=1))
    _try(out, "vsock_listen", lambda: vm.vsock.listen(5000))
    _try(out, "agent", lambda: vm.guest.run(["true"]))
    _try(out, "snapshot_save", lambda: snapshots.save(vm, "s"))
    _try(out, "stop", vm.stop)
    out.append(("state", vm.state.value, ""))
    vm.close()
    _try(out, "start", vm.start)
    _try(out, "pause", vm.pause)
    _try(out, "vsock_connect", lambda: vm.vsock.connect(5000, timeout=1))
    _try(out, "agent", lambda: vm.guest.run(["true"]))
    _try(out, "snapshot_restore", lambda: snapshots.restore(vm, "s"))

    # A running VM, then a paused one (no vsock device: its refusal is a feature's).
    cfg = _config(kernel, tmp_path / "running", arch, vsock=False)
    with vzkit.VirtualMachine(cfg, backend=backend) as vm:  # type: ignore[arg-type]
        _try(out, "start", lambda: vm.start(timeout=30))
        _try(out, "start", vm.start)
        _try(out, "resume", vm.resume)
        _try(out, "vsock_connect", lambda: vm.vsock.connect(5000, timeout=1))
        _try(out, "snapshot_restore", lambda: snapshots.restore(vm, "s"))
        _try(out, "pause", lambda: vm.pause(timeout=30))
        _try(out, "pause", vm.pause)
        _try(out, "start", vm.start)
        _try(out, "request_stop", vm.request_stop)
        _try(out, "snapshot_restore", lambda: snapshots.restore(vm, "s"))
        out.append(("state", vm.state.value, ""))
        _try(out, "resume", lambda: vm.resume(timeout=30))
        _try(out, "stop", lambda: vm.stop(timeout=30))
        out.append(("state", vm.state.value, ""))
        _try(out, "resume", vm.resume)
    return out


EXPECTED: list[Outcome] = [
    ("pause", "StateError", "cannot pause a VM that is stopped"),
    ("resume", "StateError", "cannot resume a VM that is stopped (only a paused VM resumes)"),
    ("request_stop", "StateError", "cannot ask a VM that is stopped to stop (it must be running)"),
    ("balloon", "StateError", "the balloon needs a running VM (it is stopped)"),
    ("vsock_connect", "StateError", "vsock connect needs a running VM (it is stopped)"),
    ("vsock_listen", "StateError", "vsock listen needs a running VM (it is stopped)"),
    ("agent", "StateError", "the guest agent needs a running VM (it is stopped)"),
    (
        "snapshot_save",
        "StateError",
        "cannot save a VM that is stopped (it must be running or paused)",
    ),
    ("stop", "ok", ""),
    ("state", "stopped", ""),
    ("start", "StateError", "cannot start: the VM has been closed"),
    ("pause", "StateError", "cannot pause: the VM has been closed"),
    ("vsock_connect", "StateError", "vsock connect needs a running VM (it is closed)"),
    ("agent", "StateError", "the guest agent needs a running VM (it is closed)"),
    (
        "snapshot_restore",
        "StateError",
        "cannot save or restore a snapshot: the VM has been closed",
    ),
    ("start", "ok", ""),
    ("start", "StateError", "VM is already running"),
    ("resume", "StateError", "cannot resume a VM that is running (only a paused VM resumes)"),
    ("vsock_connect", "UnsupportedError", "this VM has no vsock device (config vsock=False)"),
    ("snapshot_restore", "StateError", "restoring a snapshot needs a stopped VM (it is running)"),
    ("pause", "ok", ""),
    ("pause", "StateError", "cannot pause a VM that is paused"),
    ("start", "StateError", "VM is already paused"),
    ("request_stop", "StateError", "cannot ask a VM that is paused to stop (it must be running)"),
    ("snapshot_restore", "StateError", "restoring a snapshot needs a stopped VM (it is paused)"),
    ("state", "paused", ""),
    ("resume", "ok", ""),
    ("stop", "ok", ""),
    ("state", "stopped", ""),
    ("resume", "StateError", "cannot resume a VM that is stopped (only a paused VM resumes)"),
]


def test_every_guard_of_the_table_is_exercised() -> None:
    assert {call for call, _, _ in EXPECTED} - {"state"} == set(_GUARDS)


def test_wrong_state_calls_refuse_the_same_on_both_backends(
    kernel: Path,
    tmp_path: Path,
    qemu_stand_in: None,
    vz_stand_in: FakeRuntime,
) -> None:
    # Each backend's host architecture (the stand-in QEMU is x86_64, the stand-in Mac arm64).
    on_qemu = _scenario(QEMU, "x86_64", kernel, tmp_path / "qemu")
    on_vz = _scenario(VZ, "aarch64", kernel, tmp_path / "vz")
    assert on_qemu == EXPECTED
    assert on_vz == EXPECTED


# -- the protocols ---------------------------------------------------------------------------

CAPABILITIES: dict[Feature, type] = {
    Feature.VSOCK: VsockCapable,
    Feature.BALLOON: BalloonCapable,
    Feature.SNAPSHOTS: SnapshotCapable,
}


def _members(protocol: type) -> dict[str, Any]:
    return {
        name: value
        for name, value in vars(protocol).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


def _names(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize(
    ("backend", "machine_cls"), [(QEMU, QemuMachine), (VZ, VzMachine)], ids=["qemu", "vz"]
)
def test_each_machine_implements_its_declared_capabilities_structurally(
    backend: Any, machine_cls: type, kernel: Path, tmp_path: Path
) -> None:
    """No base class: the lifecycle and each declared capability are met by name, with the
    protocols' parameter names (a renamed or reshaped method fails here)."""
    machine = machine_cls(_config(kernel, tmp_path / "m"), lambda old, new: None)
    wanted = [Machine, AgentStream] + [p for f, p in CAPABILITIES.items() if f in backend.features]
    for protocol in wanted:
        for name, member in _members(protocol).items():
            impl = inspect.getattr_static(machine_cls, name, None)
            if impl is None:
                impl = inspect.getattr_static(machine, name)  # an instance attribute
            if isinstance(member, property) or not callable(impl):
                continue
            assert _names(impl) == _names(member), f"{machine_cls.__name__}.{name}"
            assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(member), name
        if protocol is not Machine:  # runtime-checkable: the core's isinstance sees it
            assert isinstance(machine, protocol), protocol.__name__
    assert isinstance(backend, vzkit.backends.Backend)
    assert isinstance(backend, MacBackend) == (Feature.MACOS_GUESTS in backend.features)


class _Bare:
    """A lifecycle-only machine (no vsock, balloon, snapshots or agent)."""

    state = S.STOPPED
    pid = None
    console_log_path = None
    console_pty = None
    last_error = None

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    async def close(self) -> None:
        pass


class _Boasting:
    """Declares every feature; its machine has none of them."""

    name = "boasting"
    features = frozenset(Feature)

    def check_available(self) -> None:
        pass

    def create_machine(self, config: vzkit.LinuxVMConfig, on_state: StateListener) -> _Bare:
        return _Bare(config.state_dir or Path("."))


def test_a_declared_feature_the_machine_lacks_is_unsupported_not_an_attribute_error(
    kernel: Path, tmp_path: Path
) -> None:
    cfg = _config(kernel, tmp_path / "bare", vsock=True)
    with vzkit.VirtualMachine(cfg, backend=_Boasting()) as vm:  # type: ignore[arg-type]
        core = core_of(vm)
        for get, what in [
            (core.vsock_machine, "vsock (VsockCapable)"),
            (core.balloon_machine, "balloon (BalloonCapable)"),
            (core.snapshot_machine, "snapshots (SnapshotCapable)"),
            (core.agent_stream, "the guest agent (AgentStream)"),
        ]:
            with pytest.raises(vzkit.UnsupportedError) as info:
                get()
            assert str(info.value) == f"the boasting backend's machine does not implement {what}"
            assert info.value.backend == "boasting"
        with pytest.raises(vzkit.UnsupportedError, match="does not implement balloon"):
            vm.balloon.info()


def test_macos_guests_need_a_backend_that_boots_them(tmp_path: Path) -> None:
    mac = vzkit.MacVMConfig(vm_dir=tmp_path / "mac")
    with pytest.raises(vzkit.UnsupportedError) as info:
        vzkit.VirtualMachine(mac, backend=QEMU)
    assert str(info.value) == "macOS guests need the vz backend; the qemu backend cannot boot them"
    assert (info.value.backend, info.value.feature) == ("qemu", "macos-guests")


SRC = Path(vzkit.__file__).parent
#: A capability method called on the lifecycle machine, past the core's isinstance check.
_FAT_CALL = re.compile(
    r"(?:\bcore|\bself|_core)\.machine\."
    r"(vsock_connect|vsock_listen|set_balloon_target|balloon_info|snapshot_blockers"
    r"|snapshot_info|prepare_save|finish_save|save_state|capture_disks|restore_state"
    r"|agent_console|agent_vsock)\b"
)


def fat_calls(root: Path) -> list[str]:
    """``file:line`` of each capability call on the core's ``.machine`` outside the backends
    (a local ``machine`` is the narrowed capability the core handed out)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "backends" in path.relative_to(root).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _FAT_CALL.search(line):
                found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_outside_the_backends_capabilities_are_reached_through_the_core_checks() -> None:
    """``core.machine`` is the lifecycle only; vsock, balloon, snapshots and the agent stream
    go through ``core.vsock_machine()`` & co., which check the feature and the protocol."""
    assert fat_calls(SRC) == []


def test_the_rule_sees_a_fat_call(tmp_path: Path) -> None:
    (tmp_path / "x.py").write_text(
        "await core.machine.save_state(p, None)\n"
        "await core.snapshot_machine().save_state(p)\n"
        "return self._core.machine.agent_vsock()\n"
    )
    assert fat_calls(tmp_path) == ["x.py:1", "x.py:3"]


def test_a_backend_module_without_a_backend_object_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``load_backend`` checks ``BACKEND`` against the runtime-checkable protocol (no cast)."""
    import importlib

    from vzkit.backends import load_backend

    unavailable = vzkit.BackendUnavailableError  # vzkit's names load lazily, by importlib
    monkeypatch.setattr(importlib, "import_module", lambda *a: type("M", (), {"BACKEND": 1}))
    with pytest.raises(unavailable) as info:
        load_backend("qemu")
    assert str(info.value) == (
        "backend 'qemu' exports no BACKEND with name, features, check_available() and "
        "create_machine()"
    )
