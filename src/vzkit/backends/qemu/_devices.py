"""The guest's devices on the qemu backend, one record each, and the command line built from
them.

A :class:`Device` says what QEMU needs from one device of a :class:`~._argv.Plan`: its argv
pieces (the pure lowering in ``_argv``), the fds QEMU must inherit for it, whether a save can
migrate it (and why not), and how it is hot-plugged where it can be. The helper processes
behind some devices are owned elsewhere and closed with the run: virtiofsd per share
(``_virtiofs.Shares``), passt (``_passt.Passt``), the vsock device (``_vsock.VsockTransport``,
plugged and unplugged over QMP by ``_vsock_plug``).

:func:`build_argv` concatenates the machine-level pieces and every device's, in a fixed
order (``tests/unit/test_qemu_argv.py`` pins the result); :func:`pass_fds` is the one list
of inherited fds a run spawns QEMU with. A new device is one more record here and one small
lowering function in ``_argv``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import _argv, _disks, _nics, _vsock_plug
from ._argv import Plan
from ._virtiofs import ShareKind

__all__ = ["DEVICES", "Device", "build_argv", "migration_blockers", "pass_fds"]


def _no_fds(plan: Plan) -> tuple[int, ...]:
    return ()


def _migratable(plan: Plan) -> str | None:
    return None


def _fds(*values: int | None) -> tuple[int, ...]:
    return tuple(fd for fd in values if fd is not None)


@dataclass(frozen=True, slots=True)
class Device:
    """One guest device: its lowering, its inherited fds and its migration verdict."""

    name: str
    args: Callable[[Plan], list[str]]
    fds: Callable[[Plan], tuple[int, ...]] = _no_fds
    #: Why a save cannot migrate this device in ``plan`` (None: it can).
    blocker: Callable[[Plan], str | None] = _migratable
    #: How it leaves and comes back around a save, when it must ("" for never).
    hotplug: str = ""


def _share_fds(plan: Plan) -> tuple[int, ...]:
    return _fds(*(share.fd for share in plan.shares))


def _share_blocker(plan: Plan) -> str | None:
    """vhost-user-fs keeps its state in virtiofsd, which QEMU cannot migrate."""
    names = [
        f"vhost-user-fs (the VirtioFS share {share.tag!r} of {str(share.path)!r})"
        for share in plan.shares
        if share.kind is ShareKind.VIRTIOFS
    ]
    return ", ".join(names) or None


def _vsock_blocker(plan: Plan) -> str | None:
    return _vsock_plug.migration_blocker(plan.machine) if plan.config.vsock else None


#: The devices in command-line order (the order keeps PCI addresses stable: pvpanic last).
#: The root disk comes first: it is the guest's /dev/vda.
DEVICES: tuple[Device, ...] = (
    Device("root-disk", _argv.root_disk_args),  # its layer is captured (_rootlayer.capture)
    Device("disk", _argv.disk_args),
    Device("iso", _argv.iso_args),
    Device("disks", _disks.more_disks_args, blocker=_disks.more_disks_blocker),
    Device("nic", _argv.network_args, lambda plan: _fds(plan.passt_fd, plan.tap_fd)),
    Device("nics", _nics.more_networks_args),
    Device("rng", _argv.rng_args),
    Device("balloon", _argv.balloon_args),
    Device("sound", _argv.sound_args),
    Device("console", _argv.console_args),
    Device("agent-port", _argv.agent_port_args, lambda plan: _fds(plan.agent_fd)),
    Device(
        "vsock",
        _argv.vsock_args,
        lambda plan: _fds(plan.vsock_fd, plan.vhost_vsock_fd),
        _vsock_blocker,
        hotplug="unplugged before a save and plugged after it and after a restore "
        "(_vsock_plug: QEMU cannot migrate vhost devices)",
    ),
    Device("agent-key", _argv.agent_key_args, lambda plan: _fds(plan.agent_key_fd)),
    Device("shares", _argv.share_args, _share_fds, _share_blocker),
    Device("display", _argv.display_args),
    Device("pvpanic", _argv.panic_args),
)

#: Machine-level pieces around the devices: before them and after them.
_HEAD = (_argv.base_args, _argv.sandbox_args, _argv.machine_args, _argv.boot_args)
_TAIL = (_argv.incoming_args,)


def build_argv(plan: Plan) -> list[str]:
    """The full QEMU command line for ``plan``."""
    argv = [str(plan.binary)]
    for piece in _HEAD:
        argv += piece(plan)
    for device in DEVICES:
        argv += device.args(plan)
    for piece in _TAIL:
        argv += piece(plan)
    return argv


def pass_fds(plan: Plan) -> tuple[int, ...]:
    """Every fd QEMU inherits for ``plan``: QMP's, then each device's."""
    fds = [plan.qmp_fd]
    for device in DEVICES:
        fds += device.fds(plan)
    return tuple(dict.fromkeys(fds))


def migration_blockers(plan: Plan) -> list[str]:
    """The devices of ``plan`` whose state a save cannot migrate, named for an error."""
    return [reason for device in DEVICES if (reason := device.blocker(plan)) is not None]
