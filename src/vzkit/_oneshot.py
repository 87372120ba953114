"""The common case in one line: ``vzkit.run(argv)`` and ``with vzkit.start() as vm:``.

Both boot vzkit's default guest (:func:`vzkit.default_guest_config`; the image is built and
cached on first use), wait for its agent, and tear the VM down when done, also when the body
or the command raises. ``vzkit.aio.run`` and ``vzkit.aio.start`` (:func:`run_async`,
:func:`start_async` here, re-exported lazily by :mod:`vzkit.aio`) are the asyncio twins, with
the same parameters (``tests/unit/test_twins.py`` holds them to it). Everything here is a thin
layer over the facades (:class:`vzkit.VirtualMachine`, :class:`vzkit.aio.VirtualMachine`).

``check=True`` raises :class:`subprocess.CalledProcessError`, not a vzkit error: the
command failed, not vzkit, and it is what ``guest.run`` and :func:`subprocess.run` raise, so
code written for either keeps working; ``except vzkit.VzkitError`` still means that vzkit
(the VM, the agent) failed. A ``timeout`` covers boot and command together and raises
:class:`vzkit.VMTimeoutError` (a :class:`TimeoutError`) with the command's partial output on
its ``__cause__`` when the command was the part that ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from . import aio
from ._guestcore import DEFAULT_READY_TIMEOUT
from ._vm import VirtualMachine
from ._volume import VolumeMount, parse_volume_spec
from .agent._command import command_argv, encode_input, user_spec
from .errors import ConfigError, VMTimeoutError

if TYPE_CHECKING:
    from ._config import LinuxVMConfig
    from .agent import Args, StrOrBytes
    from .backends import Backend

__all__ = ["DEFAULT_IMAGE", "STOP_TIMEOUT", "run", "run_async", "start", "start_async"]

#: The busybox guest in an initramfs (``image=None`` is the same).
DEFAULT_IMAGE = "default"
#: The bound of the clean power-off at the end (half to the guest, then the VM is forced off).
STOP_TIMEOUT = 10.0

VolumeSpec = VolumeMount | str
_BOOT = "boot (up to its agent's answer)"
_RUN = "boot and run the command"


def _guest_config(
    image: str | None, volumes: Iterable[VolumeSpec], overrides: dict[str, Any]
) -> LinuxVMConfig:
    """vzkit's guest (``image``: the default, ``"debian"``, ...: see
    :func:`vzkit.default_guest_config`) with ``volumes`` (specs or mounts) and ``overrides``."""
    from ._imagebuild import default_guest_config  # building an image on first use: lazily

    if isinstance(volumes, str | VolumeMount):
        raise ConfigError(f"volumes must be a list of volumes, got {volumes!r}")
    mounts = tuple(parse_volume_spec(v) if isinstance(v, str) else v for v in volumes)
    if mounts:
        overrides = {**overrides, "volumes": (*overrides.get("volumes", ()), *mounts)}
    return default_guest_config(image=image, **overrides)


def _check_command(
    args: Args, shell: bool, input: bytes | str | None, text: bool, user: str | None
) -> None:
    """Refuse a command ``guest.run`` would refuse before a VM boots for it."""
    command_argv(args, shell)
    encode_input(input, text)
    user_spec(user)


class _Deadline:
    """One ``timeout`` over several steps (boot, then the command)."""

    def __init__(self, timeout: float | None, what: str) -> None:
        if timeout is not None and (timeout < 0 or math.isnan(timeout)):
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        self.timeout, self.what = timeout, what
        self._end = None if timeout is None else time.monotonic() + timeout

    @property
    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def left(self, default: float | None = None) -> float | None:
        """Seconds left (``default`` without a timeout); raises once none are left."""
        if self._end is None:
            return default
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def error(self) -> VMTimeoutError:
        return VMTimeoutError(
            f"the VM did not {self.what} within timeout={self.timeout:g} s: pass a larger "
            "timeout, or None"
        )


def _timed_out(deadline: _Deadline, err: BaseException) -> VMTimeoutError | None:
    """The error to raise for ``err`` when it is the overall deadline running out."""
    if isinstance(err, subprocess.TimeoutExpired) or deadline.expired:
        return deadline.error()
    return None


# -- blocking ----------------------------------------------------------------------------------


@contextlib.contextmanager
def start(
    image: str | None = None,
    *,
    volumes: Iterable[VolumeSpec] = (),
    timeout: float | None = None,
    backend: str | Backend = "auto",
    **overrides: Any,
) -> Iterator[VirtualMachine]:
    """``with vzkit.start() as vm:`` a running default guest whose agent answers.

    ``image``: ``None`` or ``"default"`` (vzkit's default guest). ``volumes``: host
    directories to share, as :class:`~vzkit.VolumeMount` objects or specs, ``"path:/data"``
    (mounted at ``/data``) or ``"path[:tag]"`` (at ``/mnt/<tag>``), ``:ro`` for read-only.
    ``timeout`` bounds the boot up to the agent's answer (default: the agent's
    120 s). ``overrides`` are :class:`~vzkit.LinuxVMConfig` fields (``cpus=2``,
    ``memory_gb=1``, ``arch="aarch64"``, ...). On leaving the block the guest is asked to
    power off (forced after a few seconds); when the block raises, the VM is forced off at
    once. Either way every process and temporary file of the VM is released.
    """
    config = _guest_config(image, volumes, overrides)
    with _started(config, _Deadline(timeout, _BOOT), backend) as vm:
        yield vm


@contextlib.contextmanager
def _started(
    config: LinuxVMConfig, deadline: _Deadline, backend: str | Backend
) -> Iterator[VirtualMachine]:
    with VirtualMachine(config, backend) as vm:
        vm.start(timeout=deadline.left())
        vm.guest.wait_ready(deadline.left(DEFAULT_READY_TIMEOUT))
        yield vm
        vm.stop(timeout=STOP_TIMEOUT)


@overload
def run(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[False] = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[bytes]: ...


@overload
def run(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[True],
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[str]: ...


@overload
def run(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: bool = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[Any]: ...


def run(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: bool = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[Any]:
    """Run one command in a fresh default guest and return its result, like
    :func:`subprocess.run` with ``capture_output=True``.

    ``vzkit.run(["uname", "-a"], text=True).stdout``. The VM boots, runs ``args`` through
    its agent and is torn down, also on errors. ``args``, ``env`` (replaces the guest's
    environment), ``cwd``, ``input``, ``check``, ``text``, ``shell`` and ``user`` are those of
    :meth:`vzkit.Guest.run`; ``image``, ``volumes``, ``backend`` and ``config_overrides`` those
    of :func:`start`. ``timeout`` covers boot and command together and raises
    :class:`~vzkit.VMTimeoutError` (building the guest image on first use is not counted).
    """
    _check_command(args, shell, input, text, user)
    config = _guest_config(image, volumes, config_overrides)
    deadline = _Deadline(timeout, _RUN)
    try:
        with _started(config, deadline, backend) as vm:
            return vm.guest.run(
                args, input=input, timeout=deadline.left(), check=check, env=env, cwd=cwd,
                shell=shell, text=text, user=user,
            )  # fmt: skip
    except (VMTimeoutError, subprocess.TimeoutExpired) as err:
        if (late := _timed_out(deadline, err)) is None:
            raise
        raise late from err


# -- asyncio: vzkit.aio.start and vzkit.aio.run -------------------------------------------------


@contextlib.asynccontextmanager
async def start_async(
    image: str | None = None,
    *,
    volumes: Iterable[VolumeSpec] = (),
    timeout: float | None = None,
    backend: str | Backend = "auto",
    **overrides: Any,
) -> AsyncIterator[aio.VirtualMachine]:
    """``async with vzkit.aio.start() as vm:`` a running default guest whose agent answers;
    torn down on leaving the block (see :func:`vzkit.start`)."""
    config = await _guest_config_async(image, volumes, overrides)
    async with _started_async(config, _Deadline(timeout, _BOOT), backend) as vm:
        yield vm


@overload
async def run_async(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[False] = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[bytes]: ...


@overload
async def run_async(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: Literal[True],
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[str]: ...


@overload
async def run_async(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: bool = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[Any]: ...


async def run_async(
    args: Args,
    *,
    image: str | None = None,
    volumes: Iterable[VolumeSpec] = (),
    env: Mapping[StrOrBytes, StrOrBytes] | None = None,
    cwd: StrOrBytes | None = None,
    input: bytes | str | None = None,
    timeout: float | None = None,
    check: bool = False,
    text: bool = False,
    shell: bool = False,
    user: str | None = None,
    backend: str | Backend = "auto",
    **config_overrides: Any,
) -> subprocess.CompletedProcess[Any]:
    """``await vzkit.aio.run(argv)``: one command in a fresh default guest (see
    :func:`vzkit.run`)."""
    _check_command(args, shell, input, text, user)
    config = await _guest_config_async(image, volumes, config_overrides)
    deadline = _Deadline(timeout, _RUN)
    try:
        async with _started_async(config, deadline, backend) as vm:
            return await vm.guest.run(
                args, input=input, timeout=deadline.left(), check=check, env=env, cwd=cwd,
                shell=shell, text=text, user=user,
            )  # fmt: skip
    except (VMTimeoutError, subprocess.TimeoutExpired) as err:
        if (late := _timed_out(deadline, err)) is None:
            raise
        raise late from err


async def _guest_config_async(
    image: str | None, volumes: Iterable[VolumeSpec], overrides: dict[str, Any]
) -> LinuxVMConfig:
    # building the image on first use blocks (downloads, compression): not on this loop
    return await asyncio.to_thread(_guest_config, image, volumes, overrides)


@contextlib.asynccontextmanager
async def _started_async(
    config: LinuxVMConfig, deadline: _Deadline, backend: str | Backend
) -> AsyncIterator[aio.VirtualMachine]:
    async with aio.VirtualMachine(config, backend) as vm:
        await vm.start(timeout=deadline.left())
        await vm.guest.wait_ready(deadline.left(DEFAULT_READY_TIMEOUT))
        yield vm
        await vm.stop(timeout=STOP_TIMEOUT)
