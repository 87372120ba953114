"""The image supply chain: unsigned builds are flagged, stale Releases and hostile names refused.

A fake Debian mirror on 127.0.0.1 (from test_guest_mirror) serves the packages; what a
hostile mirror could send (names and versions with ``/``, ``..``, NUL or newlines, a Release
that lists ``../`` paths or hashes) must be refused before anything is written.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

from vzkit.cli import main
from vzkit.image import _image
from vzkit.image._deb import is_package_name, is_version
from vzkit.image._fetch import GuestDebs, find_guest_debs, mirror_guest_debs
from vzkit.image._mirror import (
    DebianMirror,
    DebianSource,
    ExpiredReleaseError,
    MirrorFieldError,
)

from .test_guest_initramfs import KVER, MODULES, make_deb, make_elf
from .test_guest_mirror import (
    KERNEL_V2,
    FakeMirror,
    Pkg,
    publish,
    serve_mirror,
    sources,
    standard_repo,
)

ROOT = Path(__file__).parents[2]
UNSIGNED = "NOT signature-checked"


@pytest.fixture
def mirror() -> Iterator[FakeMirror]:
    with serve_mirror() as fake:
        yield fake


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- unsigned builds: one warning, and the image says so ---------------------------------------


@pytest.fixture
def image_repo(mirror: FakeMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMirror:
    """A mirror with a bootable-looking kernel and busybox, a fake agent, the CLI's env."""
    work = tmp_path / "work"
    work.mkdir()
    files = {f"./lib/modules/{KVER}/{rel}": data for rel, data in MODULES.items()}
    files[f"./boot/vmlinuz-{KVER}"] = b"MZ fake bzImage"
    kernel = make_deb(work, f"linux-image-{KVER}", "6.1.1-1", "amd64", files).read_bytes()
    busybox = make_deb(work, "busybox-static", "1:1.35.0-4", "amd64",
                       {"./bin/busybox": make_elf(62)}).read_bytes()  # fmt: skip
    publish(
        mirror,
        "bookworm",
        [
            Pkg("linux-image-cloud-amd64", "6.1.1-1", depends=f"linux-image-{KVER} (= 6.1.1-1)"),
            Pkg(f"linux-image-{KVER}", "6.1.1-1", data=kernel),
            Pkg("busybox-static", "1:1.35.0-4", data=busybox),
        ],
    )
    agent = tmp_path / "vzkit-agent"
    agent.write_bytes(b"\x7fELF fake agent")
    import vzkit.image._agent_build as agent_build

    monkeypatch.setattr(agent_build, "build_agent", lambda *a, **k: agent)
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VZKIT_DEBIAN_MIRROR", mirror.url)
    monkeypatch.setenv("VZKIT_DEBIAN_SECURITY_MIRROR", "none")
    monkeypatch.setenv("VZKIT_DEBIAN_KEYRING", "none")
    monkeypatch.setenv("VZKIT_PROGRESS", "0")
    monkeypatch.delenv("VZKIT_DEB_SOURCE", raising=False)
    return mirror


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    yield CliRunner()
    guest_log = logging.getLogger("vzkit.image")
    for handler in [h for h in guest_log.handlers if type(h).__name__ == "_EchoWarnings"]:
        guest_log.removeHandler(handler)


def test_unsigned_build_warns_once_and_image_list_says_unsigned(
    image_repo: FakeMirror, cli: CliRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="vzkit")
    built = cli.invoke(main, ["image", "build", "--arch", "x86_64", "--source", "mirror"])
    assert built.exit_code == 0, built.output
    warned = [r for r in caplog.records if UNSIGNED in r.getMessage()]
    assert len(warned) == 1  # one WARNING per build, not one per suite or package
    assert warned[0].levelno == logging.WARNING
    assert built.stderr.count(f"vzkit: warning: Debian package indexes from {image_repo.url} "
                              f"are {UNSIGNED}") == 1  # fmt: skip
    assert "trust   unsigned" in built.stdout

    listed = cli.invoke(main, ["image", "list"])
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split()[-1] == "TRUST"
    assert row.split()[-1] == "unsigned"
    [entry] = json.loads(cli.invoke(main, ["image", "list", "--json"]).stdout)
    assert entry["trust"] == "unsigned"
    assert entry["arch"] == "x86_64"
    assert entry["kernel_version"] == KVER

    caplog.clear()  # a second build uses the cache: no mirror, no new warning, still unsigned
    again = cli.invoke(main, ["image", "build", "--arch", "x86_64", "--source", "mirror"])
    assert again.exit_code == 0, again.output
    assert UNSIGNED not in again.stderr
    assert "trust   unsigned" in again.stdout
    assert not [r for r in caplog.records if UNSIGNED in r.getMessage()]


def test_image_trust_is_recorded_and_only_upgraded(
    image_repo: FakeMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    image = _image.default_image("x86_64", cache_dir=cache, source="mirror")
    assert _image.image_trust(image.kernel.parent) == "unsigned"
    debs = find_guest_debs(cache / "debs" / "x86_64", "x86_64")
    # the same bytes, later verified (e.g. with gpgv and the keyring installed): upgraded
    verified = GuestDebs(kernel=debs.kernel, busybox=debs.busybox, trust="verified")
    monkeypatch.setattr(_image, "fetch_guest_debs", lambda *a, **k: verified)
    assert _image.default_image("x86_64", cache_dir=cache) == image
    assert _image.image_trust(image.kernel.parent) == "verified"
    unsigned = GuestDebs(kernel=debs.kernel, busybox=debs.busybox, trust="unsigned")
    monkeypatch.setattr(_image, "fetch_guest_debs", lambda *a, **k: unsigned)
    _image.default_image("x86_64", cache_dir=cache)
    assert _image.image_trust(image.kernel.parent) == "verified"  # never downgraded
    local = _image.default_image("x86_64", cache_dir=tmp_path / "c2", deb_dir=debs.kernel.parent)
    assert _image.image_trust(local.kernel.parent) == "local"


def test_cached_debs_keep_their_trust_until_they_change(mirror: FakeMirror, tmp_path: Path) -> None:
    standard_repo(mirror)
    cache = tmp_path / "debs"
    debs = mirror_guest_debs(cache, "x86_64", sources=sources(mirror), keyring=None)
    assert debs.trust == "unsigned"
    from vzkit.image._fetch import fetch_guest_debs, recorded_trust

    assert fetch_guest_debs(cache, "x86_64").trust == "unsigned"  # from the cache, no network
    debs.kernel.write_bytes(debs.kernel.read_bytes())  # rewritten by someone else
    assert recorded_trust(debs.kernel) == "unknown"
    assert fetch_guest_debs(cache, "x86_64").trust == "unknown"


# -- Valid-Until and Date -----------------------------------------------------------------------


def _date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True).replace("GMT", "UTC")


def _client(fake: FakeMirror, tmp_path: Path, **kwargs: object) -> DebianMirror:
    source = DebianSource(url=fake.url, suite="bookworm")
    idx = tmp_path / "a" / "b" / "c" / "d" / "idx"  # deep, so that ../../../.. stays in tmp_path
    return DebianMirror([source], "amd64", index_dir=idx, keyring=None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("inrelease", [False, True])
def test_expired_release_is_refused(mirror: FakeMirror, tmp_path: Path, inrelease: bool) -> None:
    extra = f"Date: {_date(-20 * 86400)}\nValid-Until: {_date(-3 * 86400)}\n"
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")], inrelease=inrelease,
            release_extra=extra)  # fmt: skip
    with pytest.raises(ExpiredReleaseError) as info:
        _client(mirror, tmp_path).lookup("busybox-static")
    message = str(info.value)
    assert re.search(r"dists/bookworm/(In)?Release: the Release file expired 3\.0 day", message)
    assert "Use another mirror (--mirror URL or VZKIT_DEBIAN_MIRROR)" in message
    assert "check the system clock" in message
    assert not [p for p, _ in mirror.requests if "binary-amd64" in p]  # no index fetched


def test_valid_until_in_the_future_is_accepted_and_the_check_can_be_waived(
    mirror: FakeMirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = f"Date: {_date(-60)}\nValid-Until: {_date(7 * 86400)}\n"
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")], release_extra=fresh)
    assert _client(mirror, tmp_path).lookup("busybox-static").version == "1"
    stale = f"Date: {_date(-20 * 86400)}\nValid-Until: {_date(-3 * 86400)}\n"
    publish(mirror, "bookworm", [Pkg("busybox-static", "2")], release_extra=stale)
    caplog.set_level(logging.WARNING, logger="vzkit")
    client = _client(mirror, tmp_path, check_valid_until=False)  # a snapshot mirror
    assert client.lookup("busybox-static").version == "2"
    assert any("accepted because VZKIT_DEBIAN_CHECK_VALID_UNTIL=no" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_release_dated_in_the_future_or_undated_nonsense_is_refused(
    mirror: FakeMirror, tmp_path: Path
) -> None:
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")],
            release_extra=f"Date: {_date(3 * 86400)}\n")  # fmt: skip
    with pytest.raises(ExpiredReleaseError, match=r"72 h ahead of this machine's clock: check"):
        _client(mirror, tmp_path).load()
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")],
            release_extra="Valid-Until: someday\n")  # fmt: skip
    with pytest.raises(MirrorFieldError, match=r"refusing Valid-Until 'someday'") as info:
        _client(mirror, tmp_path).load()
    assert (info.value.field, info.value.value) == ("Valid-Until", "someday")


# -- hostile names, versions and paths ----------------------------------------------------------

HOSTILE = ["../../etc/x", "/abs", "a/b", "1/../../../../../x", "1\0x", "1\n x", ".."]


def _assert_nothing_written(mirror: FakeMirror, tmp_path: Path, before: set[str]) -> None:
    after = {f for f in _files(tmp_path) - before if "/.mirror/" not in f"/{f}"}
    assert after <= {"c", "c/d", "c/d/cache", "c/d/cache/.mirror"}, after  # no .deb, .part, lock
    assert not [p for p, _ in mirror.requests if p.endswith((".deb", "x"))]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("field", ["Version", "Filename"])
def test_hostile_version_or_filename_is_refused_before_anything_is_written(
    mirror: FakeMirror, tmp_path: Path, field: str, value: str
) -> None:
    standard_repo(mirror)
    hostile = value if field == "Version" else f"pool/main/{value}.deb"
    if field == "Filename" and value in ("../../etc/x", "/abs", "..", "a/b"):
        hostile = value  # not under pool/ at all
    publish(
        mirror,
        "bookworm-security",
        [Pkg("linux-image-cloud-amd64", "6.1.2-1", depends=KERNEL_V2),  # any version
         Pkg(KERNEL_V2, "6.1.2-1", fields={field: hostile})],
        inrelease=True,
    )  # fmt: skip
    cache = tmp_path / "c" / "d" / "cache"
    before = _files(tmp_path)
    with pytest.raises(MirrorFieldError) as info:
        mirror_guest_debs(cache, "x86_64", sources=sources(mirror), keyring=None)
    err = info.value
    assert err.field == field
    stored = hostile.replace("\n ", "\n")  # a continuation line joins with a newline
    assert err.value == stored
    assert f"refusing {field} {stored!r}" in str(err)
    assert "bookworm-security/main/binary-amd64/Packages" in str(err)
    _assert_nothing_written(mirror, tmp_path, before)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_package_name_is_refused(mirror: FakeMirror, tmp_path: Path, name: str) -> None:
    publish(mirror, "bookworm", [Pkg("busybox-static", "1"), Pkg(name, "1", fields={})])
    client = _client(mirror, tmp_path)
    with pytest.raises(MirrorFieldError, match="refusing Package") as info:
        client.lookup(name)
    assert (info.value.field, info.value.value) == ("Package", name)
    assert not is_package_name(name)


@pytest.mark.parametrize(
    ("line", "bad"),
    [
        (f"../../../../{'f' * 8} 10 main/binary-amd64/Packages.xz", f"../../../../{'f' * 8}"),
        (f"{'a' * 64} 10 ../../main/Packages.xz", "../../main/Packages.xz"),
        (f"{'a' * 64} 10 /etc/passwd", "/etc/passwd"),
        (f"{'a' * 64} -10 main/binary-amd64/Packages.xz", "-10"),
        (f"{'a' * 64} 10 main/binary amd64/Packages.xz", None),
    ],
)
def test_hostile_release_sha256_list_is_refused(
    mirror: FakeMirror, tmp_path: Path, line: str, bad: str | None
) -> None:
    release = f"Suite: bookworm\nSHA256:\n {line}\n"
    mirror.files["/debian/dists/bookworm/Release"] = release.encode()
    mirror.files["/debian/dists/bookworm/main/binary-amd64/Packages.xz"] = b"0123456789"
    before = _files(tmp_path)
    with pytest.raises(MirrorFieldError, match="dists/bookworm/Release: refusing SHA256") as info:
        _client(mirror, tmp_path).load()
    assert info.value.field == "SHA256"
    assert info.value.value == (bad if bad is not None else line)
    assert _files(tmp_path) - before <= {"a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/idx"}


def test_debian_policy_syntax() -> None:
    for good in ["1", "1:1.35.0-4", "6.1.2-1", "2:1.0~rc1+dfsg-1ubuntu0.1", "1.0-2-3"]:
        assert is_version(good), good
    for bad in [*HOSTILE, "", "a1", "1:", "1.0:2", "1.0-", "1 2", "1" * 300]:
        assert not is_version(bad), bad
    for good in ["busybox-static", "g++", "linux-image-6.1.0-9-cloud-amd64", "a.b"]:
        assert is_package_name(good), good
    for bad in ["a", "Abc", "-x", ".x", "a_b", "a b"]:
        assert not is_package_name(bad), bad


# -- the zig toolchain ---------------------------------------------------------------------------


def test_ziglang_is_pinned_to_the_tested_range() -> None:
    """pyproject pins ziglang to the releases the agent is known to build with.

    test_agent_build builds and runs the agent with the installed zig (0.17.1 in the dev venv);
    0.16.0 and 0.17.0 built both arches by hand (VZKIT_ZIG, December 2026). A zig outside
    the range, e.g. a future 0.18 that changes ``zig cc``, must not be installed silently.
    The wheel's agents are built with exactly the dev venv's zig (build requirement and dev
    extra), so a checkout builds the bytes the wheel ships; ziglang is no runtime dependency
    (the wheel ships the agents, docs/packaging.md).
    """
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("ziglang")]
    extras = pyproject["project"]["optional-dependencies"]
    [pin] = [Requirement(d) for d in extras["agent-build"] if d.startswith("ziglang")]
    assert any(spec.operator == "<" for spec in pin.specifier), f"{pin} has no upper bound"
    assert pin.specifier.contains(installed_version("ziglang"))
    for tested in ("0.16.0", "0.17.0", "0.17.1"):
        assert pin.specifier.contains(tested), tested
    for untested in ("0.13.0", "0.15.2", "0.18.0", "1.0.0"):
        assert not pin.specifier.contains(untested), untested
    exact = [
        Requirement(d)
        for d in [*pyproject["build-system"]["requires"], *extras["dev"]]
        if d.startswith("ziglang")
    ]
    assert [str(r.specifier) for r in exact] == [f"=={installed_version('ziglang')}"] * 2
