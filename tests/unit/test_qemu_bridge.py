"""Bridged networking on Linux: vzkit runs qemu-bridge-helper and passes QEMU the tap fd.

A stand-in helper speaks the real one's protocol: it gets ``--use-vnet --br=BR --fd=N`` and
sends one byte with an fd (``SCM_RIGHTS``) on socket N; or it refuses, as the real one does
for a bridge that ``/etc/qemu/bridge.conf`` does not allow.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children
from vzkit.backends.qemu._bridge import open_bridge_tap

FAKE_HELPER = f"""#!{sys.executable}
import array, os, socket, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
assert sys.argv[1] == "--use-vnet", sys.argv
if args["--br"] != "br-ok":
    print("access denied by acl file", file=sys.stderr)
    sys.exit(1)
sock = socket.socket(fileno=int(args["--fd"]))
tap = os.open(os.path.join(os.path.dirname(sys.argv[0]), "tap"), os.O_RDWR | os.O_CREAT)
sock.sendmsg([b"\\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [tap]))])
"""


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    path = tmp_path / "qemu-bridge-helper"
    path.write_text(FAKE_HELPER)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_tap_fd_comes_from_the_helper(helper: Path, tmp_path: Path) -> None:
    fd = asyncio.run(open_bridge_tap(helper, "br-ok", tmp_path / "bridge-helper.log"))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "tap"))
    finally:
        os.close(fd)
    assert live_children() == {}  # the helper was reaped
    assert stat.S_IMODE((tmp_path / "bridge-helper.log").stat().st_mode) == 0o600


def test_a_refused_bridge_is_a_vm_error_with_the_helpers_reason(
    helper: Path, tmp_path: Path
) -> None:
    with pytest.raises(vzkit.VMError) as info:
        asyncio.run(open_bridge_tap(helper, "br-no", tmp_path / "bridge-helper.log"))
    assert str(info.value) == (
        "qemu-bridge-helper could not attach the VM to bridge 'br-no' (exit 1): access denied "
        "by acl file (is the bridge allowed in /etc/qemu/bridge.conf?)"
    )
    assert live_children() == {}
