"""Build minimal Linux guests (kernel + initramfs) from Debian packages, in pure Python.

:func:`build_guest` turns a Debian cloud kernel package and ``busybox-static`` into a
bootable kernel and a reproducible gzip'd cpio initramfs whose ``/init`` loads the virtio,
vsock and virtiofs modules, prints ``VZKIT-GUEST-READY`` on the serial console and then runs a
shell there. The building blocks are public too: ``.deb`` reading (:class:`DebPackage`),
cpio newc writing and reading (:class:`CpioWriter`, :func:`read_cpio`), kernel module
metadata and load order (:func:`read_modinfo`, :func:`resolve_modules`) and package download
(:func:`apt_download`, :func:`fetch_guest_debs`, :func:`find_guest_debs`), and the agent build
(:func:`build_agent`, from the C sources that :mod:`vzkit.agent` ships).

Layering: this package may import the core and :mod:`vzkit.agent` (to build and package the
agent), never a backend; :mod:`vzkit.agent` never imports it.
"""

from __future__ import annotations

from ._agent_build import AGENT_TARGETS, build_agent
from ._cpio import CpioEntry, CpioWriter, read_cpio
from ._deb import DebEntry, DebPackage, compare_versions, parse_control, parse_depends
from ._debian_image import (
    DebianImage,
    find_debian_image,
    list_debian_images,
    prune_debian_images,
    remove_debian_image,
)
from ._fetch import (
    DEB_ARCHES,
    GuestDebs,
    apt_download,
    deb_arch,
    fetch_guest_debs,
    find_guest_debs,
    kernel_metapackage,
)
from ._image import (
    default_guest_config,
    default_image,
    image_trust,
    list_images,
    remove_images,
)
from ._initramfs import (
    CONSOLES,
    GUEST_MODULES,
    GuestImage,
    build_guest,
    init_script,
    stage2_script,
    uncompress_arm64_kernel,
)
from ._modules import (
    ModInfo,
    ModulePlan,
    decompress_module,
    elf_section,
    normalize_module_name,
    parse_modules_builtin,
    read_modinfo,
    resolve_modules,
)
from ._rootdisk import BaseImage, FileMeta, build_root_disk, disk_size_for, rootfs_base

__all__ = [
    "AGENT_TARGETS",
    "CONSOLES",
    "DEB_ARCHES",
    "GUEST_MODULES",
    "BaseImage",
    "CpioEntry",
    "CpioWriter",
    "DebEntry",
    "DebPackage",
    "DebianImage",
    "FileMeta",
    "GuestDebs",
    "GuestImage",
    "ModInfo",
    "ModulePlan",
    "apt_download",
    "build_agent",
    "build_guest",
    "build_root_disk",
    "compare_versions",
    "deb_arch",
    "decompress_module",
    "default_guest_config",
    "default_image",
    "disk_size_for",
    "elf_section",
    "fetch_guest_debs",
    "find_debian_image",
    "find_guest_debs",
    "image_trust",
    "init_script",
    "kernel_metapackage",
    "list_debian_images",
    "list_images",
    "normalize_module_name",
    "parse_control",
    "parse_depends",
    "parse_modules_builtin",
    "prune_debian_images",
    "read_cpio",
    "read_modinfo",
    "remove_debian_image",
    "remove_images",
    "resolve_modules",
    "rootfs_base",
    "stage2_script",
    "uncompress_arm64_kernel",
]
