"""Bridged networking on Linux: vzkit runs qemu-bridge-helper and hands QEMU the tap device.

QEMU's own ``-netdev bridge`` forks and execs the (often setuid) qemu-bridge-helper, which its
seccomp sandbox forbids (``spawn=deny``), and a setuid program cannot gain its rights under the
``no_new_privs`` libseccomp sets. So vzkit runs the helper itself, as an owned process, before
QEMU: the helper checks ``/etc/qemu/bridge.conf`` as ever, makes a tap device on the bridge and
sends its fd over a socket (``--fd``); QEMU inherits that fd (``-netdev tap,fd=N``) and stays
fully sandboxed.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from pathlib import Path

from ..._private import open_private
from ..._process import spawn
from ...errors import UnsupportedError, VMError

__all__ = ["HELPERS", "find_bridge_helper", "open_bridge_tap"]

HELPERS = ("/usr/lib/qemu/qemu-bridge-helper", "/usr/libexec/qemu-bridge-helper")
_HELPER_TIMEOUT_S = 10.0


def find_bridge_helper() -> Path:
    for helper in HELPERS:
        if os.access(helper, os.X_OK):
            return Path(helper)
    raise UnsupportedError(
        "bridged networking needs qemu-bridge-helper, which was not found",
        backend="qemu",
        feature="network:bridged",
    )


def _receive_fd(sock: socket.socket) -> int | None:
    """The one fd the helper sent with its byte (``SCM_RIGHTS``), if any."""
    fds = array.array("i")
    try:
        _, ancdata, _, _ = sock.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    except BlockingIOError:
        return None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else None


async def open_bridge_tap(helper: Path, bridge: str, log_path: Path) -> int:
    """A tap device on ``bridge`` from ``helper``: its fd (the caller owns and closes it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [str(helper), "--use-vnet", f"--br={bridge}", f"--fd={theirs.fileno()}"]
        with open_private(log_path) as stderr:
            proc = await spawn(
                argv, name="qemu-bridge-helper", pass_fds=(theirs.fileno(),), stderr=stderr
            )
        theirs.close()
        try:
            async with asyncio.timeout(_HELPER_TIMEOUT_S):
                rc = await proc.wait()
        except BaseException:
            await proc.kill()
            raise
        ours.setblocking(False)
        fd = _receive_fd(ours)
    finally:
        theirs.close()
        ours.close()
    if rc == 0 and fd is not None:
        return fd
    if fd is not None:
        os.close(fd)
    lines = log_path.read_text(errors="replace").strip().splitlines()
    raise VMError(
        f"qemu-bridge-helper could not attach the VM to bridge {bridge!r} (exit {rc}): "
        f"{lines[-1] if lines else 'no output'} (is the bridge allowed in /etc/qemu/bridge.conf?)"
    )
