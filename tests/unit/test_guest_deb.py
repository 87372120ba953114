"""Unit tests for vzkit.image._deb: .deb parsing on synthetic packages built here."""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vzkit.errors import GuestError
from vzkit.image import DebPackage, compare_versions, parse_control, parse_depends

CONTROL = (
    "Package: demo\n"
    "Version: 1:2.0-3\n"
    "Architecture: amd64\n"
    "Pre-Depends: base\n"
    "Depends: libc6 (>= 2.36), foo:any | bar [amd64], linux-image-6.1.0-9-cloud-amd64 (= 6.1-1)\n"
    "Description: a demo\n"
    " with a long description\n"
    " .\n"
    " over lines\n"
)


def make_tar(files: Mapping[str, bytes | str | None], compression: str = "xz") -> bytes:
    """A tarball: bytes are regular files, ``"->target"`` symlinks, ``"=>target"`` hard
    links, None directories; names are stored as given (``./usr/...`` like dpkg-deb)."""
    out = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=out, mode=mode) as tar:  # type: ignore[call-overload]
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str):
                info.type = tarfile.SYMTYPE if content.startswith("->") else tarfile.LNKTYPE
                info.linkname, info.mode = content[2:], 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o755 if name.endswith("bin/tool") else 0o644
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def make_ar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out.write(header.encode("ascii"))
        out.write(data)
        if len(data) % 2:
            out.write(b"\n")
    return out.getvalue()


def make_deb(
    data: Mapping[str, bytes | str | None],
    control: str = CONTROL,
    data_comp: str = "xz",
    control_comp: str = "xz",
) -> bytes:
    ext = {"xz": ".xz", "gz": ".gz", "bz2": ".bz2", "": ""}
    return make_ar(
        [
            ("debian-binary", b"2.0\n"),
            (f"control.tar{ext[control_comp]}", make_tar({"./control": control.encode()},
                                                          control_comp)),
            (f"data.tar{ext[data_comp]}", make_tar(data, data_comp)),
        ]
    )  # fmt: skip


DATA: dict[str, bytes | str | None] = {
    "./": None,
    "./usr/": None,
    "./usr/bin/": None,
    "./usr/bin/tool": b"\x7fELF tool binary",
    "./usr/bin/alias": "->tool",
    "./usr/bin/hard": "=>./usr/bin/tool",
    "./etc/odd.conf": b"odd-length!",
}


def write(tmp_path: Path, blob: bytes, name: str = "demo.deb") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("comp", ["xz", "gz", "bz2", ""])
def test_reads_control_and_data_for_each_compression(tmp_path: Path, comp: str) -> None:
    pkg = DebPackage(write(tmp_path, make_deb(DATA, data_comp=comp, control_comp=comp)))
    assert (pkg.name, pkg.version, pkg.architecture) == ("demo", "1:2.0-3", "amd64")
    assert pkg.control["Description"] == "a demo\nwith a long description\n.\nover lines"
    assert pkg.read("/usr/bin/tool") == b"\x7fELF tool binary"
    assert pkg.read("usr/bin/tool") == pkg.read("./usr/bin/tool")


def test_depends_groups_alternatives_and_drops_versions(tmp_path: Path) -> None:
    pkg = DebPackage(write(tmp_path, make_deb(DATA)))
    assert pkg.depends == [
        ["base"],
        ["libc6"],
        ["foo", "bar"],
        ["linux-image-6.1.0-9-cloud-amd64"],
    ]
    assert repr(pkg) == "DebPackage(demo 1:2.0-3 amd64)"


def test_entries_kinds_modes_and_normalised_paths(tmp_path: Path) -> None:
    entries = {e.path: e for e in DebPackage(write(tmp_path, make_deb(DATA))).entries()}
    assert list(entries) == [
        "/", "/usr", "/usr/bin", "/usr/bin/tool", "/usr/bin/alias", "/usr/bin/hard",
        "/etc/odd.conf",
    ]  # fmt: skip
    assert entries["/usr/bin/tool"].kind == "file"
    assert entries["/usr/bin/tool"].mode == 0o755
    assert entries["/usr/bin/tool"].size == len(b"\x7fELF tool binary")
    assert entries["/usr/bin"].kind == "dir"
    assert (entries["/usr/bin/alias"].kind, entries["/usr/bin/alias"].linkname) == (
        "symlink",
        "tool",
    )
    assert (entries["/usr/bin/hard"].kind, entries["/usr/bin/hard"].linkname) == (
        "hardlink",
        "/usr/bin/tool",
    )


def test_extract_selects_by_paths_or_predicate_and_follows_hard_links(tmp_path: Path) -> None:
    pkg = DebPackage(write(tmp_path, make_deb(DATA)))
    assert pkg.extract(["/usr/bin/hard", "/missing"]) == {}  # target not selected first
    both = pkg.extract(["/usr/bin/tool", "/usr/bin/hard", "/missing"])
    assert both == {
        "/usr/bin/tool": b"\x7fELF tool binary",
        "/usr/bin/hard": b"\x7fELF tool binary",
    }
    assert pkg.extract(lambda p: p.endswith(".conf")) == {"/etc/odd.conf": b"odd-length!"}
    streamed = list(pkg.iter_files(lambda e: e.path.startswith("/usr")))
    assert [(e.path, len(d)) for e, d in streamed] == [("/usr/bin/tool", 16)]


def test_read_missing_file_names_it(tmp_path: Path) -> None:
    pkg = DebPackage(write(tmp_path, make_deb(DATA)))
    with pytest.raises(GuestError, match=r"no file /nope"):
        pkg.read("/nope")


def _zstd_deb(tmp_path: Path, data: bytes) -> DebPackage:
    blob = make_ar(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", make_tar({"./control": CONTROL.encode()})),
            ("data.tar.zst", data),
        ]
    )
    return DebPackage(write(tmp_path, blob))


def test_zstd_members_are_read_with_zstandard(tmp_path: Path) -> None:
    """Ubuntu's packages have zstd members; before Python 3.14 the optional zstandard
    package reads them (issue 18), in two frames here as a streaming compressor may write."""
    import zstandard

    tar = make_tar(DATA, "")
    half = len(tar) // 2
    frames = b"".join(
        zstandard.ZstdCompressor().compress(part) for part in (tar[:half], tar[half:])
    )
    pkg = _zstd_deb(tmp_path, frames)
    assert pkg.read("/usr/bin/tool") == DATA["./usr/bin/tool"]
    with pytest.raises(GuestError, match=r"corrupt data.tar.zst"):
        _zstd_deb(tmp_path, b"\x28\xb5\x2f\xfd not really zstd").read("/usr/bin/tool")


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="3.14 reads zstd itself")
def test_zstd_member_without_zstandard_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vzkit.image import _deb

    monkeypatch.setattr(_deb, "_zstandard", lambda: None)
    with pytest.raises(GuestError, match=r"install the zstandard package"):
        _zstd_deb(tmp_path, b"\x28\xb5\x2f\xfd").read("/usr/bin/tool")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "no ar archive header"),
        (b"garbage garbage garbage", "no ar archive header"),
        (b"!<arch>\nshort", "corrupt ar member header"),
        (make_ar([("control.tar.xz", b"x")]), "no debian-binary"),
        (make_ar([("debian-binary", b"3.0\n")]), "unsupported deb format"),
        (make_ar([("debian-binary", b"2.0\n")]), r"no control.tar"),
        (
            make_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", make_tar({"./x": b""}))]),
            "no data.tar",
        ),
        (
            make_ar(
                [
                    ("debian-binary", b"2.0\n"),
                    ("control.tar.xz", make_tar({"./x": b""})),
                    ("data.tar.xz", make_tar({})),
                ]
            ),
            "has no control file",
        ),
        (
            make_ar(
                [
                    ("debian-binary", b"2.0\n"),
                    ("control.tar.gz", b"\x1f\x8b\x08\x00garbage"),
                    ("data.tar.xz", make_tar({})),
                ]
            ),
            "corrupt control.tar.gz",
        ),
        (make_deb(DATA, control="Package: x\nVersion: 1\n"), "lacks the Architecture field"),
        (make_deb(DATA, control="no colon here\n"), "expected 'Field: value'"),
    ],
)
def test_malformed_packages_raise_guest_error(tmp_path: Path, blob: bytes, message: str) -> None:
    with pytest.raises(GuestError, match=message):
        DebPackage(write(tmp_path, blob))


def test_truncated_package_raises(tmp_path: Path) -> None:
    blob = make_deb(DATA)
    with pytest.raises(GuestError, match="truncated"):
        DebPackage(write(tmp_path, blob[: len(blob) - 40]))


def test_bad_ar_size_field_raises(tmp_path: Path) -> None:
    blob = bytearray(make_deb(DATA))
    blob[8 + 48 : 8 + 58] = b"12x4      "
    with pytest.raises(GuestError, match="bad size"):
        DebPackage(write(tmp_path, bytes(blob)))


def test_corrupt_data_tarball_raises_on_read(tmp_path: Path) -> None:
    blob = make_ar(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", make_tar({"./control": CONTROL.encode()})),
            ("data.tar.xz", make_tar(DATA)[:60]),
        ]
    )
    pkg = DebPackage(write(tmp_path, blob))
    with pytest.raises(GuestError, match=r"corrupt data\.tar\.xz"):
        pkg.entries()


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="cannot read"):
        DebPackage(tmp_path / "absent.deb")


def test_parse_control_continuations_and_errors() -> None:
    fields = parse_control("A: 1\nB: two\n  more\n\nC: next paragraph\n")
    assert fields == {"A": "1", "B": "two\nmore"}
    with pytest.raises(GuestError, match="continuation without a field"):
        parse_control(" leading continuation\n")


def test_parse_depends() -> None:
    assert parse_depends("") == []
    assert parse_depends("a, b (>= 1:2) | c:amd64 , d [!arm64]") == [["a"], ["b", "c"], ["d"]]
    with pytest.raises(GuestError, match="cannot parse dependency"):
        parse_depends("(>= 1)")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0", "1.0", 0),
        ("1.0", "1.1", -1),
        ("1.10", "1.9", 1),
        ("1:0.1", "9.9", 1),
        ("1.0~rc1", "1.0", -1),
        ("1.0~~", "1.0~", -1),
        ("1.0-1", "1.0-2", -1),
        ("1.0a", "1.0", 1),
        ("1.0+b1", "1.0", 1),
        ("1.0.", "1.0+", 1),  # non-letters compare by ASCII: '+' < '.'
        ("1.0a", "1.0.", -1),  # letters sort before non-letters
        ("6.1.192-2", "6.1.99-1", 1),
        ("1:1.35.0-4+deb12u1+b1", "1:1.35.0-4+deb12u1", 1),
        ("1.0-1", "1.0", 1),
    ],
)
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_compare_versions_rejects_bad_epoch() -> None:
    with pytest.raises(GuestError, match="bad epoch"):
        compare_versions("x:1.0", "1.0")


_VERSION = st.from_regex(r"\A([0-9]:)?[0-9][0-9a-z.+~]{0,6}(-[0-9a-z.+~]{1,4})?\Z")


@given(_VERSION, _VERSION, _VERSION)
def test_compare_versions_is_a_total_order(a: str, b: str, c: str) -> None:
    assert compare_versions(a, a) == 0
    assert compare_versions(a, b) == -compare_versions(b, a)
    if compare_versions(a, b) <= 0 and compare_versions(b, c) <= 0:
        assert compare_versions(a, c) <= 0
