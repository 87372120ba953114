"""``vzkit.VirtualMachine``: the blocking facade (scripts want ``vm.start(timeout=60)``)."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from ._config import LinuxVMConfig
from ._guest import Guest
from ._loop import run_sync
from ._macconfig import MacVMConfig
from ._state import VMState
from ._vmcore import VMCore, VMView
from ._vsock import Vsock
from .backends import Backend, BalloonInfo

__all__ = ["Balloon", "VirtualMachine"]


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
        self,
        config: LinuxVMConfig | MacVMConfig,
        backend: str | Backend = "auto",
        *,
        name: str | None = None,
    ) -> None:
        if name is None:
            self._attach(VMCore(config, backend))
        else:  # a named VM: recorded now (stopped), started by start(), lives on after close()
            from .named._remote import new_named_core

            if not isinstance(config, LinuxVMConfig):
                raise TypeError("a named VM takes a LinuxVMConfig")
            self._attach(new_named_core(config, name, backend))

    def _attach(self, core: VMCore) -> None:
        self._core = core
        self.balloon = Balloon(core)
        self.guest = Guest(core)
        self.vsock = Vsock(core)

    @classmethod
    def _of(cls, core: VMCore) -> Self:
        """A facade over an existing core (a named VM made or reached by :mod:`vzkit.named`)."""
        vm = cls.__new__(cls)
        vm._attach(core)
        return vm

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
        clock to the host's and reseeds its RNG (through the agent), so the guest does not
        live in the past nor share random numbers with other VMs restored from the snapshot."""
        run_sync(self._core.resume(timeout))

    def request_stop(self) -> None:
        """Ask the guest to power off (power button, and the agent when connected); returns
        without waiting."""
        run_sync(self._core.request_stop())

    def stop(self, timeout: float | None = None) -> None:
        """Stop the VM: ask the guest (the agent when connected, so a guest without a power
        button shuts down cleanly too, and the power button), wait up to half of ``timeout``,
        then force it off."""
        run_sync(self._core.stop(timeout))

    def wait(self, timeout: float | None = None) -> VMState:
        """Wait until the VM has stopped (or failed) and return the final state."""
        return run_sync(self._core.wait(timeout))

    def close(self) -> None:
        """Force the VM off if it runs and release everything. Idempotent."""
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
