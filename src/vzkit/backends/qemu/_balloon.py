"""The memory balloon of a QEMU VM, over QMP (``balloon``, ``query-balloon``).

:class:`Balloon` keeps the target the VM was last asked for and reaches QEMU only through the
QMP call it is given (the machine's, which fails while QEMU does not run).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..._config import LinuxVMConfig
from ...errors import UnsupportedError
from .._protocol import BalloonInfo

__all__ = ["MIN_BALLOON_MB", "Balloon"]

#: The smallest target the guest is asked for.
MIN_BALLOON_MB = 64
_MIB = 1024 * 1024

Execute = Callable[[str, dict[str, object] | None], Awaitable[Any]]


class Balloon:
    """The balloon of one VM (across its runs): ``config.balloon`` says whether it has one."""

    def __init__(self, config: LinuxVMConfig, execute: Execute) -> None:
        self._config, self._execute = config, execute
        self._target_mb = config.memory_mb

    async def set_target(self, target_mb: int) -> None:
        if not self._config.balloon:
            raise UnsupportedError(
                "this VM has no memory balloon (config balloon=False)",
                backend="qemu",
                feature="balloon",
            )
        await self._execute("balloon", {"value": target_mb * _MIB})
        self._target_mb = target_mb

    async def info(self, running: bool) -> BalloonInfo:
        """The config's values, and while QEMU runs (``running``) what the guest has now."""
        if not self._config.balloon:
            return BalloonInfo(False, 0.0, MIN_BALLOON_MB)
        actual: float | None = None
        if running:
            reply = await self._execute("query-balloon", None)
            actual = int(reply["actual"]) / (1 << 30)
        return BalloonInfo(True, self._target_mb / 1024, MIN_BALLOON_MB, actual)
