"""``guest.copy_in``/``copy_out``: files and directory trees between the host and the guest,
streamed as tar through one agent exec (``docs/guide.md``, *Files in and out of the guest*).

The host side is Python's :mod:`tarfile` in stream mode (:mod:`vzkit._hosttar`: a host tree
written one member at a time; the guest's tar read without trusting it); the guest side is
``sh`` and ``tar`` run with ``PATH`` = :data:`GUEST_PATH`, whose first entry is
``/run/vzkit/bin``: in a root-disk guest (Debian, OCI images, ``--rootfs`` trees) that is
vzkit's busybox, copied there by the initramfs (``init.sh``, ``stage2.sh``), so an image
without ``tar`` or ``sh`` works; in the default guest ``/bin`` is the initramfs's busybox. A
guest booted without vzkit's init has neither unless its image brings ``sh`` and ``tar``;
without them the copy fails with the guest's "exec sh: No such file or directory".

Semantics are ``docker cp``'s: a file onto an existing directory goes inside it, a directory
onto a missing path becomes that path, ``SRC/.`` copies a directory's contents; modes and
symbolic links are kept; copying in runs the guest's tar as root (whatever the image's user),
which keeps the host's numeric owners. A missing guest path, or a missing parent of the
destination, raises :class:`~vzkit.agent.GuestFileNotFoundError` (a ``FileNotFoundError``).

Memory stays bounded: the tar streams move through the agent's flow-controlled windows, the
host side in a worker thread that blocks on them (the shared loop keeps running).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._hosttar import CHUNK, CopyRefusedError, extract_confined, write_tree
from .agent import GuestFileNotFoundError
from .agent._process import RawStreamReader, RawStreamWriter
from .errors import GuestError, VMTimeoutError

if TYPE_CHECKING:
    from ._vmcore import VMCore
    from .agent._channel import StrOrBytes, _ExecChannel, _InStream
    from .agent._protocol import ExitStatus

__all__ = ["GUEST_PATH", "copy_in", "copy_out"]

#: ``PATH`` of the guest's ``sh`` and ``tar``: vzkit's busybox of a root-disk guest first.
GUEST_PATH = "/run/vzkit/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV: dict[StrOrBytes, StrOrBytes] = {"PATH": GUEST_PATH, "LC_ALL": "C"}
#: What the guest's stderr keeps for an error message.
_STDERR_KEPT = 64 * 1024

#: $1 the destination, $2 its parent: what is there.
_PROBE = (
    'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ] || [ -L "$1" ]; then echo other; '
    'elif [ -d "$2" ]; then echo missing; elif [ -e "$2" ]; then echo parent-not-dir; '
    "else echo no-parent; fi"
)
#: $1 the directory the stream is extracted in.
_UNTAR = 'cd -- "$1" && exec tar -x -f -'
#: $1 the parent of the source, $2 its name, $3 the source as given.
_TAR = (
    'cd -- "$1" || exit 3; [ -e "$2" ] || [ -L "$2" ] || '
    '{ echo "$3: No such file or directory" >&2; exit 3; }; exec tar -c -f - "./$2"'
)
_MISSING = 3  # _TAR's exit status for a missing source


async def _drain(stream: _InStream, keep: bytearray) -> None:
    """Read ``stream`` to its end, keeping its first :data:`_STDERR_KEPT` bytes."""
    while chunk := await stream.read(CHUNK):
        keep += chunk[: max(0, _STDERR_KEPT - len(keep))]


async def _threaded(channel: _ExecChannel, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a worker thread; if this is cancelled or fails, the channel is
    cancelled (the thread's next read or write ends) and the thread awaited."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except BaseException:
        channel.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the first error is the one raised
        raise


def _guest_failed(what: str, status: ExitStatus, stderr: bytes) -> GuestError:
    detail = stderr.decode(errors="replace").strip() or f"exit status {status.returncode}"
    message = f"{what} failed in the guest: {detail}"
    if status.returncode == 127 and b"exec sh" in stderr:
        message += (
            " (the guest has no sh or tar: vzkit's busybox is in /run/vzkit of guests booted by "
            "vzkit's initramfs; copy with guest.write_file/read_file instead)"
        )
    return GuestError(message)


def _cwd(core: VMCore) -> str | None:
    """Where relative guest paths start: the image's working directory, as ``docker cp``."""
    process = getattr(core.config, "process", None)
    return (process.cwd or None) if process else None


async def _run(
    core: VMCore, script: str, *args: str, timeout: float | None, stdin: bool = False
) -> _ExecChannel:
    conn = await core.agent.connection()
    # conn.exec, not core.agent.exec: as root, whatever the image's user (as docker cp)
    return await conn.exec(
        ["sh", "-c", script, "sh", *args], stdin=stdin, env=_ENV, cwd=_cwd(core),
        timeout=timeout,
    )  # fmt: skip


async def _probe(core: VMCore, path: str, parent: str, timeout: float | None) -> str:
    channel = await _run(core, _PROBE, path, parent, timeout=timeout)
    out, err = bytearray(), bytearray()
    try:
        status = await channel.communicate(None, out, err, _STDERR_KEPT)
    finally:
        channel.cancel()  # a no-op once it exited; else the agent kills it
    _check_timeout(status, timeout)
    if status.returncode != 0:
        raise _guest_failed(f"looking at {path!r}", status, bytes(err))
    return out.decode(errors="replace").strip()


def _check_timeout(status: ExitStatus, timeout: float | None) -> None:
    """The agent killed the guest's command at ``timeout``: the copy's timeout error."""
    if status.timed_out:
        raise TimeoutError(f"the guest's command outlived {timeout} s")


async def copy_in(
    core: VMCore, src: StrOrBytes, dest: StrOrBytes, timeout: float | None = None
) -> None:
    """Copy the host file or tree ``src`` to the guest path ``dest``."""
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            await _copy_in(core, os.fsdecode(src), os.fsdecode(dest), timeout)
    except TimeoutError as err:
        if not bound.expired() and isinstance(err, VMTimeoutError):
            raise  # not ours: e.g. the agent did not answer
        raise VMTimeoutError(f"copying {src!r} into the guest took over {timeout} s") from None


async def _copy_in(core: VMCore, given: str, dest: str, timeout: float | None) -> None:
    src = Path(given)  # (Path drops a trailing "/.": the test below looks at what was given)
    src.lstat()  # a missing host source: FileNotFoundError, as shutil.copy raises
    is_dir = src.is_dir() and not src.is_symlink()
    contents = is_dir and (given.rstrip("/") == "" or given.endswith("/."))
    path = dest.rstrip("/") or "/"
    parent = posixpath.dirname(path) or "."
    kind = await _probe(core, path, parent, timeout)
    if kind == "dir":
        target, name = path, "" if contents else src.resolve().name if is_dir else src.name
    elif kind == "other":
        if is_dir:
            raise GuestError(f"cannot copy the directory {src} onto the guest file {path!r}")
        target, name = parent, posixpath.basename(path)
    elif kind == "missing":
        if dest.endswith("/") and not is_dir:
            raise GuestFileNotFoundError(
                f"the guest has no directory {path!r} to copy {src} into (a destination "
                "ending in '/' must be an existing directory)",
                errno=errno.ENOENT,
            )
        target, name = parent, posixpath.basename(path)
    elif kind == "parent-not-dir":
        raise GuestError(f"cannot copy to {path!r}: {parent!r} is not a directory in the guest")
    else:
        raise GuestFileNotFoundError(
            f"cannot copy to {path!r}: the guest has no directory {parent!r} (make it first, "
            f"e.g. guest.run(['mkdir', '-p', {parent!r}]))",
            errno=errno.ENOENT,
        )
    channel = await _run(core, _UNTAR, target, timeout=timeout, stdin=True)
    out, err = bytearray(), bytearray()
    drains = asyncio.gather(_drain(channel.stdout, out), _drain(channel.stderr, err))
    try:
        try:
            await _threaded(channel, _send_tree, channel, src, name)
        except BrokenPipeError:
            pass  # the guest's tar stopped reading: its status says why
        channel.close_stdin()
        status = await channel.wait()
        await drains
    except BaseException:
        channel.cancel()
        drains.cancel()
        with contextlib.suppress(BaseException):
            await drains
        raise
    _check_timeout(status, timeout)
    if status.returncode != 0:
        raise _guest_failed(f"copying {src} to {path!r}", status, bytes(err))


def _send_tree(channel: _ExecChannel, src: Path, name: str) -> None:
    out = io.BufferedWriter(RawStreamWriter(channel), CHUNK)
    write_tree(out, src, name)
    out.flush()


async def copy_out(
    core: VMCore, src: StrOrBytes, dest: StrOrBytes, timeout: float | None = None
) -> None:
    """Copy the guest file or tree ``src`` to the host path ``dest``."""
    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            await _copy_out(core, os.fsdecode(src), os.fsdecode(dest), timeout)
    except TimeoutError as err:
        if not bound.expired() and isinstance(err, VMTimeoutError):
            raise  # not ours: e.g. the agent did not answer
        raise VMTimeoutError(f"copying {src!r} out of the guest took over {timeout} s") from None


async def _copy_out(core: VMCore, src: str, given: str, timeout: float | None) -> None:
    dest = Path(given)
    contents = src.endswith("/.")
    path = (src[:-2] if contents else src).rstrip("/") or "/"
    if path == "/":
        parent, name, contents = "/", ".", True
    else:
        parent, name = posixpath.dirname(path) or ".", posixpath.basename(path)
    dir_expected = False
    if dest.is_dir():
        root, top = dest, "" if contents else name
    elif os.path.lexists(dest):
        root, top = dest.parent, dest.name  # a directory over it is refused by the extraction
    else:
        if not dest.parent.is_dir():
            raise FileNotFoundError(
                errno.ENOENT, "no such host directory to copy into", str(dest.parent)
            )
        root, top, dir_expected = dest.parent, dest.name, given.endswith(os.sep)
    channel = await _run(core, _TAR, parent, name, src, timeout=timeout)
    err = bytearray()
    drain = asyncio.ensure_future(_drain(channel.stderr, err))
    try:
        reader = io.BufferedReader(RawStreamReader(channel.stdout), CHUNK)
        strip = "" if name == "." else name
        try:
            extract = functools.partial(extract_confined, dir_expected=dir_expected)
            await _threaded(channel, extract, reader, root, strip, top)
        except CopyRefusedError:
            raise
        except GuestError as error:  # no valid tar: the guest's status may say why
            status = await channel.wait()
            await drain
            _check_timeout(status, timeout)
            if status.returncode != 0:
                raise _out_failed(src, status, bytes(err)) from error
            raise
        status = await channel.wait()
        await drain
    except BaseException:
        channel.cancel()
        drain.cancel()
        with contextlib.suppress(BaseException):
            await drain
        raise
    _check_timeout(status, timeout)
    if status.returncode != 0:
        raise _out_failed(src, status, bytes(err))


def _out_failed(src: str, status: ExitStatus, stderr: bytes) -> GuestError:
    if status.returncode == _MISSING:
        detail = stderr.decode(errors="replace").strip()
        return GuestFileNotFoundError(
            f"cannot copy {src!r} out of the guest: {detail}", errno=errno.ENOENT
        )
    return _guest_failed(f"copying {src!r} out", status, stderr)
