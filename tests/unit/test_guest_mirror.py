"""The Debian mirror client against a fake repository served over HTTP on 127.0.0.1.

The fake mirror is generated here (tiny .debs, Packages.xz, Release with SHA256 sums) and
can misbehave on purpose: drop a connection halfway, ignore ``Range``, corrupt a body,
answer 500.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import lzma
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vzkit.image._download import ChecksumError, DownloadError, download
from vzkit.image._fetch import choose_source, fetch_guest_debs, find_guest_debs, mirror_guest_debs
from vzkit.image._mirror import (
    DebianMirror,
    DebianSource,
    MirrorError,
    SignatureError,
    default_sources,
    parse_relation,
    strip_clearsign,
)

from .test_guest_deb import make_deb


@dataclass
class FakeMirror:
    """Files by URL path, and per-path faults consumed one per request."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def hits(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mirror: FakeMirror

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        self.mirror.requests.append((path, rng))
        faults = self.mirror.faults.get(path) or [""]
        fault = faults.pop(0)
        if fault == "500":
            self._send(500, b"oops")
            return
        body = self.mirror.files.get(path)
        if body is None:
            self._send(404, b"not found")
            return
        if fault == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:16]) + body[16:]
        start = 0
        if rng and fault != "ignore_range":
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self._send(416, b"")
                return
        payload = body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault == "drop":  # half the body, then the connection goes away
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve_mirror() -> Iterator[FakeMirror]:
    """A FakeMirror served over HTTP on 127.0.0.1 (loopback only) while the block runs."""
    fake = FakeMirror()
    handler = type("Handler", (_Handler,), {"mirror": fake})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/debian"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def mirror() -> Iterator[FakeMirror]:
    with serve_mirror() as fake:
        yield fake


def deb(name: str, version: str, arch: str, depends: str = "", payload: bytes = b"x") -> bytes:
    control = f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
    control += f"Depends: {depends}\n" if depends else ""
    return make_deb({"./usr/share/payload": payload}, control=control, data_comp="")


@dataclass
class Pkg:
    name: str
    version: str
    depends: str = ""
    payload: bytes = b"x"
    arch: str = "amd64"
    size_delta: int = 0
    bad_sha: bool = False
    data: bytes | None = None  # a prebuilt .deb instead of a generated one
    fields: dict[str, str] = field(default_factory=dict)  # stanza fields to override

    def blob(self) -> bytes:
        if self.data is not None:
            return self.data
        return deb(self.name, self.version, self.arch, self.depends, self.payload)

    @property
    def pool(self) -> str:
        return f"pool/main/{self.name}_{self.version.split(':')[-1]}_{self.arch}.deb"


def publish(
    fake: FakeMirror,
    suite: str,
    pkgs: list[Pkg],
    *,
    index: str = "Packages.xz",
    by_hash: bool = False,
    bad_index_sha: bool = False,
    inrelease: bool = False,
    release_extra: str = "",
) -> None:
    """Put ``pkgs`` into ``suite`` of the fake mirror with a consistent hash chain.

    ``release_extra`` is added to the Release fields (``Date: ...\n``).
    """
    stanzas = []
    for pkg in pkgs:
        blob = pkg.blob()
        fake.files[f"/debian/{pkg.pool}"] = blob
        sha = hashlib.sha256(b"other" if pkg.bad_sha else blob).hexdigest()
        lines = {"Package": pkg.name, "Version": pkg.version, "Architecture": pkg.arch}
        if pkg.depends:
            lines["Depends"] = pkg.depends
        lines.update(Filename=pkg.pool, Size=str(len(blob) + pkg.size_delta), SHA256=sha)
        lines.update(pkg.fields)
        stanzas.append("".join(f"{key}: {value}\n" for key, value in lines.items()))
    text = "\n".join(stanzas).encode()
    packed = lzma.compress(text) if index.endswith(".xz") else gzip.compress(text, mtime=0)
    dists = f"/debian/dists/{suite}"
    sha = hashlib.sha256(packed).hexdigest()
    fake.files[f"{dists}/main/binary-amd64/{index}"] = packed
    if by_hash:
        fake.files[f"{dists}/main/binary-amd64/by-hash/SHA256/{sha}"] = packed
    listed = "0" * 64 if bad_index_sha else sha
    release = (
        f"Suite: {suite}\nArchitectures: amd64 arm64\nComponents: main\n"
        + release_extra
        + ("Acquire-By-Hash: yes\n" if by_hash else "")
        + f"SHA256:\n {listed} {len(packed)} main/binary-amd64/{index}\n"
        + f" {'1' * 64} 123 main/binary-arm64/{index}\n"
    )
    if inrelease:
        fake.files[f"{dists}/InRelease"] = (
            "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
            + release
            + "-----BEGIN PGP SIGNATURE-----\n\nnot checked\n-----END PGP SIGNATURE-----\n"
        ).encode()
    else:
        fake.files[f"{dists}/Release"] = release.encode()


KERNEL_V1 = "linux-image-6.1.0-9-cloud-amd64"
KERNEL_V2 = "linux-image-6.1.0-10-cloud-amd64"
BIG = os.urandom(300_000)


def standard_repo(fake: FakeMirror, **kernel: object) -> None:
    """bookworm: old kernel + busybox; bookworm-security: newer kernel (as on Debian)."""
    publish(
        fake,
        "bookworm",
        [
            Pkg("linux-image-cloud-amd64", "6.1.1-1", depends=f"{KERNEL_V1} (= 6.1.1-1)"),
            Pkg(KERNEL_V1, "6.1.1-1", depends="kmod"),
            Pkg("busybox-static", "1:1.35.0-4"),
            Pkg("busybox-static", "1:1.35.0-4", arch="arm64"),
        ],
    )
    publish(
        fake,
        "bookworm-security",
        [
            Pkg("linux-image-cloud-amd64", "6.1.2-1", depends=f"{KERNEL_V2} (= 6.1.2-1), x"),
            Pkg(KERNEL_V2, "6.1.2-1", depends="kmod, linux-base", payload=BIG, **kernel),  # type: ignore[arg-type]
        ],
        inrelease=True,
    )


def sources(fake: FakeMirror) -> tuple[DebianSource, ...]:
    return default_sources(fake.url, security_mirror=fake.url, suite="bookworm")


def kernel_path(fake: FakeMirror) -> str:
    return f"/debian/pool/main/{KERNEL_V2}_6.1.2-1_amd64.deb"


def fetch(fake: FakeMirror, cache: Path) -> Path:
    return mirror_guest_debs(cache, "x86_64", sources=sources(fake), keyring=None).kernel


def test_newest_kernel_across_suites_verified_and_named_like_apt(
    mirror: FakeMirror, tmp_path: Path
) -> None:
    standard_repo(mirror)
    cache = tmp_path / "debs"
    debs = mirror_guest_debs(cache, "x86_64", sources=sources(mirror), keyring=None)
    assert debs.kernel == cache / f"{KERNEL_V2}_6.1.2-1_amd64.deb"
    assert debs.busybox == cache / "busybox-static_1%3a1.35.0-4_amd64.deb"
    assert debs.kernel.read_bytes() == mirror.files[kernel_path(mirror)]
    assert sorted(p.name for p in cache.glob("*.deb")) == [
        "busybox-static_1%3a1.35.0-4_amd64.deb",
        f"{KERNEL_V2}_6.1.2-1_amd64.deb",
        "linux-image-cloud-amd64_6.1.2-1_amd64.deb",
    ]
    assert find_guest_debs(cache, "x86_64") == debs  # the cache reads the same as apt's
    assert not list(cache.glob("*.part"))
    # bookworm-updates does not exist on this mirror: an optional suite, skipped
    assert ("/debian/dists/bookworm-updates/Release", None) in mirror.requests
    # a second run finds every file verified in place and downloads no .deb again
    before = len(mirror.requests)
    assert mirror_guest_debs(cache, "x86_64", sources=sources(mirror), keyring=None) == debs
    assert not [p for p, _ in mirror.requests[before:] if p.endswith(".deb")]


def test_interrupted_download_resumes_with_range(mirror: FakeMirror, tmp_path: Path) -> None:
    standard_repo(mirror)
    path = kernel_path(mirror)
    mirror.faults[path] = ["drop"]
    seen: list[int] = []
    target = tmp_path / "k.deb"
    blob = mirror.files[path]
    sha = hashlib.sha256(blob).hexdigest()
    download(mirror.url.removesuffix("/debian") + path, target, size=len(blob), sha256=sha,
             on_bytes=seen.append)  # fmt: skip
    hits = mirror.hits(path)
    assert hits[0] is None
    assert hits[1] is not None
    assert hits[1].startswith("bytes=")
    offset = int(hits[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < len(blob)
    assert len(hits) == 2
    assert target.read_bytes() == blob
    assert sum(seen) == len(blob)
    assert not (tmp_path / "k.deb.part").exists()


def test_server_ignoring_range_restarts_cleanly(mirror: FakeMirror, tmp_path: Path) -> None:
    standard_repo(mirror)
    path = kernel_path(mirror)
    mirror.faults[path] = ["drop", "ignore_range"]
    blob = mirror.files[path]
    seen: list[int] = []
    target = tmp_path / "k.deb"
    url = mirror.url.removesuffix("/debian") + path
    download(url, target, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
             on_bytes=seen.append)  # fmt: skip
    hits = mirror.hits(path)
    assert len(hits) == 2
    assert hits[1] is not None
    assert target.read_bytes() == blob
    assert sum(seen) == len(blob)  # the discarded prefix was taken back off the progress


def test_leftover_part_from_an_earlier_run_is_continued(mirror: FakeMirror, tmp_path: Path) -> None:
    standard_repo(mirror)
    path = kernel_path(mirror)
    blob = mirror.files[path]
    cache = tmp_path / "debs"
    cache.mkdir()
    part = cache / f"{KERNEL_V2}_6.1.2-1_amd64.deb.part"
    part.write_bytes(blob[:1000])
    assert fetch(mirror, cache).read_bytes() == blob
    assert mirror.hits(path) == ["bytes=1000-"]
    assert not part.exists()


def test_sha256_mismatch_retries_once_then_fails_leaving_nothing(
    mirror: FakeMirror, tmp_path: Path
) -> None:
    standard_repo(mirror, bad_sha=True)
    cache = tmp_path / "debs"
    with pytest.raises(ChecksumError, match="SHA256 mismatch") as info:
        fetch(mirror, cache)
    url = mirror.url.removesuffix("/debian") + kernel_path(mirror)
    assert info.value.url == url
    assert url in str(info.value)
    assert mirror.hits(kernel_path(mirror)) == [None, None]  # once more, from scratch
    assert not list(cache.glob(f"{KERNEL_V2}*"))  # neither the .deb nor a .part


def test_corruption_in_transit_is_repaired_by_one_fresh_download(
    mirror: FakeMirror, tmp_path: Path
) -> None:
    standard_repo(mirror)
    mirror.faults[kernel_path(mirror)] = ["corrupt"]
    assert fetch(mirror, tmp_path).read_bytes() == mirror.files[kernel_path(mirror)]
    assert mirror.hits(kernel_path(mirror)) == [None, None]


@pytest.mark.parametrize("delta", [1, -1])
def test_size_mismatch_fails_leaving_nothing(
    mirror: FakeMirror, tmp_path: Path, delta: int
) -> None:
    standard_repo(mirror, size_delta=delta)
    cache = tmp_path / "debs"
    with pytest.raises(ChecksumError, match="size mismatch: the index says") as info:
        fetch(mirror, cache)
    assert info.value.url.endswith(f"{KERNEL_V2}_6.1.2-1_amd64.deb")
    assert not list(cache.glob(f"{KERNEL_V2}*"))


def test_missing_package_is_a_clear_error(mirror: FakeMirror, tmp_path: Path) -> None:
    publish(mirror, "bookworm", [Pkg("linux-image-cloud-amd64", "1", depends=f"{KERNEL_V1}")])
    with pytest.raises(MirrorError, match=rf"package {KERNEL_V1} for amd64 not found in http"):
        fetch(mirror, tmp_path)
    publish(mirror, "bookworm", [Pkg(KERNEL_V1, "1")])
    with pytest.raises(MirrorError, match="package linux-image-cloud-amd64 for amd64 not found"):
        fetch(mirror, tmp_path)


def test_missing_primary_suite_is_a_clear_error(mirror: FakeMirror, tmp_path: Path) -> None:
    with pytest.raises(MirrorError, match="no InRelease or Release file: not a Debian mirror"):
        fetch(mirror, tmp_path)


def test_unreachable_mirror_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/debian"
    source = DebianSource(url=url, suite="bookworm")
    with pytest.raises(DownloadError, match=f"cannot reach {url}/dists/bookworm/InRelease"):
        mirror_guest_debs(tmp_path, "x86_64", sources=[source], keyring=None)
    assert not list(tmp_path.rglob("*.deb*"))


def test_repeated_failures_give_up_keeping_the_part(
    mirror: FakeMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vzkit.image._download._BACKOFF_S", 0.0)
    standard_repo(mirror)
    path = kernel_path(mirror)
    mirror.faults[path] = ["drop"] + ["500"] * 10
    cache = tmp_path / "debs"
    with pytest.raises(DownloadError, match="4 times in a row without progress") as info:
        fetch(mirror, cache)
    assert info.value.url.endswith(path)
    part = cache / f"{KERNEL_V2}_6.1.2-1_amd64.deb.part"
    assert 0 < part.stat().st_size < len(mirror.files[path])  # kept to resume next time
    assert not (cache / f"{KERNEL_V2}_6.1.2-1_amd64.deb").exists()
    mirror.faults[path] = []
    assert fetch(mirror, cache).read_bytes() == mirror.files[path]


def test_index_hash_mismatch_fails(mirror: FakeMirror, tmp_path: Path) -> None:
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")], bad_index_sha=True)
    client = DebianMirror(
        [DebianSource(url=mirror.url, suite="bookworm")], "amd64", index_dir=tmp_path, keyring=None
    )
    with pytest.raises(ChecksumError, match=r"binary-amd64/Packages.xz: SHA256 mismatch"):
        client.lookup("busybox-static")
    assert not list(tmp_path.glob("*.xz*"))


def test_gz_index_and_by_hash(mirror: FakeMirror, tmp_path: Path) -> None:
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")], index="Packages.gz", by_hash=True)
    client = DebianMirror(
        [DebianSource(url=mirror.url, suite="bookworm")], "amd64", index_dir=tmp_path, keyring=None
    )
    assert client.lookup("busybox-static").version == "1"
    fetched = [p for p, _ in mirror.requests if "binary-amd64" in p]
    assert len(fetched) == 1
    assert "/by-hash/SHA256/" in fetched[0]
    assert [p.suffix for p in tmp_path.glob("*.gz")] == [".gz"]


def test_stale_indexes_are_pruned(mirror: FakeMirror, tmp_path: Path) -> None:
    source = DebianSource(url=mirror.url, suite="bookworm")
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")])
    DebianMirror([source], "amd64", index_dir=tmp_path, keyring=None).load()
    publish(mirror, "bookworm", [Pkg("busybox-static", "2")])
    client = DebianMirror([source], "amd64", index_dir=tmp_path, keyring=None)
    assert client.lookup("busybox-static").version == "2"
    assert len(list(tmp_path.glob("*.xz"))) == 1


def test_signature_required_with_a_keyring(mirror: FakeMirror, tmp_path: Path) -> None:
    publish(mirror, "bookworm", [Pkg("busybox-static", "1")])
    keyring = tmp_path / "keyring.gpg"
    keyring.write_bytes(b"")
    client = DebianMirror(
        [DebianSource(url=mirror.url, suite="bookworm")],
        "amd64",
        index_dir=tmp_path,
        keyring=keyring,
    )
    with pytest.raises(MirrorError, match=r"unsigned \(no InRelease, no Release.gpg\)"):
        client.load()


def test_strip_clearsign() -> None:
    signed = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: x\n- -dash\n"
        "-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n"
    )
    assert strip_clearsign(signed, "u") == "Suite: x\n-dash\n"
    with pytest.raises(MirrorError, match="u: not an OpenPGP clearsigned message"):
        strip_clearsign("Suite: x\n" + signed, "u")
    with pytest.raises(MirrorError, match="truncated"):
        strip_clearsign(signed.split("-----BEGIN PGP SIGNATURE")[0], "u")


def test_parse_relation() -> None:
    assert parse_relation("linux-image-6.1.0-9-cloud-amd64 (= 6.1.1-1), a:any | b, c (>=2)") == [
        ("linux-image-6.1.0-9-cloud-amd64", "=", "6.1.1-1"),
        ("a", None, None),
        ("c", ">=", "2"),
    ]


def test_default_sources_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MIRROR", "SECURITY_MIRROR", "SUITE"):
        monkeypatch.delenv(f"VZKIT_DEBIAN_{var}", raising=False)
    assert [(s.url, s.suite, s.optional) for s in default_sources()] == [
        ("https://deb.debian.org/debian", "bookworm", False),
        ("https://deb.debian.org/debian", "bookworm-updates", True),
        ("https://deb.debian.org/debian-security", "bookworm-security", True),
    ]
    monkeypatch.setenv("VZKIT_DEBIAN_MIRROR", "http://m/debian")
    monkeypatch.setenv("VZKIT_DEBIAN_SECURITY_MIRROR", "none")
    monkeypatch.setenv("VZKIT_DEBIAN_SUITE", "trixie")
    assert [(s.url, s.suite) for s in default_sources()] == [
        ("http://m/debian", "trixie"),
        ("http://m/debian", "trixie-updates"),
    ]


def test_choose_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZKIT_DEB_SOURCE", raising=False)
    monkeypatch.delenv("VZKIT_DEBIAN_MIRROR", raising=False)
    assert choose_source() == "auto"
    assert choose_source(mirror="http://m") == "mirror"
    assert choose_source("apt", mirror="http://m") == "apt"
    monkeypatch.setenv("VZKIT_DEBIAN_MIRROR", "http://m")
    assert choose_source() == "mirror"
    monkeypatch.setenv("VZKIT_DEB_SOURCE", "apt")
    assert choose_source() == "apt"
    with pytest.raises(Exception, match="unknown package source 'ftp'"):
        choose_source("ftp")


@pytest.fixture
def mirror_env(mirror: FakeMirror, monkeypatch: pytest.MonkeyPatch) -> FakeMirror:
    standard_repo(mirror)
    monkeypatch.setenv("VZKIT_DEBIAN_MIRROR", mirror.url)
    monkeypatch.setenv("VZKIT_DEBIAN_SECURITY_MIRROR", mirror.url)
    monkeypatch.setenv("VZKIT_DEBIAN_KEYRING", "none")
    monkeypatch.delenv("VZKIT_DEB_SOURCE", raising=False)
    return mirror


def test_auto_without_apt_uses_the_mirror(
    mirror_env: FakeMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    debs = fetch_guest_debs(tmp_path / "debs", "x86_64", source="auto")
    assert debs.kernel.name == f"{KERNEL_V2}_6.1.2-1_amd64.deb"


def test_auto_falls_back_to_the_mirror_when_apt_fails(
    mirror_env: FakeMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("apt-get", "dpkg"):
        (bindir / tool).write_text("#!/bin/sh\necho 'E: no network' >&2\nexit 100\n")
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    debs = fetch_guest_debs(tmp_path / "debs", "x86_64", source="auto")
    assert debs.kernel.name == f"{KERNEL_V2}_6.1.2-1_amd64.deb"
    with pytest.raises(Exception, match="E: no network"):
        fetch_guest_debs(tmp_path / "debs2", "x86_64", source="apt")


SIGNED = Path(__file__).parents[1] / "data" / "debian-signed"
needs_gpgv = pytest.mark.skipif(shutil.which("gpgv") is None, reason="needs gpgv")


def signed_client(fake: FakeMirror, tmp_path: Path, layout: str, keyring: Path) -> DebianMirror:
    dists = "/debian/dists/bookworm"
    fake.files[f"{dists}/main/binary-amd64/Packages.gz"] = (SIGNED / "Packages.gz").read_bytes()
    for name in ("Release", "Release.gpg") if layout == "Release.gpg" else ("InRelease",):
        fake.files[f"{dists}/{name}"] = (SIGNED / name).read_bytes()
    source = DebianSource(url=fake.url, suite="bookworm")
    return DebianMirror([source], "amd64", index_dir=tmp_path / "idx", keyring=keyring)


@needs_gpgv
@pytest.mark.parametrize("layout", ["InRelease", "Release.gpg"])
def test_signed_release_verifies_with_gpgv(mirror: FakeMirror, tmp_path: Path, layout: str) -> None:
    client = signed_client(mirror, tmp_path, layout, SIGNED / "keyring.gpg")
    assert client.lookup("busybox-static").version == "1:1.35.0-4"
    assert client.trust == "verified"


@needs_gpgv
@pytest.mark.parametrize("layout", ["InRelease", "Release.gpg"])
def test_tampered_or_unknown_signature_is_refused(
    mirror: FakeMirror, tmp_path: Path, layout: str
) -> None:
    client = signed_client(mirror, tmp_path, layout, SIGNED / "keyring.gpg")
    name = "/debian/dists/bookworm/" + ("Release" if layout == "Release.gpg" else "InRelease")
    mirror.files[name] = mirror.files[name].replace(b"Origin: vzkit", b"Origin: evil!")
    with pytest.raises(SignatureError, match="bad or unknown signature"):
        client.load()
    empty = tmp_path / "empty.gpg"
    empty.write_bytes(b"")
    mirror.files[name] = (SIGNED / name.rsplit("/", 1)[1]).read_bytes()
    client = signed_client(mirror, tmp_path, layout, empty)
    with pytest.raises(SignatureError, match="bad or unknown signature"):
        client.load()


def test_a_web_page_instead_of_a_release_file(mirror: FakeMirror, tmp_path: Path) -> None:
    mirror.files["/debian/dists/bookworm/Release"] = b"<html>\n<body>captive portal</body>\n"
    with pytest.raises(MirrorError, match=r"dists/bookworm/Release: not a Debian Release file"):
        fetch(mirror, tmp_path)
