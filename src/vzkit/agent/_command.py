"""What a guest command is, as :func:`subprocess.run` has it: the argv, ``shell``, ``text``.

A list (or tuple) is one program and its arguments; a string is a shell line and needs
``shell=True``, which runs it as ``/bin/sh -c LINE`` (as :mod:`subprocess` does, further list
items become ``$0``, ``$1``, ...). A string without ``shell=True`` is refused with
:class:`~vzkit.errors.ArgumentError`: run as one program name, ``"echo hi"`` would exit 127
("not found"), which is never what was meant. A path object (:class:`os.PathLike`) is one
program, without arguments.

``user="USER[:GROUP]"`` (names, resolved in the guest, or numeric ids) runs the command as
that user: with its groups from the guest's ``/etc/group``, or only ``GROUP`` when one is given,
and its ``HOME``, ``USER`` and ``LOGNAME`` unless ``env`` sets them. A malformed spec is refused
here with :class:`~vzkit.errors.SpecError`; a name the guest does not know fails the request
with :class:`~vzkit.agent.AgentError`.

``tty=True`` runs the command on a pseudo-terminal in the guest (protocol 2.2): its stdin,
stdout and stderr are the pty's slave, its controlling terminal; stdout carries the merged
output as a terminal shows it (``\\r\\n`` line ends, echoed input) and stderr stays empty.
``size=(rows, cols)`` is the pty's first window size (default 24x80), ``term=`` its ``TERM``
(default: the host's ``$TERM``, else ``xterm-256color``) unless ``env`` sets ``TERM``.

``text=True`` encodes a ``str`` input and decodes both outputs as UTF-8, the guest's encoding
(the host's locale says nothing about the guest's bytes); bytes that are not UTF-8 become
U+FFFD, so a command's result is never lost to a decoding error. Newlines are left as the
guest wrote them (a Linux guest writes ``\\n``).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from vzkit.errors import ArgumentError, SpecError

from ._channel import Args

__all__ = [
    "DEFAULT_TERM",
    "DEFAULT_TTY_SIZE",
    "GUEST_SHELL",
    "check_user",
    "command_argv",
    "completed",
    "decode_output",
    "encode_input",
    "tty_options",
    "user_spec",
]

#: The shell of ``shell=True``, as :mod:`subprocess` uses ``/bin/sh`` on POSIX.
GUEST_SHELL = "/bin/sh"
ENCODING = "utf-8"
#: ``TERM`` of a tty command when neither ``term=`` nor the host's ``$TERM`` says one.
DEFAULT_TERM = "xterm-256color"
#: A tty command's window size (rows, columns) when ``size=`` says none: a terminal's classic.
DEFAULT_TTY_SIZE = (24, 80)


def command_argv(args: Args, shell: bool) -> tuple[bytes, ...]:
    """The argv that runs ``args`` in the guest (see the module docstring)."""
    if shell:
        items = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        if not items:
            raise ValueError("args must not be empty")
        return (os.fsencode(GUEST_SHELL), b"-c", *(os.fsencode(a) for a in items))
    if isinstance(args, str | bytes):
        shown = args if isinstance(args, str) else args.decode(errors="replace")
        raise ArgumentError(
            f"the command {shown!r} is a string: pass a list of the program and its arguments "
            f"(e.g. {shown.split()!r}), or shell=True to run it with {GUEST_SHELL} -c"
        )
    if isinstance(args, os.PathLike):
        return (os.fsencode(args),)
    argv = tuple(os.fsencode(a) for a in args)
    if not argv:
        raise ValueError("args must not be empty")
    return argv


def check_user(user: str | None) -> None:
    """Refuse a ``user`` that is not ``USER[:GROUP]`` (names or numeric ids) or None:
    :class:`~vzkit.errors.SpecError` (ArgumentError for a non-str). Whether the guest knows
    the names only the guest can tell."""
    if user is None:
        return
    if not isinstance(user, str):
        raise ArgumentError(f"user must be a str, USER or USER:GROUP, not {user!r}")
    name, sep, group = user.partition(":")
    blank = any(c.isspace() or c == "\0" for c in user)
    if blank or not name or (sep and not group) or ":" in group:
        raise SpecError(
            f"user must be USER or USER:GROUP (names or numeric ids, e.g. 'nobody' or "
            f"'1000:1000'), got {user!r}"
        )


def user_spec(user: str | None) -> bytes:
    """``user`` as EXEC carries it; ``b""`` (the agent's own user) for None."""
    check_user(user)
    return b"" if user is None else user.encode(ENCODING)


def encode_input(data: bytes | str | None, text: bool) -> bytes | None:
    """The bytes to send to the command's stdin."""
    if isinstance(data, str):
        if not text:
            raise ArgumentError("input is a str: pass text=True to send it as UTF-8, or bytes")
        return data.encode(ENCODING)
    return data


def decode_output(data: bytes, text: bool) -> Any:
    """``data`` as the caller asked for it: bytes, or (``text=True``) a str."""
    return data.decode(ENCODING, errors="replace") if text else data


def completed(
    args: Args, returncode: int, out: bytes, err: bytes, text: bool
) -> subprocess.CompletedProcess[Any]:
    """The result of a finished command, its outputs decoded when ``text``."""
    return subprocess.CompletedProcess(
        args, returncode, decode_output(out, text), decode_output(err, text)
    )


def tty_options(
    tty: bool, term: str | None, size: tuple[int, int] | None
) -> tuple[bytes, tuple[int, int]] | None:
    """``(b"TERM=...", (rows, cols))`` for a tty command, None without ``tty``; ``term`` and
    ``size`` without ``tty=True`` are refused (:class:`~vzkit.errors.ArgumentError`), as are
    a ``term`` that is not a word and a size that is not two integers 0 to 65535."""
    if not tty:
        if term is not None or size is not None:
            raise ArgumentError("term= and size= go with tty=True (a command on a terminal)")
        return None
    if term is None:
        term = os.environ.get("TERM") or DEFAULT_TERM
    if not isinstance(term, str) or not term or any(c.isspace() or c in "=\0" for c in term):
        raise ArgumentError(f"term must be a terminal type such as {DEFAULT_TERM!r}, not {term!r}")
    rows, cols = DEFAULT_TTY_SIZE if size is None else _size(size)
    return b"TERM=" + term.encode(ENCODING), (rows, cols)


def _size(size: object) -> tuple[int, int]:
    """``size`` as ``(rows, cols)``, each 0 to 65535 (a pty's ``struct winsize``)."""
    if isinstance(size, tuple | list) and len(size) == 2:
        rows, cols = size
        ints = all(isinstance(n, int) and not isinstance(n, bool) for n in (rows, cols))
        if ints and 0 <= rows <= 65535 and 0 <= cols <= 65535:
            return rows, cols
    raise ArgumentError(f"size must be (rows, cols), each 0 to 65535, not {size!r}")
