"""The vz backend on real macOS and Virtualization.framework (skipped only off macOS).

What needs no guest runs on every Mac: the backend loads, configs build and validate with
the real framework, a VM is created and refuses a bogus kernel cleanly. Booting a guest
needs a Linux kernel (and initramfs) for this Mac's architecture: set ``VZKIT_VZ_KERNEL``
(and ``VZKIT_VZ_INITRD``), e.g. one built by ``vzkit.guest.build_guest`` on Linux. The
interpreter must carry the ``com.apple.security.virtualization`` entitlement.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

import vzkit

pytestmark = [
    pytest.mark.macos,
    pytest.mark.skipif(sys.platform != "darwin", reason="needs macOS (Virtualization.framework)"),
]

READY = b"VZKIT-GUEST-READY"


def _guest(tmp_path: Path, **kw: object) -> vzkit.LinuxVMConfig:
    kernel = os.environ.get("VZKIT_VZ_KERNEL")
    if not kernel:
        pytest.skip("set VZKIT_VZ_KERNEL (and VZKIT_VZ_INITRD) to boot a guest")
    initrd = os.environ.get("VZKIT_VZ_INITRD") or None
    return vzkit.LinuxVMConfig(
        kernel_path=kernel,
        initrd_path=initrd,
        cmdline="console=hvc0 panic=-1",
        memory_gb=0.5,
        state_dir=tmp_path / "state",
        **kw,  # type: ignore[arg-type]
    )


def _wait_for(path: Path, marker: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and marker in path.read_bytes():
            return True
        time.sleep(0.2)
    return False


def test_backend_loads() -> None:
    from vzkit.backends import load_backend

    backend = load_backend("vz")
    assert backend.name == "vz"


def test_config_builds_and_validates_with_the_real_framework(tmp_path: Path) -> None:
    from vzkit.backends import vz

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    disk = vzkit.create_disk_image(tmp_path / "disk.img", 1)
    share = tmp_path / "share"
    share.mkdir()
    cfg = vzkit.LinuxVMConfig(
        kernel_path=kernel,
        disk_path=disk,
        state_dir=tmp_path / "state",
        volumes=(vzkit.VolumeMount(share, "share"),),
    )
    config = vz.build_linux_vm_config(cfg)
    vz.validate_config(config)
    assert (tmp_path / "state" / "linux-machine.id").stat().st_size > 0
    queue = vz.Queue("e2e")
    vm = vz.create_vm(config, queue)
    assert vz.vm_state(queue, vm) is vzkit.VMState.STOPPED
    handler = vz.start_vm(queue, vm)
    assert handler.wait(30)
    if handler.error is None:  # a zero-filled "kernel" may still start and then fail
        vz.stop_vm(queue, vm).wait(30)


def test_boot_pause_resume_stop(tmp_path: Path) -> None:
    cfg = _guest(tmp_path)
    with vzkit.VirtualMachine(cfg, backend="vz") as vm:
        vm.start(timeout=60)
        assert _wait_for(vm.console_log_path, READY, 60)  # type: ignore[arg-type]
        vm.pause(timeout=30)
        vm.resume(timeout=30)
        vm.balloon.set_target_gb(0.375)
        assert vm.balloon.info().has_balloon
        vm.stop(timeout=30)
        assert vm.state is vzkit.VMState.STOPPED


def test_vsock_refused_port(tmp_path: Path) -> None:
    cfg = _guest(tmp_path)
    with vzkit.VirtualMachine(cfg, backend="vz") as vm:
        vm.start(timeout=60)
        assert _wait_for(vm.console_log_path, READY, 60)  # type: ignore[arg-type]
        machine = vm._core.machine
        with pytest.raises(ConnectionRefusedError):
            machine.vsock.connect(4999, timeout=10)  # type: ignore[attr-defined]
        listener = machine.vsock.listen(5000)  # type: ignore[attr-defined]
        listener.close()
        assert isinstance(socket.socket, type)
