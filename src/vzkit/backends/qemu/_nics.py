"""More NICs (``LinuxVMConfig.networks``) on the qemu backend: one ``-netdev``/``-device`` pair
each (``net1``, ``net2``, ...), after the first NIC, with the MAC kept for each in the state
directory (``Plan.nic_macs``).

The first NIC's ``nat`` is passt on Linux, which keeps the host's loopback services out of the
guest's reach; a further NIC has QEMU's own backends only, and QEMU's user-mode network lets
the guest reach the host's loopback at 10.0.2.2. So on Linux a further NIC is ``host-only``
(user-mode, restricted) or ``nat:host-loopback`` (user-mode, saying so); plain ``nat`` and
``bridged`` (qemu-bridge-helper, run by vzkit for the first NIC only) are refused there.
"""

from __future__ import annotations

from ..._network import NetworkConfig, NetworkMode
from ...errors import UnsupportedError
from ._argv import Plan, netdev, virtio

__all__ = ["more_networks_args"]


def _refuse_on_linux(net: NetworkConfig, index: int) -> None:
    if net.mode is NetworkMode.NAT and not net.host_loopback:
        raise UnsupportedError(
            f"NIC {index + 1} ('nat') would be QEMU's user-mode network, where the guest "
            "reaches the host's loopback services; only the first NIC gets passt's nat. "
            "Use 'nat:host-loopback' if that is meant, or 'host-only'",
            backend="qemu",
            feature="network:more-nat",
        )
    if net.mode is NetworkMode.BRIDGED:
        raise UnsupportedError(
            f"NIC {index + 1} ('{net}'): on Linux only the first NIC (network) can be bridged",
            backend="qemu",
            feature="network:more-bridged",
        )


def more_networks_args(plan: Plan) -> list[str]:
    """The NICs of ``config.networks`` in order; NIC ``i`` (1: the second) is ``net{i}``."""
    args: list[str] = []
    for index, net in enumerate(plan.config.networks, start=1):
        if plan.host_os != "darwin":
            _refuse_on_linux(net, index)
        ident = f"net{index}"
        backend = netdev(net.mode, net.interface, plan.host_os, ident)
        if backend is None:  # 'none' is refused by the config; nothing to add
            continue
        device = f"{virtio(plan, 'net')},netdev={ident},id={ident}-dev"
        if index <= len(plan.nic_macs):
            device += f",mac={plan.nic_macs[index - 1]}"
        args += ["-netdev", backend, "-device", device]
    return args
