"""The registry client against a real registry: Debian's docker-registry on 127.0.0.1, with
images made by umoci and pushed by skopeo (tools vzkit did not write), plain and behind
htpasswd Basic auth. No VM is booted; nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import (
    LocalRegistry,
    add_index,
    layout_blob,
    layout_manifest,
    local_registry,
    run,
    umoci_image,
)
from vzkit.image.oci._credentials import CredentialStore
from vzkit.image.oci._errors import RegistryAuthError, RegistryError
from vzkit.image.oci._registry import RegistryClient

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BIG = os.urandom(3 << 20)  # a layer larger than one read, random so gzip keeps it large


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout: images ``amd`` and ``arm`` (umoci) and an index ``multi`` over both."""
    path = tmp_path_factory.mktemp("oci") / "layout"
    umoci_image(path, "amd", {"/etc/hello": b"amd64\n", "/big": BIG}, arch="amd64",
                env={"GREETING": "hello"})  # fmt: skip
    umoci_image(path, "arm", {"/etc/hello": b"arm64\n"}, arch="arm64")
    add_index(path, "multi", {
        "amd": {"architecture": "amd64", "os": "linux"},
        "arm": {"architecture": "arm64", "os": "linux", "variant": "v8"},
    })  # fmt: skip
    return path


@pytest.fixture(scope="module")
def registry(layout: Path) -> Iterator[LocalRegistry]:
    with local_registry() as reg:
        reg.push(f"oci:{layout}:amd", "deb:1")
        reg.push(f"oci:{layout}:multi", "multi:1", all_images=True)
        yield reg


@pytest.fixture(scope="module")
def auth_registry(layout: Path) -> Iterator[LocalRegistry]:
    with local_registry(user="vzkit", password="s3cret pass") as reg:
        reg.push(f"oci:{layout}:arm", "private/arm:1")
        yield reg


def client(reg: LocalRegistry, credentials: CredentialStore | None = None) -> RegistryClient:
    return RegistryClient(
        reg.host, insecure=True, credentials=credentials or CredentialStore(files=[])
    )


def test_pull_manifest_config_and_layers_verified(
    registry: LocalRegistry, layout: Path, tmp_path: Path
) -> None:
    reg = client(registry)
    body, media_type, digest = reg.get_manifest("deb", "1")
    assert (media_type, digest) == (OCI_MANIFEST, layout_manifest(layout, "amd")["digest"])
    manifest = json.loads(body)
    blobs = [manifest["config"], *manifest["layers"]]
    seen = 0
    for n, desc in enumerate(blobs):
        dest = tmp_path / f"blob{n}"
        reg.fetch_blob("deb", desc["digest"], dest, size=desc["size"], progress=None)
        data = dest.read_bytes()
        assert sha(data) == desc["digest"]
        assert data == layout_blob(layout, desc["digest"])
        seen += len(data)
    config = json.loads((tmp_path / "blob0").read_text())
    assert config["architecture"] == "amd64"
    assert "GREETING=hello" in config["config"]["Env"]
    assert seen > len(BIG) // 2  # the big layer came through whole (it is gzip'd random data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"blob{n}" for n in range(len(blobs))]


def test_multi_arch_index_and_its_manifests_by_digest(
    registry: LocalRegistry, layout: Path
) -> None:
    reg = client(registry)
    body, media_type, _ = reg.get_manifest("multi", "1")
    assert media_type == OCI_INDEX
    index = json.loads(body)
    platforms = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    assert platforms == {
        "amd64": layout_manifest(layout, "amd")["digest"],
        "arm64": layout_manifest(layout, "arm")["digest"],
    }
    for arch, digest in platforms.items():
        manifest, kind, got = reg.get_manifest("multi", digest)
        assert (kind, got) == (OCI_MANIFEST, digest)
        config = json.loads(layout_blob(layout, json.loads(manifest)["config"]["digest"]))
        assert config["architecture"] == arch


def biggest_layer(reg: RegistryClient) -> dict[str, object]:
    manifest = json.loads(reg.get_manifest("deb", "1")[0])
    return dict(max(manifest["layers"], key=lambda d: d["size"]))


def test_blob_resumes_from_a_partial_file_with_range(
    registry: LocalRegistry, layout: Path, tmp_path: Path
) -> None:
    reg = client(registry)
    big = biggest_layer(reg)
    data = layout_blob(layout, big["digest"])
    half = len(data) // 2
    with reg.open_blob("deb", big["digest"], offset=half) as stream:
        assert stream.status == 206  # type: ignore[attr-defined]  # the registry honoured Range
        assert stream.read() == data[half:]
    dest = tmp_path / "layer"
    (tmp_path / "layer.part").write_bytes(data[:half])
    reg.fetch_blob("deb", big["digest"], dest, size=big["size"])
    assert dest.read_bytes() == data
    assert not (tmp_path / "layer.part").exists()


def test_a_partial_file_that_is_not_a_prefix_is_replaced_by_a_fresh_download(
    registry: LocalRegistry, layout: Path, tmp_path: Path
) -> None:
    reg = client(registry)
    big = biggest_layer(reg)
    dest = tmp_path / "layer"
    (tmp_path / "layer.part").write_bytes(b"\0" * 1000)  # garbage: the digest will not match
    reg.fetch_blob("deb", big["digest"], dest, size=big["size"])  # one fresh download repairs
    assert dest.read_bytes() == layout_blob(layout, big["digest"])


def test_unknown_tag_and_repository(registry: LocalRegistry) -> None:
    reg = client(registry)
    with pytest.raises(RegistryError) as tag:
        reg.get_manifest("deb", "nope")
    assert (tag.value.status, tag.value.code) == (404, "MANIFEST_UNKNOWN")
    assert f"`skopeo list-tags docker://{registry.host}/deb`" in str(tag.value)
    with pytest.raises(RegistryError) as repo:
        reg.get_manifest("nothing/here", "1")
    # distribution 2.8 says MANIFEST_UNKNOWN for a repository it never heard of, too
    assert (repo.value.status, repo.value.code) == (404, "MANIFEST_UNKNOWN")
    assert str(repo.value).startswith(f"{registry.host}/nothing/here: no such manifest")


def test_basic_auth_registry_with_credentials_skopeo_login_wrote(
    auth_registry: LocalRegistry, layout: Path, tmp_path: Path
) -> None:
    with pytest.raises(RegistryAuthError, match="wants credentials and none were found"):
        client(auth_registry).get_manifest("private/arm", "1")
    authfile = tmp_path / "auth.json"
    run(["skopeo", "login", "--tls-verify=false", "--authfile", str(authfile),
         "-u", "vzkit", "-p", "s3cret pass", auth_registry.host])  # fmt: skip
    reg = client(auth_registry, CredentialStore(files=[authfile]))
    body, _, digest = reg.get_manifest("private/arm", "1")
    assert digest == layout_manifest(layout, "arm")["digest"]
    layer = json.loads(body)["layers"][0]
    reg.fetch_blob("private/arm", layer["digest"], tmp_path / "layer", size=layer["size"])
    assert (tmp_path / "layer").read_bytes() == layout_blob(layout, layer["digest"])


def test_basic_auth_registry_refuses_wrong_credentials(auth_registry: LocalRegistry) -> None:
    wrong = CredentialStore(files=[], explicit={auth_registry.host: ("vzkit", "wrong")})
    with pytest.raises(RegistryAuthError, match="'vzkit' from the given credentials are "
                       "refused") as caught:  # fmt: skip
        client(auth_registry, wrong).get_manifest("private/arm", "1")
    assert caught.value.status == 401
