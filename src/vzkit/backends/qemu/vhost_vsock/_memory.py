"""Guest memory as the front-end shares it: mmap'd file descriptors with strict bounds checks.

``VHOST_USER_SET_MEM_TABLE`` passes one fd per region, each described by its guest physical
address, size, the front-end's (QEMU's) user address and the offset of the region within the
fd. Descriptor addresses are guest physical addresses; ring addresses are QEMU user addresses.
Every translation checks that the whole ``[addr, addr + length)`` range lies inside mapped
memory; nothing outside is ever read or written, whatever the guest puts in its descriptors.
A range may cross from one region into an adjacent one (the result is a list of views).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from ....errors import VMError

__all__ = ["MAX_REGIONS", "GuestMemory", "GuestMemoryError", "RegionSpec"]

log = logging.getLogger(__name__)

MAX_REGIONS = 8
_U64 = (1 << 64) - 1


class GuestMemoryError(VMError):
    """An address range is not (entirely) inside guest memory, or a region is unusable."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One region of a memory table, as sent by the front-end."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


class _Region:
    __slots__ = ("guest_addr", "guest_end", "mm", "size", "user_addr", "user_end", "view")

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        if spec.size <= 0:
            raise GuestMemoryError(f"region at guest address {spec.guest_addr:#x} is empty")
        for name in ("guest_addr", "user_addr", "mmap_offset"):
            value = getattr(spec, name)
            if not 0 <= value <= _U64 or value + spec.size > _U64 + 1:
                raise GuestMemoryError(f"region {name} {value:#x} + {spec.size:#x} overflows")
        info = os.fstat(fd)
        # Touching a page past the end of the file would raise SIGBUS: check the size first.
        if stat.S_ISREG(info.st_mode) and info.st_size < spec.mmap_offset + spec.size:
            raise GuestMemoryError(
                f"region fd is {info.st_size} bytes, too small for offset "
                f"{spec.mmap_offset:#x} + size {spec.size:#x}"
            )
        aligned = spec.mmap_offset - spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
        skip = spec.mmap_offset - aligned
        try:
            self.mm = mmap.mmap(fd, skip + spec.size, mmap.MAP_SHARED, offset=aligned)
        except (OSError, ValueError, OverflowError) as err:
            raise GuestMemoryError(f"cannot map region: {err}") from err
        self.view = memoryview(self.mm)[skip : skip + spec.size]
        self.guest_addr = spec.guest_addr
        self.guest_end = spec.guest_addr + spec.size
        self.user_addr = spec.user_addr
        self.user_end = spec.user_addr + spec.size
        self.size = spec.size

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # a view escaped somewhere; the mapping goes when it does
            log.debug("guest memory region still referenced at close; left to the GC")


class GuestMemory:
    """The regions of one memory table. ``close()`` unmaps them all."""

    def __init__(self, specs: Sequence[RegionSpec], fds: Sequence[int]) -> None:
        """Map ``fds[i]`` for ``specs[i]``. The fds are not closed (the caller owns them)."""
        if len(specs) != len(fds):
            raise GuestMemoryError(f"{len(specs)} regions but {len(fds)} file descriptors")
        if len(specs) > MAX_REGIONS:
            raise GuestMemoryError(f"{len(specs)} regions (at most {MAX_REGIONS})")
        ordered = sorted(specs, key=lambda s: s.guest_addr)
        for a, b in itertools.pairwise(ordered):
            if a.guest_addr + a.size > b.guest_addr:
                raise GuestMemoryError(
                    f"regions at guest addresses {a.guest_addr:#x} and {b.guest_addr:#x} overlap"
                )
        self._regions: list[_Region] = []
        try:
            for spec, fd in zip(specs, fds, strict=True):
                self._regions.append(_Region(spec, fd))
        except BaseException:
            self.close()
            raise
        self._regions.sort(key=lambda r: r.guest_addr)
        self._by_user = sorted(self._regions, key=lambda r: r.user_addr)
        self._last = self._regions[0] if self._regions else None

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    def close(self) -> None:
        regions, self._regions, self._by_user, self._last = self._regions, [], [], None
        for region in regions:
            with contextlib.suppress(Exception):
                region.close()

    def _find_guest(self, addr: int) -> _Region | None:
        last = self._last
        if last is not None and last.guest_addr <= addr < last.guest_end:
            return last
        for region in self._regions:
            if region.guest_addr <= addr < region.guest_end:
                self._last = region
                return region
        return None

    def guest_views(self, addr: int, length: int) -> list[memoryview]:
        """Views of guest physical ``[addr, addr + length)``, split at region boundaries."""
        if length < 0 or addr < 0 or addr + length > _U64 + 1:
            raise GuestMemoryError(f"bad guest range {addr:#x}+{length:#x}")
        if length == 0:
            return []
        views: list[memoryview] = []
        while length > 0:
            region = self._find_guest(addr)
            if region is None:
                raise GuestMemoryError(f"guest address {addr:#x} is outside guest memory")
            start = addr - region.guest_addr
            take = min(length, region.size - start)
            views.append(region.view[start : start + take])
            addr += take
            length -= take
        return views

    def guest_view(self, addr: int, length: int) -> memoryview:
        """One contiguous view of guest physical ``[addr, addr + length)`` (one region)."""
        region = self._find_guest(addr)
        if region is None or length < 0 or addr + length > region.guest_end:
            raise GuestMemoryError(
                f"guest range {addr:#x}+{length:#x} is not inside one memory region"
            )
        start = addr - region.guest_addr
        return region.view[start : start + length]

    def user_view(self, addr: int, length: int) -> memoryview:
        """One contiguous view of the front-end's user address range (for vring areas)."""
        if length < 0:
            raise GuestMemoryError(f"bad length {length}")
        for region in self._by_user:
            if region.user_addr <= addr and addr + length <= region.user_end:
                start = addr - region.user_addr
                return region.view[start : start + length]
        raise GuestMemoryError(f"user range {addr:#x}+{length:#x} is not inside one memory region")
