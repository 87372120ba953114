"""Linux kernel modules: read ``.modinfo`` from ``.ko`` files and plan a load order.

A loadable module is an ELF relocatable object; its ``.modinfo`` section is a run of
NUL-terminated ``key=value`` strings (``name=``, ``depends=a,b``, ``alias=``, ``softdep=``...).
The section is found by walking the section header table with :mod:`struct` (ELF32/ELF64,
either byte order). Compressed modules (``.ko.xz``, ``.ko.gz``) are decompressed first;
``.ko.zst`` raises GuestError, the standard library having no zstd before Python 3.14.

Module names follow the kernel's rule that ``-`` and ``_`` are the same character: the
canonical form uses ``_`` (``virtio-rng.ko`` is module ``virtio_rng``).
"""

from __future__ import annotations

import gzip
import lzma
import posixpath
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vzkit.errors import GuestError

__all__ = [
    "MODULE_SUFFIXES",
    "ModInfo",
    "ModulePlan",
    "decompress_module",
    "elf_section",
    "normalize_module_name",
    "parse_modules_builtin",
    "read_modinfo",
    "resolve_modules",
]

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")

_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZ_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SHN_XINDEX = 0xFFFF
_SHT_NOBITS = 8


def normalize_module_name(name: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    base = posixpath.basename(name.strip())
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(data: bytes, filename: str = "") -> bytes:
    """The raw ELF of a module file, decompressing xz or gzip; GuestError for zstd."""
    label = filename or "module"
    try:
        if data.startswith(_XZ_MAGIC):
            return lzma.decompress(data)
        if data.startswith(_GZ_MAGIC):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as err:
        raise GuestError(f"{label}: corrupt compressed module: {err}") from err
    if data.startswith(_ZSTD_MAGIC):
        raise GuestError(
            f"{label}: zstd-compressed modules are not supported (no zstd in the standard "
            "library); use a kernel package with uncompressed or xz-compressed modules"
        )
    return data


def elf_section(data: bytes, name: str, *, label: str = "ELF file") -> bytes | None:
    """The content of section ``name`` of an ELF file, or None if it has no such section."""
    if len(data) < 16 or data[:4] != b"\x7fELF":
        raise GuestError(f"{label}: not an ELF file")
    klass, encoding = data[4], data[5]
    if klass not in (1, 2) or encoding not in (1, 2):
        raise GuestError(f"{label}: unsupported ELF class {klass} / data encoding {encoding}")
    order = "<" if encoding == 1 else ">"
    if klass == 2:
        ehdr, shdr = struct.Struct(order + "HHIQQQIHHHHHH"), struct.Struct(order + "IIQQQQIIQQ")
    else:
        ehdr, shdr = struct.Struct(order + "HHIIIIIHHHHHH"), struct.Struct(order + "IIIIIIIIII")
    if len(data) < 16 + ehdr.size:
        raise GuestError(f"{label}: truncated ELF header")
    fields = ehdr.unpack_from(data, 16)
    shoff, shentsize, shnum, shstrndx = fields[5], fields[10], fields[11], fields[12]
    if shoff == 0:
        return None
    if shentsize < shdr.size:
        raise GuestError(f"{label}: bad ELF section header size {shentsize}")

    def header(index: int) -> tuple[int, ...]:
        start = shoff + index * shentsize
        if start + shdr.size > len(data):
            raise GuestError(f"{label}: ELF section header {index} lies beyond the file end")
        return tuple(shdr.unpack_from(data, start))

    first = header(0)
    if shnum == 0:  # extended numbering: the real count is in section 0's sh_size
        shnum = first[5]
    if shstrndx == _SHN_XINDEX:
        shstrndx = first[6]
    if shnum * shentsize > len(data) or shstrndx >= shnum:
        raise GuestError(f"{label}: inconsistent ELF section header table")
    sections = [header(i) for i in range(shnum)]

    def contents(sec: tuple[int, ...]) -> bytes:
        offset, size = sec[4], sec[5]
        if sec[1] == _SHT_NOBITS:
            return b""
        if offset + size > len(data):
            raise GuestError(f"{label}: ELF section extends beyond the file end")
        return data[offset : offset + size]

    strtab = contents(sections[shstrndx])
    wanted = name.encode()
    for sec in sections:
        start = sec[0]
        if start >= len(strtab):
            continue
        end = strtab.find(b"\0", start)
        if strtab[start : end if end >= 0 else len(strtab)] == wanted:
            return contents(sec)
    return None


@dataclass(frozen=True)
class ModInfo:
    """The ``.modinfo`` of one module. ``fields`` keeps every value of repeated keys."""

    name: str
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, key: str) -> tuple[str, ...]:
        return tuple(self.fields.get(key, ()))

    @property
    def depends(self) -> tuple[str, ...]:
        """Hard dependencies (module names, normalised), in the order the module lists them."""
        deps = ",".join(self.get("depends"))
        return tuple(normalize_module_name(d) for d in deps.split(",") if d.strip())

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.get("alias")

    @property
    def softdeps_pre(self) -> tuple[str, ...]:
        """Modules named after ``pre:`` in ``softdep=`` (loaded before this one by modprobe)."""
        found: list[str] = []
        for value in self.get("softdep"):
            section = ""
            for word in value.split():
                if word.endswith(":"):
                    section = word[:-1]
                elif section == "pre":
                    found.append(normalize_module_name(word))
        return tuple(found)


def read_modinfo(data: bytes, filename: str = "") -> ModInfo:
    """Parse the ``.modinfo`` section of a (possibly compressed) module file.

    The module name comes from ``name=``, or from ``filename`` for old modules without it.
    """
    label = filename or "module"
    section = elf_section(decompress_module(data, filename), ".modinfo", label=label)
    if section is None:
        raise GuestError(f"{label}: no .modinfo section (not a kernel module?)")
    fields: dict[str, tuple[str, ...]] = {}
    for raw in section.split(b"\0"):
        key, sep, value = raw.decode("utf-8", "replace").partition("=")
        if sep and key:
            fields[key] = (*fields.get(key, ()), value)
    names = fields.get("name", ())
    name = normalize_module_name(names[0]) if names else normalize_module_name(filename)
    if not name:
        raise GuestError(f"{label}: module has no name= field and no file name to use")
    return ModInfo(name, fields)


def parse_modules_builtin(text: str) -> set[str]:
    """Module names listed in a kernel's ``modules.builtin`` (one ``kernel/...ko`` a line)."""
    return {normalize_module_name(line) for line in text.splitlines() if line.strip()}


@dataclass(frozen=True)
class ModulePlan:
    """What to load: ``order`` lists module names with every dependency before its users.

    ``builtin`` holds wanted modules (requested or depended on) that are built into the
    kernel; ``missing`` holds optional requested modules this kernel does not have at all.
    """

    order: list[str]
    builtin: list[str]
    missing: list[str]


def resolve_modules(
    requested: Iterable[str],
    available: Mapping[str, Sequence[str]],
    *,
    builtin: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> ModulePlan:
    """Dependency closure and load order of ``requested`` modules.

    ``available`` maps each loadable module's name to its ``depends``. Names are normalised
    (``-`` == ``_``). Modules are visited depth-first in request order, dependencies in the
    order listed, and emitted after their dependencies, so the result is deterministic.
    A requested module that is neither available nor builtin raises GuestError, unless it
    is in ``optional``; a missing dependency always raises; a dependency cycle raises
    GuestError naming the cycle.
    """
    deps = {normalize_module_name(k): [normalize_module_name(d) for d in v]
            for k, v in available.items()}  # fmt: skip
    built = {normalize_module_name(b) for b in builtin}
    maybe = {normalize_module_name(o) for o in optional}
    order: list[str] = []
    builtins: list[str] = []
    missing: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: list[str]) -> None:
        if name in done:
            return
        if name in chain:
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise GuestError(f"kernel module dependency cycle: {cycle}")
        if name not in deps:
            done.add(name)
            if name in built:
                builtins.append(name)
            elif not chain and name in maybe:
                missing.append(name)
            elif chain:
                raise GuestError(f"kernel module {name!r} (needed by {chain[-1]!r}) not found")
            else:
                raise GuestError(f"kernel module {name!r} not found")
            return
        for dep in deps[name]:
            visit(dep, [*chain, name])
        done.add(name)
        order.append(name)

    for name in requested:
        visit(normalize_module_name(name), [])
    return ModulePlan(order, builtins, missing)
