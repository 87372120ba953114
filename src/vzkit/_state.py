"""The VM state machine's states (VZ's ``VZVirtualMachineState``, ten cases)."""

from __future__ import annotations

import enum
import platform

from .errors import SpecError

__all__ = ["Arch", "VMState", "host_arch"]


class VMState(enum.StrEnum):
    """A virtual machine's state; values match the seed's lower-case names.

    The order of definition follows ``VZVirtualMachineState`` (stopped = 0 ... restoring = 9);
    :attr:`vz_value` gives that number.
    """

    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"
    ERROR = "error"
    STARTING = "starting"
    PAUSING = "pausing"
    RESUMING = "resuming"
    STOPPING = "stopping"
    SAVING = "saving"
    RESTORING = "restoring"

    @property
    def vz_value(self) -> int:
        """The matching ``VZVirtualMachineState`` integer."""
        return list(VMState).index(self)

    @classmethod
    def from_vz_value(cls, value: int) -> VMState:
        members = list(cls)
        if not 0 <= value < len(members):
            raise ValueError(f"unknown VZVirtualMachineState {value}")
        return members[value]

    @property
    def is_transitional(self) -> bool:
        return self in _TRANSITIONAL


_TRANSITIONAL = frozenset(
    {
        VMState.STARTING,
        VMState.PAUSING,
        VMState.RESUMING,
        VMState.STOPPING,
        VMState.SAVING,
        VMState.RESTORING,
    }
)


class Arch(enum.StrEnum):
    """Guest CPU architectures vzkit builds and boots."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @property
    def debian(self) -> str:
        """Debian's name for the architecture (``amd64`` / ``arm64``)."""
        return "amd64" if self is Arch.X86_64 else "arm64"

    @classmethod
    def parse(cls, text: str) -> Arch:
        key = text.strip().lower()
        aliases = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
        try:
            return cls(aliases.get(key, key))
        except ValueError:
            raise SpecError(
                f"unknown architecture {text!r}; expected one of: "
                + ", ".join(a.value for a in cls)
            ) from None


def host_arch() -> Arch:
    """The host's architecture as an :class:`Arch` (raises :class:`SpecError` on others)."""
    return Arch.parse(platform.machine())
