"""vhost-user protocol rules of the vsock device, driven by the fake front-end."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.backends.qemu.vhost_vsock import VhostUserVsockDevice, connect_hybrid
from vzkit.backends.qemu.vhost_vsock._packet import Op
from vzkit.backends.qemu.vhost_vsock._vhost_user import (
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    PF_CONFIG,
    PF_MQ,
    PF_REPLY_ACK,
    Request,
)
from vzkit.backends.qemu.vhost_vsock._virtqueue import F_EVENT_IDX, F_INDIRECT_DESC

from ..support.vhost_vsock.fakedriver import REGION_SIZE, FakeDriver
from ..support.vhost_vsock.fakeguest import GuestConn, attached

U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def bare(uds: Path) -> Iterator[tuple[VhostUserVsockDevice, FakeDriver]]:
    """A device with a front-end connected but nothing negotiated yet."""
    with attached(uds, setup=False) as pair:
        yield pair


def negotiate(fake: FakeDriver) -> None:
    """Protocol features with REPLY_ACK, so every refusal is visible."""
    fake.get_u64(Request.GET_FEATURES)
    fake.send_msg(Request.SET_PROTOCOL_FEATURES, U64.pack((1 << PF_CONFIG) | (1 << PF_REPLY_ACK)))
    fake.send_msg(Request.SET_OWNER)
    features = (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES) | (1 << F_EVENT_IDX)
    assert fake.ack(Request.SET_FEATURES, U64.pack(features)) == 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_offers_version1_protocol_features_and_ring_features(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    _, fake = bare
    features = fake.get_u64(Request.GET_FEATURES)
    for bit in (F_VERSION_1, F_PROTOCOL_FEATURES, F_EVENT_IDX, F_INDIRECT_DESC):
        assert features >> bit & 1
    assert not features >> 1 & 1  # no SEQPACKET
    protocol = fake.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert protocol == (1 << PF_CONFIG) | (1 << PF_REPLY_ACK)
    assert not protocol >> PF_MQ & 1


def test_ring_features_can_be_withheld(uds: Path) -> None:
    with attached(uds, setup=False, event_idx=False, indirect=False) as (_, fake):
        features = fake.get_u64(Request.GET_FEATURES)
        assert not features >> F_EVENT_IDX & 1
        assert not features >> F_INDIRECT_DESC & 1


def test_get_config_returns_the_guest_cid(uds: Path) -> None:
    with attached(uds, setup=False, guest_cid=0xFFFF_FFF0) as (_, fake):
        fake.guest_cid = 0xFFFF_FFF0
        assert fake.config_cid() == 0xFFFF_FFF0
        body = fake.call(Request.GET_CONFIG, struct.pack("=III", 2, 2, 0) + b"\0" * 2)
        assert body == struct.pack("=III", 2, 2, 0) + b"\xff\xff"


@pytest.mark.parametrize(("offset", "size"), [(8, 8), (0, 9), (4, 8), (0, 300)])
def test_get_config_out_of_range_answers_empty(
    bare: tuple[VhostUserVsockDevice, FakeDriver], offset: int, size: int
) -> None:
    _, fake = bare
    assert fake.call(Request.GET_CONFIG, struct.pack("=III", offset, size, 0) + b"\0" * size) == b""


def test_set_config_is_refused(bare: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _, fake = bare
    negotiate(fake)
    assert fake.ack(Request.SET_CONFIG, struct.pack("=III", 0, 8, 0) + U64.pack(9)) != 0
    assert fake.config_cid() == 3


def test_unoffered_features_are_refused(bare: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _, fake = bare
    negotiate(fake)
    assert fake.ack(Request.SET_FEATURES, U64.pack(1 << 1)) != 0  # SEQPACKET
    assert fake.ack(Request.SET_FEATURES, U64.pack(1 << 33)) != 0  # ACCESS_PLATFORM
    assert fake.ack(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << PF_MQ)) != 0


def test_unknown_requests_are_refused_without_dropping_the_session(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = bare
    negotiate(fake)
    assert fake.ack(200) != 0
    fake.send_msg(201, b"\1" * 16)  # no reply wanted: ignored
    assert fake.ack(Request.SET_LOG_BASE, struct.pack("=QQ", 4096, 0)) != 0
    fake.sync()
    assert dev.attached


# -- memory table --------------------------------------------------------------------------


def mem_table(*regions: tuple[int, int, int, int]) -> bytes:
    return struct.pack("=II", len(regions), 0) + b"".join(
        struct.pack("=QQQQ", *region) for region in regions
    )


@pytest.mark.parametrize(
    ("regions", "nfds", "why"),
    [
        ([(0, REGION_SIZE, 0x7000_0000_0000, 0)], 2, "more fds than regions"),
        ([(0, REGION_SIZE, 0x7000_0000_0000, 0)] * 2, 1, "fewer fds than regions"),
        ([(0, 4 * REGION_SIZE, 0x7000_0000_0000, 0)], 1, "region past the end of the fd"),
        ([(0, REGION_SIZE, 0x7000_0000_0000, REGION_SIZE * 2)], 1, "offset past the end"),
        (
            [(0, REGION_SIZE, 0x7000_0000_0000, 0), (4096, REGION_SIZE, 0x7100_0000_0000, 0)],
            2,
            "overlapping regions",
        ),
        ([(0, 0, 0x7000_0000_0000, 0)], 1, "empty region"),
        ([(2**64 - 4096, 8192, 0x7000_0000_0000, 0)], 1, "guest address overflow"),
        ([(i * 4096, 4096, 0x7000_0000_0000 + i * 4096, 0) for i in range(9)], 9, "9 regions"),
    ],
)
def test_bad_memory_tables_are_refused_and_fds_closed(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
    regions: list[tuple[int, int, int, int]],
    nfds: int,
    why: str,
) -> None:
    dev, fake = bare
    negotiate(fake)
    before = open_fds()
    status = fake.ack(Request.SET_MEM_TABLE, mem_table(*regions), [fake.memfd] * nfds)
    assert status != 0, why
    assert open_fds() == before  # the device closed every descriptor it received
    assert dev.attached


def test_memory_table_with_zero_regions_is_refused(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    _, fake = bare
    negotiate(fake)
    assert fake.ack(Request.SET_MEM_TABLE, struct.pack("=II", 0, 0)) != 0


def test_memory_table_can_be_replaced_while_running(uds: Path) -> None:
    with attached(uds) as (_dev, fake):
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(f"{uds}_7000")
        lst.listen()
        assert fake.ack(Request.SET_MEM_TABLE, fake.mem_table_payload(), [fake.memfd] * 2) == 0
        fake.send(Op.REQUEST, 1024, 7000)
        (resp,) = fake.recv(ops=[Op.RESPONSE, Op.RST])
        assert resp.op == Op.RESPONSE
        conn, _ = lst.accept()
        conn.close()
        lst.close()


# -- rings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (Request.SET_VRING_NUM, STATE.pack(2, 128)),  # the event queue stays in QEMU
        (Request.SET_VRING_NUM, STATE.pack(255, 128)),
        (Request.SET_VRING_NUM, STATE.pack(0, 100)),  # not a power of two
        (Request.SET_VRING_NUM, STATE.pack(0, 0)),
        (Request.SET_VRING_NUM, STATE.pack(0, 65536)),
        (Request.SET_VRING_NUM, b"\0\0\0\0"),  # short payload
        (Request.SET_VRING_BASE, STATE.pack(0, 0x10000)),
        (Request.SET_VRING_ADDR, struct.pack("=IIQQQQ", 2, 0, 0, 0, 0, 0)),
        (Request.SET_VRING_ENABLE, STATE.pack(7, 1)),
        (Request.SET_VRING_KICK, U64.pack(0)),  # kick before memory, size and addresses
    ],
)
def test_bad_ring_requests_are_refused(
    bare: tuple[VhostUserVsockDevice, FakeDriver], request_: int, payload: bytes
) -> None:
    dev, fake = bare
    negotiate(fake)
    fds = [fake.rx.kick_fd] if request_ == Request.SET_VRING_KICK else []
    before = open_fds()
    assert fake.ack(request_, payload, fds) != 0
    assert open_fds() == before
    assert dev.attached


def test_vring_fd_flag_mismatch_is_refused(bare: tuple[VhostUserVsockDevice, FakeDriver]) -> None:
    _, fake = bare
    negotiate(fake)
    before = open_fds()
    # "no fd" flag set, but a descriptor attached anyway (and the reverse)
    assert fake.ack(Request.SET_VRING_CALL, U64.pack(0x100), [fake.rx.call_fd]) != 0
    assert fake.ack(Request.SET_VRING_CALL, U64.pack(0)) != 0
    assert open_fds() == before


def test_ring_outside_memory_does_not_start(uds: Path) -> None:
    with attached(uds, setup=False) as (dev, fake):
        negotiate(fake)
        assert fake.ack(Request.SET_MEM_TABLE, fake.mem_table_payload(), [fake.memfd] * 2) == 0
        fake.send_msg(Request.SET_VRING_NUM, STATE.pack(0, 128))
        fake.send_msg(Request.SET_VRING_ADDR, struct.pack("=IIQQQQ", 0, 0, 0x1000, 0x2000,
                                                          0x3000, 0))  # fmt: skip
        fake.send_msg(Request.SET_VRING_KICK, U64.pack(0), [fake.rx.kick_fd])
        fake.send_msg(Request.SET_VRING_ENABLE, STATE.pack(0, 1))
        fake.sync()
        assert dev.attached
        assert not dev.running


def test_rings_start_disabled_until_enabled(uds: Path) -> None:
    with attached(uds, setup=False) as (_dev, fake):
        negotiate(fake)
        assert fake.ack(Request.SET_MEM_TABLE, fake.mem_table_payload(), [fake.memfd] * 2) == 0
        for q in (fake.rx, fake.tx):
            fake.start_ring(q)
        fake.post_rx()
        fake.send(Op.RW, 1024, 52, b"x")  # earns an RST once the rings run
        fake.settle()
        assert fake.tx.used_entries() == []  # started but not enabled: untouched
        for q in (fake.rx, fake.tx):
            fake.send_msg(Request.SET_VRING_ENABLE, STATE.pack(q.index, 1))
        (rst,) = fake.recv(ops=[Op.RST])
        assert rst.dst_port == 1024


def test_without_protocol_features_rings_start_enabled(uds: Path) -> None:
    with attached(uds, setup=False) as (dev, fake):
        fake.send_msg(Request.SET_OWNER)
        fake.send_msg(Request.SET_FEATURES, U64.pack((1 << F_VERSION_1) | (1 << F_EVENT_IDX)))
        fake.send_msg(Request.SET_MEM_TABLE, fake.mem_table_payload(), [fake.memfd] * 2)
        for q in (fake.rx, fake.tx):
            fake.start_ring(q)
        fake.post_rx()
        fake.send(Op.RW, 1024, 52, b"x")
        (rst,) = fake.recv(ops=[Op.RST])
        assert rst.dst_port == 1024
        fake.send_msg(Request.SET_VRING_ENABLE, STATE.pack(0, 0))  # illegal here: ignored
        fake.sync()
        assert dev.running


def test_get_vring_base_stops_the_ring_and_restart_resumes(uds: Path) -> None:
    with attached(uds) as (dev, fake):
        for i in range(3):
            fake.send(Op.RW, 1100 + i, 52, b"x")
        fake.recv(3, ops=[Op.RST])
        fake.wait_tx_done()
        assert fake.stop_ring(fake.tx) == 3
        rx_base = fake.stop_ring(fake.rx)
        assert rx_base == 3
        assert not dev.running
        fake.send(Op.RW, 1200, 52, b"x")  # posted while stopped: left alone
        fake.settle()
        assert fake.poll_rx() == []
        assert fake.tx.used_entries() == []
        fake.start_ring(fake.rx, rx_base)
        fake.start_ring(fake.tx, 3)
        (rst,) = fake.recv(ops=[Op.RST])
        assert rst.dst_port == 1200


def test_pause_resume_keeps_connections(uds: Path) -> None:
    """QEMU stops the rings when the VM pauses and restarts them at the saved bases."""
    with attached(uds) as (_dev, fake):
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(f"{uds}_7000")
        lst.listen()
        conn = GuestConn(fake, 1024, 7000)
        conn.control(Op.REQUEST)
        conn.wait(lambda: any(p.op == Op.RESPONSE for p in conn.packets))
        host, _ = lst.accept()
        fake.tx.reclaimed += fake.tx.used_entries()
        bases = [fake.stop_ring(fake.rx), fake.stop_ring(fake.tx)]
        host.sendall(b"while paused")
        fake.settle()  # the device has seen the bytes while the rings were stopped
        fake.start_ring(fake.rx, bases[0])
        fake.start_ring(fake.tx, bases[1])
        assert conn.recv_exactly(12) == b"while paused"
        conn.send(b"after resume")
        host.settimeout(5)
        assert host.recv(100) == b"after resume"
        host.close()
        lst.close()


def test_reset_owner_disables_rings(uds: Path) -> None:
    with attached(uds) as (dev, fake):
        fake.send_msg(Request.RESET_OWNER)
        fake.sync()
        assert not dev.running


def test_reset_device_drops_connections(uds: Path) -> None:
    with attached(uds) as (dev, fake):
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(f"{uds}_7000")
        lst.listen()
        fake.send(Op.REQUEST, 1024, 7000)
        fake.recv(ops=[Op.RESPONSE])
        host, _ = lst.accept()
        fake.send_msg(Request.RESET_DEVICE)
        fake.sync()
        host.settimeout(5)
        assert host.recv(1) == b""
        assert dev.connections == 0
        host.close()
        lst.close()


# -- transport -----------------------------------------------------------------------------


def test_message_split_across_writes_is_reassembled(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    _, fake = bare
    data = struct.pack("=III", Request.GET_CONFIG, 1, 20) + struct.pack("=III", 0, 8, 0) + bytes(8)
    for piece in (data[:5], data[5:12], data[12:13], data[13:]):
        fake.sock.sendall(piece)
        time.sleep(0.02)  # spacing, not synchronisation: lets the device read pieces apart
    request, _, body = fake.recv_reply()
    assert request == Request.GET_CONFIG
    assert struct.unpack_from("<Q", body, 12)[0] == 3


def test_oversized_message_drops_the_session(
    bare: tuple[VhostUserVsockDevice, FakeDriver],
) -> None:
    dev, fake = bare
    fake.sock.sendall(struct.pack("=III", Request.SET_MEM_TABLE, 1, 1 << 20))
    fake.sock.settimeout(5)
    assert fake.sock.recv(1) == b""
    assert not dev.attached


def test_front_end_disconnect_closes_connections_and_refuses_new_ones(uds: Path) -> None:
    # no connect timeout in reach: a refusal can only come from the detached device
    with attached(uds, connect_timeout_s=3600.0) as (dev, fake):
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(f"{uds}_7000")
        lst.listen()
        fake.send(Op.REQUEST, 1024, 7000)
        fake.recv(ops=[Op.RESPONSE])
        host, _ = lst.accept()
        fake.sock.close()  # QEMU went away
        host.settimeout(5)
        assert host.recv(1) == b""
        deadline = time.monotonic() + 2
        while dev.attached and time.monotonic() < deadline:
            time.sleep(0.01)  # poll interval
        assert not dev.attached
        with pytest.raises(ConnectionRefusedError):  # (waiting would raise TimeoutError)
            connect_hybrid(uds, 52, timeout=5)
        host.close()
        lst.close()
