"""The wire of a supervisor's control socket: framed JSON, file descriptors beside it.

A frame is a 4-byte big-endian length and a JSON object. Requests are
``{"id": N, "op": NAME, ...}``; answers ``{"id": N, "ok": true, "result": ...}`` or
``{"id": N, "ok": false, "error": {"type": CLASS, "message": TEXT}}``; events (``{"event":
"state", ...}``, ``{"event": "vsock_accept", ...}``) come unasked. A frame that carries file
descriptors (a vsock stream the supervisor opened, passed to the client so the supervisor is
not in the data path) says how many in ``"fds"`` and is sent in one ``sendmsg`` with them
(``SCM_RIGHTS``); the reader keeps received descriptors in order and hands each frame its own.

The socket lives in the VM's 0700 directory and is 0600; the supervisor also refuses a peer
of another user (``SO_PEERCRED``/``LOCAL_PEERCRED``), whatever the modes say.
"""

from __future__ import annotations

import array
import collections
import contextlib
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import errors
from ..errors import VMError, VzkitError

__all__ = [
    "MAX_FRAME",
    "FrameReader",
    "decode_message",
    "peer_uid",
    "remote_error",
    "send_frame",
    "short_path",
]

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 20
_MAX_FDS = 8
#: Longest socket path bound or connected by name (sun_path is 104 bytes on macOS).
_MAX_SUN_PATH = 100


def send_frame(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    """Send one frame (with ``fds``, counted in the frame's ``"fds"``). Callers serialise
    their sends (one lock per socket)."""
    if fds:
        message = {**message, "fds": len(fds)}
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise VMError(f"control frame of {len(body)} bytes is too large")
    frame = _LEN.pack(len(body)) + body
    if fds:
        sent = sock.sendmsg(
            [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        )
        if sent < len(frame):
            sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def decode_message(body: bytes) -> dict[str, Any]:
    """A frame's JSON object (its body, after the length)."""
    try:
        message = json.loads(body)
    except ValueError as err:
        raise VMError(f"a control frame is not JSON: {err}") from err
    if not isinstance(message, dict):
        raise VMError("a control frame is not a JSON object")
    return message


class FrameReader:
    """Frames from a blocking socket, each with the descriptors sent with it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    def read(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next frame and its descriptors (the caller owns them), ``None`` at EOF."""
        while True:
            if len(self._buf) >= _LEN.size:
                (size,) = _LEN.unpack_from(self._buf)
                if size > MAX_FRAME:
                    raise VMError(f"control frame of {size} bytes is too large")
                if len(self._buf) >= _LEN.size + size:
                    body = bytes(self._buf[_LEN.size : _LEN.size + size])
                    del self._buf[: _LEN.size + size]
                    return self._decode(body)
            if not self._fill():
                if self._buf:
                    raise VMError("the control socket closed in the middle of a frame")
                return None

    def _decode(self, body: bytes) -> tuple[dict[str, Any], list[int]]:
        message = decode_message(body)
        count = message.get("fds", 0)
        if not isinstance(count, int) or not 0 <= count <= _MAX_FDS or count > len(self._fds):
            raise VMError("a control frame names descriptors that did not come with it")
        return message, [self._fds.popleft() for _ in range(count)]

    def _fill(self) -> bool:
        space = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
        try:
            data, ancdata, _flags, _addr = self._sock.recvmsg(65536, space)
        except ConnectionResetError:
            return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.set_inheritable(fd, False)
                    self._fds.append(fd)
        self._buf += data
        return bool(data)

    def close(self) -> None:
        """Close descriptors received but never handed out."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())


#: Errors a supervisor answers with (by class name) that are not classes of vzkit's tree.
_OTHER_ERRORS: dict[str, type[BaseException]] = {
    "ConnectionRefusedError": ConnectionRefusedError,
    "ConnectionResetError": ConnectionResetError,
    "FileNotFoundError": FileNotFoundError,
    "TimeoutError": errors.VMTimeoutError,
    "ValueError": errors.ConfigError,
    "AgentError": errors.GuestError,  # vzkit.agent's (the agent refused a request)
    "ProtocolError": errors.GuestError,
    "GuestFileNotFoundError": errors.GuestError,
}


def remote_error(name: str, error: dict[str, Any]) -> BaseException:
    """The exception a supervisor's error answer (``{"type", "message"}``) stands for: the
    class of vzkit's error tree it names, a few built-in ones, else a :class:`VMError` that
    names the VM."""
    kind, message = str(error.get("type")), str(error.get("message"))
    found = getattr(errors, kind, None) if kind in errors.__all__ else None
    if isinstance(found, type) and issubclass(found, VzkitError):
        return found(message)
    other = _OTHER_ERRORS.get(kind)
    if other is not None:
        return other(message)
    return VMError(f"VM {name!r}: {message}")


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (``None`` if unknown)."""
    if sys.platform.startswith("linux"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)
    if sys.platform == "darwin":
        # LOCAL_PEERCRED (1) at SOL_LOCAL (0): struct xucred {u_int version; uid_t uid; ...}
        raw = sock.getsockopt(0, 1, 76)
        return int(struct.unpack_from("=II", raw)[1])
    return None


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A name for the socket at ``path`` that fits ``sun_path``: the path itself when short,
    else (Linux) the same file through a ``/proc/self/fd`` name of its directory."""
    name = os.fsencode(path)
    if len(name) <= _MAX_SUN_PATH:
        yield str(path)
        return
    if not sys.platform.startswith("linux"):
        raise VzkitError(
            f"the control socket path {str(path)!r} is too long for a Unix socket: set "
            "VZKIT_HOME to a shorter directory"
        )
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
