"""A user-space vhost-user-vsock device for QEMU, with Firecracker's hybrid Unix sockets.

QEMU's ``vhost-user-vsock-pci`` (or ``vhost-user-vsock-device`` on virtio-mmio) hands the
vsock rx/tx virtqueues to :class:`VhostUserVsockDevice` over a vhost-user socket, so vsock
works without ``/dev/vhost-vsock``. Host programs reach guest port P by connecting to the
device's Unix socket and writing ``CONNECT P\\n`` (:func:`connect_hybrid`); guest connections
to host port P arrive at a Unix socket the host listens on at ``<uds>_P``
(:func:`guest_port_path`). See ``docs/vsock.md``.
"""

from ._conn import VsockStats
from ._device import VhostUserVsockDevice
from ._helper import helper_argv
from ._hybrid import (
    HandshakeError,
    connect_hybrid,
    guest_port_path,
    parse_connect_line,
    peer_port_from_address,
)

__all__ = [
    "HandshakeError",
    "VhostUserVsockDevice",
    "VsockStats",
    "connect_hybrid",
    "guest_port_path",
    "helper_argv",
    "parse_connect_line",
    "peer_port_from_address",
]
