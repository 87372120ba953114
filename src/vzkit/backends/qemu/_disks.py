"""More disks (``LinuxVMConfig.disks``) on the qemu backend: one ``-blockdev`` and one
``-device`` each, after the main disk and the ISO.

The source is an image file in its stated format (:func:`~._argv.image_node`: no backing file
followed) or a network block device through QEMU's ``nbd`` driver (TCP or a Unix socket). Both
are JSON ``-blockdev`` definitions, so a path or an export name needs no ``,,`` escaping. The
bus is virtio-blk, an NVMe controller per disk (``nvme``, a serial number required), or USB
mass storage (``usb-storage`` on one ``qemu-xhci`` controller shared by the USB disks).
"""

from __future__ import annotations

import json

from ..._disk import DiskImage
from ..._storage import Disk, DiskBus, nbd_endpoint
from ...errors import UnsupportedError
from ._argv import Plan, image_node, virtio

__all__ = ["disk_blockdev", "more_disks_args", "more_disks_blocker"]

#: The xHCI controller the USB disks share (the display's keyboard and tablet use their own).
XHCI = "xhci0"


def _node(index: int) -> str:
    return f"xdisk{index}"


def disk_blockdev(disk: Disk, node: str) -> dict[str, object]:
    """The ``-blockdev`` definition of one disk, named ``node``."""
    if disk.url:
        where = nbd_endpoint(disk.url)
        server: dict[str, str] = (
            {"type": "unix", "path": where.socket}
            if where.socket
            else {"type": "inet", "host": where.host, "port": str(where.port)}
        )
        out: dict[str, object] = {"driver": "nbd", "node-name": node, "server": server}
        if where.export:
            out["export"] = where.export
        if disk.read_only:
            out["read-only"] = True
        return out
    assert disk.path is not None
    image = image_node(DiskImage(disk.path, disk.format), read_only=disk.read_only)
    return {"driver": image["driver"], "node-name": node, "cache": {"direct": False}, **image}


def _device(plan: Plan, disk: Disk, index: int) -> str:
    node = _node(index)
    if disk.bus is DiskBus.VIRTIO:
        return f"{virtio(plan, 'blk')},drive={node},id={node}-dev"
    if plan.machine == "microvm":
        raise UnsupportedError(
            f"the disk {disk.source!r} is on the {disk.bus.value} bus, which needs PCI; the "
            "microvm machine has none (use bus=virtio, or machine type 'q35')",
            backend="qemu",
            feature=f"disk-bus:{disk.bus.value}",
        )
    if disk.bus is DiskBus.NVME:
        return f"nvme,serial=vzkit{index},drive={node},id={node}-dev"
    return f"usb-storage,bus={XHCI}.0,drive={node},id={node}-dev,removable=off"


def more_disks_args(plan: Plan) -> list[str]:
    """Every disk of ``config.disks`` in order, with the xHCI controller before the first
    USB disk."""
    args: list[str] = []
    for index, disk in enumerate(plan.config.disks):
        device = _device(plan, disk, index)
        if disk.bus is DiskBus.USB and f"qemu-xhci,id={XHCI}" not in args:
            args += ["-device", f"qemu-xhci,id={XHCI}"]
        node = json.dumps(disk_blockdev(disk, _node(index)), separators=(",", ":"))
        args += ["-blockdev", node, "-device", device]
    return args


def more_disks_blocker(plan: Plan) -> str | None:
    """A save would keep the memory but not these disks' content: a restore would pair the
    guest's caches with disks that moved on."""
    names = [f"the disk {disk.source!r} (disks)" for disk in plan.config.disks]
    return ", ".join(names) or None
