"""Test harness, guest side: stream sockets on the fake driver, and a started device with a
fake driver attached (:func:`attached`)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vzkit.backends.qemu.vhost_vsock._device import VhostUserVsockDevice
from vzkit.backends.qemu.vhost_vsock._packet import Op

from .fakedriver import FakeDriver, Packet

__all__ = ["GuestConn", "attached"]


@contextlib.contextmanager
def attached(
    uds_path: Path | str,
    *,
    setup: bool = True,
    post_rx: bool = True,
    driver: dict[str, Any] | None = None,
    **device_kwargs: Any,
) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    """A started device (on its thread) with a fake driver attached over a socketpair.

    The device's polling safety net is off unless asked for, so only correct kick and call
    handling lets a test pass.
    """
    device_kwargs.setdefault("poll_interval_s", None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = VhostUserVsockDevice(uds_path, vhost_socket=ours, **device_kwargs)
    fake = FakeDriver(theirs, guest_cid=device.guest_cid, **(driver or {}))
    try:
        device.start()
        if setup:
            fake.setup()
            if post_rx:
                fake.post_rx()
        yield device, fake
    finally:
        fake.close()
        device.close()


class GuestConn:
    """A guest-side stream socket on the fake driver: credit-aware send, buffered receive.

    Packets the device sends for ``(guest_port, host_port)`` are routed here by
    :meth:`FakeDriver.poll_rx`. Received payload counts as consumed at once (``fwd_cnt``)
    unless ``reading`` is False, like an application that stops reading; a credit update
    goes out when the host's view of our free space falls to half.
    """

    def __init__(
        self, driver: FakeDriver, guest_port: int, host_port: int, buf_alloc: int = 256 * 1024
    ) -> None:
        self.driver = driver
        self.guest_port = guest_port
        self.host_port = host_port
        self.buf_alloc = buf_alloc
        self.received = bytearray()  # everything received (never trimmed)
        self.pos = 0  # how far recv_exactly() has read
        self.consumed = 0
        self.advertised = 0
        self.reading = True
        self.window: int | None = None  # bound on the credit we use (None: all of it)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shutdown = 0
        self.reset = False
        self.packets: list[Packet] = []
        driver.conns[(guest_port, host_port)] = self

    def on_packet(self, packet: Packet) -> None:
        self.packets.append(packet)
        self.peer_buf_alloc, self.peer_fwd_cnt = packet.buf_alloc, packet.fwd_cnt
        if packet.op == Op.RW:
            self.received += packet.payload
            if self.reading:
                self.consume()
        elif packet.op == Op.SHUTDOWN:
            self.peer_shutdown |= packet.flags
        elif packet.op == Op.RST:
            self.reset = True
        elif packet.op == Op.CREDIT_REQUEST:
            self.credit_update()

    def consume(self) -> None:
        self.consumed = len(self.received)
        if (len(self.received) - self.advertised) * 2 >= self.buf_alloc:
            self.credit_update()

    def credit_update(self) -> None:
        self.control(Op.CREDIT_UPDATE)

    def control(self, op: Op, flags: int = 0) -> None:
        self.driver.send(op, self.guest_port, self.host_port, flags=flags,
                         buf_alloc=self.buf_alloc, fwd_cnt=self.consumed)  # fmt: skip
        self.advertised = self.consumed

    def credit(self) -> int:
        """What we may send. Like Linux, a ``window`` may bound it below the peer's buf_alloc."""
        window = (
            self.peer_buf_alloc if self.window is None else min(self.window, self.peer_buf_alloc)
        )
        return window - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)

    def send(self, data: bytes, timeout: float = 10.0, chunk: int = 64 * 1024) -> None:
        """Send ``data`` as RW packets, never beyond the device's credit."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            room = min(self.credit(), chunk, len(view))
            if room <= 0:
                if time.monotonic() > deadline:
                    raise TimeoutError("no credit from the device")
                self.driver.tx.wait_call(0.01)
                self.driver.tx.reclaimed += self.driver.tx.used_entries()
                self.driver.rx.wait_call(0.01)
                self.driver.poll_rx()
                continue
            self.driver.send(Op.RW, self.guest_port, self.host_port, bytes(view[:room]),
                             buf_alloc=self.buf_alloc, fwd_cnt=self.consumed)  # fmt: skip
            self.advertised = self.consumed
            self.tx_cnt = (self.tx_cnt + room) & 0xFFFFFFFF
            view = view[room:]
            self.driver.poll_rx()

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met on {self.guest_port}/{self.host_port}")
            self.driver.rx.wait_call(0.02)
            self.driver.poll_rx()

    def recv_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        self.wait(lambda: len(self.received) - self.pos >= n or self.reset, timeout)
        data = bytes(self.received[self.pos : self.pos + n])
        self.pos += len(data)
        return data

    def close(self) -> None:
        del self.driver.conns[(self.guest_port, self.host_port)]
