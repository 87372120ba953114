"""Container images made by real tools vzkit did not write (``umoci``, ``skopeo``), for the OCI
tests: built once per session under a temporary directory.

``build_oci_images(DIR)`` makes:

- ``layout``: an OCI image layout (``umoci``) with two images:
  ``v1`` (linux/amd64; two gzip layers: the first adds ``/etc/hello``, ``/etc/gone``, the
  symlink ``/etc/link -> hello`` and ``/usr/bin/tool``; the second whites out ``/etc/gone``
  and adds ``/etc/second``; a config with Env, WorkingDir, User, Entrypoint, Cmd, an exposed
  port and a label) and ``arm`` (linux/arm64 only; one layer with ``/etc/arch``);
- ``oci_archive``: ``skopeo copy oci:layout:v1 oci-archive:FILE``;
- ``docker_archive``: ``skopeo copy oci:layout:v1 docker-archive:FILE:test/img:v1``;
- ``multiarch``: a layout whose one entry, ``multi``, is an image index over ``v1``
  (linux/amd64) and ``arm`` (linux/arm64/v8), plus an attestation-like ``unknown/unknown``
  entry, as buildx writes them.

``session_oci_images(tmp_path_factory)`` gives them to any test module, built once per session.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

TOOL_TIMEOUT_S = 120
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class OciImages:
    root: Path
    layout: Path
    oci_archive: Path
    docker_archive: Path
    multiarch: Path
    v1_manifest: str  # the digest of v1's manifest in the layout
    arm_manifest: str


def run_tool(*argv: str | Path) -> str:
    """Run one of the image tools to completion (reaped; its stderr in the failure)."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def _layer(layout: Path, tag: str, bundle: Path, change: dict[str, str | None]) -> None:
    """Unpack ``tag``, apply ``change`` (path -> text, ``None`` removes it), repack: one new
    layer (umoci writes a whiteout for what was removed)."""
    if bundle.exists():
        shutil.rmtree(bundle)
    run_tool("umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", bundle)
    rootfs = bundle / "rootfs"
    for rel, text in change.items():
        path = rootfs / rel
        if text is None:
            path.unlink()
        elif text.startswith("->"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(text[2:])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    run_tool("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
    shutil.rmtree(bundle)


def _manifest_digest(layout: Path, tag: str) -> tuple[str, int]:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            return entry["digest"], entry["size"]
    raise KeyError(tag)


def _add_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def build_oci_images(root: Path) -> OciImages:
    layout = root / "layout"
    bundle = root / "bundle"
    run_tool("umoci", "init", "--layout", layout)
    run_tool("umoci", "new", "--image", f"{layout}:v1")
    _layer(
        layout,
        "v1",
        bundle,
        {
            "etc/hello": "hello from layer 1\n",
            "etc/gone": "whited out by layer 2\n",
            "etc/link": "->hello",
            "usr/bin/tool": "#!/bin/sh\necho tool\n",
        },
    )
    _layer(layout, "v1", bundle, {"etc/gone": None, "etc/second": "from layer 2\n"})
    run_tool(
        "umoci", "config", "--image", f"{layout}:v1",
        "--os", "linux", "--architecture", "amd64",
        "--config.env", "GREETING=hello", "--config.env", "PATH=/usr/bin:/bin",
        "--config.workingdir", "/srv", "--config.user", "1000:1000",
        "--config.entrypoint", "/bin/sh", "--config.cmd", "-c", "--config.cmd", "echo hi",
        "--config.exposedports", "8080/tcp", "--config.label", "org.example.test=yes",
    )  # fmt: skip
    run_tool("umoci", "new", "--image", f"{layout}:arm")
    _layer(layout, "arm", bundle, {"etc/arch": "arm64\n"})
    run_tool("umoci", "config", "--image", f"{layout}:arm", "--architecture", "arm64")
    run_tool("umoci", "gc", "--layout", layout)

    oci_archive = root / "v1.oci.tar"
    docker_archive = root / "v1.docker.tar"
    skopeo = ("skopeo", "--insecure-policy", "copy", "--quiet")
    run_tool(*skopeo, f"oci:{layout}:v1", f"oci-archive:{oci_archive}")
    run_tool(*skopeo, f"oci:{layout}:v1", f"docker-archive:{docker_archive}:test/img:v1")

    v1, v1_size = _manifest_digest(layout, "v1")
    arm, arm_size = _manifest_digest(layout, "arm")
    multiarch = root / "multiarch"
    shutil.copytree(layout, multiarch)
    nested = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d,
                "size": s,
                "platform": p,
            }
            for d, s, p in [
                (v1, v1_size, {"architecture": "amd64", "os": "linux"}),
                (arm, arm_size, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
                (v1, v1_size, {"architecture": "unknown", "os": "unknown"}),
            ]
        ],
    }
    data = json.dumps(nested).encode()
    index_digest = _add_blob(multiarch, data)
    top = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_INDEX,
                "digest": index_digest,
                "size": len(data),
                "annotations": {REF_NAME: "multi"},
            }
        ],
    }
    (multiarch / "index.json").write_text(json.dumps(top))
    return OciImages(
        root=root,
        layout=layout,
        oci_archive=oci_archive,
        docker_archive=docker_archive,
        multiarch=multiarch,
        v1_manifest=v1,
        arm_manifest=arm,
    )


_BUILT: dict[str, OciImages] = {}


def session_oci_images(tmp_path_factory: pytest.TempPathFactory) -> OciImages:
    """The images above, made once per test session whichever module asks first; a module
    uses them through a fixture of its own::

        @pytest.fixture(scope="session")
        def oci_images(tmp_path_factory: pytest.TempPathFactory) -> OciImages:
            return session_oci_images(tmp_path_factory)
    """
    if "images" not in _BUILT:
        _BUILT["images"] = build_oci_images(tmp_path_factory.mktemp("oci-images"))
    return _BUILT["images"]
