"""Image references in skopeo's syntax, with Docker Hub's short-name rules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vzkit.errors import SpecError
from vzkit.image.oci._ref import ImageReference, Transport, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("python:3.12", "docker.io", "library/python", "3.12", None),
        ("python", "docker.io", "library/python", "latest", None),
        ("debian:bookworm-slim", "docker.io", "library/debian", "bookworm-slim", None),
        ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None),
        ("docker.io/python", "docker.io", "library/python", "latest", None),
        ("index.docker.io/library/python:3", "docker.io", "library/python", "3", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/x/y:1", "localhost:5000", "x/y", "1", None),
        ("127.0.0.1:5000/deb:1", "127.0.0.1:5000", "deb", "1", None),
        ("ghcr.io/o/r/s:v1.2", "ghcr.io", "o/r/s", "v1.2", None),
        ("Host/x", "Host", "x", "latest", None),  # an upper-case first part is a host
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        (f"python@{D}", "docker.io", "library/python", None, D),
        (f"python:3@{D}", "docker.io", "library/python", "3", D),
        ("docker://debian:bookworm", "docker.io", "library/debian", "bookworm", None),
        ("docker://quay.io/a/b_c__d-e.f:t", "quay.io", "a/b_c__d-e.f", "t", None),
    ],
)
def test_docker_names_follow_docker_hubs_rules(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert ref.transport is Transport.DOCKER
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


def test_canonical_and_familiar_forms() -> None:
    ref = parse_reference("python:3.12")
    assert str(ref) == "docker://docker.io/library/python:3.12"
    assert ref.familiar == "python:3.12"
    assert parse_reference(str(ref)) == ref
    other = parse_reference("localhost:5000/a/b@" + D)
    assert str(other) == f"docker://localhost:5000/a/b@{D}"
    assert other.familiar == f"localhost:5000/a/b@{D}"
    assert parse_reference("bitnami/redis:7").familiar == "bitnami/redis:7"


def test_layout_and_archive_references(tmp_path: Path) -> None:
    ref = parse_reference(f"oci:{tmp_path}/lay:v1")
    assert (ref.transport, ref.path, ref.tag) == (Transport.OCI, tmp_path / "lay", "v1")
    assert str(ref) == f"oci:{tmp_path}/lay:v1"
    assert parse_reference(f"oci:{tmp_path}/lay").tag is None
    # the path ends at its first colon (skopeo's rule); the name may hold more
    assert parse_reference("oci:/x:a:b").tag == "a:b"
    arch = parse_reference(f"oci-archive:{tmp_path}/a.tar")
    assert (arch.transport, arch.path, arch.tag) == (
        Transport.OCI_ARCHIVE,
        tmp_path / "a.tar",
        None,
    )
    dock = parse_reference(f"docker-archive:{tmp_path}/d.tar:foo/bar:1")
    assert (dock.transport, dock.registry, dock.repository, dock.tag) == (
        Transport.DOCKER_ARCHIVE,
        "docker.io",
        "foo/bar",
        "1",
    )
    assert str(dock) == f"docker-archive:{tmp_path}/d.tar:docker.io/foo/bar:1"
    assert parse_reference(str(dock)) == dock
    indexed = parse_reference(f"docker-archive:{tmp_path}/d.tar:@2")
    assert indexed.index == 2
    assert str(indexed) == f"docker-archive:{tmp_path}/d.tar:@2"


def test_relative_and_home_paths_become_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert parse_reference("oci:~/lay").path == Path("/home/someone/lay")
    assert parse_reference("oci-archive:a.tar").path == Path(os.getcwd()) / "a.tar"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("Python", "lower case"),
        ("python:", "not a valid tag"),
        ("python:-x", "not a valid tag"),
        ("a//b", "not a valid repository name component"),
        ("python@sha256:abc", "not a digest"),
        ("python@sha512:" + "a" * 128, "only sha256"),
        ("docker:python", "docker://NAME"),
        ("oci:", "no path"),
        ("oci:/x:..", "not a valid image name"),
        ("docker-archive:/x.tar:@x", "not @INDEX"),
        (f"docker-archive:/x.tar:a@{D}", "not by digest"),
        ("dir:/tmp/x", "unknown transport 'dir'"),
        ("ftp://x/y", "unknown transport 'ftp'"),
        ("a" * 300, "longer than 255"),
    ],
)
def test_bad_references_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(SpecError, match="bad image reference") as info:
        parse_reference(text)
    assert says in str(info.value)
    assert "docker://HOST/REPO" in str(info.value)  # and the forms that are taken


def test_not_a_string_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="is a string"):
        parse_reference(5)  # type: ignore[arg-type]


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(
    host=st.sampled_from(["docker.io", "localhost:5000", "ghcr.io", "10.0.0.1:443"]),
    parts=st.lists(_component, min_size=1, max_size=3),
    tag=st.none() | _tag,
    pinned=st.booleans(),
)
def test_canonical_form_round_trips(
    host: str, parts: list[str], tag: str | None, pinned: bool
) -> None:
    text = f"{host}/{'/'.join(parts)}" + (f":{tag}" if tag else "") + (f"@{D}" if pinned else "")
    ref = parse_reference(text)
    assert isinstance(ref, ImageReference)
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar) == ref
