"""Lowering a ``LinuxVMConfig`` to a QEMU command line: one small function per device.

``_devices.build_argv`` only concatenates the pieces. Every option value that may hold a path or
user text goes through :func:`esc` (QEMU's option syntax doubles commas), or is a JSON string
(the disk's ``-blockdev``, see :func:`disk_args`), and nothing here
touches the file system or spawns a process, so the argv is a pure function of the
:class:`Plan` and can be pinned by unit tests.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..._config import ConsoleMode, LinuxVMConfig
from ..._disk import DiskFormat, DiskImage
from ..._display import default_linux_display_config
from ..._network import NetworkMode, PortForward
from ..._state import Arch
from ..._volume import VolumeMount, share_cmdline
from ...agent import CONSOLE_PORT_NAME as AGENT_PORT_NAME
from ...errors import UnsupportedError
from ._virtiofs import ShareDevice, ShareKind

__all__ = ["Plan", "default_cmdline", "esc"]


def esc(value: str | Path) -> str:
    """Escape an option value for QEMU's ``key=value,...`` syntax (commas are doubled)."""
    text = str(value)
    if "\x00" in text:
        raise ValueError("QEMU option values cannot contain NUL")
    return text.replace(",", ",,")


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the lowering needs beyond the config, decided by the machine at start."""

    config: LinuxVMConfig
    binary: Path
    accel: str
    qmp_fd: int
    agent_fd: int | None = None
    console_log: Path | None = None
    firmware_code: Path | None = None
    nvram: Path | None = None
    mac_address: str = ""
    #: The MAC addresses of ``config.networks``' NICs, in order (kept in the state dir).
    nic_macs: tuple[str, ...] = ()
    vnc_socket: Path | None = None
    host_os: str = sys.platform
    machine: str = ""  # derived from the config when empty (see machine_type)
    cpu: str = ""  # derived from the config and accel when empty (see cpu_model)
    #: Guest RAM in a shareable memfd: vhost-user devices (vsock, VirtioFS) map it.
    shared_memory: bool = False
    #: The vhost-user-vsock device's socket (an inherited fd), or None for no vsock device.
    vsock_fd: int | None = None
    #: An open ``/dev/vhost-vsock`` holding ``vsock_cid``: the kernel device instead.
    vhost_vsock_fd: int | None = None
    vsock_cid: int = 0  # the CID the kernel device claimed (0: the config's)
    #: Restoring a snapshot: wait for ``migrate-incoming`` (``-incoming defer``).
    incoming: bool = False
    #: The image the guest's disk runs on instead of ``config.disk_path``: a restored run's
    #: qcow2 copy-on-write overlay over ``disk_backing`` (the snapshot's image), which QEMU
    #: is given here, never from the overlay's header.
    disk_override: Path | None = None
    disk_backing: DiskImage | None = None
    #: The config's shares as served this run (virtiofsd sockets or 9p exports), in tag order.
    shares: tuple[ShareDevice, ...] = ()
    #: An inherited fd (a memfd) holding the guest agent's per-boot key (see agent_key_args).
    agent_key_fd: int | None = None
    #: Run under QEMU's seccomp filter (the binary has it: see ``_discover.sandbox_probe``).
    sandbox: bool = False
    #: The ``nat`` network's passt socket (an inherited fd), or None for QEMU's own backends.
    passt_fd: int | None = None
    #: Bridged on Linux: the tap device vzkit got from qemu-bridge-helper (see ``_bridge``).
    tap_fd: int | None = None
    #: The root disk's copy-on-write layer for this VM (``_rootlayer``), over
    #: ``config.root_disk.base``; set exactly when the config has a root disk.
    root_layer: Path | None = None
    #: A restored run: the snapshot's captured root layer (a standalone qcow2, read-only)
    #: between ``root_layer`` and the base, which QEMU is given here, never from a header.
    root_backing: DiskImage | None = None

    def __post_init__(self) -> None:
        if not self.machine:
            object.__setattr__(self, "machine", machine_type(self.config))
        if not self.cpu:
            object.__setattr__(self, "cpu", cpu_model(self.config, self.accel))

    @property
    def arch(self) -> Arch:
        return self.config.arch


def default_cmdline(arch: Arch) -> str:
    """The console the kernel should use when the config names no cmdline."""
    return "console=ttyS0" if arch is Arch.X86_64 else "console=ttyAMA0"


def kernel_cmdline(plan: Plan) -> str:
    """The config's command line plus, with shares, the words naming them (and where each
    goes) for the default guest's init (:func:`~vzkit._volume.share_cmdline`)."""
    cmdline = plan.config.cmdline or default_cmdline(plan.arch)
    guest_paths = {v.tag: v.guest_path for v in plan.config.tagged_volumes()}
    shares = share_cmdline(
        VolumeMount(share.path, share.tag, share.read_only, guest_paths.get(share.tag, ""))
        for share in plan.shares
    )
    if plan.agent_key_fd is not None:  # where the key is, not the key: cmdlines are public
        cmdline += f" {AGENT_KEY_CMDLINE}"
    if plan.config.root_disk is not None:
        cmdline += f" {plan.config.root_disk.cmdline_words()}"
    return f"{cmdline} {shares}" if shares else cmdline


#: The machine types vzkit lowers devices for, per guest arch; the first is the default.
MACHINE_TYPES = {Arch.X86_64: ("q35", "microvm"), Arch.AARCH64: ("virt",)}


def machine_type(config: LinuxVMConfig) -> str:
    """The machine for a config: its ``machine_type``, else ``q35`` on x86_64 and ``virt`` on
    aarch64. :class:`UnsupportedError` for a type vzkit has no devices for, or microvm where
    it cannot work.

    ``microvm`` (x86_64, no PCI, virtio-mmio devices found through ACPI) was measured against
    ``q35`` with the default guest under TCG here: about 2.1 s vs 2.3 s to the guest's ready
    line, but one boot in four hung with an empty console, so ``q35`` is the default
    (``$VZKIT_QEMU_MACHINE=microvm`` feeds the config's default: see
    :func:`~vzkit._config.default_machine_type`).
    """
    known = MACHINE_TYPES[config.arch]
    wanted = config.machine_type or known[0]
    if wanted not in known:
        raise UnsupportedError(
            f"machine type {wanted!r} is not supported for {config.arch.value} guests on the "
            f"qemu backend (use {' or '.join(repr(k) for k in known)}, or '' for the default)",
            backend="qemu",
            feature=f"machine:{wanted}",
        )
    if wanted == "microvm" and not (config.direct_boot and config.headless):
        raise UnsupportedError(
            "machine type 'microvm' needs a directly booted (kernel_path), headless guest: "
            "it has no firmware and no display (use 'q35')",
            backend="qemu",
            feature="machine:microvm",
        )
    return wanted


#: The aarch64 CPU under TCG: a named ARMv8.2 core (LSE atomics, no pointer authentication,
#: whose architected QARMA algorithm TCG computes in software on every signed return; a
#: userland built with pointer authentication or BTI runs, those instructions are hints). On
#: a quiet host, default guest to the agent's ready line, QEMU 7.2, median of 7 interleaved
#: rounds (``./dev bench --suite cpu --arch aarch64 -n 7``; docs/qemu-backend.md): 2.60 s,
#: against 3.01 s for ``max,pauth=off``, 3.09 s for ``cortex-a72``, 3.76 s for
#: ``max,pauth-impdef=on`` and 10.87 s for ``max``. A named model is also the same CPU in
#: every QEMU version, which ``max`` is not: a snapshot records it (issue 20).
AARCH64_TCG_CPU = "neoverse-n1"


def cpu_model(config: LinuxVMConfig, accel: str) -> str:
    """The ``-cpu`` value: the config's ``cpu_model``, else ``host`` under KVM/HVF, else (TCG)
    :data:`AARCH64_TCG_CPU` on aarch64 and ``max`` on x86_64 (no model measured faster there:
    ``max``, ``Nehalem`` and ``max,-la57`` were within noise)."""
    if config.cpu_model:
        return config.cpu_model
    if accel in ("kvm", "hvf"):
        return "host"
    return AARCH64_TCG_CPU if config.arch is Arch.AARCH64 else "max"


def virtio(plan: Plan, device: str) -> str:
    """``virtio-<device>`` on the machine's transport: PCI, or MMIO on microvm."""
    return f"virtio-{device}-device" if plan.machine == "microvm" else f"virtio-{device}-pci"


def machine_args(plan: Plan) -> list[str]:
    cfg = plan.config
    machine = f"{plan.machine},accel={plan.accel}"
    if plan.machine == "virt":
        machine += ",gic-version=max"
    memory: list[str] = []
    if plan.shared_memory:
        machine += ",memory-backend=mem0"
        backend = f"memory-backend-memfd,id=mem0,size={cfg.memory_mb}M,share=on"
        if plan.incoming:
            # Loading a state reads every guest page, and a read of a shmem hole allocates
            # it: allocating up front with two threads is faster (measured: restore of a
            # 512 MiB guest 0.51 s -> 0.34 s). Shared RAM is then fully allocated either way.
            backend += ",prealloc=on,prealloc-threads=2"
        memory = ["-object", backend]
    return [
        "-machine", machine,
        "-cpu", plan.cpu,
        "-smp", str(cfg.cpus),
        "-m", f"{cfg.memory_mb}M",
        *memory,
    ]  # fmt: skip


def base_args(plan: Plan) -> list[str]:
    """No defaults, no user config, no reboots (a guest reboot stops the VM, as on VZ)."""
    return [
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-S",  # start paused: QMP is attached before the guest runs
        "-chardev", f"socket,id=qmp0,fd={plan.qmp_fd}",
        "-mon", "chardev=qmp0,mode=control",
    ]  # fmt: skip


def boot_args(plan: Plan) -> list[str]:
    cfg = plan.config
    if cfg.kernel_path is not None:
        args = ["-kernel", str(cfg.kernel_path)]
        if cfg.initrd_path is not None:
            args += ["-initrd", str(cfg.initrd_path)]
        args += ["-append", kernel_cmdline(plan)]
        return args
    if plan.firmware_code is None or plan.nvram is None:
        raise ValueError("EFI boot needs firmware code and a variable store in the plan")
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={esc(plan.firmware_code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={esc(plan.nvram)}",
    ]  # fmt: skip


def image_node(image: DiskImage, *, read_only: bool = False) -> dict[str, object]:
    """A ``-blockdev`` definition of ``image`` in its stated format, following no file its
    header names: a qcow2 gets ``backing: null`` (no backing file; one named in the header
    is ignored). The caller refuses qcow2 images with an external data file beforehand
    (:func:`~vzkit._disk.standalone_qcow2_size`): QEMU has no option to switch that off."""
    if "\x00" in str(image.path):
        raise ValueError("QEMU option values cannot contain NUL")
    node: dict[str, object] = {
        "driver": image.format.value,
        "file": {"driver": "file", "filename": str(image.path)},
    }
    if read_only:
        node["read-only"] = True
    if image.format is DiskFormat.QCOW2:
        node["backing"] = None
    return node


def disk_node(plan: Plan) -> dict[str, object] | None:
    """The guest's disk: the config's image in its configured format (a raw disk stays raw
    whatever its first sector holds), or a restored run's overlay with its backing spelled
    out (read-only)."""
    cfg = plan.config
    if plan.disk_override is not None:
        if plan.disk_backing is None:
            raise ValueError("a disk overlay needs its backing image in the plan")
        node = image_node(DiskImage(plan.disk_override, DiskFormat.QCOW2))
        node["backing"] = image_node(plan.disk_backing, read_only=True)
    elif cfg.disk_path is not None:
        node = image_node(DiskImage(cfg.disk_path, cfg.disk_format))
    else:
        return None
    out: dict[str, object] = {"driver": node["driver"], "node-name": "disk0"}
    out["cache"] = {"direct": False}
    out.update(node)
    return out


def root_chain(layer: Path, base: DiskImage, middle: DiskImage | None) -> dict[str, object]:
    """A root disk's chain as one ``-blockdev`` definition, node by node with every format
    stated: ``layer`` (qcow2) over ``middle`` (a restored run's captured layer, read-only) over
    ``base`` (read-only). No header's backing name is followed (see :func:`image_node`)."""
    below = image_node(base, read_only=True)
    if middle is not None:
        captured = image_node(middle, read_only=True)
        captured["backing"] = below
        below = captured
    node = image_node(DiskImage(layer, DiskFormat.QCOW2))
    node["backing"] = below
    return node


def root_disk_args(plan: Plan) -> list[str]:
    """The root disk, the first disk (``/dev/vda``): this VM's qcow2 layer with the base given
    as its backing, in the base's stated format and read-only (the layer's header names no
    backing file: QEMU follows nothing it would read from a header); a restored run's layer
    lies over the snapshot's captured layer, which lies over the base."""
    root = plan.config.root_disk
    if root is None:
        return []
    if plan.root_layer is None:
        raise ValueError("a root disk needs its copy-on-write layer in the plan")
    layer = root_chain(plan.root_layer, DiskImage(root.base, root.format), plan.root_backing)
    node: dict[str, object] = {"driver": "qcow2", "node-name": "root0", "cache": {"direct": False}}
    node.update(layer)
    return [
        "-blockdev", json.dumps(node, separators=(",", ":"), ensure_ascii=False),
        "-device", f"{virtio(plan, 'blk')},drive=root0,id=root0-dev",
    ]  # fmt: skip


def disk_args(plan: Plan) -> list[str]:
    """The disk as a JSON ``-blockdev``: QEMU's ``key=value`` syntax cannot say
    ``backing: null`` (``backing=null`` names a node called "null")."""
    node = disk_node(plan)
    if node is None:
        return []
    return [
        "-blockdev", json.dumps(node, separators=(",", ":"), ensure_ascii=False),
        "-device", f"{virtio(plan, 'blk')},drive=disk0,id=disk0-dev",
    ]  # fmt: skip


#: QEMU's seccomp filter: no obsolete syscalls, no set*id/setsid, no fork/exec, no scheduler
#: or affinity changes. A guest that takes over QEMU keeps only what QEMU itself needs.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: Bridged networking on Linux without a tap fd in the plan: QEMU forks and runs the setuid
#: qemu-bridge-helper, which inherits the filter. The machine never does this (it runs the
#: helper itself and passes ``tap_fd``); a plan built without one still works.
SANDBOX_BRIDGED = "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny"


def sandbox_args(plan: Plan) -> list[str]:
    """``-sandbox`` when the plan asks for it (the machine probed the binary)."""
    if not plan.sandbox:
        return []
    net = plan.config.network
    if net.mode is NetworkMode.BRIDGED and plan.host_os != "darwin" and plan.tap_fd is None:
        return ["-sandbox", SANDBOX_BRIDGED]
    return ["-sandbox", SANDBOX]


def incoming_args(plan: Plan) -> list[str]:
    """Restore: QEMU waits for the state stream, handed over later with ``migrate-incoming``."""
    return ["-incoming", "defer"] if plan.incoming else []


def iso_args(plan: Plan) -> list[str]:
    path = plan.config.iso_path
    if path is None:
        return []
    return [
        "-blockdev",
        f"driver=raw,node-name=iso0,read-only=on,file.driver=file,file.filename={esc(path)}",
        "-device", f"{virtio(plan, 'blk')},drive=iso0,id=iso0-dev",
    ]  # fmt: skip


def netdev(mode: NetworkMode, interface: str, host_os: str, ident: str = "net0") -> str | None:
    """The ``-netdev`` for a mode on this host OS (``None``: no NIC).

    nat is user-mode networking everywhere; on macOS bridged/vmnet/host-only use QEMU's vmnet
    backends, on Linux bridged uses qemu-bridge-helper and host-only restricted user-mode
    networking (the guest reaches nothing beyond the host-side services published to it).
    """
    darwin = host_os == "darwin"
    if mode is NetworkMode.NONE:
        return None
    if mode is NetworkMode.NAT:
        return f"user,id={ident}"
    if mode is NetworkMode.BRIDGED:
        if darwin:
            return f"vmnet-bridged,id={ident},ifname={esc(interface)}"
        return f"bridge,id={ident},br={esc(interface)}"
    if mode is NetworkMode.HOST_ONLY:
        return f"vmnet-host,id={ident}" if darwin else f"user,id={ident},restrict=on"
    if darwin:
        return f"vmnet-shared,id={ident}"
    raise UnsupportedError(
        "network mode 'vmnet' needs macOS (QEMU's vmnet-shared); on Linux use 'nat', "
        "'host-only' or 'bridged:IFACE'",
        backend="qemu",
        feature="network:vmnet",
    )


def publishes_natively(mode: NetworkMode, host_os: str) -> bool:
    """Whether QEMU's network publishes the ports itself: ``nat`` (passt on Linux, else
    slirp's ``hostfwd``) and ``host-only`` on Linux (restricted slirp). Elsewhere (``none``,
    bridged, vmnet) the core forwards them through the guest agent (``vzkit._portfwd``)."""
    if mode is NetworkMode.NAT:
        return True
    return mode is NetworkMode.HOST_ONLY and host_os != "darwin"


def native_ports(cfg: LinuxVMConfig, host_os: str) -> tuple[PortForward, ...]:
    """The published ports QEMU's network serves for ``cfg`` (all or none)."""
    return cfg.publish if publishes_natively(cfg.network.mode, host_os) else ()


def hostfwd(plan: Plan) -> str:
    """``,hostfwd=...`` for every published port, where user-mode networking publishes them."""
    cfg = plan.config
    if not cfg.publish or not publishes_natively(cfg.network.mode, plan.host_os):
        return ""
    return "".join(
        f",hostfwd={p.protocol.value}:{p.host_address}:{p.host_port}-:{p.guest_port}"
        for p in cfg.publish
    )


def passt_netdev(fd: int) -> str:
    """The ``nat`` network through passt (see ``_passt``): a stream socket QEMU inherits.
    passt serves DHCP, DNS and the published ports itself."""
    return f"stream,id=net0,server=off,addr.type=fd,addr.str={fd}"


def network_args(plan: Plan) -> list[str]:
    net = plan.config.network
    if plan.passt_fd is not None and net.mode is NetworkMode.NAT:
        backend: str | None = passt_netdev(plan.passt_fd)
    elif plan.tap_fd is not None and net.mode is NetworkMode.BRIDGED:
        backend = f"tap,id=net0,fd={plan.tap_fd}"  # from qemu-bridge-helper, run by vzkit
    else:
        backend = netdev(net.mode, net.interface, plan.host_os)
        if backend is not None:
            backend += hostfwd(plan)
    if backend is None:
        return []
    device = f"{virtio(plan, 'net')},netdev=net0,id=net0-dev"
    if plan.mac_address:
        device += f",mac={plan.mac_address}"
    return ["-netdev", backend, "-device", device]


def sound_args(plan: Plan) -> list[str]:
    """No sound device: QEMU 7.2 has no virtio-sound (it came in 8.2), and an emulated HDA
    card playing into ``-audiodev none`` would be no sound output at all."""
    if not plan.config.sound:
        return []
    raise UnsupportedError(
        "the qemu backend has no sound output: QEMU 7.2 has no virtio-sound device (it came "
        "in QEMU 8.2); drop sound (--no-sound), or use the vz backend",
        backend="qemu",
        feature="sound",
    )


def rng_args(plan: Plan) -> list[str]:
    if not plan.config.entropy:
        return []
    return [
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"{virtio(plan, 'rng')},rng=rng0,id=rng0-dev",
    ]  # fmt: skip


def balloon_args(plan: Plan) -> list[str]:
    if not plan.config.balloon:
        return []
    return ["-device", f"{virtio(plan, 'balloon')},id=balloon0"]


def console_args(plan: Plan) -> list[str]:
    mode = plan.config.console
    if mode is ConsoleMode.NONE:
        return []
    if mode is ConsoleMode.STDIO:
        chardev = "stdio,id=con0,signal=off"
    elif mode is ConsoleMode.PTY:
        chardev = "pty,id=con0"
        if plan.console_log is not None:
            chardev += f",logfile={esc(plan.console_log)},logappend=on"
    else:
        if plan.console_log is None:
            raise ValueError("console mode 'log' needs a log path in the plan")
        chardev = f"file,id=con0,path={esc(plan.console_log)},append=on"
    return ["-chardev", chardev, "-serial", "chardev:con0"]


def agent_port_args(plan: Plan) -> list[str]:
    """A virtio console port named for the guest agent, on an inherited socket."""
    if plan.agent_fd is None:
        return []
    return [
        "-device", f"{virtio(plan, 'serial')},id=vser0",
        "-chardev", f"socket,id=agent0,fd={plan.agent_fd}",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
    ]  # fmt: skip


def vsock_args(plan: Plan) -> list[str]:
    """The guest's vsock device: kernel vhost-vsock, or our vhost-user device on a socket.

    On PCI machines it sits behind its own root port, so it can be unplugged and plugged
    again: QEMU cannot migrate vhost devices, so snapshots save without it, and a restored
    VM starts with the empty port (no fd in the plan) and gets a fresh device plugged in.
    """
    if not plan.config.vsock:
        return []
    args: list[str] = []
    if plan.machine != "microvm":
        args += ["-device", f"pcie-root-port,id={VSOCK_PORT},chassis=31"]
    bus = "" if plan.machine == "microvm" else f",bus={VSOCK_PORT}"
    if plan.vhost_vsock_fd is not None:
        cid = plan.vsock_cid or plan.config.vsock_cid
        args += ["-device", f"{vhost(plan, 'vsock')},id=vsock0,guest-cid={cid},"
                            f"vhostfd={plan.vhost_vsock_fd}{bus}"]  # fmt: skip
    elif plan.vsock_fd is not None:
        args += [
            "-chardev", f"socket,id=vsock0-chr,fd={plan.vsock_fd}",
            "-device", f"{vhost(plan, 'user-vsock')},id=vsock0,chardev=vsock0-chr{bus}",
        ]  # fmt: skip
    return args


VSOCK_PORT = "vsock-port"

#: The fw_cfg item holding the agent's per-boot key, and the kernel command-line word that
#: tells the default guest's init to make the agent require it (docs/agent-protocol.md).
AGENT_KEY_FW_CFG = "opt/org.vzkit/agent-key"
AGENT_KEY_CMDLINE = "vzkit.agent_key=fw_cfg"


def agent_key_args(plan: Plan) -> list[str]:
    """The agent's key as a fw_cfg item, read from an inherited fd: never on the command line
    (``/proc/PID/cmdline`` is readable by every host user) nor in a file. The guest reads it
    at ``/sys/firmware/qemu_fw_cfg/by_name/opt/org.vzkit/agent-key/raw`` (root only). fw_cfg
    items are not part of a saved state: a restored guest reads its new QEMU's key."""
    if plan.agent_key_fd is None:
        return []
    return ["-fw_cfg", f"name={AGENT_KEY_FW_CFG},file=/proc/self/fd/{plan.agent_key_fd}"]


def virtiofs_device_args(plan: Plan, index: int, share: ShareDevice) -> list[str]:
    """A vhost-user-fs device on the inherited socket of the share's virtiofsd."""
    if share.fd is None:
        raise ValueError(f"share {share.tag!r} has no virtiofsd socket in the plan")
    if not plan.shared_memory:
        raise ValueError("vhost-user-fs needs shared guest memory (Plan.shared_memory)")
    return [
        "-chardev", f"socket,id=fs{index},fd={share.fd}",
        "-device",
        f"{vhost(plan, 'user-fs')},id=fs{index}-dev,chardev=fs{index},tag={esc(share.tag)},"
        "queue-size=1024",
    ]  # fmt: skip


def ninep_device_args(plan: Plan, index: int, share: ShareDevice) -> list[str]:
    """A virtio-9p export of the share's directory; ``readonly=on`` is enforced by QEMU."""
    fsdev = f"local,id=fsdev{index},path={esc(share.path)},security_model=none"
    if share.read_only:
        fsdev += ",readonly=on"
    return [
        "-fsdev", fsdev,
        "-device", f"{virtio(plan, '9p')},id=fs{index}-dev,fsdev=fsdev{index},"
        f"mount_tag={esc(share.tag)}",
    ]  # fmt: skip


def share_args(plan: Plan) -> list[str]:
    args: list[str] = []
    for index, share in enumerate(plan.shares):
        if share.kind is ShareKind.VIRTIOFS:
            args += virtiofs_device_args(plan, index, share)
        else:
            args += ninep_device_args(plan, index, share)
    return args


def vhost(plan: Plan, device: str) -> str:
    """``vhost-<device>`` on the machine's transport: PCI, or MMIO on microvm."""
    return f"vhost-{device}-device" if plan.machine == "microvm" else f"vhost-{device}-pci"


def display_args(plan: Plan) -> list[str]:
    cfg = plan.config
    if cfg.headless:
        return ["-display", "none"]
    displays = cfg.displays or (default_linux_display_config(),)
    first = displays[0]
    args = [
        "-device",
        f"virtio-gpu-pci,id=gpu0,max_outputs={len(displays)},xres={first.width},yres={first.height}",
        "-display", "none",
    ]  # fmt: skip
    if plan.vnc_socket is not None:
        args += ["-vnc", f"unix:{esc(plan.vnc_socket)}"]
    if plan.arch is Arch.AARCH64:  # virt has no PS/2: give the display a keyboard and a tablet
        args += ["-device", "usb-ehci,id=usb0", "-device", "usb-kbd,bus=usb0.0",
                 "-device", "usb-tablet,bus=usb0.0"]  # fmt: skip
    return args


#: The pvpanic device per machine: ISA on q35 (the guest finds it through ACPI, Linux's
#: pvpanic-mmio driver), PCI on virt. None on microvm, whose ACPI tables do not list it.
PANIC_DEVICES = {"q35": "pvpanic", "virt": "pvpanic-pci"}


def panic_args(plan: Plan) -> list[str]:
    """A guest kernel panic reaches QEMU through the pvpanic device (QMP ``GUEST_PANICKED``),
    and QEMU then exits with status 1 (``-action panic=exit-failure``, QEMU 7.1+): the VM ends
    in ERROR with the reason and nothing is left running. QEMU's default would instead stop
    the guest and leave the process up.

    Last among the devices: on virt the PCI device takes the next free slot, and the devices
    before it keep the addresses that snapshots saved without it expect.
    """
    device = PANIC_DEVICES.get(plan.machine)
    return [
        *(["-device", f"{device},id=panic0"] if device else []),
        "-action", "panic=exit-failure",
    ]  # fmt: skip
