"""Disk images: sparse raw files (always) and qcow2 (through ``qemu-img`` when installed).

The format of a disk is what its config says (``disk_format``, default raw), never guessed
from its first bytes: a guest writes those bytes, and a qcow2 header it wrote into its own
raw disk could name any host file as a backing or data file (the CVE-2008-2004 class). A
qcow2 image opened on the caller's word is read here first (:func:`standalone_qcow2_size`)
and refused if its header names another file; backends open it with no backing file.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendUnavailableError, ConfigError, VzkitError

__all__ = [
    "DiskFormat",
    "DiskImage",
    "RootDisk",
    "RootInit",
    "create_disk_image",
    "kept_layer_exists",
    "root_cmdline",
    "standalone_qcow2_size",
    "wrong_layer",
]

_GIB = 1 << 30
_MIB = 1 << 20
#: Disk images hold guest data: only their owner reads them.
_IMAGE_MODE = 0o600


class DiskFormat(enum.StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True, slots=True)
class DiskImage:
    """An image file and the format it is opened in (given, never probed)."""

    path: Path
    format: DiskFormat


class RootInit(enum.StrEnum):
    """What runs in a root disk's userland: vzkit's small init with the agent (``agent``, the
    default, as ``docker run`` runs no init), or the image's own ``/sbin/init`` (``image``,
    e.g. systemd) with the agent started beside it."""

    AGENT = "agent"
    IMAGE = "image"


#: ``root=`` as vzkit's initramfs reads it: a device node, or a file system's LABEL or UUID.
_ROOT_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9][A-Za-z0-9/_.-]{0,62}|LABEL=[A-Za-z0-9_.-]{1,64}"
                             r"|UUID=[0-9A-Fa-f-]{1,64}")  # fmt: skip
_FSTYPE_RE = re.compile(r"[a-z0-9]{1,16}")
#: A base's digest as the root-disk cache records it (``disk.json``): ``sha256:`` + 64 hex.
BASE_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RootDisk:
    """The guest's root file system on a block device: ``base`` is an image that is never
    written (each VM writes into its own copy-on-write layer), in ``format`` (stated, never
    probed). It is the VM's first disk
    (``/dev/vda``); ``device`` is what the guest mounts: ``/dev/vda``, a partition
    ``/dev/vdaN``, ``LABEL=..`` or ``UUID=..``. Needs vzkit's kernel and initramfs (direct
    boot), which mount it, inject the agent and ``switch_root`` (see ``docs/images.md``).

    ``digest`` names the base's content when it is known (``sha256:`` + hex: the root-disk
    cache's digest of what the image was built from, ``BaseImage.digest``): a snapshot records
    it, and a restore onto a base with another digest is refused. Empty: a snapshot hashes the
    base's content itself (the time of its data, at save and at restore).

    ``layer`` is where the VM's writes go. ``None`` (the default): a layer of the run in the
    machine's state dir, made at its first start and deleted at close. A path: a layer that
    is kept: made at the first start if the file is missing, reused by every later start (in
    this process or another) and never deleted by vzkit, so the VM keeps what it wrote across
    stop, start and processes. Its format is the backend's (a standalone qcow2 on qemu, a
    raw copy of the base on vz); a restore of a snapshot replaces its content with the
    snapshot's (see ``docs/images.md``)."""

    base: Path
    format: DiskFormat = DiskFormat.RAW
    device: str = "/dev/vda"
    fstype: str = "ext4"
    init: RootInit = RootInit.AGENT
    digest: str = ""
    layer: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, str | os.PathLike) or "\x00" in os.fspath(self.base):
            raise ConfigError(f"root disk base must be a path, got {self.base!r}")
        object.__setattr__(self, "base", Path(self.base).expanduser().absolute())
        if self.layer is not None:
            object.__setattr__(self, "layer", _layer_path(self.layer, self.base))
        try:
            object.__setattr__(self, "format", DiskFormat(self.format))
            object.__setattr__(self, "init", RootInit(self.init))
        except ValueError as err:
            raise ConfigError(f"root disk: {err}") from None
        if not isinstance(self.digest, str) or (
            self.digest and not BASE_DIGEST_RE.fullmatch(self.digest)
        ):
            raise ConfigError(
                f"root disk digest must be 'sha256:' and 64 lower-case hex digits, got "
                f"{self.digest!r}"
            )
        self.cmdline_words()  # checks device and fstype

    def cmdline_words(self) -> str:
        """The kernel command-line words that tell vzkit's initramfs to boot this root."""
        return root_cmdline(self.device, self.fstype, self.init)

    def to_dict(self) -> dict[str, str]:
        return {
            "base": str(self.base),
            "format": self.format.value,
            "device": self.device,
            "fstype": self.fstype,
            "init": self.init.value,
            **({"digest": self.digest} if self.digest else {}),
            **({"layer": str(self.layer)} if self.layer is not None else {}),
        }


def _layer_path(layer: object, base: Path) -> Path:
    """``layer`` as an absolute path (``~`` expanded); a :class:`ConfigError` for a value
    that is not a path, names a directory, or is the base (which is never written)."""
    text = os.fspath(layer) if isinstance(layer, str | os.PathLike) else None
    if not isinstance(text, str) or "\x00" in text:
        raise ConfigError(f"root disk layer must be a path or None, got {layer!r}")
    path = Path(text).expanduser().absolute()
    if os.path.basename(text) in ("", ".", "..") or not path.name:
        raise ConfigError(f"root disk layer {text!r} must name a file, not a directory")
    if os.path.normpath(path) == os.path.normpath(base):
        raise ConfigError(
            f"root disk layer {text!r} is the base itself, which is never written: name "
            "another file for the VM's writes (a new file: vzkit makes it at the first start)"
        )
    return path


def kept_layer_exists(root: RootDisk) -> bool:
    """Whether ``root``'s kept layer (``root.layer``) is there to be reused (its mode made
    0600 if it was wider); ``False``: the start makes it. A :class:`ConfigError` saying what to
    do when it is a directory or another non-regular file, is the base under another name, or
    its directory is missing. Its format and size are the backend's to check."""
    layer = root.layer
    if layer is None:
        raise ValueError("the root disk keeps no layer")
    try:
        st = os.stat(layer)
    except FileNotFoundError:
        if not layer.parent.is_dir():
            raise ConfigError(
                f"the directory of the root disk's layer {str(layer)!r} does not exist: create "
                "it (vzkit makes the layer at the first start, not its directory)"
            ) from None
        return False
    except OSError as err:
        raise ConfigError(
            f"cannot read the root disk's layer {str(layer)!r}: {err.strerror}"
        ) from err
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"the root disk's layer {str(layer)!r} is not a regular file: point layer at a "
            "file (a new one is made at the first start)"
        )
    with contextlib.suppress(OSError):
        if os.path.samefile(layer, root.base):
            raise ConfigError(
                f"the root disk's layer {str(layer)!r} is the base {str(root.base)!r} under "
                "another name, and the base is never written: name another file for the layer"
            )
    if st.st_mode & 0o077:
        os.chmod(layer, _IMAGE_MODE)  # the guest's data: its owner's only
    return True


def wrong_layer(layer: Path, what: str) -> ConfigError:
    """The error for a kept layer that is not this base's layer on this backend: ``what``
    says how it differs."""
    return ConfigError(
        f"the root disk's layer {str(layer)!r} {what}, so it is not the layer this VM wrote "
        "over its base on this backend; point layer at another file (a new one starts from "
        "the base), or move this one away if its writes are not wanted"
    )


def root_cmdline(device: str, fstype: str = "", init: RootInit | str = RootInit.AGENT) -> str:
    """``root=DEVICE [rootfstype=FSTYPE] [vzkit.init=image]`` for vzkit's initramfs (no
    ``fstype``: the guest tries the file systems its kernel has). :class:`ConfigError` for a
    device that is not ``/dev/NAME``, ``LABEL=NAME`` or ``UUID=HEX``."""
    if not isinstance(device, str) or not _ROOT_DEVICE_RE.fullmatch(device):
        raise ConfigError(f"root device {device!r} is not /dev/NAME, LABEL=NAME or UUID=HEX")
    if not isinstance(fstype, str) or (fstype and not _FSTYPE_RE.fullmatch(fstype)):
        raise ConfigError(f"root file system type {fstype!r} is not a type name")
    try:
        mode = RootInit(init)
    except ValueError:
        raise ConfigError(f"init must be 'agent' or 'image', got {init!r}") from None
    words = f"root={device}" + (f" rootfstype={fstype}" if fstype else "")
    return words if mode is RootInit.AGENT else f"{words} vzkit.init={mode.value}"


def create_disk_image(
    path: str | os.PathLike[str],
    size_gb: int | None = None,
    *,
    format: DiskFormat | str = DiskFormat.RAW,
    size_bytes: int | None = None,
) -> Path:
    """Create a disk image of exactly ``size_gb`` GiB (or ``size_bytes``, a multiple of 1 MiB)
    at ``path`` and return its path.

    Raw images are sparse (no blocks allocated). An existing file is left untouched, as the
    seed does, whatever its size. ``qcow2`` needs ``qemu-img``. A new image is readable and
    writable by its owner only (0600), whatever the umask.
    """
    if size_bytes is not None and size_gb is None:
        if (
            not isinstance(size_bytes, int)
            or isinstance(size_bytes, bool)
            or size_bytes <= 0
            or size_bytes % _MIB
        ):
            raise ConfigError(
                f"size_bytes must be a positive multiple of 1 MiB, got {size_bytes!r}"
            )
        nbytes = size_bytes
    elif not isinstance(size_gb, int) or isinstance(size_gb, bool) or size_gb <= 0:
        raise ConfigError(f"size_gb must be a positive integer, got {size_gb!r}")
    elif size_bytes is not None:
        raise ConfigError("give size_gb or size_bytes, not both")
    else:
        nbytes = size_gb * _GIB
    try:
        fmt = DiskFormat(format)
    except ValueError:
        raise ConfigError(
            f"unknown disk format {format!r}; expected one of: "
            + ", ".join(f.value for f in DiskFormat)
        ) from None
    target = Path(path).expanduser().absolute()
    if target.exists():
        if target.is_dir():
            raise ConfigError(f"cannot create disk image: {str(target)!r} is a directory")
        return target
    if not target.parent.is_dir():
        raise ConfigError(
            f"cannot create disk image: directory {str(target.parent)!r} does not exist"
        )
    qemu_img = _qemu_img() if fmt is DiskFormat.QCOW2 else ""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _IMAGE_MODE)
    except FileExistsError:
        return target  # lost a race with another creator: leave theirs alone
    except OSError as err:
        raise VzkitError(f"cannot create disk image {str(target)!r}: {err.strerror}") from err
    try:
        os.fchmod(fd, _IMAGE_MODE)  # the umask can only take bits away: make it exact
        if fmt is DiskFormat.RAW:
            os.ftruncate(fd, nbytes)
    except OSError as err:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise VzkitError(f"cannot size disk image {str(target)!r}: {err.strerror}") from err
    os.close(fd)
    if fmt is DiskFormat.QCOW2:
        _create_qcow2(qemu_img, target, nbytes)
    return target


def _qemu_img() -> str:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BackendUnavailableError(
            "creating a qcow2 image needs qemu-img (Debian/Ubuntu: apt-get install qemu-utils; "
            "macOS: brew install qemu)"
        )
    return qemu_img


def _create_qcow2(qemu_img: str, target: Path, nbytes: int) -> None:
    """Format the empty 0600 file ``target`` as qcow2 (qemu-img writes into it in place, so
    its mode stays; it is set again after, in case a qemu-img replaced the file)."""
    argv = [qemu_img, "create", "-q", "-f", "qcow2", str(target), str(nbytes)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            raise VzkitError(f"qemu-img create failed for {str(target)!r}: {proc.stderr.strip()}")
        os.chmod(target, _IMAGE_MODE)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# -- qcow2 headers (docs/interop/qcow2.txt in QEMU's tree) -----------------------------------

_QCOW2_MAGIC = b"QFI\xfb"
#: magic, version, backing_file_offset, backing_file_size, cluster_bits, size (then more).
_QCOW2_HEAD = struct.Struct(">4sIQII Q")
_QCOW2_V3 = struct.Struct(">Q")  # incompatible_features at offset 72
_QCOW2_V3_HEADER_LENGTH = struct.Struct(">I")  # at offset 100
_QCOW2_EXT = struct.Struct(">II")  # type, length; data padded to 8 bytes
_EXT_END = 0
_EXT_DATA_FILE = 0x44415441  # "DATA": the external data file's name
_INCOMPAT_DATA_FILE = 1 << 2
_MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's limit


def standalone_qcow2_size(path: str | os.PathLike[str], *, fd: int | None = None) -> int:
    """The virtual size of the qcow2 image at ``path`` (or open as ``fd``, which is read with
    positioned reads' effect only and stays open), read from its header.

    :class:`~vzkit.errors.ConfigError` naming the file and how to flatten it when the header
    names a backing file or an external data file (vzkit never opens a file an image header
    names), or when the file is not a qcow2 image vzkit can read.
    """
    where = str(Path(path))
    try:
        with open(path if fd is None else fd, "rb", closefd=fd is None) as fh:
            fh.seek(0)
            head = fh.read(_QCOW2_HEAD.size)
            if len(head) < _QCOW2_HEAD.size or head[:4] != _QCOW2_MAGIC:
                raise ConfigError(
                    f"disk image {where!r} is not a qcow2 image (no qcow2 header); "
                    "if it is a raw image, set disk_format to 'raw'"
                )
            fields = _QCOW2_HEAD.unpack(head)
            version, backing_offset, backing_size, cluster_bits, size = fields[1:]
            if version not in (2, 3) or not 9 <= cluster_bits <= _MAX_CLUSTER_BITS:
                raise ConfigError(
                    f"disk image {where!r} has a qcow2 header vzkit cannot read (version "
                    f"{version}, cluster_bits {cluster_bits})"
                )
            fh.seek(0)
            cluster = fh.read(1 << cluster_bits)
    except OSError as err:
        raise ConfigError(f"cannot read disk image {where!r}: {err.strerror}") from err
    if backing_offset or backing_size:
        name = _header_text(cluster, backing_offset, min(backing_size, 1023))
        raise _names_a_file(where, f"the backing file {name!r}")
    if version == 3:
        if len(cluster) < 104:
            raise ConfigError(f"disk image {where!r} has a truncated qcow2 header")
        (incompatible,) = _QCOW2_V3.unpack_from(cluster, 72)
        (start,) = _QCOW2_V3_HEADER_LENGTH.unpack_from(cluster, 100)
        if start < 104:
            raise ConfigError(f"disk image {where!r} has a malformed qcow2 header")
    else:
        incompatible, start = 0, 72
    data_file = _extension(cluster, start, where, _EXT_DATA_FILE)
    if data_file is not None or incompatible & _INCOMPAT_DATA_FILE:
        named = "" if data_file is None else f" {data_file.decode(errors='replace')!r}"
        raise _names_a_file(where, f"an external data file{named}")
    return int(size)


def _header_text(cluster: bytes, offset: int, length: int) -> str:
    return cluster[offset : offset + length].decode(errors="replace") or "(unreadable)"


def _extension(cluster: bytes, offset: int, where: str, wanted: int) -> bytes | None:
    """The data of header extension ``wanted`` (``None``: absent); a malformed extension
    area is a :class:`ConfigError`."""
    while offset + _QCOW2_EXT.size <= len(cluster):
        kind, length = _QCOW2_EXT.unpack_from(cluster, offset)
        if kind == _EXT_END:
            return None
        offset += _QCOW2_EXT.size
        if offset + length > len(cluster):
            break
        if kind == wanted:
            return cluster[offset : offset + length]
        offset += (length + 7) & ~7
    raise ConfigError(f"disk image {where!r} has malformed qcow2 header extensions")


def _names_a_file(where: str, what: str) -> ConfigError:
    flat = f"{where}.standalone.qcow2"
    return ConfigError(
        f"disk image {where!r} is a qcow2 image whose header names {what}; vzkit never "
        "opens files an image header names. Flatten it into a standalone image and use "
        f"that: qemu-img convert -O qcow2 {shlex.quote(where)} {shlex.quote(flat)}"
    )
