"""Where named VMs live on disk: the per-user state directory, names, records and locks.

``<home>/vms/<name>/`` (0700) holds everything of one VM::

    vm.json          what it is: the config, the backend, its main command (written once)
    state.json       what it is doing: written atomically by its supervisor and by the
                     process that starts, stops or removes it
    supervisor.lock  held (flock) by the live supervisor for as long as it runs
    lock             held by a process that creates, starts or removes the VM (short)
    control.sock     the supervisor's control socket (0600; peers of another uid refused)
    supervisor.log   the supervisor's own messages; command.log: the main command's output
    run/             the machine's state dir: console log, QEMU's sockets, the root layer

The home is ``$VZKIT_HOME``, else ``$XDG_STATE_HOME/vzkit`` (``~/.local/state/vzkit``) on
Linux and ``~/Library/Application Support/vzkit`` on macOS. Because the state is on disk and
the supervisor's liveness is its lock, a reader tells the truth after a host reboot or a
killed supervisor: the record says running, the lock is free, so the supervisor is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fsutil import write_atomic
from .._private import private_dir
from .._state import VMState
from ..errors import SpecError, StateError, VMExistsError, VMNotFoundError, VzkitError

__all__ = [
    "VMDir",
    "check_name",
    "home",
    "make_vm_dir",
    "vms_dir",
    "wait_supervisor_gone",
]

#: Docker's container name rule, bounded: a name is also a directory and part of a path.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_NAME_BYTES = 64
#: How long a second ``start``/``rm`` waits for the first one's lock before it is told.
LOCK_WAIT_S = 120.0


def check_name(name: object) -> str:
    """``name`` if it is a valid VM name, else a :class:`SpecError` saying what is allowed."""
    if not isinstance(name, str):
        raise SpecError(f"a VM name is a string, got {type(name).__name__}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise SpecError(
            f"VM name {name[:20]!r}... is over {MAX_NAME_BYTES} bytes: pick a shorter one"
        )
    if not _NAME.fullmatch(name):
        raise SpecError(
            f"VM name {name!r} is not allowed: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (no '/' or spaces)"
        )
    return name


def home() -> Path:
    """The per-user state directory (not created here)."""
    override = os.environ.get("VZKIT_HOME")
    if override:
        return Path(override).expanduser().absolute()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "vzkit"
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "vzkit"


def vms_dir(create: bool = False) -> Path:
    path = home() / "vms"
    if create:
        private_dir(path)
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise VzkitError(f"{path} cannot be read ({err}): 'vzkit rm -f' removes the VM") from err
    if not isinstance(data, dict):
        raise VzkitError(f"{path} is not a JSON object: 'vzkit rm -f' removes the VM")
    return data


@dataclass(frozen=True)
class VMDir:
    """One named VM's directory (it may not exist yet)."""

    name: str
    path: Path

    @classmethod
    def of(cls, name: str) -> VMDir:
        return cls(check_name(name), vms_dir() / name)

    @property
    def vm_file(self) -> Path:
        return self.path / "vm.json"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def control(self) -> Path:
        return self.path / "control.sock"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    @property
    def log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def command_log(self) -> Path:
        return self.path / "command.log"

    def exists(self) -> bool:
        return self.vm_file.is_file()

    def require(self) -> VMDir:
        if not self.exists():
            raise VMNotFoundError(f"no VM named {self.name!r}: 'vzkit ls -a' lists them")
        return self

    # -- records ---------------------------------------------------------------------------

    def read_vm(self) -> dict[str, Any]:
        data = _read_json(self.require().vm_file)
        if data is None:
            raise VMNotFoundError(f"no VM named {self.name!r}: 'vzkit ls -a' lists them")
        return data

    def read_state(self) -> dict[str, Any]:
        """The recorded state, corrected by the supervisor's liveness: a record that says the
        VM runs while no supervisor holds its lock is an ERROR (the supervisor died)."""
        data = _read_json(self.state_file) or {"state": VMState.STOPPED.value}
        live = VMState(data.get("state", "stopped")) not in (VMState.STOPPED, VMState.ERROR)
        if live and not self.supervisor_alive():
            pid = data.get("supervisor_pid")
            data = {
                **data,
                "state": VMState.ERROR.value,
                "error": f"its supervisor (pid {pid}) died without stopping the VM (killed, "
                "or the host restarted): 'vzkit start' boots it again",
                "supervisor_pid": None,
                "vmm_pid": None,
            }
        return data

    def write_state(self, **fields: Any) -> None:
        """Merge ``fields`` into state.json (atomic; 0600)."""
        current = _read_json(self.state_file) or {}
        current.update(fields)
        data = json.dumps(current, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self.state_file, data)

    # -- locks -----------------------------------------------------------------------------

    def supervisor_alive(self) -> bool:
        """Whether a supervisor holds this VM's lock now."""
        try:
            fd = os.open(self.path / "supervisor.lock", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def hold_supervisor_lock(self) -> int:
        """Take the supervisor's lock for the life of this process (the fd is kept open and
        not inherited); :class:`StateError` if another supervisor has it."""
        fd = os.open(
            self.path / "supervisor.lock",
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError(f"VM {self.name!r} already has a supervisor") from None
            raise
        return fd

    @contextlib.contextmanager
    def locked(self, what: str, wait: float = LOCK_WAIT_S) -> Iterator[None]:
        """Hold the VM's operation lock (create, start, rm) for the block; waits up to
        ``wait`` seconds for another process's, then says who is in the way."""
        fd = os.open(
            self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"cannot {what} VM {self.name!r}: another vzkit process is starting, "
                        "stopping or removing it; try again when it is done"
                    )
                time.sleep(0.05)  # polled: flock has no timeout of its own
            yield
        finally:
            os.close(fd)


def wait_supervisor_gone(vmdir: VMDir, timeout: float) -> bool:
    """Wait until no supervisor holds ``vmdir``'s lock (it exits once it has closed its
    clients); False if one still does after ``timeout``."""
    deadline = time.monotonic() + timeout
    while vmdir.supervisor_alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)  # polled: the lock is released by the process's exit
    return True


def make_vm_dir(vmdir: VMDir, record: dict[str, Any]) -> None:
    """Create ``vmdir`` with its ``vm.json``; :class:`VMExistsError` if the name is taken."""
    private_dir(vmdir.path.parent)
    try:
        os.mkdir(vmdir.path, 0o700)
    except FileExistsError:
        if vmdir.exists():
            raise VMExistsError(
                f"a VM named {vmdir.name!r} exists: pick another name, or 'vzkit rm "
                f"{vmdir.name}' first"
            ) from None
        # a directory without vm.json: a create that was killed midway; take it over
    os.chmod(vmdir.path, 0o700)
    with vmdir.locked("create"):
        if vmdir.exists():
            raise VMExistsError(f"a VM named {vmdir.name!r} exists: pick another name")
        vmdir.write_state(state=VMState.STOPPED.value)
        data = json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(vmdir.vm_file, data)
