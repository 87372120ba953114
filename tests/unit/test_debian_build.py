"""``prepare_debian_tree`` end to end against a fake Debian mirror on 127.0.0.1: resolve,
download (resuming), unpack, the second stage's files, the manifest and its digest."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vzkit.errors import SpecError
from vzkit.image._debian import debian_deb_dir, parse_debian_ref, prepare_debian_tree
from vzkit.image._debian_resolve import PackageNotFoundError
from vzkit.image._debian_stage2 import STAGE2_PATH, layers, sources_list
from vzkit.image._debian_unpack import UnpackError
from vzkit.image._download import DownloadError
from vzkit.image._mirror import DEFAULT_MIRROR, DebianSource, default_sources

from .test_guest_deb import make_deb
from .test_guest_mirror import FakeMirror, Pkg, publish, serve_mirror, sources


def _pkg(name: str, version: str = "1.0", arch: str = "amd64", depends: str = "",
         **fields: str) -> Pkg:  # fmt: skip
    control = f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
    files: dict[str, bytes | str | None] = {
        "./": None,
        f"./usr/share/doc/{name}/copyright": f"{name} copyright\n".encode(),
    }
    if name == "dash":
        files.update({"./bin/": None, "./bin/dash": b"dash binary", "./bin/sh": "->dash"})
    blob = make_deb(files, control=control)
    fields = {k.replace("_", "-"): v for k, v in fields.items()}
    return Pkg(name, version, depends=depends, arch=arch, data=blob, fields=fields)


REPO = [
    _pkg("base-passwd", Priority="required"),
    _pkg("dash", "0.5.12-2", Priority="required", Essential="yes", Pre_Depends="libc6"),
    _pkg("libc6", "2.36-9"),
    _pkg("dpkg", "1.21.22", Priority="required", Essential="yes", depends="libc6 (>= 2.34)"),
    _pkg("apt", "2.6.1", Priority="required", depends="libc6"),
    _pkg("python3", "3.11.2-1", Pre_Depends="python3-minimal (= 3.11.2-1)"),
    _pkg("python3-minimal", "3.11.2-1", Pre_Depends="python3.11-minimal"),
    _pkg("python3.11-minimal", "3.11.2-6", depends="libc6"),
    _pkg("ca-certificates", "20230311", arch="all"),
    _pkg("usr-is-merged", "37", arch="all"),
    _pkg("jq", "1.6-2.1", depends="libjq1 (= 1.6-2.1)"),
    _pkg("libjq1", "1.6-2.1"),
]
SECURITY = [_pkg("libc6", "2.36-9+deb12u4")]


@pytest.fixture
def repo() -> Iterator[FakeMirror]:
    with serve_mirror() as fake:
        publish(fake, "bookworm", REPO)
        publish(fake, "bookworm-security", SECURITY, inrelease=True)
        yield fake


def _build(fake: FakeMirror, dest: Path, cache: Path, packages: tuple[str, ...] = ("jq",)):  # type: ignore[no-untyped-def]
    return prepare_debian_tree(
        dest, arch="x86_64", packages=packages, sources=sources(fake), keyring=None,
        cache_dir=cache,
    )  # fmt: skip


def _deb_requests(fake: FakeMirror) -> list[str]:
    return [path for path, _ in fake.requests if path.endswith(".deb")]


def test_a_tree_with_every_package_its_metadata_and_the_second_stage(
    repo: FakeMirror, tmp_path: Path
) -> None:
    tree, meta, manifest = _build(repo, tmp_path / "out", tmp_path / "cache")
    names = [p.name for p in manifest.packages]
    assert names == sorted(
        ["apt", "base-passwd", "ca-certificates", "dash", "dpkg", "jq", "libc6", "libjq1",
         "python3", "python3-minimal", "python3.11-minimal", "usr-is-merged"]
    )  # fmt: skip
    libc6 = next(p for p in manifest.packages if p.name == "libc6")
    assert libc6.version == "2.36-9+deb12u4"  # the newest, from -security
    for pkg in manifest.packages:
        served = next(v for k, v in repo.files.items() if k.endswith(pkg.deb))
        assert pkg.sha256 == hashlib.sha256(served).hexdigest()
        assert (tree / "var/cache/apt/archives" / pkg.deb).read_bytes() == served  # for stage 2
    assert manifest.core == ("apt", "base-passwd", "dash", "dpkg", "libc6", "usr-is-merged")
    assert manifest.trust == "unsigned"
    # unpacked, merged /usr
    assert (tree / "usr/bin/dash").read_bytes() == b"dash binary"
    assert (tree / "bin").readlink() == Path("usr/bin")
    assert (tree / "usr/share/doc/jq/copyright").is_file()
    # what the second stage needs
    assert (tree / "var/lib/dpkg/status").read_bytes() == b""
    assert (tree / "var/lib/dpkg/available").read_bytes() == b""
    assert (tree / "var/lib/dpkg/info").is_dir()
    assert (tree / "etc/hostname").read_text() == "debian\n"
    assert (tree / "etc/apt/sources.list").read_text() == (
        f"deb {repo.url} bookworm main\n"
        f"deb {repo.url} bookworm-updates main\n"
        f"deb {repo.url} bookworm-security main\n"
    )
    policy = tree / "usr/sbin/policy-rc.d"
    assert policy.read_text() == "#!/bin/sh\nexit 101\n"
    assert policy.stat().st_mode & 0o111
    script = (tree / STAGE2_PATH.lstrip("/")).read_text()
    steps = [line[5:] for line in script.splitlines() if line.startswith("step ")]
    assert steps == [
        "'installing base-passwd'", "'installing dpkg'", "'installing libc6'",
        "'unpacking the required set'", "'configuring the required set'",
        *(f"'unpacking and configuring the other packages, group {n}'" for n in (1, 2, 3)),
        "'configuring everything, checking every dependency'", "done",
    ]  # fmt: skip
    assert script.index("core base-passwd_1.0_amd64.deb") < script.index("--unpack")
    groups = [script.index(f"    {n}_") for n in ("python3.11-minimal", "python3-minimal")]
    assert groups[0] < script.index("group 2") < groups[1] < script.index("group 3")
    assert script.index("group 3") < script.index("    python3_3.11.2-1_amd64.deb")
    assert "dpkg --configure -a" in script
    assert "apt-get clean" in script
    assert "rm -f /usr/sbin/policy-rc.d" in script
    assert f"export SOURCE_DATE_EPOCH={manifest.epoch}" in script
    # metadata: the tree's root is 0755 in the guest, private on the host
    assert meta["/"].mode == stat.S_IFDIR | 0o755
    assert stat.S_IMODE(tree.stat().st_mode) == 0o700
    saved = tmp_path / "out" / "manifest.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["packages"][0]["name"] == "apt"


def test_the_same_inputs_give_the_same_digest_and_nothing_is_downloaded_twice(
    repo: FakeMirror, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = _build(repo, tmp_path / "one", cache)
    fetched = _deb_requests(repo)
    assert len(fetched) == 12
    second = _build(repo, tmp_path / "two", cache)
    assert _deb_requests(repo) == fetched  # all from the cache
    assert second.manifest == first.manifest
    assert second.manifest.digest == first.manifest.digest
    assert second.meta == first.meta
    for path in sorted((tmp_path / "one" / "tree").rglob("*")):
        twin = tmp_path / "two" / "tree" / path.relative_to(tmp_path / "one" / "tree")
        assert twin.lstat().st_mtime_ns == path.lstat().st_mtime_ns, path
        assert twin.lstat().st_mode == path.lstat().st_mode, path
    other = _build(repo, tmp_path / "three", cache, packages=())
    assert other.manifest.digest != first.manifest.digest


def test_an_interrupted_build_leaves_no_tree_and_the_next_one_resumes(
    repo: FakeMirror, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    missing = next(k for k in repo.files if k.endswith("/python3_3.11.2-1_amd64.deb"))
    body = repo.files.pop(missing)
    with pytest.raises(DownloadError, match="HTTP 404"):
        _build(repo, tmp_path / "out", cache)
    assert not (tmp_path / "out" / "tree").exists()
    kept = sorted(p.name for p in debian_deb_dir("amd64", cache).glob("*.deb"))
    assert len(kept) == 8  # the ones before python3, by name: each complete and verified
    repo.files[missing] = body
    before = len(_deb_requests(repo))
    _build(repo, tmp_path / "out", cache)
    again = _deb_requests(repo)[before:]
    assert len(again) == 12 - len(kept)
    assert not any(name in path for name in kept for path in again)


def test_the_debs_can_stay_out_of_the_tree_for_a_share(repo: FakeMirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    inside = _build(repo, tmp_path / "one", cache)
    tree, _, manifest = prepare_debian_tree(
        tmp_path / "two", arch="x86_64", packages=("jq",), sources=sources(repo), keyring=None,
        cache_dir=cache, copy_debs=False,
    )  # fmt: skip
    assert not list((tree / "var/cache/apt/archives").glob("*.deb"))
    for pkg in manifest.packages:  # the script's names are the cache's names
        assert (debian_deb_dir("amd64", cache) / pkg.deb).is_file()
    script = (tree / STAGE2_PATH.lstrip("/")).read_text()
    assert 'cd "${1:-/var/cache/apt/archives}"' in script
    assert manifest.digest != inside.manifest.digest
    assert not manifest.debs_in_tree


def test_a_tree_that_is_not_empty_is_refused_and_left_alone(
    repo: FakeMirror, tmp_path: Path
) -> None:
    old = tmp_path / "out" / "tree" / "precious"
    old.parent.mkdir(parents=True)
    old.write_text("keep me")
    with pytest.raises(UnpackError, match="is not empty: unpack into a fresh directory"):
        _build(repo, tmp_path / "out", tmp_path / "cache")
    assert old.read_text() == "keep me"


def test_an_unknown_package_fails_before_anything_is_downloaded(
    repo: FakeMirror, tmp_path: Path
) -> None:
    with pytest.raises(PackageNotFoundError, match="did you mean jq"):
        _build(repo, tmp_path / "out", tmp_path / "cache", packages=("jqq",))
    assert _deb_requests(repo) == []
    assert not (tmp_path / "out" / "tree").exists()


def test_debian_image_references() -> None:
    assert parse_debian_ref("debian") == "bookworm"
    assert parse_debian_ref("debian:bookworm") == "bookworm"
    with pytest.raises(SpecError, match="unsupported Debian suite 'sid'"):
        parse_debian_ref("debian:sid")
    with pytest.raises(SpecError, match="not a Debian image reference: 'ubuntu'"):
        parse_debian_ref("ubuntu")


def test_layers_put_each_package_after_what_it_pre_depends_on() -> None:
    pre = {"aa": ["bb"], "bb": ["cc"], "dd": ["cc", "zz"], "xx": ["yy"], "yy": ["xx"]}
    assert layers(["aa", "bb", "cc", "dd", "ee", "xx", "yy"], pre) == [
        ["cc", "ee", "yy"],
        ["bb", "dd", "xx"],
        ["aa"],
    ]


def test_the_guest_reaches_debians_own_mirrors_over_http_and_others_as_given() -> None:
    assert sources_list(default_sources(suite="bookworm", mirror=DEFAULT_MIRROR)) == (
        "deb http://deb.debian.org/debian bookworm main\n"
        "deb http://deb.debian.org/debian bookworm-updates main\n"
        "deb http://deb.debian.org/debian-security bookworm-security main\n"
    )
    own = DebianSource(url="https://mirror.example/debian/", suite="bookworm")
    assert sources_list([own]) == "deb https://mirror.example/debian bookworm main\n"
