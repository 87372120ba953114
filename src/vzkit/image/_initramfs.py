"""Build a minimal Linux guest, a kernel plus an initramfs, from two Debian packages.

The kernel package supplies ``/boot/vmlinuz-KVER`` and the modules; ``busybox-static``
supplies the whole userland. The initramfs holds busybox, the ``/init`` script shipped with
this package (``init.sh``), ``/dev/console``, and the virtio/vsock/virtiofs modules of
:data:`GUEST_MODULES` with their dependency closure, uncompressed under
``/lib/modules/KVER/`` and listed in load order in ``/etc/vzkit/modules``. Modules the kernel
has built in are skipped; modules it lacks altogether are reported in
:attr:`GuestImage.missing_modules`.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vzkit._kernel import write_arm64_image
from vzkit.errors import ConfigError, GuestError

from ._cpio import CpioWriter
from ._deb import DebPackage
from ._fetch import GuestDebs, deb_arch, fetch_guest_debs, find_guest_debs
from ._modules import (
    MODULE_SUFFIXES,
    decompress_module,
    parse_modules_builtin,
    read_modinfo,
    resolve_modules,
)

__all__ = [
    "CONSOLES",
    "GUEST_MODULES",
    "GuestImage",
    "build_guest",
    "init_script",
    "stage2_script",
    "uncompress_arm64_kernel",
]

GUEST_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_balloon",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
    "9pnet_virtio",
    "9p",
    "ext4",
    "af_packet",
    "evdev",  # the power button's events reach /init through it
    "button",  # the ACPI power button (x86_64; built in on arm64)
    "qemu_fw_cfg",  # the agent's per-boot key on the qemu backend (docs/agent-protocol.md)
    "pvpanic_mmio",  # reports a kernel panic to the VMM (QEMU's ISA pvpanic, found via ACPI)
    "pvpanic_pci",  # the same on a PCI device (QEMU's virt)
    "binfmt_misc",  # Rosetta's x86_64 programs (vzkit.rosetta=, the vz backend's rosetta=True)
)
"""Modules wanted in every guest, when the kernel has them (loaded in this order)."""

CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
_MODULES_DIR = re.compile(r"^(?:/usr)?/lib/modules/([^/]+)/(.+)$")
_VMLINUZ = re.compile(r"^/boot/vmlinuz-([^/]+)$")  # a version is one path part
_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "root", "mnt",
         "etc/vzkit")  # fmt: skip
_PROFILE = "export PS1='\\h:\\w\\$ '\n"


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot ``kernel`` with ``initrd`` and :meth:`cmdline`."""

    kernel: Path
    initrd: Path
    arch: str
    kernel_version: str
    modules: list[str]
    builtin_modules: list[str] = field(default_factory=list)
    missing_modules: list[str] = field(default_factory=list)

    @property
    def console(self) -> str:
        """The serial console device: ``ttyS0`` (x86_64) or ``ttyAMA0`` (aarch64 virt)."""
        return CONSOLES[self.arch]

    def cmdline(self, extra: str = "") -> str:
        """A kernel command line with the console set: ``console=ttyS0 quiet ...``.

        Two settings trade a little of the stock kernel's defaults for the guest's one vCPU
        (measured in ``docs/vsock.md``, "Performance"; see also ``docs/guest-image.md``):

        * ``init_on_alloc=0``: Debian builds its kernels to zero every allocation (a hardening
          default). The guest is a one-tenant sandbox whose boundary is the VM, and the
          zeroing is a memset per vsock packet (each 4 KiB receive buffer, each 64 KiB send
          buffer).
        * ``preempt=none`` (x86_64: Debian's arm64 kernel has no dynamic preemption model and
          runs "voluntary"): a woken kernel worker waits for the current task's system call
          to end instead of preempting it mid-copy, so one ``writev`` of four 64 KiB frames to
          a vsock socket is one wake-up of the send worker, not four.

        A ``cmdline`` that ends in ``init_on_alloc=1`` or ``preempt=voluntary`` undoes them
        (the last one wins).
        """
        tuning = "init_on_alloc=0" + (" preempt=none" if self.arch == "x86_64" else "")
        return f"console={self.console} quiet {tuning} {extra}".strip()


def init_script() -> bytes:
    """The guest's ``/init`` (a busybox sh script shipped as package data)."""
    return importlib.resources.files(__package__ or "vzkit.image").joinpath("init.sh").read_bytes()


def stage2_script() -> bytes:
    """The guest's second stage on a root disk, PID 1 after ``switch_root``
    (``/etc/vzkit/stage2.sh`` in the initramfs, copied to ``/run/vzkit`` of the root)."""
    return (
        importlib.resources.files(__package__ or "vzkit.image").joinpath("stage2.sh").read_bytes()
    )


def _check_arch(arch: str) -> None:
    if arch not in CONSOLES:
        raise GuestError(f"unsupported guest architecture {arch!r} (use x86_64 or aarch64)")


def _check_elf_machine(data: bytes, arch: str, what: str) -> None:
    if len(data) < 20 or data[:4] != b"\x7fELF":
        raise GuestError(f"{what} is not an ELF executable")
    order = "<" if data[5] == 1 else ">"
    (machine,) = struct.unpack_from(order + "H", data, 18)
    if machine != _ELF_MACHINES[arch]:
        raise GuestError(f"{what} is for ELF machine {machine}, not {arch}")


@dataclass
class _KernelParts:
    version: str = ""
    image: bytes = b""
    builtin: set[str] = field(default_factory=set)
    depends: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)  # module name -> path in the package


def _scan_kernel(pkg: DebPackage) -> _KernelParts:
    """One pass over the kernel package: the image, modules.builtin, every module's modinfo."""
    parts = _KernelParts()
    builtin_text: dict[str, str] = {}
    modules: dict[str, dict[str, tuple[str, list[str]]]] = {}  # kver -> name -> (path, deps)
    for entry, data in pkg.iter_files(
        lambda e: bool(_VMLINUZ.match(e.path) or _MODULES_DIR.match(e.path))
    ):
        if match := _VMLINUZ.match(entry.path):
            if parts.image:
                raise GuestError(f"{pkg.path}: more than one /boot/vmlinuz-* image")
            parts.version, parts.image = match.group(1), data
            continue
        match = _MODULES_DIR.match(entry.path)
        assert match is not None
        kver, rel = match.groups()
        if rel == "modules.builtin":
            builtin_text[kver] = data.decode("utf-8", "replace")
        elif rel.endswith(MODULE_SUFFIXES):
            info = read_modinfo(data, entry.path)
            modules.setdefault(kver, {})[info.name] = (entry.path, list(info.depends))
    if not parts.image:
        raise GuestError(f"{pkg.path}: no /boot/vmlinuz-* kernel image (a metapackage?)")
    for name, (path, deps) in modules.get(parts.version, {}).items():
        parts.paths[name], parts.depends[name] = path, deps
    parts.builtin = parse_modules_builtin(builtin_text.get(parts.version, ""))
    return parts


def _module_dest(kver: str, path: str) -> str:
    match = _MODULES_DIR.match(path)
    assert match is not None
    rel = match.group(2)
    for suffix in (".ko.xz", ".ko.gz", ".ko.zst"):
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)] + ".ko"
    return f"/lib/modules/{kver}/{rel}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _extra_bytes(source: bytes | Path) -> tuple[bytes, int]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), 0o644
    try:
        mode = 0o755 if os.access(source, os.X_OK) else 0o644
        return source.read_bytes(), mode
    except OSError as err:
        raise GuestError(f"cannot read extra file {source}: {err}") from err


def build_guest(
    arch: str,
    *,
    out_dir: Path | str,
    deb_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    extra_files: Mapping[str, bytes | Path] | None = None,
    modules: Sequence[str] = GUEST_MODULES,
    required_modules: Sequence[str] = (),
    hostname: str = "vzkit",
) -> GuestImage:
    """Build the kernel and initramfs of a minimal guest for ``arch`` into ``out_dir``.

    Packages come from ``deb_dir`` (pre-downloaded ``.deb`` files) or are downloaded with apt
    into ``cache_dir`` (exactly one of the two). ``modules`` are included when this kernel
    has them; ``required_modules`` must exist (built in or loadable) or GuestError is raised.
    ``extra_files`` maps absolute guest paths to content (bytes, mode 0644) or host files
    (their executable bit is kept); they may replace generated files such as ``/init``.
    The initramfs is reproducible: the same packages and arguments give identical bytes.
    """
    _check_arch(arch)
    debs: GuestDebs
    if deb_dir is not None and cache_dir is None:
        debs = find_guest_debs(deb_dir, arch)
    elif cache_dir is not None and deb_dir is None:
        debs = fetch_guest_debs(cache_dir, arch)
    else:
        raise GuestError("build_guest needs exactly one of deb_dir= or cache_dir=")
    kernel_pkg, busybox_pkg = DebPackage(debs.kernel), DebPackage(debs.busybox)
    for pkg in (kernel_pkg, busybox_pkg):
        if pkg.architecture != deb_arch(arch):
            raise GuestError(f"{pkg.path} is for {pkg.architecture}, not {deb_arch(arch)}")
    busybox = busybox_pkg.read("/bin/busybox")
    _check_elf_machine(busybox, arch, f"{busybox_pkg.path}:/bin/busybox")

    parts = _scan_kernel(kernel_pkg)
    plan = resolve_modules(
        [*modules, *required_modules],
        parts.depends,
        builtin=parts.builtin,
        optional=[m for m in modules if m not in required_modules],
    )
    blobs = kernel_pkg.extract(parts.paths[name] for name in plan.order)
    kver = parts.version

    cpio = CpioWriter()
    for directory in _DIRS:
        cpio.add_dir(directory)
    cpio.add_dir("tmp", 0o1777)
    cpio.add_chardev("dev/console", 5, 1, 0o600)
    cpio.add_chardev("dev/null", 1, 3, 0o666)
    cpio.add_file("bin/busybox", busybox, 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", init_script(), 0o755)
    cpio.add_file("etc/vzkit/stage2.sh", stage2_script(), 0o755)
    cpio.add_file("etc/hostname", f"{hostname}\n".encode())
    cpio.add_file("etc/profile", _PROFILE.encode())
    load_lines = []
    for name in plan.order:
        path = parts.paths[name]
        if path not in blobs:
            raise GuestError(f"{kernel_pkg.path}: module file {path} vanished between passes")
        dest = _module_dest(kver, path)
        cpio.add_file(dest, decompress_module(blobs[path], path), 0o644)
        load_lines.append(f"{name} {dest}\n")
    cpio.add_file("etc/vzkit/modules", "".join(load_lines).encode())
    for guest_path, source in (extra_files or {}).items():
        data, mode = _extra_bytes(source)
        cpio.discard(guest_path)
        cpio.add_file(guest_path, data, mode)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kernel_path, initrd_path = out / f"vmlinuz-{kver}", out / f"initrd-{kver}.img"
    _write_atomic(kernel_path, parts.image)
    _write_atomic(initrd_path, cpio.to_gzip())
    return GuestImage(
        kernel=kernel_path,
        initrd=initrd_path,
        arch=arch,
        kernel_version=kver,
        modules=list(plan.order),
        builtin_modules=list(plan.builtin),
        missing_modules=list(plan.missing),
    )


def uncompress_arm64_kernel(src: Path | str, dest: Path | str) -> Path:
    """Write the raw arm64 ``Image`` of kernel ``src`` to ``dest`` and return ``dest``.

    Apple's Virtualization framework boots only an uncompressed arm64 Image. ``src`` may be
    a raw Image (copied; Debian 12 ships this), a gzip-compressed Image, or an EFI zboot image
    (gzip, lzma, xz or bzip2 payload): :func:`vzkit._kernel.write_arm64_image`, which the vz
    backend reads kernels with too. Anything else raises GuestError.
    """
    out = Path(dest)
    try:
        write_arm64_image(Path(src), out)
    except OSError as err:
        raise GuestError(f"cannot read kernel {src}: {err}") from err
    except ConfigError as err:
        raise GuestError(str(err)) from err
    return out
