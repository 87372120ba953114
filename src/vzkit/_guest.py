"""``vm.guest``: talk to the vzkit agent inside a running VM (run commands, move files).

:class:`Guest` (``vzkit.VirtualMachine.guest``) blocks; :class:`AsyncGuest`
(``vzkit.aio.VirtualMachine.guest``) has the same names, awaitable. Both only delegate to the
VM core's agent connection (:class:`vzkit._guestcore.AgentLink`): one connection per VM run
carries every call (the protocol multiplexes channels), so calls from several threads or tasks
at once are fine, and after a restart or a restore the next call reconnects.

The agent listens on vsock port 1024 and on the virtio console port ``org.vzkit.agent.0``;
the core chooses from what the machine offers (:class:`vzkit.backends.AgentStream`): vsock
when there is a device, else the console port.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from ._guestcore import DEFAULT_MAX_OUTPUT, DEFAULT_READY_TIMEOUT
from ._loop import run_sync, wrap

if TYPE_CHECKING:
    from ._vmcore import VMCore
    from .agent import Args, AsyncGuestProcess, GuestProcess, StrOrBytes

__all__ = ["AsyncGuest", "Guest"]


class Guest:
    """The guest side of a :class:`~vzkit.VirtualMachine`, reached through the vzkit agent."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    def wait_ready(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> str:
        """Wait until the agent answers; returns its version."""
        return run_sync(self._core.agent.wait_ready(timeout))

    @overload
    def run(
        self,
        args: Args,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: Literal[False] = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[bytes]: ...
    @overload
    def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: Literal[True],
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[str]: ...
    @overload
    def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]: ...
    def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the guest like :func:`subprocess.run` (output captured).

        ``args`` is a list: the program and its arguments. A string is a shell line and needs
        ``shell=True`` (it runs as ``/bin/sh -c LINE``); without it, a string raises
        :class:`~vzkit.errors.ArgumentError`. ``text=True`` takes a ``str`` input and returns
        ``str`` outputs (UTF-8, the guest's encoding; undecodable bytes become U+FFFD).
        ``check=True`` raises :class:`subprocess.CalledProcessError` on a non-zero exit, and
        a command that outlives ``timeout`` is killed in the guest and raises
        :class:`subprocess.TimeoutExpired`, as :func:`subprocess.run` does.

        More than ``max_output`` bytes of output (stdout and stderr together, default
        256 MiB; ``None``: no limit) kill the command and raise :class:`~vzkit.GuestError`: a
        guest cannot make the host buffer without bound. Stream large output with :meth:`popen`.

        ``user="USER[:GROUP]"`` runs the command as that guest user instead of root: names are
        resolved in the guest (``/etc/passwd``, ``/etc/group``), numeric ids need no entry
        (``"1000:1000"``; a uid alone without one gets group 0 and ``HOME=/``). It gets its
        supplementary groups (only ``GROUP`` when given) and ``HOME``, ``USER`` and ``LOGNAME``
        from its entry unless ``env`` sets them. A name the guest does not know raises
        :class:`~vzkit.agent.AgentError`; a malformed spec :class:`~vzkit.errors.SpecError`.

        ``tty=True`` (with ``term=`` and ``size=``) runs it on a pseudo-terminal, as
        :meth:`popen` does: ``stdout`` is what the terminal shows, ``stderr`` is empty, and an
        ``input`` is typed on it (echoed; no end of file follows: end it with ``b"\\x04"``).
        """
        return run_sync(
            self._core.agent.run(
                args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
                max_output=max_output, shell=shell, text=text, user=user,
                tty=tty, term=term, size=size,
            )
        )  # fmt: skip

    def popen(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> GuestProcess:
        """Start a command and stream its stdin/stdout/stderr (a :class:`GuestProcess`);
        ``args``, ``shell`` and ``user`` as for :meth:`run`.

        ``tty=True`` runs it on a pseudo-terminal in the guest, its controlling terminal:
        ``stdout`` carries everything it shows (``stderr`` stays empty), ``stdin`` is what is
        typed (``b"\\x03"`` is Ctrl-C), ``size=(rows, cols)`` the first window size (default
        24x80; :meth:`GuestProcess.resize` changes it), ``term=`` its ``TERM`` (default the
        host's ``$TERM``, else ``xterm-256color``; a ``TERM`` in ``env`` wins). Closing stdin
        is no end of file on a terminal: send its EOF character (``b"\\x04"``) instead."""
        from .agent import GuestProcess

        started = self._core.agent.exec(
            args, stdin=stdin, env=env, cwd=cwd, timeout=timeout, shell=shell, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip
        return GuestProcess(run_sync(started), stdin=stdin)

    def read_file(self, path: StrOrBytes, *, max_size: int | None = DEFAULT_MAX_OUTPUT) -> bytes:
        """The content of ``path`` in the guest; :class:`~vzkit.agent.GuestFileNotFoundError`
        (a :class:`FileNotFoundError`) if there is no such file, :class:`~vzkit.GuestError`
        if it is larger than ``max_size`` bytes (default 256 MiB; ``None``: no limit)."""
        return run_sync(self._core.agent.read_file(path, max_size))

    def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically: a temporary name, then rename)."""
        run_sync(self._core.agent.write_file(path, data, mode))

    def copy_in(self, src: StrOrBytes, dest: StrOrBytes, *, timeout: float | None = None) -> None:
        """Copy the host file or directory tree ``src`` to ``dest`` in the guest, streamed as a
        tar (memory stays bounded), with ``docker cp``'s semantics: a file onto an existing
        directory goes inside it, a directory onto a missing path becomes that path,
        ``src`` ending in ``/.`` copies a directory's contents; modes, symbolic links and
        numeric owners are kept (the guest's tar runs as root). The guest's ``tar`` is vzkit's
        busybox (``docs/guide.md``, *Files in and out of the guest*). A missing parent of
        ``dest`` raises :class:`~vzkit.agent.GuestFileNotFoundError` (a
        :class:`FileNotFoundError`); a missing ``src``, :class:`FileNotFoundError`; over
        ``timeout`` seconds, :class:`~vzkit.errors.VMTimeoutError`."""
        from . import _guestcopy  # tarfile & co. on first use: 'vzkit exec' needs none

        run_sync(_guestcopy.copy_in(self._core, src, dest, timeout))

    def copy_out(self, src: StrOrBytes, dest: StrOrBytes, *, timeout: float | None = None) -> None:
        """Copy the guest file or directory tree ``src`` to ``dest`` on the host, streamed,
        with :meth:`copy_in`'s semantics the other way. The guest's stream is untrusted:
        nothing is written outside ``dest`` (names with ``..`` or absolute, links out of the
        copy, device nodes raise :class:`~vzkit._hosttar.CopyRefusedError`); modes are kept
        less set-id, sticky and group/other write bits; files belong to the caller. A missing
        ``src`` raises :class:`~vzkit.agent.GuestFileNotFoundError`."""
        from . import _guestcopy

        run_sync(_guestcopy.copy_out(self._core, src, dest, timeout))

    def sync(self) -> None:
        """Flush the guest's file systems (sync(2))."""
        run_sync(self._core.agent.sync())

    def poweroff(self) -> None:
        """Ask the guest to sync and power off; returns once the agent acknowledged."""
        run_sync(self._core.agent.poweroff())

    @property
    def connected(self) -> bool:
        """An agent connection of the VM's current run is open."""
        return self._core.agent.connected

    def close(self) -> None:
        """Close the agent connection (the VM keeps running; the next call reconnects)."""
        run_sync(self._core.agent.close())


class AsyncGuest:
    """The asyncio twin of :class:`Guest`: ``vzkit.aio.VirtualMachine.guest``."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    async def wait_ready(self, timeout: float | None = DEFAULT_READY_TIMEOUT) -> str:
        """Wait until the agent answers; returns its version."""
        return await wrap(self._core.agent.wait_ready(timeout))

    @overload
    async def run(
        self,
        args: Args,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: Literal[False] = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[bytes]: ...
    @overload
    async def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: Literal[True],
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[str]: ...
    @overload
    async def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]: ...
    async def run(
        self,
        args: Args,
        *,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        max_output: int | None = DEFAULT_MAX_OUTPUT,
        shell: bool = False,
        text: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the guest and collect its output (see :meth:`Guest.run`)."""
        return await wrap(
            self._core.agent.run(
                args, input=input, timeout=timeout, check=check, env=env, cwd=cwd,
                max_output=max_output, shell=shell, text=text, user=user,
                tty=tty, term=term, size=size,
            )
        )  # fmt: skip

    async def popen(
        self,
        args: Args,
        *,
        stdin: bool = True,
        env: Mapping[StrOrBytes, StrOrBytes] | None = None,
        cwd: StrOrBytes | None = None,
        timeout: float | None = None,
        shell: bool = False,
        user: str | None = None,
        tty: bool = False,
        term: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> AsyncGuestProcess:
        """Start a command and stream it (an :class:`AsyncGuestProcess`; ``tty``, ``term`` and
        ``size`` as for :meth:`Guest.popen`)."""
        from .agent import AsyncGuestProcess

        started = self._core.agent.exec(
            args, stdin=stdin, env=env, cwd=cwd, timeout=timeout, shell=shell, user=user,
            tty=tty, term=term, size=size,
        )  # fmt: skip
        return AsyncGuestProcess(await wrap(started), stdin=stdin)

    async def read_file(
        self, path: StrOrBytes, *, max_size: int | None = DEFAULT_MAX_OUTPUT
    ) -> bytes:
        """The content of ``path`` in the guest (see :meth:`Guest.read_file`)."""
        return await wrap(self._core.agent.read_file(path, max_size))

    async def write_file(self, path: StrOrBytes, data: bytes, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest (atomically: a temporary name, then rename)."""
        await wrap(self._core.agent.write_file(path, data, mode))

    async def copy_in(
        self, src: StrOrBytes, dest: StrOrBytes, *, timeout: float | None = None
    ) -> None:
        """Copy a host file or tree into the guest (see :meth:`Guest.copy_in`)."""
        from . import _guestcopy

        await wrap(_guestcopy.copy_in(self._core, src, dest, timeout))

    async def copy_out(
        self, src: StrOrBytes, dest: StrOrBytes, *, timeout: float | None = None
    ) -> None:
        """Copy a guest file or tree to the host (see :meth:`Guest.copy_out`)."""
        from . import _guestcopy

        await wrap(_guestcopy.copy_out(self._core, src, dest, timeout))

    async def sync(self) -> None:
        """Flush the guest's file systems (sync(2))."""
        await wrap(self._core.agent.sync())

    async def poweroff(self) -> None:
        """Ask the guest to sync and power off; returns once the agent acknowledged."""
        await wrap(self._core.agent.poweroff())

    @property
    def connected(self) -> bool:
        """An agent connection of the VM's current run is open."""
        return self._core.agent.connected

    async def close(self) -> None:
        """Close the agent connection (the VM keeps running; the next call reconnects)."""
        await wrap(self._core.agent.close())
