"""Manifests, indexes and configs (OCI and Docker schema 2): strict, bounded, platform choice."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vzkit._state import Arch
from vzkit.errors import SpecError
from vzkit.image.oci._errors import ImageFormatError, PlatformError
from vzkit.image.oci._manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    Platform,
    check_layers,
    choose_manifest,
    layer_compression,
    parse_config,
    parse_manifest,
    parse_platform,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def _entry(arch: str, digest: str, os: str = "linux", variant: str | None = None) -> dict[str, Any]:
    platform: dict[str, str] = {"architecture": arch, "os": os}
    if variant:
        platform["variant"] = variant
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10, "platform": platform}


def _index(*entries: dict[str, Any], media_type: str = OCI_INDEX) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}
    ).encode()


def _manifest(
    layer_type: str = "application/vnd.oci.image.layer.v1.tar+gzip", **extra: Any
) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": A, "size": 5},
        "layers": [{"mediaType": layer_type, "digest": B, "size": 7}],
    }
    doc.update(extra)
    return json.dumps(doc).encode()


def test_an_oci_manifest_is_parsed_field_by_field() -> None:
    parsed = parse_manifest(_manifest(annotations={"k": "v"}))
    assert isinstance(parsed, ImageManifest)
    assert parsed.config.digest == A
    assert parsed.config.size == 5
    assert [(d.digest, d.size) for d in parsed.layers] == [(B, 7)]
    assert dict(parsed.annotations) == {"k": "v"}
    assert parsed.layers[0].hex == "b" * 64


def test_a_docker_schema2_manifest_and_list() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": A,
            "size": 1,
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": B,
                "size": 2,
            }
        ],
    }
    parsed = parse_manifest(json.dumps(doc).encode(), DOCKER_MANIFEST + "; charset=utf-8")
    assert isinstance(parsed, ImageManifest)
    assert layer_compression(parsed.layers[0].media_type) == "gzip"
    listing = parse_manifest(_index(_entry("amd64", A), media_type=DOCKER_LIST))
    assert isinstance(listing, ImageIndex)
    assert listing.media_type == DOCKER_LIST


def test_a_document_without_media_type_is_known_by_its_fields() -> None:
    index = json.dumps({"schemaVersion": 2, "manifests": [_entry("amd64", A)]}).encode()
    assert isinstance(parse_manifest(index), ImageIndex)
    doc = json.loads(_manifest())
    del doc["mediaType"]
    assert isinstance(parse_manifest(json.dumps(doc).encode()), ImageManifest)


@pytest.mark.parametrize(
    ("data", "media_type", "says"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "not a JSON object"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b'{"a": 1, "a": 2}', None, "'a' appears twice"),
        (b"[" * 100000 + b"]" * 100000, None, "not valid JSON"),
        (_manifest(), DOCKER_MANIFEST, "served as"),
        (_manifest(), "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
        (
            json.dumps({"schemaVersion": 1, "mediaType": OCI_MANIFEST}).encode(),
            None,
            "schemaVersion",
        ),
        (
            json.dumps({"schemaVersion": 2, "mediaType": "text/html"}).encode(),
            None,
            "unknown media type",
        ),
        (_manifest(layer_type="application/vnd.example.weird"), None, "unknown layer media type"),
        (
            _manifest(
                config={
                    "mediaType": "application/vnd.cncf.helm.config.v1+json",
                    "digest": A,
                    "size": 1,
                }
            ),
            None,
            "not a container image config",
        ),
        (
            _manifest(
                config={
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": "sha256:zz",
                    "size": 1,
                }
            ),
            None,
            "not a sha256 digest",
        ),
        (
            _manifest(
                config={
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": "sha512:" + "a" * 128,
                    "size": 1,
                }
            ),
            None,
            "sha256 digests only",
        ),
        (
            _manifest(
                config={
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": A,
                    "size": -1,
                }
            ),
            None,
            "non-negative integer",
        ),
        (
            _manifest(
                config={
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": A,
                    "size": True,
                }
            ),
            None,
            "non-negative integer",
        ),
        (
            _manifest(
                config={"mediaType": "application/vnd.oci.image.config.v1+json", "digest": A}
            ),
            None,
            "'size'",
        ),
        (_manifest(layers="x"), None, "not a list"),
        (_manifest(annotations={"k": 1}), None, "not a string"),
        (
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": OCI_MANIFEST,
                            "digest": A,
                            "size": 1,
                            "platform": {"os": "linux"},
                        }
                    ],
                }
            ).encode(),
            None,
            "'architecture' is missing",
        ),
    ],
)
def test_malformed_documents_are_refused_with_the_field_named(
    data: bytes, media_type: str | None, says: str
) -> None:
    with pytest.raises(ImageFormatError) as info:
        parse_manifest(data, media_type, what="the test manifest")
    assert says in str(info.value)
    assert "the test manifest" in str(info.value)


def test_oversized_documents_are_refused_before_parsing() -> None:
    big = b" " * MAX_MANIFEST_BYTES + _manifest()
    with pytest.raises(ImageFormatError, match="larger than"):
        parse_manifest(big)
    with pytest.raises(ImageFormatError, match="larger than"):
        parse_config(b" " * MAX_CONFIG_BYTES + b"{}")


def test_platforms_parse_and_map_to_vzkit_arches() -> None:
    assert parse_platform("linux/arm64") == Platform(architecture="arm64")
    assert parse_platform("aarch64") == Platform(architecture="arm64")
    assert parse_platform("linux/x86_64") == Platform(architecture="amd64")
    assert str(parse_platform("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.for_arch(Arch.AARCH64).arch is Arch.AARCH64
    assert Platform.for_arch(Arch.X86_64) == Platform(architecture="amd64")
    assert Platform(architecture="s390x").arch is None
    assert parse_platform(None).arch is not None  # the host's
    for bad in ("", "linux/", "a/b/c/d", "Linux/ARM64"):
        with pytest.raises(SpecError, match="bad platform"):
            parse_platform(bad)


def test_choose_manifest_picks_the_arch_and_knows_arm64_v8() -> None:
    index = parse_manifest(
        _index(
            _entry("unknown", C, os="unknown"),  # an attestation: never picked
            _entry("amd64", A),
            _entry("arm64", B, variant="v8"),
            _entry("arm", C, variant="v7"),
        )
    )
    assert isinstance(index, ImageIndex)
    assert choose_manifest(index, parse_platform("linux/amd64")).digest == A
    assert choose_manifest(index, parse_platform("linux/arm64")).digest == B
    assert choose_manifest(index, parse_platform("linux/arm64/v8")).digest == B
    assert choose_manifest(index, parse_platform("linux/arm/v7")).digest == C
    bare = parse_manifest(_index(_entry("arm64", B)))
    assert isinstance(bare, ImageIndex)
    assert choose_manifest(bare, parse_platform("linux/arm64/v8")).digest == B


def test_an_exact_variant_wins_over_the_first_of_the_arch() -> None:
    index = parse_manifest(_index(_entry("amd64", A, variant="v3"), _entry("amd64", B)))
    assert isinstance(index, ImageIndex)
    assert choose_manifest(index, parse_platform("linux/amd64")).digest == B
    assert choose_manifest(index, parse_platform("linux/amd64/v3")).digest == A
    only_v3 = parse_manifest(_index(_entry("amd64", A, variant="v3")))
    assert isinstance(only_v3, ImageIndex)
    assert choose_manifest(only_v3, parse_platform("linux/amd64")).digest == A


def test_another_arch_only_names_what_the_image_has() -> None:
    index = parse_manifest(
        _index(_entry("s390x", A), _entry("ppc64le", B), _entry("unknown", C, os="unknown"))
    )
    assert isinstance(index, ImageIndex)
    with pytest.raises(PlatformError) as info:
        choose_manifest(index, parse_platform("linux/arm64"))
    assert info.value.available == ("linux/s390x", "linux/ppc64le")
    assert str(info.value) == (
        "the image has no manifest for linux/arm64; it has: linux/s390x, linux/ppc64le "
        "(pick one with --platform, and a guest of that arch)"
    )


def _config(**run: Any) -> dict[str, Any]:
    return {
        "architecture": "arm64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [A, B]},
    }


def test_the_image_config_carries_what_running_it_needs() -> None:
    config = parse_config(
        json.dumps(
            _config(
                Env=["PATH=/usr/bin", "LANG=C.UTF-8"],
                WorkingDir="/app",
                User="1000:1000",
                Entrypoint=["/docker-entrypoint.sh"],
                Cmd=["python3"],
                ExposedPorts={"8080/tcp": {}, "53/udp": {}},
                Volumes={"/data": {}},
                Labels={"org.opencontainers.image.title": "t"},
                StopSignal="SIGTERM",
            )
        ).encode()
    )
    assert config.env == ("PATH=/usr/bin", "LANG=C.UTF-8")
    assert (config.working_dir, config.user) == ("/app", "1000:1000")
    assert config.entrypoint == ("/docker-entrypoint.sh",)
    assert config.cmd == ("python3",)
    assert config.exposed_ports == ("53/udp", "8080/tcp")
    assert config.volumes == ("/data",)
    assert dict(config.labels) == {"org.opencontainers.image.title": "t"}
    assert config.stop_signal == "SIGTERM"
    assert config.diff_ids == (A, B)
    assert config.platform == Platform(architecture="arm64")
    assert config.created == "2026-01-01T00:00:00Z"
    empty = parse_config(json.dumps(_config()).encode())
    assert (empty.entrypoint, empty.cmd, empty.env, empty.user) == (None, None, (), "")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"config": {"Cmd": "sh -c x"}}, "'Cmd' is not a list of strings"),
        ({"config": {"Env": ["A=\x00"]}}, "NUL"),
        ({"config": {"Labels": {"a": 1}}}, "not a string"),
        ({"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}, "not a sha256 digest"),
        ({"rootfs": {"type": "other", "diff_ids": []}}, "not 'layers'"),
        ({"rootfs": {"type": "layers"}}, "'diff_ids' is missing"),
        ({"architecture": None}, "'architecture' is missing"),
        ({"config": []}, "not an object"),
    ],
)
def test_bad_configs_are_refused(change: dict[str, Any], says: str) -> None:
    doc = _config()
    doc.update(change)
    with pytest.raises(ImageFormatError) as info:
        parse_config(json.dumps(doc).encode())
    assert says in str(info.value)


def test_manifest_and_config_must_agree_on_the_layer_count() -> None:
    manifest = parse_manifest(_manifest())
    assert isinstance(manifest, ImageManifest)
    config = parse_config(json.dumps(_config()).encode())
    with pytest.raises(
        ImageFormatError, match=r"1 layers but the config.s rootfs\.diff_ids lists 2"
    ):
        check_layers(manifest, config, "img")
