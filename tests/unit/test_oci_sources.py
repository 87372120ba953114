"""Image sources and pull: layouts and archives made by umoci and skopeo (real tools), a
registry through a fake client built on the client's API, and hostile hand-made inputs."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from vzkit.image._download import ChecksumError
from vzkit.image.oci._blobs import BlobStore
from vzkit.image.oci._errors import ImageFormatError, PlatformError, RegistryError
from vzkit.image.oci._manifest import Platform, parse_platform
from vzkit.image.oci._pull import PulledImage, open_source, pull, pull_from
from vzkit.image.oci._ref import parse_reference
from vzkit.image.oci._sources import LayoutSource, RegistrySource

from ..support.oci_images import OciImages, session_oci_images

AMD64 = parse_platform("linux/amd64")
ARM64 = parse_platform("linux/arm64")
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


@pytest.fixture(scope="session")
def oci_images(tmp_path_factory: pytest.TempPathFactory) -> OciImages:
    return session_oci_images(tmp_path_factory)


def _store_files(cache: Path) -> list[str]:
    root = cache / "oci"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _layer_names(image: PulledImage, index: int) -> list[str]:
    with image.open_layer(index) as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
        return sorted(m.name.removeprefix("./") for m in tar)


def _check_v1(image: PulledImage) -> None:
    config = image.config
    assert config.env == ("GREETING=hello", "PATH=/usr/bin:/bin")
    assert (config.working_dir, config.user) == ("/srv", "1000:1000")
    assert (config.entrypoint, config.cmd) == (("/bin/sh",), ("-c", "echo hi"))
    assert config.exposed_ports == ("8080/tcp",)
    assert dict(config.labels) == {"org.example.test": "yes"}
    assert config.platform == AMD64
    assert len(image.layers) == 2
    assert "etc/hello" in _layer_names(image, 0)
    assert "etc/link" in _layer_names(image, 0)
    assert {"etc/.wh.gone", "etc/second"} <= set(_layer_names(image, 1))
    for layer in image.layers:
        with image.open_layer(layer) as fh:
            assert "sha256:" + hashlib.sha256(fh.read()).hexdigest() == layer.digest
    assert image.read_config()


def test_a_layout_made_by_umoci_is_pulled_whole(oci_images: OciImages, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    image = pull(
        f"oci:{oci_images.layout}:v1",
        platform="linux/amd64",
        cache_dir=tmp_path,
        progress=lambda d, t: seen.append((d, t)),
    )
    _check_v1(image)
    assert image.manifest_digest == oci_images.v1_manifest
    assert [layer.media_type for layer in image.layers] == [GZ, GZ]
    for layer in image.layers:  # the same bytes as umoci wrote
        assert (oci_images.layout / "blobs/sha256" / layer.hex).read_bytes() == (
            image.store.path(layer.digest).read_bytes()
        )
    assert seen[-1] == (image.size, image.size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    expected = {
        f"blobs/sha256/{d[7:]}"
        for d in (*image.layer_digests, image.config_digest, image.manifest_digest)
    }
    assert set(_store_files(tmp_path)) == expected


def test_the_second_pull_fetches_nothing(oci_images: OciImages, tmp_path: Path) -> None:
    pull(f"oci:{oci_images.layout}:v1", platform=AMD64, cache_dir=tmp_path)
    source = LayoutSource(parse_reference(f"oci:{oci_images.layout}:v1"))
    opened: list[str] = []
    original = source.open_blob

    def counting(digest: str) -> BinaryIO:
        opened.append(digest)
        return original(digest)

    source.open_blob = counting  # type: ignore[method-assign]
    seen: list[tuple[int, int]] = []
    image = pull_from(source, AMD64, BlobStore(tmp_path), progress=lambda d, t: seen.append((d, t)))
    assert set(opened).isdisjoint(image.layer_digests)  # only the manifest and config were read
    assert seen == [(image.size, image.size)]


def test_archives_made_by_skopeo_give_the_same_image(oci_images: OciImages, tmp_path: Path) -> None:
    layout = pull(f"oci:{oci_images.layout}:v1", platform=AMD64, cache_dir=tmp_path / "a")
    archive = pull(
        f"oci-archive:{oci_images.oci_archive}", platform=AMD64, cache_dir=tmp_path / "b"
    )
    _check_v1(archive)
    assert (archive.manifest_digest, archive.config_digest, archive.layer_digests) == (
        layout.manifest_digest,
        layout.config_digest,
        layout.layer_digests,
    )
    docker = pull(
        f"docker-archive:{oci_images.docker_archive}", platform=AMD64, cache_dir=tmp_path / "c"
    )
    _check_v1(docker)
    assert docker.config_digest == layout.config_digest  # the same config, kept by skopeo
    assert docker.layer_digests == docker.config.diff_ids  # plain tars: digest = diff id
    assert [layer.media_type for layer in docker.layers] == [TAR, TAR]


def test_a_docker_archive_image_is_picked_by_name_or_index(
    oci_images: OciImages, tmp_path: Path
) -> None:
    by_name = pull(
        f"docker-archive:{oci_images.docker_archive}:test/img:v1",
        platform=AMD64,
        cache_dir=tmp_path,
    )
    by_index = pull(
        f"docker-archive:{oci_images.docker_archive}:@0", platform=AMD64, cache_dir=tmp_path
    )
    assert by_name.config_digest == by_index.config_digest
    with pytest.raises(
        ImageFormatError, match=r"no image docker\.io/test/img:v2; it has: docker\.io/test/img:v1"
    ):
        pull(
            f"docker-archive:{oci_images.docker_archive}:test/img:v2",
            platform=AMD64,
            cache_dir=tmp_path,
        )
    with pytest.raises(ImageFormatError, match="holds 1 images; no @1"):
        pull(f"docker-archive:{oci_images.docker_archive}:@1", platform=AMD64, cache_dir=tmp_path)


def test_a_multi_arch_index_serves_each_arch(oci_images: OciImages, tmp_path: Path) -> None:
    amd = pull(f"oci:{oci_images.multiarch}:multi", platform="linux/amd64", cache_dir=tmp_path)
    arm = pull(f"oci:{oci_images.multiarch}", platform="linux/arm64", cache_dir=tmp_path)
    assert amd.manifest_digest == oci_images.v1_manifest
    assert arm.manifest_digest == oci_images.arm_manifest
    assert arm.config.platform == ARM64
    assert _layer_names(arm, 0) == [".", "etc", "etc/arch"]
    with pytest.raises(PlatformError) as info:
        pull(f"oci:{oci_images.multiarch}", platform="linux/s390x", cache_dir=tmp_path)
    assert info.value.available == ("linux/amd64", "linux/arm64/v8")
    assert "linux/s390x" in str(info.value)


def test_an_image_for_another_arch_only_is_refused_naming_its_arch(
    oci_images: OciImages, tmp_path: Path
) -> None:
    with pytest.raises(PlatformError) as info:
        pull(f"oci:{oci_images.layout}:arm", platform="linux/amd64", cache_dir=tmp_path)
    assert info.value.available == ("linux/arm64",)
    assert "is an image for linux/arm64, not linux/amd64" in str(info.value)
    assert _store_files(tmp_path) == []


def test_a_layout_with_several_images_wants_a_name(oci_images: OciImages, tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match=r"holds 2 images; name one \(arm, v1\)"):
        pull(f"oci:{oci_images.layout}", platform=AMD64, cache_dir=tmp_path)
    with pytest.raises(
        ImageFormatError, match="no image named 'v9' in the layout; it has: arm, v1"
    ):
        pull(f"oci:{oci_images.layout}:v9", platform=AMD64, cache_dir=tmp_path)


# --- hostile layouts --------------------------------------------------------------------------


def _copy_layout(oci_images: OciImages, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(oci_images.layout, copy)
    return copy


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _manifest_of(layout: Path, digest: str) -> dict[str, object]:
    return json.loads(_blob(layout, digest).read_bytes())


def test_a_layer_whose_digest_does_not_match_is_refused_and_not_kept(
    oci_images: OciImages, tmp_path: Path
) -> None:
    layout = _copy_layout(oci_images, tmp_path)
    manifest = _manifest_of(layout, oci_images.v1_manifest)
    layer = manifest["layers"][1]["digest"]  # type: ignore[index]
    blob = _blob(layout, layer)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="does not verify") as info:
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=cache)
    assert layer in str(info.value)
    assert not BlobStore(cache).has(layer)
    assert not [f for f in _store_files(cache) if f.startswith("tmp/")]


def test_a_config_whose_digest_does_not_match_is_refused_before_parsing(
    oci_images: OciImages, tmp_path: Path
) -> None:
    layout = _copy_layout(oci_images, tmp_path)
    manifest = _manifest_of(layout, oci_images.v1_manifest)
    config = _blob(layout, manifest["config"]["digest"])  # type: ignore[index]
    config.write_bytes(config.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(ChecksumError, match="config"):
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=tmp_path / "cache")
    assert _store_files(tmp_path / "cache") == []


def _rewrite_v1(
    layout: Path, oci_images: OciImages, change: Callable[[dict[str, object]], None]
) -> None:
    """Write a changed v1 manifest into the layout and point index.json's v1 at it."""
    manifest = _manifest_of(layout, oci_images.v1_manifest)
    change(manifest)
    data = json.dumps(manifest).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry["digest"] == oci_images.v1_manifest:
            entry.update(digest=digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_an_unknown_layer_media_type_is_refused(oci_images: OciImages, tmp_path: Path) -> None:
    layout = _copy_layout(oci_images, tmp_path)

    def weird(manifest: dict[str, object]) -> None:
        manifest["layers"][0]["mediaType"] = "application/vnd.example.squashfs"  # type: ignore[index]

    _rewrite_v1(layout, oci_images, weird)
    with pytest.raises(
        ImageFormatError, match=r"unknown layer media type 'application/vnd\.example\.squashfs'"
    ):
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=tmp_path / "cache")


def test_a_descriptor_that_understates_a_blob_is_cut_off(
    oci_images: OciImages, tmp_path: Path
) -> None:
    layout = _copy_layout(oci_images, tmp_path)

    def smaller(manifest: dict[str, object]) -> None:
        manifest["layers"][0]["size"] -= 10  # type: ignore[index,operator]

    _rewrite_v1(layout, oci_images, smaller)
    with pytest.raises(ChecksumError, match="more than the"):
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=tmp_path / "cache")


def test_oversized_documents_are_refused_without_reading_them(
    oci_images: OciImages, tmp_path: Path
) -> None:
    layout = _copy_layout(oci_images, tmp_path)

    def huge_config(manifest: dict[str, object]) -> None:
        manifest["config"]["size"] = 1 << 40  # type: ignore[index]

    _rewrite_v1(layout, oci_images, huge_config)
    with pytest.raises(ImageFormatError, match="over the 8388608 bytes vzkit reads"):
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=tmp_path / "cache")
    (layout / "index.json").write_bytes(b" " * (5 << 20))
    with pytest.raises(ImageFormatError, match=r"index\.json is larger than"):
        pull(f"oci:{layout}:v1", platform=AMD64, cache_dir=tmp_path / "cache")


def test_a_directory_that_is_no_layout(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="is not an OCI image layout"):
        pull(f"oci:{tmp_path}", platform=AMD64, cache_dir=tmp_path / "cache")
    with pytest.raises(ImageFormatError, match="is not a directory"):
        pull(f"oci:{tmp_path}/nothing", platform=AMD64, cache_dir=tmp_path / "cache")


# --- hostile archives --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"this is not an archive at all\n" * 40, "is not a tar archive"),
        (b"", "is not a tar archive"),
        (gzip.compress(b"x" * 1000), "compressed with gzip (gunzip it)"),
        (b"\0" * 10240, "empty archive"),
    ],
)
def test_an_archive_that_is_not_one(
    tmp_path: Path, transport: str, content: bytes, says: str
) -> None:
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    with pytest.raises(ImageFormatError, match=r"expected the output|gunzip|empty") as info:
        pull(f"{transport}:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    assert says in str(info.value)
    assert str(path) in str(info.value)


def test_the_wrong_archive_kind_says_which_transport_fits(
    oci_images: OciImages, tmp_path: Path
) -> None:
    with pytest.raises(
        ImageFormatError, match=r"no manifest\.json\) \(an OCI archive\? use oci-archive:\)"
    ):
        pull(f"docker-archive:{oci_images.oci_archive}", platform=AMD64, cache_dir=tmp_path)
    with pytest.raises(
        ImageFormatError, match=r"no oci-layout\) \(a docker save archive\? use docker-archive:\)"
    ):
        pull(f"oci-archive:{oci_images.docker_archive}", platform=AMD64, cache_dir=tmp_path)
    with pytest.raises(ImageFormatError, match="does not exist"):
        pull(f"oci-archive:{tmp_path}/missing.tar", platform=AMD64, cache_dir=tmp_path)
    with pytest.raises(ImageFormatError, match="Is a directory"):
        pull(f"oci-archive:{tmp_path}", platform=AMD64, cache_dir=tmp_path)


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """A tar with regular members (bytes) and symlinks (str: the target), names unchecked."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type = tarfile.SYMTYPE
                info.linkname = content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def _archive_members(oci_images: OciImages) -> list[tuple[str, bytes | str]]:
    with tarfile.open(oci_images.oci_archive) as tar:
        return [
            (m.name, tar.extractfile(m).read())  # type: ignore[union-attr]
            for m in tar
            if m.isreg()
        ]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("../escape", b"x"), "'../escape' points outside the archive"),
        (("/etc/passwd", b"x"), "'/etc/passwd' points outside the archive"),
        (("blobs/../../up", b"x"), "points outside the archive"),
        (("index.json", b"{}"), "'index.json' appears twice"),
    ],
)
def test_member_names_outside_the_archive_or_twice_are_refused(
    oci_images: OciImages, tmp_path: Path, extra: tuple[str, bytes], says: str
) -> None:
    path = _tar(tmp_path / "bad.tar", [*_archive_members(oci_images), extra])
    with pytest.raises(ImageFormatError) as info:
        pull(f"oci-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    assert says in str(info.value)
    assert not (tmp_path / "up").exists()
    assert not (tmp_path.parent / "escape").exists()


def test_a_link_out_of_the_archive_is_not_followed(oci_images: OciImages, tmp_path: Path) -> None:
    members = _archive_members(oci_images)
    manifest = _manifest_of(oci_images.layout, oci_images.v1_manifest)
    layer = manifest["layers"][0]["digest"][7:]  # type: ignore[index]
    linked = [(n, c) for n, c in members if not n.endswith(layer)]
    linked.append((f"blobs/sha256/{layer}", "../../../../../../etc/passwd"))
    path = _tar(tmp_path / "link.tar", linked)
    with pytest.raises(
        ImageFormatError, match=r"links to '(\.\./)+etc/passwd', outside the archive"
    ):
        pull(f"oci-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")


def test_a_truncated_archive_is_refused(oci_images: OciImages, tmp_path: Path) -> None:
    data = oci_images.oci_archive.read_bytes()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFormatError):
        pull(f"oci-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")


# --- a registry, through a fake client on the client's API ------------------------------------


class FakeRegistry:
    """``RegistryClient``'s API over an OCI layout: tags are the layout's ref names."""

    def __init__(self, layout: Path, fail: str | None = None) -> None:
        self.layout = layout
        self.fail = fail
        self.fetched: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest[7:]).read_bytes()

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        assert repository == "team/img"
        if not reference.startswith("sha256:"):
            index = json.loads((self.layout / "index.json").read_text())
            entry = next(
                e
                for e in index["manifests"]
                if e["annotations"]["org.opencontainers.image.ref.name"] == reference
            )
            reference = entry["digest"]
        body = self._blob(reference)
        media_type = json.loads(body).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        return body, media_type, "sha256:" + hashlib.sha256(body).hexdigest()

    def open_blob(self, repository: str, digest: str, *, offset: int = 0) -> BinaryIO:
        return io.BytesIO(self._blob(digest)[offset:])

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        dest: Path,
        *,
        size: int | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        # As RegistryClient.fetch_blob does: bytes in DEST.part (continued), DEST when whole,
        # DEST.lock held meanwhile (the store must not hold that lock itself).
        part = dest.with_name(dest.name + ".part")
        lock = os.open(dest.with_name(dest.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            have = part.stat().st_size if part.exists() else 0
            with self.lock:
                self.fetched.append((digest, have))
            if digest == self.fail:
                raise RegistryError("boom", url=f"https://r/{digest}", status=500)
            data = self._blob(digest)[have:]
            with open(part, "ab") as fh:
                for start in range(0, len(data), 64):
                    fh.write(data[start : start + 64])
                    if progress is not None:
                        progress(len(data[start : start + 64]))
            part.rename(dest)
        finally:
            os.close(lock)
            dest.with_name(dest.name + ".lock").unlink(missing_ok=True)


def test_a_registry_image_is_pulled_through_the_client(
    oci_images: OciImages, tmp_path: Path
) -> None:
    client = FakeRegistry(oci_images.multiarch)
    ref = parse_reference("localhost:5000/team/img:multi")
    seen: list[tuple[int, int]] = []
    image = pull_from(
        open_source(ref, client=client),
        ARM64,
        BlobStore(tmp_path),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert image.manifest_digest == oci_images.arm_manifest
    assert {d for d, _ in client.fetched} == set(image.layer_digests)
    assert seen[-1] == (image.size, image.size)
    amd = pull_from(RegistrySource(client, ref), AMD64, BlobStore(tmp_path), jobs=3)
    _check_v1(amd)


def test_a_registry_pull_continues_a_partial_blob(oci_images: OciImages, tmp_path: Path) -> None:
    client = FakeRegistry(oci_images.layout)
    manifest = _manifest_of(oci_images.layout, oci_images.v1_manifest)
    layer = manifest["layers"][0]["digest"]  # type: ignore[index]
    store = BlobStore(tmp_path)
    store.partial_dir.mkdir(parents=True)
    whole = _blob(oci_images.layout, layer).read_bytes()
    (store.partial_dir / f"{layer[7:]}.part").write_bytes(whole[:50])
    pull_from(RegistrySource(client, parse_reference("h.io/team/img:v1")), AMD64, store)
    assert (layer, 50) in client.fetched
    assert store.path(layer).read_bytes() == whole


def test_a_pinned_digest_must_match_what_the_registry_sends(
    oci_images: OciImages, tmp_path: Path
) -> None:
    client = FakeRegistry(oci_images.layout)
    client_ref = parse_reference("h.io/team/img@sha256:" + "0" * 64)
    client.get_manifest = lambda repo, ref: FakeRegistry.get_manifest(client, repo, "v1")  # type: ignore[method-assign]
    with pytest.raises(ChecksumError, match="not the sha256:0000"):
        pull_from(RegistrySource(client, client_ref), AMD64, BlobStore(tmp_path))


def test_one_failed_fetch_fails_the_pull_and_keeps_no_blob_of_it(
    oci_images: OciImages, tmp_path: Path
) -> None:
    manifest = _manifest_of(oci_images.layout, oci_images.v1_manifest)
    bad = manifest["layers"][1]["digest"]  # type: ignore[index]
    client = FakeRegistry(oci_images.layout, fail=bad)
    store = BlobStore(tmp_path)
    with pytest.raises(RegistryError, match="boom"):
        pull_from(RegistrySource(client, parse_reference("h.io/team/img:v1")), AMD64, store, jobs=2)
    assert not store.has(bad)


def test_platform_defaults_to_the_host(oci_images: OciImages, tmp_path: Path) -> None:
    host = Platform.host()
    if host == AMD64:
        assert pull(f"oci:{oci_images.layout}:v1", cache_dir=tmp_path).platform == AMD64
    else:
        assert pull(f"oci:{oci_images.layout}:arm", cache_dir=tmp_path).platform == ARM64


# --- docker save archives in their other shapes, made by hand from umoci's blobs -------------


def _v1_parts(oci_images: OciImages) -> tuple[bytes, list[bytes]]:
    """v1's config and its gzip layers, as umoci wrote them."""
    manifest = _manifest_of(oci_images.layout, oci_images.v1_manifest)
    config = _blob(oci_images.layout, manifest["config"]["digest"]).read_bytes()  # type: ignore[index]
    layers = [_blob(oci_images.layout, d["digest"]).read_bytes() for d in manifest["layers"]]  # type: ignore[attr-defined]
    return config, layers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _docker_tar(
    path: Path, entries: list[dict[str, object]], members: list[tuple[str, bytes | str]]
) -> Path:
    return _tar(path, [("manifest.json", json.dumps(entries).encode()), *members])


def test_a_docker_25_archive_with_gzip_layers_under_blobs(
    oci_images: OciImages, tmp_path: Path
) -> None:
    config, layers = _v1_parts(oci_images)
    names = [f"blobs/sha256/{_sha(layer)}" for layer in layers]
    path = _docker_tar(
        tmp_path / "d25.tar",
        [{"Config": f"blobs/sha256/{_sha(config)}", "RepoTags": ["x:1"], "Layers": names}],
        [(f"blobs/sha256/{_sha(config)}", config), *zip(names, layers, strict=True)],
    )
    image = pull(f"docker-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    _check_v1(image)
    assert image.layer_digests == tuple(f"sha256:{_sha(layer)}" for layer in layers)
    assert [layer.media_type for layer in image.layers] == [GZ, GZ]


def test_a_legacy_archive_with_layer_links_and_unnamed_gzip(
    oci_images: OciImages, tmp_path: Path
) -> None:
    config, layers = _v1_parts(oci_images)
    plain = gzip.decompress(layers[0])
    path = _docker_tar(
        tmp_path / "legacy.tar",
        [
            {
                "Config": f"{_sha(config)}.json",
                "RepoTags": None,
                "Layers": ["0123/layer.tar", "second.tgz"],
            }
        ],
        [
            (f"{_sha(config)}.json", config),
            (f"{_sha(plain)}.tar", plain),
            ("0123/layer.tar", f"../{_sha(plain)}.tar"),  # as docker save and skopeo link it
            ("second.tgz", layers[1]),
        ],
    )
    image = pull(f"docker-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    _check_v1(image)
    assert image.layer_digests == (image.config.diff_ids[0], f"sha256:{_sha(layers[1])}")
    assert [layer.media_type for layer in image.layers] == [TAR, GZ]


def test_a_tampered_docker_archive_is_refused(oci_images: OciImages, tmp_path: Path) -> None:
    config, layers = _v1_parts(oci_images)
    plain = [gzip.decompress(layer) for layer in layers]
    bad_config = config.replace(b"GREETING=hello", b"GREETING=hallo")
    path = _docker_tar(
        tmp_path / "config.tar",
        [{"Config": f"{_sha(config)}.json", "Layers": ["a.tar", "b.tar"]}],
        [(f"{_sha(config)}.json", bad_config), ("a.tar", plain[0]), ("b.tar", plain[1])],
    )
    with pytest.raises(ImageFormatError, match=r"hashes to sha256:.*tampered"):
        pull(f"docker-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    changed = plain[1].replace(b"from layer 2", b"from layer X")
    path = _docker_tar(
        tmp_path / "layer.tar",
        [{"Config": "c.json", "Layers": ["a.tar", "b.tar"]}],
        [("c.json", config), ("a.tar", plain[0]), ("b.tar", changed)],
    )
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="does not verify"):
        pull(f"docker-archive:{path}", platform=AMD64, cache_dir=cache)
    assert not BlobStore(cache).has(f"sha256:{_sha(plain[1])}")  # the layer's digest: its diff id
    assert not BlobStore(cache).has(f"sha256:{_sha(changed)}")


@pytest.mark.parametrize(
    ("manifest", "says"),
    [
        (b"{not json", "manifest.json is not valid JSON"),
        (b'{"Config": "c"}', "manifest.json is not a list of images"),
        (b"[]", "manifest.json is not a list of images"),
        (b'[{"Layers": []}]', "manifest.json names no Config"),
        (b'[{"Config": "c.json", "Layers": "x"}]', "Layers is not a list of strings"),
        (b'[{"Config": "missing.json", "Layers": []}]', "the archive has no 'missing.json'"),
        (
            b'[{"Config": "c.json", "RepoTags": ["a:1"]},'
            b' {"Config": "c.json", "RepoTags": ["b:2"]}]',
            "holds 2 images; it has: a:1, b:2",
        ),
    ],
)
def test_a_bad_docker_manifest_json_is_refused(
    oci_images: OciImages, tmp_path: Path, manifest: bytes, says: str
) -> None:
    config, _ = _v1_parts(oci_images)
    path = _tar(tmp_path / "m.tar", [("manifest.json", manifest), ("c.json", config)])
    with pytest.raises(ImageFormatError) as info:
        pull(f"docker-archive:{path}", platform=AMD64, cache_dir=tmp_path / "cache")
    assert says in str(info.value)


def test_a_failed_fetch_stops_the_others_which_keep_their_partial(
    oci_images: OciImages, tmp_path: Path
) -> None:
    manifest = _manifest_of(oci_images.layout, oci_images.v1_manifest)
    good, bad = (layer["digest"] for layer in manifest["layers"])  # type: ignore[attr-defined]
    stopped: list[str] = []

    class Slow(FakeRegistry):
        def fetch_blob(
            self,
            repository: str,
            digest: str,
            dest: Path,
            *,
            size: int | None,
            progress: Callable[[int], None] | None,
        ) -> None:
            if digest == bad:
                raise RegistryError("boom", url=f"https://r/{digest}", status=500)
            assert progress is not None
            dest.with_name(dest.name + ".part").write_bytes(b"some bytes")
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline:  # until the pull tells this fetch to stop
                    progress(0)
                    time.sleep(0.005)  # poll interval
            except BaseException:
                stopped.append(digest)
                raise

    store = BlobStore(tmp_path)
    with pytest.raises(RegistryError, match="boom"):
        pull_from(
            RegistrySource(Slow(oci_images.layout), parse_reference("h.io/team/img:v1")),
            AMD64,
            store,
            jobs=2,
        )
    assert stopped == [good]
    assert not store.has(good)
    assert (store.partial_dir / f"{good[7:]}.part").read_bytes() == b"some bytes"  # next pull


def test_indexes_nested_too_deep_or_pointing_at_a_non_manifest(
    oci_images: OciImages, tmp_path: Path
) -> None:
    layout = _copy_layout(oci_images, tmp_path)
    index_type = "application/vnd.oci.image.index.v1+json"
    manifest = _blob(layout, oci_images.v1_manifest).read_bytes()
    entry = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": oci_images.v1_manifest,
        "size": len(manifest),
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    for _ in range(6):  # six indexes, each the only entry of the next
        data = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": [entry]})
        digest = "sha256:" + _sha(data.encode())
        _blob(layout, digest).write_text(data)
        entry = {**entry, "mediaType": index_type, "digest": digest, "size": len(data)}
    entry["annotations"] = {"org.opencontainers.image.ref.name": "deep"}
    del entry["platform"]
    top = {"schemaVersion": 2, "manifests": [entry]}
    (layout / "index.json").write_text(json.dumps(top))
    with pytest.raises(ImageFormatError, match="indexes nested deeper than 4"):
        pull(f"oci:{layout}:deep", platform=AMD64, cache_dir=tmp_path / "cache")
    entry["mediaType"] = "application/vnd.example.thing"
    (layout / "index.json").write_text(json.dumps(top))
    with pytest.raises(ImageFormatError, match="neither an image index nor an image manifest"):
        pull(f"oci:{layout}:deep", platform=AMD64, cache_dir=tmp_path / "cache")
