"""``vzkit.VirtualMachine``: the blocking facade (scripts want ``vm.start(timeout=60)``)."""

from __future__ import annotations

import logging
import time
import warnings
from types import TracebackType

from ._config import LinuxVMConfig
from ._guest import Guest
from ._loop import run_sync
from ._macconfig import MacVMConfig
from ._state import VMState
from ._vmcore import VMCore, VMView
from ._vsock import Vsock
from .backends import Backend, BalloonInfo
from .errors import VzkitError

__all__ = ["Balloon", "VirtualMachine"]

log = logging.getLogger(__name__)


class Balloon:
    """``vm.balloon``: the memory balloon of a running VM."""

    def __init__(self, core: VMCore) -> None:
        self._core = core

    def set_target_gb(self, gb: float) -> None:
        """Ask the guest to shrink (or regrow) to ``gb`` GB, rounded down to a whole MiB."""
        run_sync(self._core.set_balloon_target_gb(gb))

    def info(self) -> BalloonInfo:
        return run_sync(self._core.balloon_info())


class VirtualMachine(VMView):
    """A virtual machine built from a :class:`~vzkit.LinuxVMConfig` (or an installed
    :class:`~vzkit.MacVMConfig`, on the vz backend only).

    ``backend="auto"`` picks ``vz`` on macOS when it is usable, else ``qemu``. Use it as a
    context manager, or call :meth:`close`, which always releases every process, socket and
    temporary file, whatever state the VM is in.
    """

    def __init__(
        self, config: LinuxVMConfig | MacVMConfig, backend: str | Backend = "auto"
    ) -> None:
        self._core = VMCore(config, backend)
        self.balloon = Balloon(self._core)
        self.guest = Guest(self._core)
        self.vsock = Vsock(self._core)

    def __repr__(self) -> str:
        return f"<VirtualMachine {self.backend} {self.state.value} pid={self.pid}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the VM and return once it runs. On failure or timeout nothing is left behind."""
        run_sync(self._core.start(timeout))

    def pause(self, timeout: float | None = None) -> None:
        run_sync(self._core.pause(timeout))

    def resume(self, timeout: float | None = None) -> None:
        """Run a paused VM. The first resume after a snapshot restore also sets the guest's
        clock to the host's (through the agent), so the guest does not live in the past."""
        run_sync(self._core.resume(timeout))
        if self._core.clock_step_pending:
            self._core.clock_step_pending = False
            self._step_guest_clock()

    def _step_guest_clock(self) -> None:
        try:
            proc = self.guest.run(["date", "-u", "-s", f"@{round(time.time())}"], timeout=10)
        except (VzkitError, TimeoutError) as err:
            log.warning("could not set the guest clock after the restore: %s", err)
            return
        if proc.returncode != 0:
            log.warning("setting the guest clock failed: %s", proc.stderr.decode(errors="replace"))

    def request_stop(self) -> None:
        """Ask the guest to power off (power button, and the agent when connected); returns
        without waiting."""
        run_sync(self._core.request_stop())
        self._ask_agent_to_power_off()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the VM: ask the guest, wait up to half of ``timeout``, then force it off."""
        self._ask_agent_to_power_off()
        run_sync(self._core.stop(timeout))
        self.guest.close()

    def _ask_agent_to_power_off(self) -> None:
        """Where the agent is connected, it carries the power-off request too (a guest without
        a power button, like aarch64 ``virt`` without firmware, still shuts down cleanly)."""
        if self.guest.connected and self.state is VMState.RUNNING:
            try:
                self.guest.poweroff()
            except VzkitError as err:
                log.debug("agent power-off request failed: %s", err)

    def wait(self, timeout: float | None = None) -> VMState:
        """Wait until the VM has stopped (or failed) and return the final state."""
        return run_sync(self._core.wait(timeout))

    def close(self) -> None:
        """Force the VM off if it runs and release everything. Idempotent."""
        self.guest.close()
        run_sync(self._core.close())

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed and core.machine.pid is not None:
            warnings.warn(
                f"unclosed VirtualMachine {self!r}; call close() or use 'with'",
                ResourceWarning,
                stacklevel=2,
            )
