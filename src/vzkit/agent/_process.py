"""Processes running in the guest, like :class:`subprocess.Popen` with pipes.

:class:`GuestProcess` (blocking file objects over :func:`vzkit._loop.run_sync`) and
:class:`AsyncGuestProcess` (awaitable streams over :func:`vzkit._loop.wrap`) are views of one
exec channel (:class:`._channel._ExecChannel`), which lives on vzkit's shared loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import select
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from vzkit._loop import get_loop, in_loop_thread, run_sync, wrap
from vzkit.errors import GuestError

from ._channel import _ExecChannel, _InStream
from ._protocol import MAX_PAYLOAD, ExitStatus

__all__ = ["AsyncGuestProcess", "AsyncStreamReader", "AsyncStreamWriter", "GuestProcess"]


class RawStreamReader(io.RawIOBase):
    """A blocking thread's view of an exec's output stream (closing it discards the rest)."""

    def __init__(self, stream: _InStream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any, /) -> int:
        data = run_sync(self._stream.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return run_sync(self._stream.read())

    def close(self) -> None:
        if not self.closed:
            _on_loop(self._stream.discard)
        super().close()


class RawStreamWriter(io.RawIOBase):
    """A blocking thread's view of an exec's stdin: each write waits for the agent's credit;
    closing it sends the end of input."""

    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel

    def writable(self) -> bool:
        return True

    def write(self, data: Any, /) -> int:
        run_sync(self._channel.write(bytes(data)))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            super().close()
            _on_loop(self._channel.close_stdin)


async def _call(fn: Callable[[], None]) -> None:
    """Run a plain function on the shared loop (channels are not thread-safe)."""
    fn()


def _on_loop(fn: Callable[[], None]) -> None:
    """Schedule ``fn()`` on the shared loop without waiting for it (channels are not
    thread-safe); a closed connection is no error here.

    Never blocks: ``close()`` also runs from finalizers, at any point of any thread and under
    whatever locks it holds (e.g. ``concurrent.futures``' global lock inside
    ``ThreadPoolExecutor.submit``, which the loop thread needs too: waiting here deadlocked).
    Later calls from the same thread are queued behind it, so their order holds.
    """

    def guarded() -> None:
        with contextlib.suppress(GuestError):
            fn()

    if in_loop_thread():
        guarded()
        return
    with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter shutdown)
        get_loop().call_soon_threadsafe(guarded)


class _ProcessBase:
    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel
        self.args = channel.args
        self.returncode: int | None = None

    def _set_status(self, status: ExitStatus) -> int:
        self.returncode = status.returncode
        return status.returncode

    @property
    def timed_out(self) -> bool:
        """Whether the agent killed the process because it outlived its ``timeout``."""
        return self._channel.status is not None and self._channel.status.timed_out


class GuestProcess(_ProcessBase):
    """A process running in the guest, like :class:`subprocess.Popen` with pipes.

    ``stdin`` (unless ``stdin=False``), ``stdout`` and ``stderr`` are binary buffered file
    objects (with ``tty=True`` the terminal's output is all on ``stdout``). Read the outputs
    while the process runs: as with pipes, a stream nobody reads stops the process once its
    window is full. Closing a reader discards the rest of it.
    """

    def __init__(self, channel: _ExecChannel, *, stdin: bool) -> None:
        super().__init__(channel)
        self.stdin: io.BufferedWriter | None = (
            io.BufferedWriter(RawStreamWriter(channel), MAX_PAYLOAD) if stdin else None
        )
        self.stdout = io.BufferedReader(RawStreamReader(channel.stdout), MAX_PAYLOAD)
        self.stderr = io.BufferedReader(RawStreamReader(channel.stderr), MAX_PAYLOAD)

    def poll(self) -> int | None:
        if self.returncode is None and self._channel.result.done():
            return self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        if self.returncode is not None:
            return self.returncode
        try:
            return self._set_status(run_sync(_wait_for(self._channel.wait(), timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Send ``input``, close stdin, read both outputs to the end and wait."""
        if self.stdin is not None:
            self.stdin.flush()
        out, err = bytearray(), bytearray()
        coro = self._channel.communicate(input if self.stdin is not None else None, out, err)
        try:
            self._set_status(run_sync(_wait_for(coro, timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(
                self.args, timeout or 0, bytes(out), bytes(err)
            ) from None
        return bytes(out), bytes(err)

    def attach(self, stdin: int | None, stdout: int, stderr: int) -> int:
        """Copy the outputs to the file descriptors ``stdout`` and ``stderr`` and, with
        ``stdin=`` a descriptor (for a process started with ``stdin=True``), that descriptor
        to the process until its end of file; wait for the end and return the returncode.

        Memory stays bounded (a chunk per stream); a descriptor that is not read holds the
        process back, as a pipe does, and one whose reader has gone (EPIPE) sends the process
        group SIGPIPE, as a shell pipeline would, the rest of its output dropped. A stdin that
        stays open (a terminal) stops being read when the process ends. The copies use
        duplicates of the descriptors, so the caller may close its own once this returns.
        An exception while waiting (``KeyboardInterrupt``) kills the process and is raised."""
        stop_r, stop_w = os.pipe()  # closing stop_w tells the stdin copy to stop
        outs = [
            threading.Thread(target=self._copy_out, args=(src, os.dup(fd)), daemon=True)
            for src, fd in ((self.stdout, stdout), (self.stderr, stderr))
        ]
        feed = None
        if stdin is not None and self.stdin is not None:
            args = (os.dup(stdin), self.stdin, stop_r)
            feed = threading.Thread(target=_copy_in, args=args, daemon=True)
        else:
            os.close(stop_r)
            if self.stdin is not None:
                with contextlib.suppress(OSError, GuestError):
                    self.stdin.close()  # nothing to forward: an empty stdin
        for thread in [*outs, *([feed] if feed else [])]:
            thread.start()
        try:
            try:
                returncode = self.wait()
            except BaseException:
                with contextlib.suppress(GuestError):
                    self.kill()
                raise
            for thread in outs:
                thread.join(timeout=30)
            return returncode
        finally:
            os.close(stop_w)
            if feed is not None:  # stopped: no more is read from stdin once this returns
                feed.join(timeout=5)

    def _copy_out(self, src: io.BufferedReader, fd: int) -> None:
        """One output to ``fd`` (owned: closed at the end) until the process closes it."""
        try:
            broken = False
            while chunk := _read_quietly(src):
                if broken:
                    continue  # dropped: the guest must not stall on a full window
                try:
                    _write_all(fd, chunk)
                except OSError as err:
                    broken = True
                    if isinstance(err, BrokenPipeError):
                        with contextlib.suppress(GuestError):
                            run_sync(
                                _call(lambda: self._channel.signal(signal.SIGPIPE, group=True))
                            )
        finally:
            os.close(fd)

    def send_signal(self, sig: int) -> None:
        run_sync(_call(lambda: self._channel.signal(sig, group=False)))

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size of a ``tty=True`` process's terminal (the guest's kernel sends
        SIGWINCH to its foreground process group); :class:`~vzkit.errors.ArgumentError`
        without a terminal or for a size out of 0 to 65535."""
        run_sync(_call(lambda: self._channel.resize(rows, cols)))

    def kill(self) -> None:
        """SIGKILL the process and its whole process group."""
        run_sync(_call(lambda: self._channel.signal(signal.SIGKILL, group=True)))

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close stdin and the outputs (discarding the rest) and wait, like Popen."""
        try:
            if self.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.stdin.close()
            self.stdout.close()
            self.stderr.close()
            self.wait()
        except GuestError:
            if exc[0] is None:
                raise


def _read_quietly(src: io.BufferedReader) -> bytes:
    """The next chunk of a process's output, ``b""`` at its end or if it broke."""
    try:
        return src.read1(MAX_PAYLOAD)
    except (OSError, ValueError, GuestError):
        return b""


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``, also when ``fd`` is non-blocking (a caller's shared file
    description): then it waits until ``fd`` takes more."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])


def _read_chunk(fd: int, stop: int) -> bytes:
    """The next chunk of ``fd`` (``b""`` at its end, or once ``stop`` is readable: the
    process ended while ``fd``, a terminal, stays open). ``select``, not ``poll``: macOS's
    poll does not take terminals."""
    while True:
        try:
            ready, _, _ = select.select([fd, stop], [], [])
        except ValueError:  # a descriptor beyond FD_SETSIZE: poll, which has no such bound
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(stop, select.POLLIN)
            ready = [ready_fd for ready_fd, _ in poller.poll()]
        if stop in ready:
            return b""
        try:
            return os.read(fd, MAX_PAYLOAD)
        except BlockingIOError:  # a non-blocking descriptor that another reader emptied
            continue


def _copy_in(fd: int, dst: io.BufferedWriter, stop: int) -> None:
    """``fd`` to the process's stdin until its end of file (or ``stop``), then close that
    stdin; ``fd`` and ``stop`` are owned (closed at the end)."""
    try:
        while chunk := _read_chunk(fd, stop):
            dst.write(chunk)
            dst.flush()
    except (OSError, ValueError, GuestError):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError, GuestError):
            dst.close()
        os.close(fd)
        os.close(stop)


async def _wait_for(coro: Any, timeout: float | None) -> Any:
    async with asyncio.timeout(timeout):
        return await coro


class AsyncStreamReader:
    """An output stream of an :class:`AsyncGuestProcess`: ``await read(n)`` or ``async for``."""

    def __init__(self, stream: _InStream) -> None:
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        return await wrap(self._stream.read(n))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read(MAX_PAYLOAD):
            yield chunk

    async def aclose(self) -> None:
        await wrap(_call(self._stream.discard))


class AsyncStreamWriter:
    """The stdin of an :class:`AsyncGuestProcess`."""

    def __init__(self, channel: _ExecChannel) -> None:
        self._channel = channel

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting while the agent's window is full."""
        await wrap(self._channel.write(data))

    async def aclose(self) -> None:
        await wrap(_call(self._channel.close_stdin))


class AsyncGuestProcess(_ProcessBase):
    """The asyncio twin of :class:`GuestProcess`."""

    def __init__(self, channel: _ExecChannel, *, stdin: bool) -> None:
        super().__init__(channel)
        self.stdin = AsyncStreamWriter(channel) if stdin else None
        self.stdout = AsyncStreamReader(channel.stdout)
        self.stderr = AsyncStreamReader(channel.stderr)

    def poll(self) -> int | None:
        """The exit status when the process has ended, else None (never waits)."""
        status = self._channel.status
        if self.returncode is None and status is not None:
            self._set_status(status)
        return self.returncode

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` s (the
        process keeps running), as :meth:`GuestProcess.wait`."""
        if self.returncode is not None:
            return self.returncode
        try:
            return self._set_status(await wrap(_wait_for(self._channel.wait(), timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None

    async def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes, bytes]:
        """Send ``input``, close stdin, read both outputs to the end and wait;
        ``subprocess.TimeoutExpired`` (with what was read) after ``timeout`` s."""
        out, err = bytearray(), bytearray()
        coro = self._channel.communicate(input if self.stdin is not None else None, out, err)
        try:
            self._set_status(await wrap(_wait_for(coro, timeout)))
        except TimeoutError:
            raise subprocess.TimeoutExpired(
                self.args, timeout or 0, bytes(out), bytes(err)
            ) from None
        return bytes(out), bytes(err)

    async def send_signal(self, sig: int) -> None:
        await wrap(_call(lambda: self._channel.signal(sig, group=False)))

    async def terminate(self) -> None:
        await self.send_signal(signal.SIGTERM)

    async def attach(self, stdin: int | None, stdout: int, stderr: int) -> int:
        """The twin of :meth:`GuestProcess.attach` (which does the copying, in a worker
        thread: descriptors may be files, which do not poll). Cancelled, the process is
        killed; the copies end with it."""
        view = GuestProcess(self._channel, stdin=self.stdin is not None)
        copying = asyncio.ensure_future(asyncio.to_thread(view.attach, stdin, stdout, stderr))
        try:
            await asyncio.shield(copying)
        except asyncio.CancelledError:
            with contextlib.suppress(GuestError):
                await self.kill()
            raise
        return await self.wait()

    async def kill(self) -> None:
        await wrap(_call(lambda: self._channel.signal(signal.SIGKILL, group=True)))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the window size of a ``tty=True`` process's terminal (see
        :meth:`GuestProcess.resize`)."""
        await wrap(_call(lambda: self._channel.resize(rows, cols)))

    async def __aenter__(self) -> AsyncGuestProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for closer in (self.stdin, self.stdout, self.stderr):
            if closer is not None:
                await closer.aclose()
        await self.wait()
