"""``vzkit.exec_call`` (and its ``vzkit.aio`` twin), the client side, against a stand-in
supervisor that serves the VM's control socket in a thread: what it sends (the request, the
descriptors), what it makes of the answers, and what it says when the VM does not run. The
real supervisor on real guests: ``tests/e2e/test_named_vms.py``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
import vzkit.aio
from vzkit.errors import GuestError, SpecError, StateError, VMError, VMNotFoundError
from vzkit.named._control import FrameReader, remote_error, send_frame, short_path
from vzkit.named._home import VMDir, make_vm_dir


@pytest.fixture(autouse=True)
def vzkit_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VZKIT_HOME", str(tmp_path / "h"))
    return tmp_path / "h"


def _record(name: str) -> dict[str, Any]:
    return {"name": name, "backend": "qemu", "features": [], "config": {}, "created": 0.0}


Answer = Callable[[dict[str, Any], list[int]], dict[str, Any] | None]


class FakeSupervisor:
    """Holds the VM's supervisor lock, says it runs and answers each exec with ``answer``
    (``None``: hang up without an answer); the requests it got are kept."""

    def __init__(self, name: str, answer: Answer) -> None:
        self.vmdir = VMDir.of(name)
        make_vm_dir(self.vmdir, _record(name))
        self.lock = self.vmdir.hold_supervisor_lock()
        self.vmdir.write_state(state="running", supervisor_pid=os.getpid())
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with short_path(self.vmdir.control) as path:
            self.server.bind(path)
        self.server.listen(4)
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            with sock:
                reader = FrameReader(sock)
                frame = reader.read()
                assert frame is not None
                message, fds = frame
                self.requests.append(message)
                send_frame(sock, {"event": "state", "state": "running"})  # an unasked event
                try:
                    reply = self.answer(message, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                if reply is not None:
                    send_frame(sock, {"id": message["id"], **reply})

    def close(self) -> None:
        self.server.close()
        os.close(self.lock)


@pytest.fixture
def supervisor() -> Iterator[Callable[[Answer], FakeSupervisor]]:
    made: list[FakeSupervisor] = []

    def make(answer: Answer) -> FakeSupervisor:
        made.append(FakeSupervisor("t1", answer))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def _echo(message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Writes to the stdout and stderr it was given, copies the stdin it was given (if any)
    to stdout, and answers returncode 7."""
    os.write(fds[0], b"out:" + " ".join(message["argv"]).encode() + b"\n")
    os.write(fds[1], b"err\n")
    if message["stdin"]:
        while chunk := os.read(fds[2], 65536):
            os.write(fds[0], chunk)
    return {"ok": True, "result": {"returncode": 7}}


def test_the_request_carries_the_command_and_the_descriptors(
    supervisor: Callable[[Answer], FakeSupervisor], tmp_path: Path
) -> None:
    fake = supervisor(_echo)
    out, err, data = tmp_path / "out", tmp_path / "err", tmp_path / "in"
    data.write_bytes(b"fed\n" * 1000)
    with out.open("wb") as o, err.open("wb") as e, data.open("rb") as i:
        code = vzkit.exec_call(
            "t1", ["sh", "-c", "x"], env=["A=1", "B="], cwd="/tmp", user="1000:1000",
            stdin=i, stdout=o, stderr=e.fileno(), timeout=5,
        )  # fmt: skip
    assert code == 7
    assert out.read_bytes() == b"out:sh -c x\n" + b"fed\n" * 1000
    assert err.read_bytes() == b"err\n"
    (request,) = fake.requests
    assert {k: request[k] for k in ("op", "argv", "env", "cwd", "user", "timeout", "stdin")} == {
        "op": "exec", "argv": ["sh", "-c", "x"], "env": ["A=1", "B="], "cwd": "/tmp",
        "user": "1000:1000", "timeout": 5, "stdin": True,
    }  # fmt: skip
    assert request["fds"] == 3
    # without stdin= the command's stdin is empty: no descriptor is forwarded for it
    with out.open("wb") as o:
        assert vzkit.exec_call("t1", ["true"], stdout=o, stderr=subprocess.DEVNULL) == 7
    assert out.read_bytes() == b"out:true\n"
    assert fake.requests[-1]["stdin"] is False
    assert fake.requests[-1]["fds"] == 2


def test_the_asyncio_twin_does_the_same(
    supervisor: Callable[[Answer], FakeSupervisor], tmp_path: Path
) -> None:
    fake = supervisor(_echo)
    out = tmp_path / "out"
    read_end, write_end = os.pipe()
    os.write(write_end, b"piped\n")
    os.close(write_end)
    with out.open("wb") as o:
        code = asyncio.run(vzkit.aio.exec_call("t1", ["cat"], stdin=read_end, stdout=o, stderr=o))
    os.close(read_end)
    assert code == 7
    assert out.read_bytes() == b"out:cat\nerr\npiped\n"
    (request,) = fake.requests
    assert (request["op"], request["argv"], request["stdin"], request["fds"]) == (
        "exec", ["cat"], True, 3,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("error", "kind", "text"),
    [
        ({"type": "SpecError", "message": "user must be USER"}, SpecError, "user must be USER"),
        ({"type": "AgentError", "message": "no user 'x'"}, GuestError, "no user 'x'"),
        ({"type": "StateError", "message": "is paused"}, StateError, "is paused"),
        ({"type": "KeyError", "message": "odd"}, VMError, "VM 't1': odd"),
    ],
)
def test_an_error_answer_is_raised_as_its_class(
    supervisor: Callable[[Answer], FakeSupervisor],
    error: dict[str, Any],
    kind: type[Exception],
    text: str,
) -> None:
    supervisor(lambda message, fds: {"ok": False, "error": error})
    with pytest.raises(kind, match=text):
        vzkit.exec_call("t1", ["true"])
    assert isinstance(remote_error("t1", error), kind)


def test_a_supervisor_that_hangs_up_without_an_answer(
    supervisor: Callable[[Answer], FakeSupervisor],
) -> None:
    supervisor(lambda message, fds: None)
    with pytest.raises(VMError, match="its supervisor ended before the command did"):
        vzkit.exec_call("t1", ["true"])
    with pytest.raises(VMError, match="its supervisor ended before the command did"):
        asyncio.run(vzkit.aio.exec_call("t1", ["true"]))


def test_a_vm_that_is_unknown_or_does_not_run_is_told() -> None:
    with pytest.raises(VMNotFoundError, match="no VM named 'nope'"):
        vzkit.exec_call("nope", ["true"])
    make_vm_dir(VMDir.of("t2"), _record("t2"))
    with pytest.raises(StateError, match="the VM 't2' is stopped: 'vzkit start t2' starts it"):
        vzkit.exec_call("t2", ["true"])
    vmdir = VMDir.of("t2")
    vmdir.write_state(state="running", supervisor_pid=4242)  # its supervisor died
    with pytest.raises(StateError, match="the VM 't2' is error"):
        vzkit.exec_call("t2", ["true"])
    lock = vmdir.hold_supervisor_lock()  # alive, but it has no control socket (yet)
    try:
        with pytest.raises(StateError, match="its supervisor does not answer"):
            vzkit.exec_call("t2", ["true"])
        vmdir.write_state(state="paused")
        with pytest.raises(StateError, match="is paused, not running"):
            vzkit.exec_call("t2", ["true"])
    finally:
        os.close(lock)


@pytest.mark.parametrize(
    ("args", "kwargs", "text"),
    [
        ("echo hi", {}, "sequence of strings"),
        ([], {}, "non-empty"),
        (["true"], {"env": ["NOEQUALS"]}, "NAME=VALUE"),
        (["true"], {"env": "A=1"}, "NAME=VALUE strings"),
        (["true"], {"stdout": object()}, "needs real files"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(
    supervisor: Callable[[Answer], FakeSupervisor],
    args: Any,
    kwargs: dict[str, Any],
    text: str,
) -> None:
    fake = supervisor(_echo)
    with pytest.raises(SpecError, match=text) as raised:
        vzkit.exec_call("t1", args, **kwargs)
    assert isinstance(raised.value, ValueError)
    assert fake.requests == []
