"""A guest command attached to this process, as ``vzkit run`` and ``vzkit exec`` both run one:
its output copied to stdout and stderr, stdin forwarded (pipes), or this terminal attached to
a pty in the guest (``-t``, :mod:`._tty`); its exit code as a shell reports it.

SIGTERM (and, on a terminal, SIGHUP) is raised in the main thread as :class:`_Terminated`,
as Ctrl-C raises ``KeyboardInterrupt``, so each command's clean-up runs on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from vzkit import VMState
from vzkit.errors import SpecError, StateError, VzkitError

if TYPE_CHECKING:
    from vzkit import VirtualMachine

__all__ = [
    "DOWN",
    "EXIT_RUN_FAILED",
    "attach_terminal",
    "catch_signals",
    "exit_code",
    "expand_env",
    "guest_command_options",
    "pump",
    "require_running",
    "stream_command",
    "terminated",
]

#: ``vzkit run``'s and ``vzkit exec``'s own failures (the VM could not boot or does not run,
#: ...), as ``docker run`` uses 125.
EXIT_RUN_FAILED = 125
#: States of a VM that is down (``vzkit start`` brings it back).
DOWN = frozenset({VMState.STOPPED, VMState.ERROR})


class _Terminated(BaseException):
    """SIGTERM (or SIGHUP on a terminal), raised in the main thread like KeyboardInterrupt so
    clean-up runs. Control flow, not an error of vzkit's tree: private to the CLI (``_run``
    and ``_exec`` catch it)."""


def terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def catch_signals() -> None:
    """Ctrl-C and SIGTERM end the command with its clean-up, even when this process was
    started with SIGINT ignored (as shells do for background jobs)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)


def pump(src: IO[bytes], dst: IO[bytes]) -> None:
    """Copy a stream to ``dst``'s file descriptor until EOF, chunk by chunk (bounded memory).

    Writes the descriptor itself, not ``dst``: these are daemon threads, and one caught inside
    a buffered writer's lock when the interpreter exits (Ctrl-C while the command prints) makes
    it abort with "_enter_buffered_busy"."""
    with contextlib.suppress(OSError, ValueError, VzkitError):
        dst.flush()  # what this process printed before goes first
        fd = dst.fileno()
        while chunk := src.read1(65536) if hasattr(src, "read1") else src.read(65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]


def exit_code(returncode: int) -> int:
    """The command's exit code, or 128+N when a signal N ended it (as shells report it)."""
    return 128 - returncode if returncode < 0 else returncode


def stream_command(
    vm: Any,
    command: list[str],
    env: Mapping[Any, Any] | None,
    cwd: str | None,
    user: str | None,
    forward_stdin: bool,
) -> int:
    """Run ``command`` in ``vm``'s guest on pipes: its output to this process's stdout and
    stderr, this stdin to it if ``forward_stdin``; its exit code (killed on Ctrl-C/SIGTERM)."""
    proc = vm.guest.popen(command, stdin=forward_stdin, env=env, cwd=cwd, user=user)
    with contextlib.ExitStack() as stack:
        fds = [_fd(stream, stack) for stream in (sys.stdin, sys.stdout, sys.stderr)]
        return exit_code(proc.attach(fds[0] if forward_stdin else None, fds[1], fds[2]))


def _fd(stream: IO[Any], stack: contextlib.ExitStack) -> int:
    """``stream``'s descriptor, flushed first; /dev/null for a stream without one (a test's
    pseudo-file)."""
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = os.open(os.devnull, os.O_RDWR)
        stack.callback(os.close, fd)
        return fd


def attach_terminal(
    vm: Any,
    command: list[str],
    env: Mapping[Any, Any] | None,
    cwd: str | None,
    user: str | None,
) -> tuple[int, bool]:
    """``-t``: ``command`` on a pty in ``vm``'s guest, attached to this terminal (:mod:`._tty`).
    Its exit code, and whether the escape (``Ctrl-]`` ``.``) ended the session."""
    from ._tty import attach, terminal_size

    fd = sys.stdin.fileno()
    proc = vm.guest.popen(command, env=env, cwd=cwd, user=user, tty=True, size=terminal_size(fd))
    returncode, detached = attach(
        proc, lambda: pump(proc.stdout, sys.stdout.buffer), terminated, fd
    )
    return exit_code(returncode), detached


def expand_env(
    items: tuple[str, ...], files: tuple[Path, ...], host: Mapping[str, str]
) -> tuple[str, ...]:
    """``-e``/``--env-file`` as docker reads them, as ``NAME=VALUE`` items: the files first
    (a line is ``NAME=VALUE`` or ``NAME``; blank lines and ``#`` comments are skipped; no
    quotes are removed), then ``-e``, later ones winning. ``NAME`` alone takes the value in
    ``host`` and is left out when ``host`` has none."""
    lines: list[tuple[str, str]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SpecError(f"--env-file {str(path)!r} cannot be read: {err}") from err
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append((line, f"{path}:{number}"))
    lines += [(item, "--env") for item in items]
    out = []
    for item, where in lines:
        name, sep, value = item.partition("=")
        if not name or name != name.strip() or "\0" in item:
            raise SpecError(f"{where} wants NAME=VALUE or NAME, got {item!r}")
        if sep:
            out.append(f"{name}={value}")
        elif name in host:
            out.append(f"{name}={host[name]}")
    return tuple(out)


def require_running(vm: VirtualMachine, name: str) -> None:
    """A ``StateError`` that says what to do unless ``vm`` runs."""
    state = vm.state
    if state is VMState.RUNNING:
        return
    if state in DOWN:
        raise StateError(f"the VM {name!r} is {state.value}: 'vzkit start {name}' starts it")
    raise StateError(f"the VM {name!r} is {state.value}, not running: try again when it runs")


def guest_command_options(func: Any) -> Any:
    """The options of a guest command attached to this process, shared by ``vzkit run`` and
    ``vzkit exec``: ``-e``, ``--env-file``, ``-w``, ``-u``, ``-i``, ``-t``."""
    import click

    func = click.option(
        "-t",
        "--tty",
        is_flag=True,
        help="Run the command on a terminal in the guest: this one goes raw (keys, Ctrl-C "
        "included, go to the guest), its size follows; Ctrl-] then . ends the session.",
    )(func)
    func = click.option(
        "-i", "--interactive", is_flag=True, help="Forward stdin even when it is a terminal."
    )(func)
    func = click.option(
        "-u",
        "--user",
        metavar="USER[:GROUP]",
        help="Run the command as this guest user (names resolved in the guest, or numeric ids), "
        "with its groups and HOME.",
    )(func)
    func = click.option("-w", "--workdir", metavar="DIR", help="Working directory in the guest.")(
        func
    )
    func = click.option(
        "--env-file",
        "env_files",
        multiple=True,
        type=click.Path(path_type=Path, dir_okay=False),
        help="Read variables from a file: NAME=VALUE or NAME per line, # comments "
        "(docker's format).",
    )(func)
    func = click.option(
        "-e",
        "--env",
        "env",
        multiple=True,
        metavar="NAME[=VALUE]",
        help="Set a variable; NAME alone passes this shell's value (as docker does).",
    )(func)
    return func
