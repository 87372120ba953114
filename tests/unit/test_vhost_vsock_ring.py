"""Split virtqueue handling and guest memory bounds: malformed descriptors never crash the
device nor make it touch memory outside the regions it was given."""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.backends.qemu.vhost_vsock import VhostUserVsockDevice
from vzkit.backends.qemu.vhost_vsock._memory import GuestMemory, GuestMemoryError, RegionSpec
from vzkit.backends.qemu.vhost_vsock._packet import HEADER, HEADER_SIZE, Op
from vzkit.backends.qemu.vhost_vsock._virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Virtqueue,
)

from ..support.polling import wait_until
from ..support.vhost_vsock.fakedriver import REGION_SIZE, SLOT, FakeDriver
from ..support.vhost_vsock.fakeguest import GuestConn, attached

U16 = struct.Struct("<H")


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def pair(uds: Path) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    with attached(uds) as pair:
        yield pair


@pytest.fixture
def indirect_pair(uds: Path) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    with attached(uds, driver={"indirect": True}) as pair:
        yield pair


def rst_header(src_port: int = 1024, dst_port: int = 52, length: int = 1) -> bytes:
    """A header that earns an RST (RW for an unknown connection): proof of processing."""
    return HEADER.pack(3, 2, src_port, dst_port, length, 1, Op.RW, 0, 4096, 0)


def publish_raw(fake: FakeDriver, head: int, descs: list[tuple[int, int, int, int]]) -> None:
    """Write descriptors ``(index, addr, len, flags, next)`` starting at ``head``, publish it."""
    for index, (addr, length, flags, nxt) in enumerate(descs):
        fake.tx.write_desc(head + index if index else head, addr, length, flags, nxt)
    fake.tx.free.remove(head)
    fake.tx.chains[head] = [head]
    fake.tx.publish(head)


def assert_alive(fake: FakeDriver, port: int = 1999) -> None:
    """The device still processes packets after the bad input."""
    fake.send(Op.RW, port, 52, b"x")
    fake.recv(ops=[Op.RST], timeout=5)
    deadline = time.monotonic() + 5
    while fake.tx.chains and time.monotonic() < deadline:
        fake.tx.reclaimed += fake.tx.used_entries()
        time.sleep(0.01)  # poll interval


def bad_chain_case(
    fake: FakeDriver, dev: VhostUserVsockDevice, descs: list[tuple[int, int, int, int]]
) -> None:
    head = fake.tx.free[0]
    publish_raw(fake, head, descs)
    assert (head, 0) in fake.wait_tx_done()  # handed back, nothing written
    assert dev.stats.bad_chains == 1
    assert_alive(fake)


OUTSIDE = 2 * REGION_SIZE  # first byte past guest memory


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (OUTSIDE, HEADER_SIZE),  # entirely outside
        (OUTSIDE - 10, HEADER_SIZE),  # crosses the end of memory
        (2**64 - 8, HEADER_SIZE),  # wraps around the address space
        (0, 0xFFFF_FFFF),  # huge length
    ],
)
def test_descriptor_outside_guest_memory_is_rejected(
    pair: tuple[VhostUserVsockDevice, FakeDriver], addr: int, length: int
) -> None:
    dev, fake = pair
    bad_chain_case(fake, dev, [(addr, length, 0, 0)])


def test_payload_descriptor_outside_memory_is_rejected(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    hdr_addr = fake.tx.slot(head)
    fake.write(hdr_addr, rst_header(length=100))
    bad_chain_case(fake, dev, [(hdr_addr, HEADER_SIZE, DESC_F_NEXT, head + 1),
                               (OUTSIDE, 100, 0, 0)])  # fmt: skip


def test_next_index_out_of_range_is_rejected(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    fake.write(fake.tx.slot(head), rst_header())
    bad_chain_case(fake, dev, [(fake.tx.slot(head), HEADER_SIZE, DESC_F_NEXT, 500)])


def test_descriptor_loop_is_capped(pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    addr = fake.tx.slot(head)
    fake.write(addr, rst_header())
    bad_chain_case(fake, dev, [(addr, 8, DESC_F_NEXT, head + 1), (addr, 8, DESC_F_NEXT, head)])


def test_self_loop_is_capped(pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    bad_chain_case(fake, dev, [(fake.tx.slot(head), 4, DESC_F_NEXT, head)])


def test_readable_after_writable_is_rejected(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    addr = fake.tx.slot(head)
    bad_chain_case(fake, dev, [(addr, 16, DESC_F_WRITE | DESC_F_NEXT, head + 1),
                               (addr + 16, HEADER_SIZE, 0, 0)])  # fmt: skip


def test_indirect_descriptor_without_negotiation_is_rejected(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    head = fake.tx.free[0]
    table = fake.tx.tables + 64 * head
    fake.write(table, struct.pack("<QIHH", fake.tx.slot(head), HEADER_SIZE, 0, 0))
    fake.write(fake.tx.slot(head), rst_header())
    bad_chain_case(fake, dev, [(table, 16, DESC_F_INDIRECT, 0)])


@pytest.mark.parametrize(
    "case", ["nested", "with next", "bad length", "outside memory", "empty", "bad inner next"]
)
def test_malformed_indirect_tables_are_rejected(
    indirect_pair: tuple[VhostUserVsockDevice, FakeDriver], case: str
) -> None:
    dev, fake = indirect_pair
    head = fake.tx.free[0]
    table = fake.tx.tables + 64 * head
    slot = fake.tx.slot(head)
    fake.write(slot, rst_header())
    entry = struct.pack("<QIHH", slot, HEADER_SIZE, 0, 0)
    fake.write(table, entry)
    descs = {
        "nested": [(table, 16, DESC_F_INDIRECT, 0)],
        "with next": [(table, 16, DESC_F_INDIRECT | DESC_F_NEXT, head + 1)],
        "bad length": [(table, 20, DESC_F_INDIRECT, 0)],
        "outside memory": [(OUTSIDE - 8, 16, DESC_F_INDIRECT, 0)],
        "empty": [(table, 0, DESC_F_INDIRECT, 0)],
        "bad inner next": [(table, 16, DESC_F_INDIRECT, 0)],
    }[case]
    if case == "nested":
        fake.write(table, struct.pack("<QIHH", table, 16, DESC_F_INDIRECT, 0))
    if case == "bad inner next":
        fake.write(table, struct.pack("<QIHH", slot, HEADER_SIZE, DESC_F_NEXT, 1))
    bad_chain_case(fake, dev, descs)


def test_head_index_out_of_range_is_skipped(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    fake.tx.publish(4000)
    assert_alive(fake)
    assert dev.stats.bad_chains == 1


def test_available_index_jump_breaks_only_that_ring_until_restarted(
    pair: tuple[VhostUserVsockDevice, FakeDriver], caplog: pytest.LogCaptureFixture
) -> None:
    _dev, fake = pair
    fake.tx.avail_idx = fake.tx.kick_idx = 1000
    fake.write(fake.tx.avail + 2, U16.pack(1000))
    fake.tx.kick()
    wait_until(lambda: "available index jumped" in caplog.text, "the device to notice the jump")
    base = fake.stop_ring(fake.tx)
    assert base == 0
    fake.tx.avail_idx = fake.tx.kick_idx = 0
    fake.write(fake.tx.avail + 2, U16.pack(0))
    fake.start_ring(fake.tx, 0)
    assert_alive(fake)


def test_rx_buffers_too_small_or_readable_are_skipped(
    uds: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with attached(uds, post_rx=False) as (dev, fake):
        fake.rx.add(writable=[40])  # cannot even hold a header
        fake.rx.add(readable=[b"x" * 8], writable=[HEADER_SIZE, 4096])
        fake.post_rx(4)
        fake.send(Op.RW, 1024, 52, b"x")
        (rst,) = fake.recv(ops=[Op.RST])
        assert rst.dst_port == 1024
        assert dev.stats.bad_chains == 2
        assert [p.len for p in fake.inbox if p.op == -1] == [0, 0]  # returned, 0 bytes used


def test_rx_header_across_descriptors_and_small_payload_descriptors(uds: Path) -> None:
    """A packet's header may be split anywhere; payload fills several descriptors."""
    with attached(uds, post_rx=False) as (_dev, fake):
        for _ in range(8):
            fake.rx.add(writable=[10, 34, 7, 100])
        host = socket.socket(socket.AF_UNIX)
        host.bind(f"{uds}_7000")
        host.listen()
        conn = GuestConn(fake, 1024, 7000)
        conn.control(Op.REQUEST)
        peer, _ = host.accept()
        peer.sendall(bytes(range(200)))
        data = conn.recv_exactly(200)
        assert data == bytes(range(200))
        assert max(len(p.payload) for p in conn.packets) <= 107
        peer.close()
        host.close()


def test_buffer_spanning_the_two_regions_is_read_correctly(
    pair: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = pair
    host = socket.socket(socket.AF_UNIX)
    host.bind(f"{dev.uds_path}_7000")
    host.listen()
    conn = GuestConn(fake, 1024, 7000)
    conn.control(Op.REQUEST)
    conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
    peer, _ = host.accept()
    payload = os.urandom(3000)
    addr = REGION_SIZE - 1000  # straddles the region boundary (guest-physically adjacent)
    fake.write(addr, HEADER.pack(3, 2, 1024, 7000, len(payload), 1, Op.RW, 0, 1 << 18, 0)
               + payload)  # fmt: skip
    head = fake.tx.free[0]
    publish_raw(fake, head, [(addr, HEADER_SIZE + len(payload), 0, 0)])
    peer.settimeout(5)
    got = b""
    while len(got) < len(payload):
        got += peer.recv(65536)
    assert got == payload
    peer.close()
    host.close()


def test_event_idx_device_rearms_kicks(pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _dev, fake = pair
    for i in range(20):
        fake.send(Op.RW, 1100 + i, 52, b"x")
        fake.wait_tx_done()
    fake.recv(20, ops=[Op.RST])
    avail_event = U16.unpack(fake.read(fake.tx.used + 4 + 8 * fake.tx.size, 2))[0]
    assert avail_event == fake.tx.avail_idx  # "kick me on the next one"
    assert fake.tx.kicks == 20


def test_used_event_suppresses_interrupts(pair: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _dev, fake = pair
    fake.tx.used_entries()
    with_event = fake.tx.avail + 4 + 2 * fake.tx.size
    fake.write(with_event, U16.pack((fake.tx.last_used + 5) & 0xFFFF))  # not before 6 more
    fake.send(Op.RW, 1100, 52, b"x")
    fake.recv(ops=[Op.RST])
    fake.settle()  # the device has ended the iteration that used the packet
    assert not fake.tx.wait_call(0)
    fake.tx.used_entries()  # catches up and sets used_event to "the next one"
    fake.send(Op.RW, 1101, 52, b"x")
    assert fake.tx.wait_call(2)


def test_no_interrupt_flag_without_event_idx(uds: Path) -> None:
    with attached(uds, driver={"event_idx": False}) as (_dev, fake):
        fake.write(fake.tx.avail, U16.pack(1))  # VRING_AVAIL_F_NO_INTERRUPT
        fake.send(Op.RW, 1100, 52, b"x")
        fake.recv(ops=[Op.RST])
        assert not fake.tx.wait_call(0.1)
        fake.write(fake.tx.avail, U16.pack(0))
        fake.send(Op.RW, 1101, 52, b"x")
        assert fake.tx.wait_call(2)


@pytest.mark.parametrize("driver", [{"event_idx": False}, {"indirect": True},
                                    {"event_idx": False, "indirect": True}])  # fmt: skip
def test_transfer_with_each_ring_feature_combination(uds: Path, driver: dict[str, bool]) -> None:
    with attached(uds, driver=driver) as (_dev, fake):
        host = socket.socket(socket.AF_UNIX)
        host.bind(f"{uds}_7000")
        host.listen()
        conn = GuestConn(fake, 1024, 7000)
        conn.control(Op.REQUEST)
        conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
        peer, _ = host.accept()
        data = os.urandom(300_000)
        peer.sendall(data)
        assert conn.recv_exactly(len(data)) == data
        conn.send(data[: SLOT // 4] * 4)
        peer.settimeout(5)
        got = b""
        while len(got) < SLOT:
            got += peer.recv(1 << 20)
        assert got == data[: SLOT // 4] * 4
        peer.close()
        host.close()


def test_no_error_is_logged_by_malformed_input(
    pair: tuple[VhostUserVsockDevice, FakeDriver], caplog: pytest.LogCaptureFixture
) -> None:
    """Bad guest input is a warning, never a crash logged at ERROR."""
    _dev, fake = pair
    caplog.set_level(logging.WARNING)
    fake.tx.publish(4000)
    publish_raw(fake, fake.tx.free[0], [(OUTSIDE, HEADER_SIZE, 0, 0)])
    fake.send(Op.RW, 1024, 52, b"x", length=60000)
    fake.send(99, 1024, 52)
    assert_alive(fake)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("malformed descriptor chain" in r.message for r in caplog.records)


# -- GuestMemory ---------------------------------------------------------------------------


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-mem")
    os.ftruncate(fd, 3 * mmap.PAGESIZE)
    yield fd
    os.close(fd)


def test_guest_memory_translation_and_bounds(memfd: int) -> None:
    page = mmap.PAGESIZE
    mem = GuestMemory(
        [RegionSpec(0x1000, page, 0xA000, 0), RegionSpec(0x1000 + page, page, 0xF000, page)],
        [memfd, memfd],
    )
    try:
        views = mem.guest_views(0x1000 + page - 2, 4)  # spans the two adjacent regions
        assert [len(v) for v in views] == [2, 2]
        views[1][0:2] = b"ok"
        assert os.pread(memfd, 2, page) == b"ok"
        assert bytes(mem.user_view(0xF000, 2)) == b"ok"
        for addr, length in [(0, 1), (0xFFF, 2), (0x1000 + 2 * page - 1, 2), (2**64 - 1, 2)]:
            with pytest.raises(GuestMemoryError):
                mem.guest_views(addr, length)
        with pytest.raises(GuestMemoryError):
            mem.guest_view(0x1000 + page - 2, 4)  # one view cannot cross regions
        with pytest.raises(GuestMemoryError):
            mem.user_view(0xA000 + page - 2, 4)  # user ranges are not adjacent
        assert mem.guest_views(0x1000, 0) == []
    finally:
        mem.close()


def test_guest_memory_rejects_regions_past_the_end_of_the_file(memfd: int) -> None:
    with pytest.raises(GuestMemoryError, match="too small"):
        GuestMemory([RegionSpec(0, 4 * mmap.PAGESIZE, 0, 0)], [memfd])
    with pytest.raises(GuestMemoryError, match="too small"):
        GuestMemory([RegionSpec(0, mmap.PAGESIZE, 0, 3 * mmap.PAGESIZE)], [memfd])


def test_guest_memory_unaligned_offset(memfd: int) -> None:
    os.pwrite(memfd, b"abc", 0x10)
    mem = GuestMemory([RegionSpec(0x0, 0x100, 0x0, 0x10)], [memfd])
    try:
        assert bytes(mem.guest_view(0, 3)) == b"abc"
    finally:
        mem.close()


def test_used_index_is_published_once_per_batch(memfd: int) -> None:
    """Used elements are written as chains are pushed, but the driver's view of the used index
    moves once per batch (publish / need_notify), so a polling driver sees the whole batch."""
    page = mmap.PAGESIZE
    mem = GuestMemory([RegionSpec(0, 3 * page, 0x10000, 0)], [memfd])
    size = 8
    desc, avail, used = 0, page, 2 * page
    for i in range(size):  # one 64-byte writable buffer per descriptor
        os.pwrite(memfd, struct.pack("<QIHH", 0x800 + 64 * i, 64, DESC_F_WRITE, 0), desc + 16 * i)
    os.pwrite(memfd, struct.pack("<HH", 0, 3) + struct.pack("<3H", 0, 1, 2), avail)
    vq = Virtqueue(mem, size=size, desc_addr=0x10000 + desc, avail_addr=0x10000 + avail,
                   used_addr=0x10000 + used)  # fmt: skip

    def used_idx() -> int:
        value: int = U16.unpack(os.pread(memfd, 2, used + 2))[0]
        return value

    try:
        for _ in range(3):
            chain = vq.pop()
            assert chain is not None
            vq.push(chain.head, 10)
        assert used_idx() == 0  # not visible yet
        assert vq.unpublished == 3
        assert struct.unpack("<II", os.pread(memfd, 8, used + 4 + 8 * 2)) == (2, 10)
        assert vq.need_notify()  # publishes first
        assert used_idx() == 3
        assert vq.unpublished == 0
        assert not vq.need_notify()
        vq.publish()  # nothing new: no store
        assert used_idx() == 3
    finally:
        vq.release()
        mem.close()
