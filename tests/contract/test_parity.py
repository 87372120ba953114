"""``docs/vz-parity.md`` lists every seed name with a Python name that exists and a real test."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "vz-parity.md"

# Every exported name of the seed's API reference (shared/seed/vzkit-v0.4.4.txt), copied here
# because tests must not read ../shared.
SEED_NAMES = [
    "RunLoopRunFinished",
    "RunLoopRunStopped",
    "RunLoopRunTimedOut",
    "RunLoopRunHandledSource",
    "AddMemoryBalloonDevice",
    "BuildLinuxVMConfig",
    "CanStart",
    "CanStop",
    "CreateBlockDevice",
    "CreateDirectoryShare",
    "CreateDiskAttachment",
    "CreateDiskImage",
    "CreateMacGraphicsConfig",
    "CreateNetworkAttachment",
    "CreateNetworkDevice",
    "CreateSerialConsole",
    "CreateStdioSerialConsole",
    "CreateVM",
    "CreateVirtioFSDevices",
    "CreateVirtioGraphicsConfig",
    "ExtractNSErrorMessage",
    "FormatNSErrorDetailed",
    "NSDataFromBytes",
    "NSDataToBytes",
    "PrintNSErrorDetailed",
    "Retain",
    "RunRunLoopAggressively",
    "RunRunLoopOnce",
    "RunRunLoopUntilDone",
    "SetBalloonTarget",
    "StartVM",
    "StopVM",
    "VMState",
    "ValidateConfig",
    "BalloonInfo",
    "GetBalloonInfo",
    "DisplayConfig",
    "DefaultDisplayConfig",
    "DefaultLinuxDisplayConfig",
    "ParseDisplaySpec",
    "DisplaySlice",
    "DisplaySlice.Set",
    "DisplaySlice.String",
    "ErrorCompletionHandler",
    "NewErrorCompletionHandler",
    "ErrorCompletionHandler.Block",
    "ErrorCompletionHandler.Done",
    "ErrorCompletionHandler.Error",
    "ErrorCompletionHandler.Wait",
    "LinuxVMConfig",
    "NetworkConfig",
    "ParseNetworkMode",
    "NetworkMode",
    "NetworkModeNAT",
    "NetworkModeBridged",
    "NetworkModeVMNet",
    "NetworkModeNone",
    "Queue",
    "NewQueue",
    "WrapQueue",
    "Queue.Async",
    "Queue.Queue",
    "Queue.Sync",
    "SnapshotManager",
    "NewSnapshotManager",
    "SnapshotManager.Delete",
    "SnapshotManager.List",
    "SnapshotManager.Restore",
    "SnapshotManager.Save",
    "SnapshotMeta",
    "VolumeMount",
    "ParseVolumeSpec",
    "VsockConn",
    "NewVsockConn",
    "VsockConn.Close",
    "VsockConn.LocalAddr",
    "VsockConn.Read",
    "VsockConn.RemoteAddr",
    "VsockConn.SetDeadline",
    "VsockConn.SetReadDeadline",
    "VsockConn.SetWriteDeadline",
    "VsockConn.Write",
    "VsockManager",
    "NewVsockManager",
    "VsockManager.Connect",
    "VsockManager.DispatchFunc",
]

ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \| `([^`]+)` \|$")


def rows() -> list[tuple[str, str, str]]:
    out = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            out.append((match[1], match[2], match[3]))
    return out


def test_every_seed_name_has_a_row() -> None:
    listed = [seed for seed, _, _ in rows()]
    assert sorted(set(SEED_NAMES) - set(listed)) == []


def _resolve(dotted: str) -> object:
    prefix = {"vz": "vzkit.backends.vz", "vzkit": "vzkit", "socket": "socket"}
    head, _, rest = dotted.partition(".")
    obj: object = importlib.import_module(prefix[head])
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("seed", "python", "test"), rows(), ids=[r[0] for r in rows()])
def test_row_names_exist(seed: str, python: str, test: str) -> None:
    names = re.findall(r"`((?:vz|vzkit|socket)\.[\w.]+)`", python)
    assert names, f"{seed}: no Python name in {python!r}"
    for name in names:
        if name.endswith(".block"):  # an instance attribute
            continue
        _resolve(name)
    path, _, func = test.partition("::")
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {re.escape(func)}\(", source, re.M), test
