"""Hot-plug of the vsock device over QMP: it is the one device QEMU cannot migrate
(vhost-vsock and vhost-user-vsock keep their state outside QEMU), so a snapshot saves without
it and a restored VM gets a fresh one.

On PCI machines the device sits behind its own ``pcie-root-port`` (``_argv.VSOCK_PORT``),
so it can be unplugged and plugged again; microvm has no PCI hot-plug, and a VM there cannot
be saved with vsock (:func:`migration_blocker`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ...errors import UnsupportedError, VMError
from . import _argv
from ._vsock import VsockTransport

__all__ = ["QmpLink", "migration_blocker", "plug", "unplug"]

#: QEMU's ids of the device and (user-space device) its chardev.
DEVICE_ID = "vsock0"
CHARDEV_ID = "vsock0-chr"
_POLL_S = 0.05


class QmpLink(Protocol):
    """What hot-plug needs from the machine's QMP connection."""

    async def execute(self, cmd: str, args: dict[str, object] | None = None) -> Any: ...

    def send_fd(self, fd: int) -> None: ...


def migration_blocker(machine: str) -> str | None:
    """Why a VM with a vsock device on ``machine`` cannot be saved, or None."""
    if machine == "microvm":
        return "the vsock device (microvm has no PCI hot-plug to unplug it around a save)"
    return None


async def unplug(vsock: VsockTransport, qmp: QmpLink, machine: str, timeout: float) -> None:
    """Unplug the device and stop it. The guest must acknowledge the unplug: at once with ACPI
    hot-plug (x86_64 q35), about 5 s later with PCIe native hot-plug (aarch64 ``virt``: the
    attention-button delay). Open connections end; listeners stay for the next device."""
    if not vsock.attached:
        return
    if machine == "microvm":
        raise UnsupportedError(
            "the vsock device cannot be unplugged on microvm (no PCI hot-plug)",
            backend="qemu",
            feature="snapshots",
        )
    await qmp.execute("device_del", {"id": DEVICE_ID})
    try:
        await asyncio.wait_for(_gone(qmp, vsock.kernel), timeout)
    except TimeoutError:
        raise VMError(
            f"the guest did not release its vsock device within {timeout:g} s "
            "(it must acknowledge the PCI unplug)"
        ) from None
    await vsock.stop_device()


async def _peripherals(qmp: QmpLink) -> set[str]:
    devices: list[dict[str, Any]] = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return {str(d.get("name")) for d in devices}


async def _gone(qmp: QmpLink, kernel: bool) -> None:
    """Wait until the unplugged device and its chardev are gone."""
    while DEVICE_ID in await _peripherals(qmp):
        await asyncio.sleep(_POLL_S)
    while not kernel:  # the device lets go of its chardev a moment after it left
        try:
            await qmp.execute("chardev-remove", {"id": CHARDEV_ID})
            return
        except VMError as err:
            if "busy" not in str(err):
                raise
        await asyncio.sleep(_POLL_S)


async def plug(vsock: VsockTransport, qmp: QmpLink) -> None:
    """Plug a fresh device into its port (after a save, or into a restored VM): the fd goes
    over the QMP socket (``getfd``), then ``device_add`` (and ``chardev-add`` for ours)."""
    if vsock.attached:
        return
    bus = {"bus": _argv.VSOCK_PORT}
    try:
        if not vsock.prepared:
            await vsock.prepare()
        if vsock.kernel:
            assert vsock.kernel_fd is not None
            qmp.send_fd(vsock.kernel_fd)
            await qmp.execute("getfd", {"fdname": "vsock0-vhostfd"})
            await qmp.execute("device_add", {
                "driver": "vhost-vsock-pci", "id": DEVICE_ID, "guest-cid": vsock.guest_cid,
                "vhostfd": "vsock0-vhostfd", **bus})  # fmt: skip
        else:
            assert vsock.qemu_fd is not None
            qmp.send_fd(vsock.qemu_fd)
            await qmp.execute("getfd", {"fdname": "vsock0-fd"})
            await qmp.execute("chardev-add", {
                "id": CHARDEV_ID,
                "backend": {"type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": "vsock0-fd"}}, "server": False}},
            })  # fmt: skip
            await qmp.execute("device_add", {
                "driver": "vhost-user-vsock-pci", "id": DEVICE_ID, "chardev": CHARDEV_ID,
                **bus})  # fmt: skip
        vsock.after_spawn()
        await vsock.wait_ready()
    except BaseException:
        await vsock.stop_device()
        raise
    vsock.attached = True
