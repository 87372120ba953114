"""Unit tests for vzkit.image._fetch with fake ``apt-get`` and ``dpkg`` commands on PATH."""

from __future__ import annotations

import io
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from vzkit.errors import GuestError
from vzkit.image import (
    apt_download,
    deb_arch,
    fetch_guest_debs,
    find_guest_debs,
    kernel_metapackage,
)

FAKE_APT = """#!{python}
import pathlib, shutil, sys
repo = pathlib.Path({repo!r})
with open(repo / "calls.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if a not in ("-q", "-o") and "=" not in a]
if args[0] == "update":
    sys.exit(0)
for spec in args[1:]:
    name, arch = spec.split(":")
    found = sorted(repo.glob(name + "_*_" + arch + ".deb"))
    if not found:
        sys.stderr.write("E: Unable to locate package " + spec + "\\n")
        sys.exit(100)
    shutil.copy(found[0], found[0].name)
"""

FAKE_DPKG = """#!/bin/sh
[ "$1" = --print-architecture ] && echo amd64
exit 0
"""


def _tar(files: Mapping[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def make_deb(directory: Path, package: str, arch: str, depends: str = "") -> Path:
    control = f"Package: {package}\nVersion: 1.0-1\nArchitecture: {arch}\n"
    control += f"Depends: {depends}\n" if depends else ""
    blob = b"!<arch>\n"
    for name, data in [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", _tar({"./control": control.encode()})),
        ("data.tar.gz", _tar({"./usr/share/doc/x": b"x"})),
    ]:
        blob += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        blob += data + b"\n" * (len(data) % 2)
    path = directory / f"{package}_1.0-1_{arch}.deb"
    path.write_bytes(blob)
    return path


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake archive served by fake apt-get/dpkg commands first on PATH."""
    repo, bindir = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir()
    bindir.mkdir()
    for arch in ("amd64", "arm64"):
        kernel = f"linux-image-6.1.0-9-cloud-{arch}"
        make_deb(repo, kernel_metapackage(arch), arch, depends=f"{kernel} (= 1.0-1)")
        make_deb(repo, kernel, arch, depends="kmod, linux-base")
        make_deb(repo, "busybox-static", arch)
    (bindir / "apt-get").write_text(FAKE_APT.format(python=sys.executable, repo=str(repo)))
    (bindir / "dpkg").write_text(FAKE_DPKG)
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return repo


def calls(repo: Path) -> list[str]:
    log = repo / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_native_download_uses_host_apt(repo: Path, tmp_path: Path) -> None:
    paths = apt_download(["busybox-static"], tmp_path / "dl", "x86_64")
    assert [p.name for p in paths] == ["busybox-static_1.0-1_amd64.deb"]
    assert paths[0].parent == tmp_path / "dl"
    assert calls(repo) == ["-q download busybox-static:amd64"]


def test_foreign_arch_uses_private_lists_refreshed_once(repo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dl"
    apt_download(["busybox-static"], dest, "aarch64")
    apt_download(["busybox-static"], dest, "aarch64")
    log = calls(repo)
    assert [line.split()[-1] for line in log] == [
        "update",
        "busybox-static:arm64",
        "busybox-static:arm64",
    ]
    assert all("APT::Architecture=arm64" in line for line in log)
    assert f"Dir::State::Lists={dest / '.apt-arm64' / 'lists'}" in log[0]
    assert (dest / ".apt-arm64" / "updated").exists()


def test_unknown_package_falls_back_then_fails_clearly(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="Unable to locate package nope:amd64") as info:
        apt_download(["nope"], tmp_path / "dl", "x86_64")
    assert "not in the configured apt sources" in str(info.value)
    assert [line.split()[-1] for line in calls(repo)] == ["nope:amd64", "update", "nope:amd64"]
    with pytest.raises(GuestError, match="dpkg --add-architecture amd64"):
        apt_download(["nope"], tmp_path / "dl", "x86_64", private=False)


def test_missing_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestError, match=r"apt-get not found.*deb_dir="):
        apt_download(["busybox-static"], tmp_path / "dl", "x86_64", private=False)


def test_fetch_guest_debs_resolves_the_metapackage_and_caches(repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    debs = fetch_guest_debs(cache, "x86_64")
    assert debs.kernel.name == "linux-image-6.1.0-9-cloud-amd64_1.0-1_amd64.deb"
    assert debs.busybox.name == "busybox-static_1.0-1_amd64.deb"
    assert len(calls(repo)) == 2
    assert fetch_guest_debs(cache, "x86_64") == debs  # served from the cache
    assert len(calls(repo)) == 2
    fetch_guest_debs(cache, "x86_64", refresh=True)
    assert len(calls(repo)) == 3  # metapackage + busybox again; kernel already cached


def test_arch_names() -> None:
    assert [deb_arch(a) for a in ("x86_64", "aarch64", "arm64")] == ["amd64", "arm64", "arm64"]
    with pytest.raises(GuestError, match="unsupported guest architecture"):
        deb_arch("mips")


def test_apt_downloads_are_recorded_as_verified_by_apt(repo: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert fetch_guest_debs(cache, "x86_64").trust == "apt"
    assert fetch_guest_debs(cache, "x86_64").trust == "apt"  # the cache remembers
    assert fetch_guest_debs(cache, "x86_64", refresh=True).trust == "apt"  # kernel reused
    assert find_guest_debs(cache, "x86_64").trust == "local"  # a directory of one's own
