"""The QEMU backend object: what it offers and how it makes a machine."""

from __future__ import annotations

import sys

from ..._config import LinuxVMConfig
from ..._state import host_arch
from .._protocol import Feature, StateListener
from ._discover import find_qemu
from ._machine import QemuMachine

__all__ = ["BACKEND", "QemuBackend"]


class QemuBackend:
    name = "qemu"
    #: vsock needs vhost (kernel or vhost-user), which QEMU offers on Linux hosts only.
    features = frozenset(
        {
            Feature.LIFECYCLE,
            Feature.BALLOON,
            Feature.SHARES,
            Feature.SNAPSHOTS,
            Feature.SNAPSHOT_FANOUT,
        }
        | ({Feature.VSOCK} if sys.platform == "linux" else set())
    )

    def check_available(self) -> None:
        find_qemu(host_arch())

    def create_machine(self, config: LinuxVMConfig, on_state: StateListener) -> QemuMachine:
        return QemuMachine(config, on_state)


BACKEND = QemuBackend()
