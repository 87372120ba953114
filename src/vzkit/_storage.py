"""Disks beside the main one: :class:`Disk`, an image file or a network block device (NBD)
on a virtio, NVMe or USB mass-storage bus, and the CLI's ``--add-disk`` spec.

Pure data, like the rest of the config: backends lower a disk to their own terms (a
``-blockdev`` and a ``-device`` on qemu, a storage attachment and a storage device
configuration on vz) and refuse what they cannot do.
"""

from __future__ import annotations

import enum
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ._disk import DiskFormat
from .errors import ConfigError, SpecError

__all__ = [
    "Disk",
    "DiskBus",
    "NbdEndpoint",
    "check_disk_files",
    "check_disks",
    "check_nbd_url",
    "disk_from_dict",
    "nbd_endpoint",
    "parse_disk_spec",
]

#: The NBD URI schemes vzkit takes (the NBD project's URI format, which Apple's attachment
#: and QEMU's ``nbd`` driver both read): TCP and a Unix socket, without TLS.
NBD_SCHEMES = ("nbd", "nbd+unix")
NBD_DEFAULT_PORT = 10809
_NBD_FORMS = "'nbd://HOST[:PORT][/EXPORT]' or 'nbd+unix:///[EXPORT]?socket=/PATH'"
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?|\[[0-9A-Fa-f:.]{2,45}\]")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_MAX_URL = 1024


class DiskBus(enum.StrEnum):
    """How a disk reaches the guest."""

    VIRTIO = "virtio"  # virtio-blk: /dev/vdX in a Linux guest
    NVME = "nvme"  # an NVMe controller: /dev/nvmeXn1 (vz: macOS 14+)
    USB = "usb"  # USB mass storage: /dev/sdX (vz: macOS 13+)


class NbdEndpoint(NamedTuple):
    """An NBD URL taken apart: a TCP ``host``/``port`` or a Unix ``socket``, and the export."""

    host: str
    port: int
    socket: str
    export: str


def _nbd_problem(url: str) -> str:
    return f"NBD URL {url!r} is not one of {_NBD_FORMS}"


def nbd_endpoint(url: str) -> NbdEndpoint:
    """``url`` taken apart, or :class:`ConfigError` saying what an NBD URL looks like."""
    if not isinstance(url, str) or not url or len(url) > _MAX_URL or _CONTROL.search(url):
        raise ConfigError(f"{_nbd_problem(str(url))} (no spaces or control characters)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"{_nbd_problem(url)}: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in NBD_SCHEMES:
        raise ConfigError(f"{_nbd_problem(url)}: the scheme must be 'nbd' or 'nbd+unix'")
    if parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{_nbd_problem(url)}: no user name, password or '#fragment'")
    export = urllib.parse.unquote(parts.path.removeprefix("/"))
    if "\x00" in export:
        raise ConfigError(f"{_nbd_problem(url)}: the export name contains a NUL byte")
    if scheme == "nbd":
        host = parts.netloc.rpartition(":")[0] if port is not None else parts.netloc
        if not _HOST_RE.fullmatch(host):
            raise ConfigError(f"{_nbd_problem(url)}: name the server's host")
        if parts.query:
            raise ConfigError(f"{_nbd_problem(url)}: 'nbd://' takes no '?query'")
        if port == 0:
            raise ConfigError(f"{_nbd_problem(url)}: the port must be from 1 to 65535")
        return NbdEndpoint(host.strip("[]"), port or NBD_DEFAULT_PORT, "", export)
    if parts.netloc:
        raise ConfigError(f"{_nbd_problem(url)}: 'nbd+unix:///' names no host")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    sockets = query.get("socket", [])
    if set(query) != {"socket"} or len(sockets) != 1 or not sockets[0].startswith("/"):
        raise ConfigError(
            f"{_nbd_problem(url)}: give the server's socket as '?socket=' and an absolute path"
        )
    return NbdEndpoint("", 0, sockets[0], export)


def check_nbd_url(url: str) -> str:
    """``url`` if it is an NBD URL vzkit takes, else :class:`ConfigError`."""
    nbd_endpoint(url)
    return url


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A disk beside the main one (``LinuxVMConfig.disks``): an image file (``path``, in
    ``format``, stated and never probed) or a network block device (``url``, an NBD URL; the
    vz backend needs macOS 14), exactly one of the two, on ``bus``. ``read_only`` attaches it
    read-only (an NBD export too: the vz backend forces it read-only)."""

    path: Path | None = None
    url: str = ""
    format: DiskFormat = DiskFormat.RAW
    bus: DiskBus = DiskBus.VIRTIO
    read_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ConfigError(f"disk url must be a string, got {self.url!r}")
        if (self.path is None) == (not self.url):
            raise ConfigError(
                "a disk is a file (path) or a network block device (url): give exactly one"
            )
        if self.path is not None:
            text = os.fspath(self.path) if isinstance(self.path, str | os.PathLike) else None
            if not isinstance(text, str) or not text or "\x00" in text:
                raise ConfigError(f"disk path must be a non-empty path, got {self.path!r}")
            object.__setattr__(self, "path", Path(text).expanduser().absolute())
        else:
            check_nbd_url(self.url)
        for name, kind in (("format", DiskFormat), ("bus", DiskBus)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ConfigError(
                    f"disk {self.source!r}: {name} must be one of "
                    f"{', '.join(repr(k.value) for k in kind)}, got {getattr(self, name)!r}"
                ) from None
        if self.url and self.format is not DiskFormat.RAW:
            raise ConfigError(
                f"disk {self.url!r}: a network block device is raw blocks; drop the format"
            )
        if not isinstance(self.read_only, bool):
            raise ConfigError(f"disk read_only must be true or false, got {self.read_only!r}")

    @property
    def source(self) -> str:
        """The file's path or the NBD URL."""
        return self.url or str(self.path)

    def __str__(self) -> str:
        """The ``--add-disk`` spec of this disk (what :func:`parse_disk_spec` reads)."""
        words = [self.source]
        if self.bus is not DiskBus.VIRTIO:
            words.append(f"bus={self.bus.value}")
        if self.format is not DiskFormat.RAW:
            words.append(f"format={self.format.value}")
        if self.read_only:
            words.append("ro")
        return ",".join(words)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path)} if self.path else {"url": self.url}
        if self.format is not DiskFormat.RAW:
            out["format"] = self.format.value
        out["bus"] = self.bus.value
        if self.read_only:
            out["read_only"] = True
        return out


def check_disks(disks: Iterable[object]) -> None:
    """:class:`ConfigError` unless each of a config's ``disks`` is a :class:`Disk`."""
    for disk in disks:
        if not isinstance(disk, Disk):
            raise ConfigError(f"disks must hold Disk objects (parse_disk_spec), got {disk!r}")


def check_disk_files(disks: Iterable[Disk]) -> None:
    """:class:`ConfigError` naming the first disk whose file is missing (a VM reads them at
    start: checked when a config is made and again at start)."""
    for index, disk in enumerate(disks):
        path = disk.path
        if path is not None and not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise ConfigError(f"disks[{index}]: {str(path)!r} {what}")


_DISK_KEYS = frozenset({"path", "url", "format", "bus", "read_only"})


def disk_from_dict(data: Mapping[str, Any]) -> Disk:
    """The inverse of :meth:`Disk.to_dict` (a config file's ``[[disks]]`` table)."""
    if not isinstance(data, Mapping) or set(data) - _DISK_KEYS:
        raise ConfigError(
            f"a disk must be a table with path or url, and format, bus, read_only; got {data!r}"
        )
    return Disk(**dict(data))


_SPEC_FORMS = "SOURCE[,bus=virtio|nvme|usb][,format=raw|qcow2][,ro]"


def parse_disk_spec(spec: str) -> Disk:
    """``PATH`` or an NBD URL, then options after commas: ``bus=virtio|nvme|usb``,
    ``format=raw|qcow2`` and ``ro``. Options are read from the end, so a path may hold commas
    as long as what follows its last comma is not an option."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a disk spec is {_SPEC_FORMS}, got {spec!r}")
    source, options = spec.strip(), dict[str, str]()
    while "," in source:
        head, _, word = source.rpartition(",")
        key, sep, value = word.partition("=")
        key = key.strip().lower()
        if (sep and key in ("bus", "format")) or (not sep and key in ("ro", "rw")):
            if key in options or (key in ("ro", "rw") and {"ro", "rw"} & set(options)):
                what = "ro or rw" if key in ("ro", "rw") else key
                raise SpecError(f"disk spec {spec!r} gives {what} twice: give it once")
            options[key] = value.strip().lower()
            source = head
        else:
            break
    fields: dict[str, Any] = {"read_only": "ro" in options}
    if "bus" in options:
        fields["bus"] = options["bus"]
    if "format" in options:
        fields["format"] = options["format"]
    if "://" in source:
        fields["url"] = source
    else:
        fields["path"] = source
    try:
        return Disk(**fields)
    except ConfigError as err:
        raise SpecError(f"disk spec {spec!r}: {err} (the form is {_SPEC_FORMS})") from None
