"""Unit tests for vzkit.image._modules on synthetic ELF objects with a .modinfo section."""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vzkit.errors import GuestError
from vzkit.image import (
    elf_section,
    normalize_module_name,
    parse_modules_builtin,
    read_modinfo,
    resolve_modules,
)


def make_elf(sections: Mapping[str, bytes], *, bits: int = 64, little: bool = True) -> bytes:
    """A relocatable ELF object holding ``sections`` (PROGBITS) plus ``.shstrtab``."""
    order = "<" if little else ">"
    ehdr = struct.Struct(order + ("HHIQQQIHHHHHH" if bits == 64 else "HHIIIIIHHHHHH"))
    shdr = struct.Struct(order + ("IIQQQQIIQQ" if bits == 64 else "IIIIIIIIII"))
    names = [*sections, ".shstrtab"]
    strtab, name_offsets = b"\0", []
    for name in names:
        name_offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    blobs = [*sections.values(), strtab]
    body, offsets, pos = b"", [], 16 + ehdr.size
    for blob in blobs:
        offsets.append(pos)
        body += blob
        pos += len(blob)
    body += b"\0" * (-pos % 8)
    shoff = pos + (-pos % 8)
    headers = shdr.pack(*[0] * 10)
    for i, blob in enumerate(blobs):
        kind = 3 if i == len(blobs) - 1 else 1  # SHT_STRTAB / SHT_PROGBITS
        headers += shdr.pack(name_offsets[i], kind, 0, 0, offsets[i], len(blob), 0, 0, 1, 0)
    ident = b"\x7fELF" + bytes([bits // 32, 1 if little else 2, 1]) + b"\0" * 9
    header = ehdr.pack(1, 62, 1, 0, 0, shoff, 0, 16 + ehdr.size, 0, 0, shdr.size,
                       len(blobs) + 1, len(blobs))  # fmt: skip
    return ident + header + body + headers


def make_module(name: str | None, depends: str = "", **extra: str | list[str]) -> bytes:
    fields = [f"name={name}"] if name is not None else []
    fields += [f"depends={depends}", "license=GPL"]
    for key, value in extra.items():
        fields += [f"{key}={v}" for v in (value if isinstance(value, list) else [value])]
    modinfo = b"\0".join(f.encode() for f in fields) + b"\0\0\0"
    return make_elf({".text": b"\x90" * 7, ".modinfo": modinfo, ".data": b"x"})


def test_read_modinfo_fields() -> None:
    info = read_modinfo(
        make_module(
            "virtio_net",
            "virtio_ring,virtio,net-failover",
            alias=["virtio:d00000001v*", "virtio:d00000002v*"],
            softdep="pre: crc32c post: other",
        )
    )
    assert info.name == "virtio_net"
    assert info.depends == ("virtio_ring", "virtio", "net_failover")
    assert info.aliases == ("virtio:d00000001v*", "virtio:d00000002v*")
    assert info.softdeps_pre == ("crc32c",)
    assert info.get("license") == ("GPL",)
    assert info.get("absent") == ()


def test_empty_depends_and_name_from_file_name() -> None:
    info = read_modinfo(make_module(None), "kernel/drivers/char/hw_random/virtio-rng.ko")
    assert info.name == "virtio_rng"
    assert info.depends == ()
    with pytest.raises(GuestError, match="no name= field"):
        read_modinfo(make_module(None))


@pytest.mark.parametrize(("bits", "little"), [(64, True), (32, True), (64, False), (32, False)])
def test_elf_classes_and_byte_orders(bits: int, little: bool) -> None:
    elf = make_elf({".modinfo": b"name=m\0depends=a-b\0"}, bits=bits, little=little)
    assert elf_section(elf, ".modinfo") == b"name=m\0depends=a-b\0"
    assert elf_section(elf, ".missing") is None
    assert read_modinfo(elf).depends == ("a_b",)


def test_compressed_modules() -> None:
    raw = make_module("fuse")
    assert read_modinfo(lzma.compress(raw), "fuse.ko.xz").name == "fuse"
    assert read_modinfo(gzip.compress(raw), "fuse.ko.gz").name == "fuse"
    with pytest.raises(GuestError, match="zstd"):
        read_modinfo(b"\x28\xb5\x2f\xfd" + raw, "fuse.ko.zst")
    with pytest.raises(GuestError, match="corrupt compressed module"):
        read_modinfo(b"\xfd7zXZ\x00 broken", "fuse.ko.xz")


def test_malformed_elf_raises() -> None:
    good = make_module("m")
    with pytest.raises(GuestError, match="not an ELF file"):
        read_modinfo(b"garbage")
    with pytest.raises(GuestError, match="unsupported ELF class"):
        read_modinfo(good[:4] + b"\x03" + good[5:])
    with pytest.raises(GuestError, match="truncated ELF header"):
        read_modinfo(good[:30])
    with pytest.raises(GuestError, match=r"beyond the file end|inconsistent"):
        read_modinfo(good[: len(good) - 20])
    with pytest.raises(GuestError, match=r"no \.modinfo section"):
        read_modinfo(make_elf({".text": b"\x90"}))
    # .modinfo whose offset points past the end of the file
    shoff = struct.unpack_from("<Q", good, 0x28)[0]
    broken = bytearray(good)
    struct.pack_into("<Q", broken, shoff + 2 * 64 + 24, 1 << 20)
    with pytest.raises(GuestError, match="extends beyond the file end"):
        read_modinfo(bytes(broken))
    no_sections = bytearray(good)
    struct.pack_into("<Q", no_sections, 0x28, 0)
    with pytest.raises(GuestError, match=r"no \.modinfo section"):
        read_modinfo(bytes(no_sections))


def test_extended_section_numbering() -> None:
    elf = bytearray(make_elf({".modinfo": b"name=ext\0"}))
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    count, strndx = struct.unpack_from("<HH", elf, 0x3C)
    struct.pack_into("<HH", elf, 0x3C, 0, 0xFFFF)  # e_shnum = 0, e_shstrndx = SHN_XINDEX
    struct.pack_into("<Q", elf, shoff + 32, count)  # section 0 sh_size = real count
    struct.pack_into("<I", elf, shoff + 40, strndx)  # section 0 sh_link = real strndx
    assert read_modinfo(bytes(elf)).name == "ext"


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("virtio-rng", "virtio_rng"),
        ("kernel/fs/fuse/fuse.ko", "fuse"),
        ("vmw_vsock_virtio_transport.ko.xz", "vmw_vsock_virtio_transport"),
        ("a-b_c.ko.zst", "a_b_c"),
        ("  9pnet_virtio.ko.gz ", "9pnet_virtio"),
    ],
)
def test_normalize_module_name(raw: str, name: str) -> None:
    assert normalize_module_name(raw) == name


def test_parse_modules_builtin() -> None:
    text = "kernel/fs/ext4/ext4.ko\n\nkernel/net/packet/af_packet.ko\nkernel/lib/crc-t10dif.ko\n"
    assert parse_modules_builtin(text) == {"ext4", "af_packet", "crc_t10dif"}


AVAILABLE = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci": ["virtio_ring", "virtio-pci-modern-dev", "virtio"],
    "virtio_pci_modern_dev": [],
    "failover": [],
    "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "fuse": [],
    "virtiofs": ["fuse", "virtio", "virtio_ring", "crc32c"],
}


def test_closure_and_load_order() -> None:
    plan = resolve_modules(
        ["virtio-pci", "virtio_net", "virtiofs", "ext4"],
        AVAILABLE,
        builtin=["crc32c", "kernel/fs/ext4/ext4.ko"],
    )
    assert plan.order == [
        "virtio_ring", "virtio_pci_modern_dev", "virtio", "virtio_pci",
        "failover", "net_failover", "virtio_net", "fuse", "virtiofs",
    ]  # fmt: skip
    assert plan.builtin == ["crc32c", "ext4"]
    assert plan.missing == []


def test_order_follows_request_order_and_is_deterministic() -> None:
    a = resolve_modules(["fuse", "virtio_net"], AVAILABLE)
    b = resolve_modules(["fuse", "virtio_net"], AVAILABLE)
    assert a == b
    assert a.order[0] == "fuse"
    assert resolve_modules(["virtio_net", "fuse"], AVAILABLE).order[-1] == "fuse"


def test_missing_modules() -> None:
    with pytest.raises(GuestError, match="'9p' not found"):
        resolve_modules(["virtio", "9p"], AVAILABLE)
    plan = resolve_modules(
        ["virtio", "9p", "9pnet-virtio"], AVAILABLE, optional=["9p", "9pnet_virtio"]
    )
    assert plan.missing == ["9p", "9pnet_virtio"]
    assert plan.order == ["virtio_ring", "virtio"]
    with pytest.raises(GuestError, match=r"'crc32c' \(needed by 'virtiofs'\) not found"):
        resolve_modules(["virtiofs"], AVAILABLE, optional=["crc32c"])


def test_cycles_raise_naming_the_cycle() -> None:
    with pytest.raises(GuestError, match="cycle: a -> b -> c -> a"):
        resolve_modules(["top"], {"top": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]})
    with pytest.raises(GuestError, match="cycle: self -> self"):
        resolve_modules(["self"], {"self": ["self"]})


@st.composite
def dags(draw: st.DrawFn) -> dict[str, list[str]]:
    count = draw(st.integers(1, 12))
    names = [f"m{i}" for i in range(count)]
    return {
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        for i, name in enumerate(names)
    }


@given(dags(), st.data())
def test_order_respects_dependencies(graph: dict[str, list[str]], data: st.DataObject) -> None:
    requested = data.draw(st.lists(st.sampled_from(sorted(graph)), min_size=1, unique=True))
    order = resolve_modules(requested, graph).order
    assert len(order) == len(set(order))
    position = {name: i for i, name in enumerate(order)}
    for name in order:
        for dep in graph[name]:
            assert position[dep] < position[name]
    closure, todo = set(), list(requested)
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(graph[name])
    assert set(order) == closure
