"""The vz backend's ``stdio`` console on a terminal (as vfkit): the terminal is raw while the
VM runs, so every key (Ctrl-C included) is a byte for the guest and the guest echoes;
``Ctrl-]`` ``.`` stops the VM; the terminal's settings come back on every way out.

The framework reads the console from a descriptor itself, so the test puts a pseudo-terminal
on this process's fd 0 for the duration (``stdin_tty``) and types on its other side.
"""

from __future__ import annotations

import os
import select
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._graph import render
from ._support import ARM64_IMAGE
from .fakeobjc import FakeRuntime, guest_power_off

pytestmark = pytest.mark.contract
COOKED = termios.ICANON | termios.ECHO | termios.ISIG


@pytest.fixture
def stdin_tty() -> Iterator[int]:
    """A pty's terminal end on fd 0 (restored after); yields the side that types."""
    master, slave = os.openpty()
    saved = os.dup(0)
    os.dup2(slave, 0)
    try:
        yield master
    finally:
        os.dup2(saved, 0)
        for fd in (saved, slave, master):
            os.close(fd)


@pytest.fixture
def cfg(tmp_path: Path) -> vzkit.LinuxVMConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(ARM64_IMAGE)
    return vzkit.LinuxVMConfig(
        kernel_path=kernel, memory_gb=1, console="stdio", state_dir=tmp_path / "state"
    )


def lflag() -> int:
    return int(termios.tcgetattr(0)[3])


def console_input_fd(fake: FakeRuntime) -> int:
    (port,) = render(fake, fake.vms[-1]._fk.extra["config"])["serialPorts"]
    fd = port["attachment"]["fileHandleForReading"]["fd"]
    assert isinstance(fd, int)
    return fd


def read_some(fd: int, want: int) -> bytes:
    got = b""
    while len(got) < want:
        ready, _, _ = select.select([fd], [], [], 5)
        assert ready, f"only {got!r} arrived"
        got += os.read(fd, 1024)
    return got


def test_the_terminal_is_raw_while_the_vm_runs_and_keys_reach_the_guest(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, stdin_tty: int
) -> None:
    assert lflag() & COOKED == COOKED
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        assert lflag() & COOKED == 0  # no echo, no line editing, Ctrl-C is no signal
        fd = console_input_fd(fake)
        assert fd != 0  # the console reads the copy, so the escape can be seen
        os.write(stdin_tty, b"ls\r\x03")
        assert read_some(fd, 4) == b"ls\r\x03"
        guest_power_off(fake, fake.vms[-1])
        assert vm.wait(timeout=5) is vzkit.VMState.STOPPED
        assert lflag() & COOKED == COOKED  # back as soon as the guest is off
    assert fake.violations == []


def test_ctrl_bracket_dot_stops_the_vm_and_restores_the_terminal(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, stdin_tty: int
) -> None:
    saved = termios.tcgetattr(0)
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        fd = console_input_fd(fake)
        os.write(stdin_tty, b"a\x1d\x1db\x1d.")  # Ctrl-] twice sends one
        assert read_some(fd, 3) == b"a\x1db"
        assert vm.wait(timeout=5) is vzkit.VMState.STOPPED
        assert termios.tcgetattr(0) == saved
    assert fake.violations == []


def test_close_restores_the_terminal(
    fake: FakeRuntime, cfg: vzkit.LinuxVMConfig, stdin_tty: int
) -> None:
    saved = termios.tcgetattr(0)
    vm = vzkit.VirtualMachine(cfg, backend=vzb.BACKEND)
    vm.start(timeout=5)
    assert termios.tcgetattr(0) != saved
    vm.close()
    assert termios.tcgetattr(0) == saved


def test_stdin_not_a_terminal_is_read_as_it_is(fake: FakeRuntime, cfg: vzkit.LinuxVMConfig) -> None:
    read_fd, write_fd = os.pipe()
    saved = os.dup(0)
    os.dup2(read_fd, 0)
    try:
        with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
            vm.start(timeout=5)
            assert console_input_fd(fake) == 0
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_fd, write_fd):
            os.close(fd)


def test_a_terminal_of_another_foreground_group_is_left_as_it_is(
    fake: FakeRuntime,
    cfg: vzkit.LinuxVMConfig,
    stdin_tty: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A background job (``vzkit run ... &``) must not change the terminal (SIGTTOU would
    stop it): its console reads the terminal as it is."""
    saved = termios.tcgetattr(0)
    monkeypatch.setattr(os, "tcgetpgrp", lambda fd: os.getpgrp() + 1)
    with vzkit.VirtualMachine(cfg, backend=vzb.BACKEND) as vm:
        vm.start(timeout=5)
        assert console_input_fd(fake) == 0
        assert termios.tcgetattr(0) == saved
