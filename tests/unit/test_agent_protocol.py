"""The agent wire protocol, pure Python: frames and message payloads both ways."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vzkit.agent._protocol import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    RESYNC_PREAMBLE,
    ErrorInfo,
    ExecFlag,
    ExecRequest,
    ExitFlag,
    ExitStatus,
    Frame,
    FrameDecoder,
    Hello,
    KillRequest,
    MsgType,
    ProtocolError,
    ReadFileRequest,
    Stream,
    Window,
    WriteFileRequest,
    decode_file_end,
    decode_header,
    decode_hello_request,
    encode_file_end,
    encode_frame,
    encode_hello_request,
    env_entries,
)
from vzkit.errors import GuestError


def test_resync_preamble_completes_any_frame_then_reads_as_resets() -> None:
    assert len(RESYNC_PREAMBLE) % HEADER_SIZE == 0
    assert len(RESYNC_PREAMBLE) >= (HEADER_SIZE + MAX_PAYLOAD - 1) + HEADER_SIZE
    assert set(RESYNC_PREAMBLE) == {0}
    frames = FrameDecoder().feed(RESYNC_PREAMBLE)
    assert set(frames) == {Frame(MsgType.RESET, 0)}


def test_frame_layout_is_little_endian_with_reserved_zeroes() -> None:
    data = encode_frame(MsgType.STDOUT, 0x01020304, b"abc")
    assert data == b"\x03\0\0\0" + b"\x13" + b"\0\0\0" + b"\x04\x03\x02\x01" + b"abc"
    assert HEADER_SIZE == 12
    assert decode_header(data[:HEADER_SIZE]) == (3, MsgType.STDOUT, 0x01020304)


def test_payload_limit_is_enforced_both_ways() -> None:
    encode_frame(MsgType.STDIN, 1, b"x" * MAX_PAYLOAD)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(MsgType.STDIN, 1, b"x" * (MAX_PAYLOAD + 1))
    header = struct.pack("<IB3xI", MAX_PAYLOAD + 1, MsgType.STDOUT, 1)
    with pytest.raises(ProtocolError, match="frame of 65537 bytes exceeds the maximum of 65536"):
        FrameDecoder().feed(header)


def test_reserved_bytes_must_be_zero() -> None:
    with pytest.raises(ProtocolError, match="reserved bytes"):
        decode_header(b"\0\0\0\0\x03\x01\0\0\x01\0\0\0")


def test_protocol_error_is_a_guest_error() -> None:
    assert issubclass(ProtocolError, GuestError)


frames = st.builds(
    Frame,
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
)


@given(st.lists(frames, max_size=8), st.data())
def test_decoder_reassembles_any_split(items: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode() for f in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder, out, last = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == items
    assert decoder.buffered == 0


def test_decoder_holds_back_a_partial_frame() -> None:
    decoder = FrameDecoder()
    data = encode_frame(MsgType.PING, 7)
    assert decoder.feed(data[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(data[5:]) == [Frame(MsgType.PING, 7)]


def test_hello_both_ways() -> None:
    nonce = bytes(range(16))
    assert encode_hello_request(nonce=nonce) == MAGIC + b"\x02\0\x03\0" + nonce
    assert decode_hello_request(encode_hello_request((1, 3), nonce)) == (1, 3, nonce)
    with pytest.raises(ValueError, match="16 bytes"):
        encode_hello_request(nonce=b"short")
    hello = Hello(1, 0, MAX_PAYLOAD, 262144, nonce, "0.1.0")
    assert Hello.decode(hello.encode()) == hello
    with pytest.raises(ProtocolError, match="magic"):
        Hello.decode(b"NOTMAGIC" + hello.encode()[8:])
    with pytest.raises(ProtocolError, match="truncated HELLO payload"):
        Hello.decode(MAGIC + b"\x01\0")


names = st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)


@given(
    st.lists(names, min_size=1, max_size=5),
    st.lists(names, max_size=5),
    st.binary(max_size=20),
    st.sampled_from(list(ExecFlag)),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=20),
)
def test_exec_round_trip(
    argv: list[bytes],
    env: list[bytes],
    cwd: bytes,
    flags: ExecFlag,
    timeout: int,
    window: int,
    user: bytes,
) -> None:
    request = ExecRequest(tuple(argv), tuple(env), cwd, flags, timeout, window, user)
    assert ExecRequest.decode(request.encode()) == request


def test_exec_layout() -> None:
    payload = ExecRequest((b"ls", b"-l"), (b"A=1",), b"/tmp", ExecFlag.STDIN, 500, 4096).encode()
    assert payload == (
        struct.pack("<IIIII", 1, 500, 4096, 2, 1)
        + b"\2\0\0\0ls"
        + b"\2\0\0\0-l"
        + b"\3\0\0\0A=1"
        + b"\4\0\0\0/tmp"
    )
    with pytest.raises(ProtocolError, match="truncated EXEC payload"):
        ExecRequest.decode(payload[:-1])
    with pytest.raises(ProtocolError, match="truncated EXEC payload"):
        ExecRequest.decode(payload + b"x")  # the start of a user string (2.1)
    # 2.1: the user is a trailing string, sent only when set (a 2.0 agent reads the rest)
    as_user = ExecRequest((b"ls", b"-l"), (b"A=1",), b"/tmp", ExecFlag.STDIN, 500, 4096, b"a:b")
    assert as_user.encode() == payload + b"\3\0\0\0a:b"
    assert ExecRequest.decode(payload).user == b""
    with pytest.raises(ProtocolError, match="1 trailing bytes in EXEC"):
        ExecRequest.decode(as_user.encode() + b"x")


def test_exit_status() -> None:
    exited = ExitStatus(3)
    assert ExitStatus.decode(exited.encode()) == exited
    assert exited.returncode == 3
    killed = ExitStatus(None, 9, ExitFlag.TIMED_OUT)
    assert killed.encode() == struct.pack("<iII", -1, 9, 1)
    assert ExitStatus.decode(killed.encode()) == killed
    assert (killed.returncode, killed.timed_out) == (-9, True)


def test_small_messages_round_trip() -> None:
    err = ErrorInfo(2, "read_file /x: No such file or directory")
    assert ErrorInfo.decode(err.encode()) == err
    assert Window.decode(Window(65536, Stream.ERR).encode()) == Window(65536, Stream.ERR)
    with pytest.raises(ProtocolError, match="unknown stream 7"):
        Window.decode(struct.pack("<II", 1, 7))
    assert KillRequest.decode(KillRequest(15, group=True).encode()) == KillRequest(15, True)
    assert ReadFileRequest.decode(ReadFileRequest(b"/etc/os", 9).encode()) == ReadFileRequest(
        b"/etc/os", 9
    )
    assert WriteFileRequest.decode(WriteFileRequest(b"/a", 0o600).encode()) == WriteFileRequest(
        b"/a", 0o600
    )
    assert decode_file_end(encode_file_end(2**40)) == 2**40


def test_env_entries() -> None:
    assert env_entries([("A", "1"), (b"B", b"x=y")]) == (b"A=1", b"B=x=y")
    for bad in ("", "A=B", "A\0"):
        with pytest.raises(ValueError, match="invalid environment variable"):
            env_entries([(bad, "1")])
