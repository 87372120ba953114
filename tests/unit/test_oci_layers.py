"""OCI layers applied onto a tree without root: whiteouts, opaque directories, replacement,
links, confinement, owners and xattrs, compression, diff ids, bounded memory, umoci's layers."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from vzkit.image._debian_unpack import FileMeta, TreeWriter
from vzkit.image._download import ChecksumError
from vzkit.image.oci import _layers
from vzkit.image.oci._errors import ImageFormatError
from vzkit.image.oci._layers import LayerInput, apply_layer, apply_layers, open_layer

from ..support.oci_layout import blob_path, layout_image, umoci_image
from .test_debian_unpack import M, write_members

CAP = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def tar_of(members: list[M]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        write_members(tar, members)
    return out.getvalue()


def diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(members: list[M], media: str | None = "application/vnd.oci.image.layer.v1.tar",
          name: str = "layer") -> LayerInput:  # fmt: skip
    data = tar_of(members)
    blob = gzip.compress(data) if media and media.endswith("gzip") else data
    return LayerInput(lambda: io.BytesIO(blob), media, diff_id(data), name)


def build(tmp_path: Path, *layers: LayerInput) -> tuple[Path, dict[str, FileMeta]]:
    root = tmp_path / "root"
    meta = apply_layers(root, layers)
    return root, dict(meta)


def guest_mode(root: Path, meta: dict[str, FileMeta], path: str) -> int:
    """The mode the disk gets: meta's, else the host file's."""
    return meta[path].mode if path in meta else (root / path.lstrip("/")).lstat().st_mode


def listing(root: Path) -> list[str]:
    return sorted("/" + str(p.relative_to(root)) for p in root.rglob("*"))


def test_whiteouts_hide_lower_entries_and_never_appear(tmp_path: Path) -> None:
    lower = layer([
        M("etc", "dir", mode=0o755), M("etc/gone", data=b"x"), M("etc/kept", data=b"k"),
        M("etc/dir", "dir"), M("etc/dir/deep", data=b"d"),
        M("dev", "dir"), M("dev/null", "chr", mode=0o666, dev=(1, 3)),
        M("opt", "dir"), M("opt/o", "dir"), M("opt/o/old", data=b"o"),
        M("opt/o/sub", "dir"), M("opt/o/sub/older", data=b"o"),
    ])  # fmt: skip
    upper = layer([
        M("etc/.wh.gone"), M("etc/.wh.dir"), M("dev/.wh.null"),
        M("opt/o/before", data=b"b"),  # listed before the opaque marker: stays
        M("opt/o/sub", "dir", mode=0o750), M("opt/o/sub/new", data=b"n"),
        M("opt/o/.wh..wh..opq"),
        M("opt/o/after", data=b"a"),
        M("etc/.wh..wh.plnk"), M(".wh.never-there"),
        M("etc/.wh."), M("etc/.wh.."), M("opt/o/sub/.wh..."),  # name nothing: no harm
    ])  # fmt: skip
    root, meta = build(tmp_path, lower, upper)
    assert listing(root) == [
        "/dev", "/etc", "/etc/kept", "/opt", "/opt/o", "/opt/o/after", "/opt/o/before",
        "/opt/o/sub", "/opt/o/sub/new",
    ]  # fmt: skip
    assert "/dev/null" not in meta
    assert stat.S_IMODE((root / "opt/o/sub").stat().st_mode) == 0o750  # the upper's mode
    # A whiteout only hides lower layers: the same layer's entry stays.
    root2, _ = build(tmp_path / "2", layer([M("a", data=b"1"), M(".wh.a")]))
    assert (root2 / "a").read_bytes() == b"1"


def test_a_link_replaced_by_a_file_no_longer_leads_anywhere(tmp_path: Path) -> None:
    lower = layer([M("real", "dir"), M("d", "sym", "real"), M("d/x", data=b"1")])
    upper = layer([M("d", data=b"now a file"), M("d/y", data=b"2")])
    with pytest.raises(ImageFormatError, match="/d is not a directory"):
        build(tmp_path, lower, upper)
    assert not (tmp_path / "root/real/y").exists()


def test_later_entries_replace_earlier_ones_of_any_kind(tmp_path: Path) -> None:
    lower = layer([
        M("f2d", data=b"file"), M("d2f", "dir"), M("d2f/inside", data=b"i"),
        M("s2d", "sym", "/elsewhere"), M("same", data=b"old", uid=5),
        M("dir", "dir", mode=0o700, uid=1),
    ])  # fmt: skip
    upper = layer([
        M("f2d", "dir"), M("f2d/x", data=b"x"), M("d2f", data=b"now a file"),
        M("s2d", "dir"), M("same", data=b"new"), M("dir", "dir", mode=0o755),
    ])  # fmt: skip
    root, meta = build(tmp_path, lower, upper)
    assert (root / "f2d/x").read_bytes() == b"x"
    assert (root / "d2f").read_bytes() == b"now a file"
    assert (root / "s2d").is_dir()
    assert not (root / "s2d").is_symlink()
    assert (root / "same").read_bytes() == b"new"
    assert "/same" not in meta
    assert "/dir" not in meta
    assert stat.S_IMODE((root / "dir").stat().st_mode) == 0o755


def test_hard_links_reach_lower_layers_and_keep_the_owner(tmp_path: Path) -> None:
    lower = layer([M("bin", "dir"), M("bin/tool", data=b"t", mode=0o4755, uid=7, gid=8)])
    upper = layer([M("usr", "dir"), M("usr/tool", "link", "bin/tool"),
                   M("usr/tool2", "link", "./usr/tool")])  # fmt: skip
    root, meta = build(tmp_path, lower, upper)
    assert os.path.samefile(root / "bin/tool", root / "usr/tool")
    assert os.path.samefile(root / "bin/tool", root / "usr/tool2")
    assert meta["/usr/tool"] == meta["/bin/tool"] == FileMeta(7, 8, stat.S_IFREG | 0o4755)
    with pytest.raises(ImageFormatError, match="not a file in the tree"):
        build(tmp_path / "bad", layer([M("x", "link", "missing")], name="sha256:abc"))


def test_names_and_symlinks_cannot_lead_out_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    lower = layer([
        M("etc", "dir"), M("up", "sym", "../../../../outside"), M("abs", "sym", str(outside)),
        M("etcabs", "sym", "/etc"),
    ])  # fmt: skip
    upper = layer([
        M("../../outside/dotdot", data=b"1"), M("/outside/absolute", data=b"2"),
        M("up/through-relative", data=b"3"), M("abs/through-absolute", data=b"4"),
        M("etcabs/passwd", data=b"root"), M("up/.wh.anything"),
    ])  # fmt: skip
    root, _ = build(tmp_path / "t", lower, upper)
    assert list(outside.iterdir()) == []
    assert (root / "outside/dotdot").read_bytes() == b"1"
    assert (root / "outside/absolute").read_bytes() == b"2"
    assert (root / "outside/through-relative").read_bytes() == b"3"  # .. stops at the root
    assert (root / str(outside).lstrip("/") / "through-absolute").read_bytes() == b"4"
    assert (root / "etc/passwd").read_bytes() == b"root"
    assert os.readlink(root / "up") == "../../../../outside"  # links stay as the layer has them


def test_owners_modes_devices_fifos_and_xattrs_go_to_meta(tmp_path: Path) -> None:
    lower = layer([
        M("dev", "dir"), M("dev/sda", "chr", mode=0o660, gid=6, dev=(8, 0)),
        M("run", "dir", mode=0o1777), M("run/fifo", "fifo", mode=0o620, uid=3),
        M("bin", "dir"), M("bin/ping", data=b"p", mode=0o755, xattrs={
            "security.capability": CAP, "trusted.overlay.origin": b"x", "user.note": b"n"}),
        M("home", "dir", uid=1000, gid=1000, mode=0o750, xattrs={"user.old": b"1"}),
        M("bin/su", data=b"s", mode=0o4755),
    ])  # fmt: skip
    upper = layer([
        M("bin/ping-hard", "link", "bin/ping"),
        M("home", "dir", uid=1000, gid=1000, mode=0o750),  # restated: its xattrs go
    ])  # fmt: skip
    root, meta = build(tmp_path, lower, upper)
    assert meta["/dev/sda"] == FileMeta(0, 6, stat.S_IFCHR | 0o660, os.makedev(8, 0))
    assert not (root / "dev/sda").exists()  # users cannot mknod: meta makes it
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert meta["/run/fifo"] == FileMeta(3, 0, stat.S_IFIFO | 0o620)
    assert guest_mode(root, meta, "/run") == stat.S_IFDIR | 0o1777
    assert meta["/home"] == FileMeta(1000, 1000, stat.S_IFDIR | 0o750)
    kept = (("security.capability", CAP), ("user.note", b"n"))  # an overlay's own: dropped
    assert meta["/bin/ping"] == FileMeta(0, 0, stat.S_IFREG | 0o755, xattrs=kept)
    assert meta["/bin/ping-hard"].xattrs == kept
    assert guest_mode(root, meta, "/bin/su") == stat.S_IFREG | 0o4755


@pytest.mark.parametrize(
    "media",
    [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        None,  # docker-archive's layers: sniffed
    ],
)
def test_compressions_and_the_diff_id(tmp_path: Path, media: str | None) -> None:
    data = tar_of([M("a", data=b"hello")])
    if media and "zstd" in media:
        zstandard: Any = importlib.import_module("zstandard")
        blob = zstandard.ZstdCompressor().compress(data)
    elif media is None or media.endswith("gzip"):
        blob = gzip.compress(data)
    else:
        blob = data
    good = LayerInput(lambda: io.BytesIO(blob), media, diff_id(data), "l")
    root, _ = build(tmp_path / "ok", good)
    assert (root / "a").read_bytes() == b"hello"
    bad = LayerInput(lambda: io.BytesIO(blob), media, diff_id(b"other"), "sha256:feed")
    with pytest.raises(ChecksumError, match="sha256:feed: its uncompressed content"):
        build(tmp_path / "bad", bad)


def test_zstd_without_a_decompressor_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def missing(name: str, package: str | None = None) -> Any:
        if name in ("zstandard", "compression.zstd"):
            raise ImportError(name)
        return real(name, package)

    monkeypatch.setattr(_layers.importlib, "import_module", missing)
    with pytest.raises(ImageFormatError, match=r"pip install 'vzkit\[zstd\]'"):
        open_layer(io.BytesIO(b""), "application/vnd.oci.image.layer.v1.tar+zstd", "l")


def test_bad_layers_are_format_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="not one vzkit reads"):
        open_layer(io.BytesIO(b""), "application/vnd.example.squashfs")
    junk = b"this is not a tar" * 100
    with pytest.raises(ImageFormatError, match="sha256:junk is not a readable tar"):
        build(tmp_path / "a", LayerInput(lambda: io.BytesIO(junk), None, None, "sha256:junk"))
    cut = gzip.compress(tar_of([M("a", data=os.urandom(100_000))]))[:5000]
    with pytest.raises(ImageFormatError, match="is not a readable tar"):
        build(tmp_path / "b", LayerInput(lambda: io.BytesIO(cut), None, None, "cut"))


class _Zeros(io.RawIOBase):
    """A gzip layer made on the fly: one file of ``size`` zero bytes, never held whole."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("big")
        info.size = size
        self._parts = iter([info.tobuf(), *([bytes(1 << 20)] * (size >> 20)), bytes(1024)])
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            part = next(self._parts, None)
            if part is None:
                return 0
            self._buffer = part
        count = min(len(buffer), len(self._buffer))
        buffer[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count


def test_a_big_layer_streams_in_bounded_memory(tmp_path: Path) -> None:
    size = 192 << 20
    blob = tmp_path / "big.tar.gz"
    with gzip.open(blob, "wb", compresslevel=1) as out, _Zeros(size) as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            out.write(chunk)
    opener: Callable[[], IO[bytes]] = lambda: blob.open("rb")  # noqa: E731
    tracemalloc.start()
    try:
        root, _ = build(tmp_path, LayerInput(opener, None, None, "big"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (root / "big").stat().st_size == size
    assert peak < 16 << 20, peak  # a few 1 MiB buffers, not the layer
    assert (root / "big").stat().st_blocks == 0  # zeros stay holes


def test_a_2_gib_layer_passes_through_without_being_held(tmp_path: Path) -> None:
    """A plain layer streamed as it is made (nothing of it on disk or in memory whole)."""
    size = 2 << 30
    writer = TreeWriter(tmp_path / "root")
    tracemalloc.start()
    try:
        result = apply_layer(writer, LayerInput(lambda: _Zeros(size), None, None, "2g"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.size == size + 512 + 1024  # the header, the content, the end blocks
    assert peak < 16 << 20, peak
    st = (tmp_path / "root/big").stat()
    assert (st.st_size, st.st_blocks) == (size, 0)


def test_a_layer_made_by_umoci_with_a_deletion(tmp_path: Path) -> None:
    """umoci (a real tool) writes the layers; its second layer whites out a file."""

    def base(rootfs: Path) -> None:
        (rootfs / "etc").mkdir()
        (rootfs / "etc/doomed").write_text("bye\n")
        (rootfs / "etc/kept").write_text("kept\n")
        (rootfs / "tool").write_text("#!/bin/sh\n")
        (rootfs / "tool").chmod(0o4755)

    def top(rootfs: Path) -> None:
        (rootfs / "etc/doomed").unlink()
        (rootfs / "etc/new").write_text("new\n")

    layout = umoci_image(tmp_path, base, top)
    pulled = layout_image(layout)
    diff_ids = pulled.config["rootfs"]["diff_ids"]
    layers = [
        LayerInput(layer.open, layer.media_type, diff_id, layer.digest)
        for layer, diff_id in zip(pulled.layers, diff_ids, strict=True)
    ]
    assert len(layers) == 2
    with tarfile.open(blob_path(layout, pulled.layers[1].digest)) as tar:
        assert "etc/.wh.doomed" in tar.getnames()  # umoci wrote a whiteout
    root, meta = build(tmp_path, *layers)
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["kept", "new"]
    assert (root / "etc/new").read_text() == "new\n"
    assert guest_mode(root, meta, "/tool") == stat.S_IFREG | 0o4755
