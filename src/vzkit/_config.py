"""``LinuxVMConfig``: pure, frozen data describing a Linux VM, with TOML/JSON round-trips.

Nothing here knows a backend. Backends lower a config to their own terms (a QEMU argv, a
``VZVirtualMachineConfiguration``) and may reject what they cannot do with
:class:`~vzkit.errors.UnsupportedError`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self, cast

from ._disk import DiskFormat, RootDisk
from ._display import DisplayConfig, parse_display_spec
from ._fsutil import write_atomic
from ._network import (
    NetworkConfig,
    NetworkMode,
    PortForward,
    check_more_networks,
    parse_network_mode,
    parse_port_spec,
)
from ._process_defaults import ProcessDefaults
from ._state import Arch, host_arch
from ._storage import Disk, check_disk_files, check_disks, disk_from_dict
from ._volume import VolumeMount, assign_volume_tags, volume_from_dict
from .errors import ConfigError, SpecError

__all__ = [
    "MAX_CPUS",
    "MAX_MEMORY_GB",
    "MAX_VSOCK_PORT",
    "MIN_MEMORY_MB",
    "ConfigData",
    "ConsoleMode",
    "LinuxVMConfig",
    "check_vsock_port",
    "default_accelerator",
    "default_machine_type",
    "default_share_device",
    "default_vsock_device",
]

_NETWORK_KEYS = frozenset({"mode", "interface", "host_loopback"})
#: The bool fields of the devices both configs have.
DEVICE_BOOLS = ("vsock", "balloon", "entropy", "sound")

#: Below this a Linux guest cannot boot; backends may demand more.
MIN_MEMORY_MB = 64
MAX_CPUS = 255
#: The most memory a config may ask for: 4 TiB. A static cap, checked when the config is made,
#: so an absurd value fails there and not as an ``OverflowError`` or a VMM error at start. The
#: real limit depends on the host (VZ's ``maximumAllowedMemorySize``; QEMU's guest physical
#: address bits, 40 by default on x86_64, i.e. 1 TiB of address space) and is checked by the
#: backend at start; 4 TiB is above any host vzkit runs on today and far below any overflow.
MAX_MEMORY_GB = 4096
_MIB_PER_GB = 1024


# -- the environment ---------------------------------------------------------------------
# The ``VZKIT_*`` variables that choose a VM's devices feed config defaults here and are read
# nowhere else in the library: backends read the config. (Host tool locations are read by
# the functions at the end of this block; the guest image builder, the cache and progress
# output read their own.)
ENV_ACCEL = "VZKIT_QEMU_ACCEL"
ENV_MACHINE = "VZKIT_QEMU_MACHINE"
ENV_SHARE_DEVICE = "VZKIT_SHARE_DEVICE"
ENV_VSOCK_DEVICE = "VZKIT_VSOCK"
ENV_QEMU_BINARY = "VZKIT_QEMU_{arch}"  # e.g. VZKIT_QEMU_X86_64=/opt/qemu/bin/qemu-system-x86_64
ENV_EFI_CODE, ENV_EFI_VARS = "VZKIT_EFI_CODE", "VZKIT_EFI_VARS"
ENV_VIRTIOFSD = "VZKIT_VIRTIOFSD"
ENV_AGENT_TRANSPORT = "VZKIT_AGENT_TRANSPORT"
#: A CPU model: QEMU's ``-cpu`` syntax, a model name and ``,prop=value`` options (e.g.
#: ``max,pauth-impdef=on``). No paths and no spaces: nothing in it can name a file.
_CPU_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=,-]{0,199}")
_MACHINE_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SHARE_DEVICE_RE = re.compile(r"virtiofs|9p(:[^,:\s]+(,[^,:\s]+)*)?", re.IGNORECASE)
_VSOCK_DEVICES = ("kernel", "user")


def qemu_binary_override(arch: Arch) -> tuple[str, str]:
    """``(variable, value)`` of ``$VZKIT_QEMU_<ARCH>``: the QEMU binary to use instead of
    ``qemu-system-<arch>`` on ``PATH`` (value ``""`` when unset)."""
    name = ENV_QEMU_BINARY.format(arch=arch.value.upper())
    return name, os.environ.get(name, "")


def efi_override() -> tuple[str, str]:
    """``$VZKIT_EFI_CODE`` and ``$VZKIT_EFI_VARS``: UEFI firmware code and variable-store
    template to use instead of the distribution's (both or neither; ``""`` when unset)."""
    return os.environ.get(ENV_EFI_CODE, ""), os.environ.get(ENV_EFI_VARS, "")


def virtiofsd_override() -> str:
    """``$VZKIT_VIRTIOFSD``: the virtiofsd tried first (``""`` when unset)."""
    return os.environ.get(ENV_VIRTIOFSD, "")


def agent_transport_override() -> str:
    """``$VZKIT_AGENT_TRANSPORT``: ``"vsock"`` or ``"console"`` forces how the core reaches the
    guest agent (tests and benchmarks; read at each connect, so one VM can switch between
    calls), ``""`` when unset or anything else (vsock when the machine offers it, else the
    console port: :mod:`vzkit._guestcore`)."""
    forced = os.environ.get(ENV_AGENT_TRANSPORT, "").strip()
    return forced if forced in ("vsock", "console") else ""


def default_share_device() -> str:
    """The default of :attr:`LinuxVMConfig.share_device`: ``$VZKIT_SHARE_DEVICE``, else
    ``""``."""
    return os.environ.get(ENV_SHARE_DEVICE, "").strip()


def default_vsock_device() -> str:
    """The default of :attr:`LinuxVMConfig.vsock_device`: ``$VZKIT_VSOCK`` (``user`` keeps
    the kernel's vhost-vsock out, e.g. to measure the user-space device), else ``""``."""
    return os.environ.get(ENV_VSOCK_DEVICE, "").strip()


def default_accelerator() -> str:
    """The default of :attr:`LinuxVMConfig.accelerator`: ``$VZKIT_QEMU_ACCEL`` (e.g. ``tcg``
    to keep KVM out of a benchmark), else ``""`` (the backend picks the best that works)."""
    return os.environ.get(ENV_ACCEL, "")


def default_machine_type(arch: Arch, direct_boot: bool, headless: bool) -> str:
    """The default of :attr:`LinuxVMConfig.machine_type` when the config names none: ``""``
    (the backend's default for the arch: ``q35``/``virt`` on qemu), or ``microvm`` when
    ``$VZKIT_QEMU_MACHINE=microvm`` asks for it and it fits (an x86_64 guest booted directly
    and headless: microvm has no firmware and no display). Elsewhere the variable is ignored,
    as it always was."""
    wanted = os.environ.get(ENV_MACHINE, "")
    if wanted == "microvm" and arch is Arch.X86_64 and direct_boot and headless:
        return "microvm"
    return ""


def memory_gb_value(value: object) -> float:
    """``memory_gb`` as a float: a finite number (not a bool) of at most :data:`MAX_MEMORY_GB`,
    else :class:`ConfigError`; the minimum is the caller's. An integer too large for a float
    is refused here, not with an ``OverflowError`` (nor a ``ValueError`` from its repr)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"memory_gb must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > 2**64:
        shown = f"an integer of {value.bit_length()} bits"
        gb = math.inf if value > 0 else -math.inf
    else:
        shown, gb = repr(value), float(value)
    if math.isnan(gb) or gb == -math.inf:
        raise ConfigError(f"memory_gb must be a finite number, got {shown}")
    if gb > MAX_MEMORY_GB:
        raise ConfigError(f"memory_gb must be at most {MAX_MEMORY_GB} GB (4 TiB), got {shown}")
    return gb


class ConsoleMode(enum.StrEnum):
    """Where the guest's serial console goes."""

    LOG = "log"  # appended to a file (``console_log_path``, default ``<state_dir>/console.log``)
    STDIO = "stdio"  # this process's stdin/stdout (interactive)
    PTY = "pty"  # a pseudo-terminal (path reported by the backend), also logged
    NONE = "none"  # no serial console


_PATH_FIELDS = (
    "disk_path",
    "iso_path",
    "kernel_path",
    "initrd_path",
    "state_dir",
    "console_log_path",
)
# Inputs that must exist when named: the VM reads them at start.
_INPUT_FILES = ("disk_path", "iso_path", "kernel_path", "initrd_path")


def _as_path(name: str, value: object) -> Path | None:
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, bytes) or not text:
            raise ConfigError(f"{name} must be a non-empty path, got {value!r}")
        if "\x00" in text:
            raise ConfigError(f"{name} contains a NUL byte: {text!r}")
        return Path(text).expanduser().absolute()
    raise ConfigError(f"{name} must be a path, got {type(value).__name__} {value!r}")


class ConfigData:
    """What the VM configs share: ``replace``, plain data, TOML/JSON text and files.

    Subclasses are frozen dataclasses; :data:`WHAT` names them in error messages. Fields are
    encoded by type (paths, enums) or by name (``network``, ``volumes``, ``displays``,
    ``publish``); ``None`` fields are left out and come back as their default.
    """

    __slots__ = ()
    WHAT: ClassVar[str] = "VM config"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (and validated)."""
        unknown = sorted(set(changes) - {f.name for f in fields(_dc(self))})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cast(Self, dataclasses.replace(_dc(self), **changes))

    def _check_devices(self, sequences: tuple[str, ...], bools: tuple[str, ...]) -> None:
        """The checks both configs make of the devices they share: ``network``, the
        ``sequences`` (made tuples), volumes (host paths made absolute, tags assigned),
        displays and the ``bools``. Raises :class:`ConfigError`."""
        network = getattr(self, "network", None)
        if not isinstance(network, NetworkConfig):
            raise ConfigError(f"network must be a NetworkConfig, got {network!r}")
        for name in sequences:
            value = getattr(self, name)
            if isinstance(value, str | bytes | Mapping):
                raise ConfigError(f"{name} must be a sequence, got {value!r}")
            try:
                object.__setattr__(self, name, tuple(value))
            except TypeError:
                raise ConfigError(f"{name} must be a sequence, got {value!r}") from None
        volumes: tuple[VolumeMount, ...] = getattr(self, "volumes", ())
        for vol in volumes:
            if not isinstance(vol, VolumeMount):
                raise ConfigError(f"volumes must hold VolumeMount objects, got {vol!r}")
        volumes = tuple(_absolute_volume(v) for v in volumes)
        object.__setattr__(self, "volumes", volumes)
        assign_volume_tags(volumes)  # raises ConfigError on duplicate explicit tags
        for disp in getattr(self, "displays", ()):
            if not isinstance(disp, DisplayConfig):
                raise ConfigError(f"displays must hold DisplayConfig objects, got {disp!r}")
        check_disks(getattr(self, "disks", ()))
        check_more_networks(getattr(self, "networks", ()))
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str/int/float/bool/list/dict); ``None`` fields are left out."""
        out: dict[str, Any] = {}
        for f in fields(_dc(self)):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif f.name == "network":
                net = value
                value = {"mode": net.mode.value, "interface": net.interface}
                if net.host_loopback:  # written only when set: older files stay as they were
                    value["host_loopback"] = True
            elif f.name == "volumes":
                value = [v.to_dict() for v in value]
            elif f.name in ("displays", "publish", "networks"):
                value = [str(d) for d in value]
            elif f.name == "disks":
                value = [d.to_dict() for d in value]
            elif f.name == "root_disk":
                value = value.to_dict()
            elif f.name == "process":
                value = value.to_dict()
                if not value:
                    continue  # written only when set: older files stay as they were
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are a :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a VM config must be a table/object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cast(Any, cls))})
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = dict(data)
        try:
            if "network" in kwargs:
                net = kwargs["network"]
                if not isinstance(net, Mapping) or set(net) - _NETWORK_KEYS:
                    raise ConfigError(
                        f"network must be a table with mode/interface/host_loopback, got {net!r}"
                    )
                kwargs["network"] = NetworkConfig(
                    NetworkMode(net.get("mode", "nat")),
                    net.get("interface", ""),
                    net.get("host_loopback", False),
                )
            if "volumes" in kwargs:
                kwargs["volumes"] = tuple(volume_from_dict(v) for v in kwargs["volumes"])
            if "displays" in kwargs:
                kwargs["displays"] = tuple(parse_display_spec(s) for s in kwargs["displays"])
            if "publish" in kwargs:
                kwargs["publish"] = tuple(parse_port_spec(s) for s in kwargs["publish"])
            if "networks" in kwargs:
                kwargs["networks"] = tuple(parse_network_mode(s) for s in kwargs["networks"])
            if "disks" in kwargs:
                kwargs["disks"] = tuple(disk_from_dict(d) for d in kwargs["disks"])
            if isinstance(kwargs.get("root_disk"), Mapping):
                kwargs["root_disk"] = RootDisk(**kwargs["root_disk"])
            if isinstance(kwargs.get("process"), Mapping):
                kwargs["process"] = ProcessDefaults.from_dict(kwargs["process"])
            return cls(**kwargs)
        except ConfigError:
            raise
        except (SpecError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"invalid {cls.WHAT}: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid JSON {cls.WHAT}: {err}") from err
        return cls.from_dict(data)

    def to_toml(self) -> str:
        import tomli_w  # on first use: most processes never write TOML

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> Self:
        try:
            data = _tomllib().loads(text)
        except _tomllib().TOMLDecodeError as err:
            raise ConfigError(f"invalid TOML {cls.WHAT}: {err}") from err
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the config as TOML (``.toml``) or JSON (anything else), atomically."""
        target = Path(path)
        text = self.to_toml() if target.suffix == ".toml" else self.to_json()
        write_atomic(target, text.encode("utf-8"), mode=0o666)  # a config: umask decides

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a config written by :meth:`save` (TOML for ``.toml``, else JSON)."""
        source = Path(path)
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read VM config {str(source)!r}: {err.strerror}") from err
        return cls.from_toml(text) if source.suffix == ".toml" else cls.from_json(text)


def _tomllib() -> Any:
    import tomllib  # on first use: most processes never read TOML

    return tomllib


def _dc(obj: object) -> Any:
    """``obj`` as what :func:`dataclasses.fields` and ``replace`` take (the subclasses are
    dataclasses; this base is not one)."""
    return obj


@dataclass(frozen=True, slots=True, kw_only=True)
class LinuxVMConfig(ConfigData):
    """Everything needed to boot a Linux guest.

    Boot mode: name ``kernel_path`` (optionally ``initrd_path`` and ``cmdline``) for direct
    kernel boot; leave it empty for EFI boot from ``disk_path``/``iso_path``. Paths may be given
    as ``str``; relative paths are resolved against the current directory at construction.
    Files the VM reads (kernel, initrd, disk, ISO) must exist. ``disk_format`` is the format
    of ``disk_path`` (raw unless you say qcow2): it is never guessed from the disk's content,
    which the guest writes.
    """

    cpus: int = 2
    memory_gb: float = 1.0
    arch: Arch = field(default_factory=host_arch)

    disk_path: Path | None = None
    disk_format: DiskFormat = DiskFormat.RAW
    iso_path: Path | None = None
    #: More disks, after the main disk and the ISO: files or NBD exports on a virtio, NVMe or
    #: USB bus (see :class:`Disk`).
    disks: tuple[Disk, ...] = ()
    #: The root file system's disk (a read-only base with a per-VM layer; the first disk,
    #: ``disk_path`` then comes second): booted by vzkit's initramfs, see :class:`RootDisk`.
    root_disk: RootDisk | None = None
    #: What every guest command starts from (an image's env, working directory, user and
    #: default command): see :class:`ProcessDefaults`.
    process: ProcessDefaults = field(default_factory=ProcessDefaults)

    kernel_path: Path | None = None
    initrd_path: Path | None = None
    cmdline: str = ""

    state_dir: Path | None = None  # efi.nvram, machine id, sockets, console log; None: temporary

    nested_virtualization: bool = True  # enabled where the host and backend support it
    #: x86_64 Linux programs in an aarch64 guest through Apple's Rosetta (the vz backend on
    #: Apple silicon, macOS 13+): its directory is shared with the guest and vzkit's guests
    #: register it with binfmt_misc. Other backends refuse it.
    rosetta: bool = False
    volumes: tuple[VolumeMount, ...] = ()
    network: NetworkConfig = field(default_factory=NetworkConfig)
    #: More NICs after ``network`` (the first), each with its own MAC kept in ``state_dir``.
    networks: tuple[NetworkConfig, ...] = ()
    publish: tuple[PortForward, ...] = ()  # host ports forwarded to the guest (any network)
    headless: bool = True
    displays: tuple[DisplayConfig, ...] = ()
    #: Show the display: a window on the vz backend (closing it stops the VM; the window
    #: needs the main thread in vzkit's calls), the VNC endpoint reported on qemu. Implies a
    #: display (``headless=False``).
    gui: bool = False

    vsock: bool = True
    vsock_cid: int = 3
    balloon: bool = True
    entropy: bool = True
    sound: bool = False  # virtio sound output (vz; QEMU 7.2 has no virtio-sound)
    console: ConsoleMode = ConsoleMode.LOG
    console_log_path: Path | None = None

    #: e.g. "tcg", "kvm", "hvf"; "" takes :func:`default_accelerator` (``$VZKIT_QEMU_ACCEL``,
    #: else the backend picks the best that works).
    accelerator: str = ""
    #: The guest CPU in QEMU's ``-cpu`` syntax; "" lets the backend choose per accelerator and
    #: arch (qemu: ``host`` under KVM/HVF, ``neoverse-n1`` on aarch64 under TCG, else
    #: ``max``; the vz backend ignores it: VZ offers no CPU model). Part of the guest's
    #: hardware: a snapshot restores only with the CPU model it was saved with.
    cpu_model: str = ""
    #: The machine type (qemu: ``q35`` or ``microvm`` on x86_64, ``virt`` on aarch64); ""
    #: takes the backend's default for the arch (see :func:`default_machine_type`); the vz
    #: backend ignores it. Recorded with a snapshot like ``cpu_model``.
    machine_type: str = ""
    #: How shares reach the guest: "virtiofs" (a sandboxed virtiofsd per share where one can
    #: run, else virtio-9p), "9p" (virtio-9p for every share), "9p:TAG,TAG" (for those tags);
    #: "" takes :func:`default_share_device` (``$VZKIT_SHARE_DEVICE``), else "virtiofs".
    share_device: str = ""
    #: The host side of the vsock device: "kernel" (vhost-vsock where ``/dev/vhost-vsock`` can
    #: be had, else vzkit's user-space device) or "user" (always the user-space device); ""
    #: takes :func:`default_vsock_device` (``$VZKIT_VSOCK``), else "kernel". The guest sees the
    #: same virtio-vsock device either way.
    vsock_device: str = ""

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool):
            raise ConfigError(f"cpus must be an integer, got {self.cpus!r}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        memory_gb = memory_gb_value(self.memory_gb)
        if memory_gb * _MIB_PER_GB < MIN_MEMORY_MB:
            raise ConfigError(
                f"memory_gb={self.memory_gb!r} is below the minimum of {MIN_MEMORY_MB} MiB "
                f"({MIN_MEMORY_MB / _MIB_PER_GB:g} GB)"
            )
        put("memory_gb", memory_gb)
        try:
            put("arch", Arch.parse(str(self.arch)))
            put("console", ConsoleMode(self.console))
        except (SpecError, ValueError) as err:
            raise ConfigError(str(err)) from err

        if not isinstance(self.cmdline, str):
            raise ConfigError(f"cmdline must be a string, got {self.cmdline!r}")
        for name in _PATH_FIELDS:
            put(name, _as_path(name, getattr(self, name)))
        self._check_disk_format()
        if self.kernel_path is None:
            if self.initrd_path is not None:
                raise ConfigError(
                    "initrd_path is set but kernel_path is not (direct boot needs both)"
                )
            if self.cmdline:
                raise ConfigError(
                    "cmdline is set but kernel_path is not (EFI boot takes no cmdline)"
                )
        if "\x00" in self.cmdline:
            raise ConfigError("cmdline contains a NUL byte")
        if not isinstance(self.process, ProcessDefaults):
            raise ConfigError(f"process must be a ProcessDefaults, got {self.process!r}")
        if self.root_disk is not None:
            if not isinstance(self.root_disk, RootDisk):
                raise ConfigError(f"root_disk must be a RootDisk, got {self.root_disk!r}")
            if self.kernel_path is None:
                raise ConfigError(
                    "root_disk needs direct boot (kernel_path and vzkit's initramfs, which "
                    "mount the root and start the agent)"
                )
            if self.root_disk.layer is not None and self.root_disk.layer == self.disk_path:
                raise ConfigError("root_disk.layer is disk_path: give each its own file")

        self._check_devices(
            ("volumes", "displays", "publish", "disks", "networks"),
            ("nested_virtualization", "rosetta", "headless", "gui", *DEVICE_BOOLS),
        )
        if self.gui and self.headless:
            put("headless", False)  # a shown display needs one
        self._check_files()
        if self.rosetta and self.arch is not Arch.AARCH64:
            raise ConfigError(
                f"rosetta runs x86_64 programs in an aarch64 guest; this guest is "
                f"{self.arch.value}: set arch='aarch64' (--arch aarch64), or drop rosetta"
            )
        self._check_publish()
        if not isinstance(self.vsock_cid, int) or not 3 <= self.vsock_cid < 0xFFFFFFFF:
            raise ConfigError(
                f"vsock_cid must be an integer from 3 to 4294967294, got {self.vsock_cid!r}"
            )
        if not isinstance(self.accelerator, str):
            raise ConfigError(f"accelerator must be a string, got {self.accelerator!r}")
        if not self.accelerator:
            put("accelerator", default_accelerator())
        self._check_hardware_names()

    def _check_hardware_names(self) -> None:
        """``cpu_model`` and ``machine_type``: strings in QEMU's syntax, or "" (the default)."""
        if not isinstance(self.cpu_model, str):
            raise ConfigError(f"cpu_model must be a string, got {self.cpu_model!r}")
        if self.cpu_model and not _CPU_MODEL_RE.fullmatch(self.cpu_model):
            raise ConfigError(
                f"cpu_model {self.cpu_model!r} is not a CPU model: give a model name and "
                "options as QEMU's -cpu takes them (letters, digits, '_.+=-', options after "
                "commas, e.g. 'max,pauth-impdef=on' or 'cortex-a72'), or '' for the default"
            )
        if not isinstance(self.machine_type, str):
            raise ConfigError(f"machine_type must be a string, got {self.machine_type!r}")
        if not self.machine_type:
            default = default_machine_type(self.arch, self.kernel_path is not None, self.headless)
            object.__setattr__(self, "machine_type", default)
        elif not _MACHINE_TYPE_RE.fullmatch(self.machine_type):
            raise ConfigError(
                f"machine_type {self.machine_type!r} is not a machine type name (e.g. 'q35', "
                "'microvm', 'virt'), or '' for the default"
            )
        if not isinstance(self.share_device, str):
            raise ConfigError(f"share_device must be a string, got {self.share_device!r}")
        share = self.share_device or default_share_device() or "virtiofs"
        if not _SHARE_DEVICE_RE.fullmatch(share):
            raise ConfigError(
                f"share_device {share!r} is not one of 'virtiofs', '9p' or '9p:TAG,TAG'"
            )
        object.__setattr__(self, "share_device", share.lower() if ":" not in share else share)
        if not isinstance(self.vsock_device, str):
            raise ConfigError(f"vsock_device must be a string, got {self.vsock_device!r}")
        vsock = self.vsock_device or default_vsock_device() or "kernel"
        if vsock not in _VSOCK_DEVICES:
            raise ConfigError(f"vsock_device {vsock!r} is not one of 'kernel' or 'user'")
        object.__setattr__(self, "vsock_device", vsock)

    def check_inputs(self) -> None:
        """Raise :class:`ConfigError` naming the first input that is missing: a file the VM
        reads (kernel, initrd, disk, ISO; also checked at construction) or a shared
        directory. Backends run it again at start: files and directories can vanish. A config
        with nothing to boot (no kernel, disk or ISO) is refused here too: its firmware would
        wait forever."""
        if self.kernel_path is None and self.disk_path is None and self.iso_path is None:
            raise ConfigError(
                "nothing to boot: the config has no kernel, disk or ISO; give a kernel "
                "(kernel_path, --kernel) for direct boot or a disk or ISO (--disk, --iso) for EFI "
                "boot, or use vzkit's guest (vzkit.default_guest_config(), or 'vzkit run' "
                "without --config)"
            )
        self._check_files()
        for vol in self.volumes:
            if not vol.host_path.is_dir():
                what = "does not exist" if not vol.host_path.exists() else "is not a directory"
                raise ConfigError(
                    f"shared directory {str(vol.host_path)!r} (volume {str(vol)!r}) {what}"
                )

    def _check_files(self) -> None:
        named = [(name, getattr(self, name)) for name in _INPUT_FILES]
        if isinstance(self.root_disk, RootDisk):
            named.append(("root_disk.base", self.root_disk.base))
        for name, path in named:
            if path is not None and not path.is_file():
                what = "does not exist" if not path.exists() else "is not a regular file"
                raise ConfigError(f"{name}: {str(path)!r} {what}")
        check_disk_files(self.disks)

    def _check_disk_format(self) -> None:
        try:
            object.__setattr__(self, "disk_format", DiskFormat(self.disk_format))
        except (ValueError, TypeError):
            raise ConfigError(
                f"disk_format must be one of {', '.join(f.value for f in DiskFormat)}, "
                f"got {self.disk_format!r}"
            ) from None
        if self.disk_format is not DiskFormat.RAW and self.disk_path is None:
            raise ConfigError(f"disk_format is {self.disk_format.value!r} but disk_path is not set")

    def _check_publish(self) -> None:
        seen: set[tuple[str, int]] = set()
        for fwd in self.publish:
            if not isinstance(fwd, PortForward):
                raise ConfigError(f"publish must hold PortForward objects, got {fwd!r}")
            key = (fwd.protocol.value, fwd.host_port)
            if key in seen:
                raise ConfigError(f"host port {fwd.host_port}/{key[0]} is published twice")
            seen.add(key)

    # -- derived ------------------------------------------------------------------------

    @property
    def memory_mb(self) -> int:
        """Memory in MiB, rounded down to a whole MiB."""
        return int(self.memory_gb * _MIB_PER_GB)

    @property
    def direct_boot(self) -> bool:
        return self.kernel_path is not None

    def tagged_volumes(self) -> tuple[VolumeMount, ...]:
        """The volumes with unique tags filled in (see :func:`assign_volume_tags`)."""
        return assign_volume_tags(self.volumes)


def _absolute_volume(vol: VolumeMount) -> VolumeMount:
    return dataclasses.replace(vol, host_path=vol.host_path.expanduser().absolute())


MAX_VSOCK_PORT = 0xFFFFFFFF


def check_vsock_port(port: object) -> int:
    """``port`` if it is a vsock port (an integer from 0 to 2**32-1), else ``ConfigError``."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= MAX_VSOCK_PORT:
        raise ConfigError(f"vsock port must be an integer from 0 to {MAX_VSOCK_PORT}, got {port!r}")
    return port
