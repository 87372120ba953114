"""The Debian OCI test image itself, checked with real tools only (skopeo, umoci, tar, chroot),
so the tests that boot it through vzkit rest on an image known to be what it claims: its
config (Env, WorkingDir, User, Cmd), its three layers, the whiteouts in them, the archives and
the multi-arch index, all as they come back from the real registry. No VM is booted; nothing
of vzkit's OCI code runs here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import oci_debian as deb
from tests.support.registry import LocalRegistry, local_registry, run


@pytest.fixture(scope="session")
def debian_oci() -> deb.DebianOciImage:
    return deb.session_debian_image()


@pytest.fixture(scope="module")
def registry(debian_oci: deb.DebianOciImage) -> Iterator[LocalRegistry]:
    with local_registry() as reg:
        debian_oci.push(reg, "deb:1")
        debian_oci.push(reg, "multi:1", tag=deb.INDEX_TAG)
        yield reg


@pytest.fixture(scope="module")
def pulled(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``deb:1`` copied back out of the registry by skopeo into an OCI layout."""
    layout = tmp_path_factory.mktemp("pulled") / "layout"
    run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{registry.host}/deb:1", f"oci:{layout}:1"])  # fmt: skip
    return layout


def inspect(*args: str) -> dict[str, object]:
    return dict(json.loads(run(["skopeo", "inspect", *args])))


def layer_tars(layout: Path) -> list[tarfile.TarFile]:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    return [
        tarfile.open(fileobj=io.BytesIO((blobs / layer["digest"][7:]).read_bytes()))
        for layer in manifest["layers"]
    ]


def names(tar: tarfile.TarFile) -> set[str]:
    return {member.name.removeprefix("./").rstrip("/") for member in tar.getmembers()}


def test_the_registry_serves_the_config_umoci_wrote(registry: LocalRegistry) -> None:
    config = inspect("--tls-verify=false", "--config", f"docker://{registry.host}/deb:1")
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    settings = config["config"]
    assert isinstance(settings, dict)
    assert f"GREETING={deb.GREETING}" in settings["Env"]
    assert deb.PATH_ENV in settings["Env"]
    assert settings["WorkingDir"] == deb.WORKDIR
    assert settings["User"] == deb.USER
    assert settings["Cmd"] == deb.CMD
    assert "Entrypoint" not in settings
    rootfs = config["rootfs"]
    assert isinstance(rootfs, dict)
    assert len(rootfs["diff_ids"]) == deb.LAYERS


def test_the_registry_serves_three_layers_of_the_layout(
    registry: LocalRegistry, debian_oci: deb.DebianOciImage
) -> None:
    seen = inspect("--tls-verify=false", f"docker://{registry.host}/deb:1")
    manifest = debian_oci.manifest("1")
    layers = manifest["layers"]
    assert isinstance(layers, list)
    assert len(layers) == deb.LAYERS
    assert seen["Layers"] == [layer["digest"] for layer in layers]
    assert seen["Digest"] == debian_oci.manifest_digest("1")
    assert (seen["Architecture"], seen["Os"]) == ("amd64", "linux")
    # layer 1 is the whole Debian tree (tens of MB compressed), the others are small
    assert layers[0]["size"] > 20 << 20
    assert all(layer["size"] < 1 << 20 for layer in layers[1:])


def test_the_layers_hold_the_whiteouts_and_what_they_hide(pulled: Path) -> None:
    first, second, third = layer_tars(pulled)
    lower = names(first)
    assert {"etc/issue.net", "usr/share/lintian", "etc/cron.daily/dpkg"} <= lower
    assert {"etc/os-release", "usr/bin/dash", "etc/passwd"} <= lower
    # layer 2: umoci's whiteouts for a removed file and a removed directory
    upper = names(second)
    assert {"etc/.wh.issue.net", "usr/share/.wh.lintian"} <= upper
    assert not any(name.endswith(".wh..wh..opq") for name in upper)  # umoci writes none
    members = {m.name.removeprefix("./").rstrip("/"): m for m in second.getmembers()}
    assert (members["srv/app"].uid, members["srv/app"].mode & 0o7777) == (deb.UID, 0o750)
    assert members["srv/app/hello.txt"].uid == deb.UID
    assert members["home/app"].uid == deb.UID
    passwd = second.extractfile(members["etc/passwd"])
    assert passwd is not None
    assert f"app:x:{deb.UID}:{deb.UID}::/home/app:/bin/sh" in passwd.read().decode()
    # layer 3: the opaque directory
    assert names(third) == {
        "etc",
        deb.OPAQUE_DIR.lstrip("/"),
        f"{deb.OPAQUE_DIR.lstrip('/')}/.wh..wh..opq",
        *(f"{deb.OPAQUE_DIR.lstrip('/')}/{name}" for name in deb.OPAQUE_KEEPS),
    }


def test_umoci_unpacks_it_and_the_cmd_prints_what_the_boot_tests_expect(
    pulled: Path, tmp_path: Path
) -> None:
    """umoci applies the whiteouts; the Cmd, run as the config says (chroot, uid 1000, the
    working directory, the config's Env only), prints :data:`CMD_OUTPUT`."""
    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--image", f"{pulled}:1", str(bundle)])
    rootfs = bundle / "rootfs"
    for path in deb.WHITED_OUT:
        assert not (rootfs / path.lstrip("/")).exists(), path
    assert sorted(os.listdir(rootfs / deb.OPAQUE_DIR.lstrip("/"))) == sorted(deb.OPAQUE_KEEPS)
    assert (rootfs / deb.HELLO.lstrip("/")).read_text() == deb.HELLO_TEXT
    config = inspect("--config", f"oci:{pulled}:1")["config"]
    assert isinstance(config, dict)
    done = subprocess.run(
        ["env", "-i", *config["Env"], "chroot", f"--userspec={deb.UID}:{deb.UID}", str(rootfs),
         "sh", "-c", 'cd "$0" && exec "$@"', config["WorkingDir"], *config["Cmd"]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, deb.CMD_OUTPUT, "")
    check = subprocess.run(
        ["env", "-i", *config["Env"], "chroot", f"--userspec={deb.UID}:{deb.UID}", str(rootfs),
         "sh", "-c", deb.GUEST_CHECK],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (check.returncode, check.stdout, check.stderr) == (0, deb.GUEST_CHECK_OUTPUT, "")


def test_the_cache_key_follows_the_tools_and_the_recipe() -> None:
    tools = {"mmdebstrap": "mmdebstrap 1.3.5", "umoci": "umoci 0.4.7", "skopeo": "skopeo 1.9.3"}
    assert deb.cache_key(tools) == deb.cache_key(dict(tools))
    assert deb.cache_key(tools) != deb.cache_key({**tools, "umoci": "umoci 0.4.8"})
    # the recipe is this module's text: the key of a session is the one of its build.json
    built = deb.session_debian_image()
    assert built.build["key"] == deb.cache_key(deb.tool_versions()) == built.root.name


def test_the_archives_hold_the_same_image(debian_oci: deb.DebianOciImage) -> None:
    layout = inspect("--config", f"oci:{debian_oci.layout}:1")
    for source in (
        f"docker-archive:{debian_oci.docker_archive}",
        f"oci-archive:{debian_oci.oci_archive}",
    ):
        config = inspect("--config", source)
        assert config["config"] == layout["config"], source
        assert config["rootfs"] == layout["rootfs"], source
    with tarfile.open(debian_oci.docker_archive) as archive:
        member = archive.extractfile("manifest.json")
        assert member is not None
        manifest = json.loads(member.read())
    assert manifest[0]["RepoTags"] == ["docker.io/library/deb:1"]  # skopeo names it in full
    assert len(manifest[0]["Layers"]) == deb.LAYERS


def test_the_multiarch_index_offers_amd64_and_arm64(registry: LocalRegistry) -> None:
    raw = json.loads(run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                          f"docker://{registry.host}/multi:1"]))  # fmt: skip
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = [entry["platform"] for entry in raw["manifests"]]
    assert platforms == [deb.PLATFORMS["amd64"], deb.PLATFORMS["arm64"]]
    arm = inspect("--tls-verify=false", "--override-arch", "arm64", "--override-variant", "v8",
                  "--config", f"docker://{registry.host}/multi:1")  # fmt: skip
    assert arm["architecture"] == "arm64"
    settings = arm["config"]
    assert isinstance(settings, dict)
    assert settings["Cmd"] == deb.CMD
    rootfs = arm["rootfs"]
    assert isinstance(rootfs, dict)
    assert len(rootfs["diff_ids"]) == deb.LAYERS


def test_a_second_session_finds_the_image_in_the_cache(debian_oci: deb.DebianOciImage) -> None:
    stamp = (debian_oci.root / "build.json").stat().st_mtime_ns
    again = deb.debian_oci_image()
    assert again.root == debian_oci.root
    assert (again.root / "build.json").stat().st_mtime_ns == stamp
    assert not [p for p in again.root.parent.iterdir() if p.name.startswith(".build-")]
