"""Named VMs' records on disk, names, locks and the control socket's wire (no VM runs)."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
from pathlib import Path

import pytest

import vzkit
from vzkit.errors import SpecError, StateError, VMError, VMExistsError, VMNotFoundError
from vzkit.named._control import FrameReader, peer_uid, send_frame, short_path
from vzkit.named._home import VMDir, check_name, home, make_vm_dir, vms_dir


@pytest.fixture(autouse=True)
def vzkit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VZKIT_HOME", str(tmp_path / "h"))
    return tmp_path / "h"


@pytest.mark.parametrize("name", ["t1", "web.1", "a_b-c", "X" * 64, "9lives"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "has space", "x" * 65, ".dot", "-dash", "é", "..", 3])
def test_bad_names_are_refused_with_what_is_allowed(name: object) -> None:
    with pytest.raises(SpecError) as err:
        check_name(name)
    assert isinstance(err.value, ValueError)


def test_home_follows_vzkit_home_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert home() == tmp_path / "h"
    monkeypatch.delenv("VZKIT_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "vzkit"
    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # not absolute: ignored (XDG's rule)
    assert home() == Path.home() / ".local" / "state" / "vzkit"


def _record(name: str) -> dict[str, object]:
    return {"name": name, "backend": "qemu", "config": {}, "created": 1.0}


def test_a_vm_dir_is_private_and_a_name_is_taken_once(vzkit_home: Path) -> None:
    vmdir = VMDir.of("t1")
    make_vm_dir(vmdir, _record("t1"))
    assert stat.S_IMODE(vmdir.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(vms_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE(vmdir.vm_file.stat().st_mode) == 0o600
    assert vmdir.read_state()["state"] == "stopped"
    with pytest.raises(VMExistsError, match="a VM named 't1' exists"):
        make_vm_dir(VMDir.of("t1"), _record("t1"))
    # a directory left by a create that was killed before vm.json: taken over
    os.mkdir(vms_dir() / "t2", 0o755)
    make_vm_dir(VMDir.of("t2"), _record("t2"))
    assert stat.S_IMODE((vms_dir() / "t2").stat().st_mode) == 0o700
    with pytest.raises(VMNotFoundError, match="no VM named 'zz'") as err:
        VMDir.of("zz").read_vm()
    assert isinstance(err.value, LookupError)


def test_a_record_that_says_running_without_a_live_supervisor_reads_as_error() -> None:
    vmdir = VMDir.of("k1")
    make_vm_dir(vmdir, _record("k1"))
    vmdir.write_state(state="running", supervisor_pid=4242, vmm_pid=4343)
    state = vmdir.read_state()
    assert state["state"] == "error"
    assert "supervisor (pid 4242) died" in state["error"]
    assert "'vzkit start'" in state["error"]
    assert (state["supervisor_pid"], state["vmm_pid"]) == (None, None)
    # the same record while the supervisor's lock is held: running
    fd = vmdir.hold_supervisor_lock()
    try:
        assert vmdir.supervisor_alive()
        assert vmdir.read_state()["state"] == "running"
        with pytest.raises(StateError, match="already has a supervisor"):
            vmdir.hold_supervisor_lock()
    finally:
        os.close(fd)
    assert not vmdir.supervisor_alive()


def test_the_operation_lock_tells_the_second_comer() -> None:
    vmdir = VMDir.of("l1")
    make_vm_dir(vmdir, _record("l1"))
    inside = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with vmdir.locked("start"):
            inside.set()
            leave.wait(30)

    # flock locks belong to open file descriptions: a second open in the same process conflicts
    t = threading.Thread(target=hold)
    t.start()
    inside.wait(30)
    try:
        with (
            pytest.raises(StateError, match="another vzkit process is starting"),
            vmdir.locked("start", wait=0.1),
        ):
            pass
    finally:
        leave.set()
        t.join(30)


def test_state_json_is_merged_atomically_and_private() -> None:
    vmdir = VMDir.of("s1")
    make_vm_dir(vmdir, _record("s1"))
    vmdir.write_state(state="stopped", exit_code=3)
    vmdir.write_state(error="x")
    data = json.loads(vmdir.state_file.read_text())
    assert (data["exit_code"], data["error"]) == (3, "x")
    assert stat.S_IMODE(vmdir.state_file.stat().st_mode) == 0o600
    vmdir.state_file.write_text("[1]")
    with pytest.raises(vzkit.VzkitError, match="not a JSON object"):
        vmdir.read_state()


# -- the control socket's wire -----------------------------------------------------------------


def test_frames_carry_descriptors_in_order() -> None:
    a, b = socket.socketpair()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    with a, b:
        send_frame(a, {"id": 1})
        send_frame(a, {"id": 2}, [r1])
        send_frame(a, {"id": 3}, [r2])
        reader = FrameReader(b)
        got = [reader.read() for _ in range(3)]
        assert [m["id"] for m, _ in got] == [1, 2, 3]  # type: ignore[index]
        assert [len(fds) for _, fds in got] == [0, 1, 1]  # type: ignore[misc]
        os.write(w1, b"one")
        os.write(w2, b"two")
        assert os.read(got[1][1][0], 3) == b"one"  # type: ignore[index]
        assert os.read(got[2][1][0], 3) == b"two"  # type: ignore[index]
        for _, fds in got:  # type: ignore[misc]
            for fd in fds:
                os.close(fd)
        a.shutdown(socket.SHUT_WR)
        assert reader.read() is None
    for fd in (r1, w1, r2, w2):
        os.close(fd)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", 5) + b"[1,2]",  # not an object
        struct.pack(">I", 3) + b"{x}",  # not JSON
        struct.pack(">I", 9) + b'{"fds":2}',  # names descriptors that did not come
        struct.pack(">I", 1 << 30),  # too large
        struct.pack(">I", 10) + b"{}",  # cut off
    ],
)
def test_bad_frames_are_refused(raw: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(VMError):
            FrameReader(b).read()


def test_peer_uid_and_long_socket_paths(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    server = socket.socket(socket.AF_UNIX)
    with short_path(path) as name:
        assert len(name) < 100
        server.bind(name)
    server.listen(1)
    client = socket.socket(socket.AF_UNIX)
    with short_path(path) as name:
        client.connect(name)
    conn, _ = server.accept()
    with server, client, conn:
        assert peer_uid(conn) == os.geteuid()
    assert path.exists()
