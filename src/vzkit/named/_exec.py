"""``vzkit.exec_call``: a command in a named VM with this process's file descriptors as its
stdio, run by the VM's supervisor (``vzkit exec`` without ``-t``).

The client sends one ``exec`` request on the control socket with its stdout, stderr (and
stdin) passed as descriptors (:mod:`._control`) and waits for the returncode; the supervisor
runs the command through its own agent connection and copies the outputs straight into those
descriptors. So a call needs no event loop, no agent session and no config of its own: a new
``vzkit exec`` process imports little more than this module. Closing the connection (Ctrl-C,
the caller killed) makes the supervisor kill the command.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Sequence
from typing import IO, Any

from .._state import VMState
from ..errors import SpecError, StateError, VMError
from ._control import MAX_FRAME, FrameReader, decode_message, remote_error, send_frame, short_path
from ._home import VMDir, check_name

__all__ = ["DEVNULL", "exec_call", "exec_call_async"]

#: ``stdin=DEVNULL``: the command reads an empty stdin (the default); ``subprocess.DEVNULL``'s
#: value, which is taken too.
DEVNULL = -3

_Stream = int | IO[Any] | None


def exec_call(
    name: str,
    args: Sequence[str],
    *,
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: str | None = None,
    stdin: _Stream = DEVNULL,
    stdout: _Stream = None,
    stderr: _Stream = None,
    timeout: float | None = None,
) -> int:
    """Run ``args`` in the running named VM ``name`` as :func:`subprocess.call` runs a
    program, and return its returncode (negative: killed by that signal).

    ``stdout``/``stderr``: a file descriptor or a file with one (``None``: this process's);
    ``stdin``: one to forward to the command until its end of file (``DEVNULL``, the default:
    an empty stdin; ``None``: this process's). ``env``: ``NAME=VALUE`` items, as ``vzkit exec
    -e`` takes them (:meth:`~vzkit.ProcessDefaults.command_environment`); ``cwd``, ``user``
    (``USER[:GROUP]``) as for ``guest.run``; ``timeout``: seconds after which the guest kills
    the command. The output goes from the VM's supervisor straight into the descriptors, so
    this process needs no connection of its own (:func:`vzkit.connect` gives one).

    :class:`~vzkit.errors.VMNotFoundError` for an unknown name, :class:`~vzkit.errors.
    StateError` (saying what to do) unless the VM runs, the guest's error when the command
    cannot start (an unknown user, a missing program is returncode 127)."""
    argv, items = _check(args, env)
    vmdir = VMDir.of(check_name(name))
    with contextlib.ExitStack() as stack:
        fds = [_fd(stdout, 1, stack), _fd(stderr, 2, stack)]
        if stdin != DEVNULL:
            fds.append(_fd(stdin, 0, stack))
        sock = _open(vmdir)
        stack.callback(sock.close)
        request = {"id": 1, "op": "exec", "argv": argv, "env": items, "cwd": cwd,
                   "user": user, "timeout": timeout, "stdin": len(fds) == 3}  # fmt: skip
        reader = FrameReader(sock)
        stack.callback(reader.close)
        try:
            send_frame(sock, request, fds)
            while (frame := reader.read()) is not None:
                message, received = frame
                for fd in received:
                    os.close(fd)
                if message.get("id") == 1:
                    return _returncode(vmdir.name, message)
        except OSError as err:
            raise VMError(f"VM {vmdir.name!r}: its supervisor went away: {err}") from err
        raise VMError(f"VM {vmdir.name!r}: its supervisor ended before the command did")
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the with returns or raises


async def exec_call_async(
    name: str,
    args: Sequence[str],
    *,
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: str | None = None,
    stdin: _Stream = DEVNULL,
    stdout: _Stream = None,
    stderr: _Stream = None,
    timeout: float | None = None,
) -> int:
    """The asyncio twin of :func:`exec_call`. Cancelled, it closes the connection, and the
    supervisor kills the command."""
    import asyncio  # here: 'vzkit exec' does not pay for it

    argv, items = _check(args, env)
    vmdir = VMDir.of(check_name(name))
    with contextlib.ExitStack() as stack:
        fds = [_fd(stdout, 1, stack), _fd(stderr, 2, stack)]
        if stdin != DEVNULL:
            fds.append(_fd(stdin, 0, stack))
        sock = await asyncio.to_thread(_open, vmdir)
        stack.callback(sock.close)
        request = {"id": 1, "op": "exec", "argv": argv, "env": items, "cwd": cwd,
                   "user": user, "timeout": timeout, "stdin": len(fds) == 3}  # fmt: skip
        try:
            send_frame(sock, request, fds)  # one small frame: the socket takes it at once
        except OSError as err:
            raise VMError(f"VM {vmdir.name!r}: its supervisor went away: {err}") from err
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        stack.callback(writer.close)
        while True:
            try:
                header = await reader.readexactly(4)
                size = int.from_bytes(header, "big")
                if size > MAX_FRAME:
                    raise VMError(f"control frame of {size} bytes is too large")
                body = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, OSError):
                raise VMError(
                    f"VM {vmdir.name!r}: its supervisor ended before the command did"
                ) from None
            message = decode_message(body)
            if message.get("id") == 1:
                return _returncode(vmdir.name, message)


def _check(args: Sequence[str], env: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(args, str | bytes):
        raise SpecError("exec_call's args is a sequence of strings: ['sh', '-c', '...']")
    argv = list(args)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise SpecError("exec_call's args is a non-empty sequence of strings")
    if isinstance(env, str | bytes):
        raise SpecError("exec_call's env is a sequence of NAME=VALUE strings")
    items = list(env)
    for item in items:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise SpecError(f"env items are NAME=VALUE, got {item!r}")
    return argv, items


def _fd(stream: _Stream, default: int, stack: contextlib.ExitStack) -> int:
    """The descriptor of ``stream`` (flushed first): an int, a file's, ``None`` for this
    process's ``default`` (0, 1, 2), or /dev/null for ``DEVNULL``."""
    if stream == DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, fd)
        return fd
    if stream is None:  # this process's own; none (pythonw, a test's pseudo-file): /dev/null
        own = (sys.stdin, sys.stdout, sys.stderr)[default]
        try:
            return _fd(own, default, stack) if own is not None else _fd(DEVNULL, default, stack)
        except SpecError:
            return _fd(DEVNULL, default, stack)
    if isinstance(stream, int):
        try:
            os.fstat(stream)
        except (OSError, OverflowError):
            raise SpecError(
                f"exec_call's stdio takes open file descriptors, files or DEVNULL, got {stream}"
            ) from None
        return stream
    with contextlib.suppress(AttributeError, OSError, ValueError):
        stream.flush()  # what was written before goes first
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError) as err:
        raise SpecError(
            f"exec_call needs real files (with a file descriptor) for its stdio, got {stream!r}: "
            "use vzkit.connect(name).guest.run(...) to capture output in memory"
        ) from err


def _open(vmdir: VMDir) -> socket.socket:
    """A connection to the supervisor of the running VM, or a :class:`StateError` that says
    what to do."""
    vmdir.read_vm()  # VMNotFoundError for an unknown name
    state = VMState(vmdir.read_state().get("state", "stopped"))
    name = vmdir.name
    if state in (VMState.STOPPED, VMState.ERROR):
        raise StateError(f"the VM {name!r} is {state.value}: 'vzkit start {name}' starts it")
    if state is not VMState.RUNNING:
        raise StateError(f"the VM {name!r} is {state.value}, not running: try again when it runs")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(vmdir.control) as path:
            sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()  # the supervisor went meanwhile (or has not served yet)
        raise StateError(
            f"the VM {name!r} is not running (its supervisor does not answer): 'vzkit ls -a' "
            "says why"
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _returncode(name: str, message: dict[str, Any]) -> int:
    if not message.get("ok"):
        raise remote_error(name, message.get("error") or {})
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("returncode"), int):
        raise VMError(f"VM {name!r}: the supervisor's answer to an exec has no returncode")
    return int(result["returncode"])
