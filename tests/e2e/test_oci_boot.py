"""An OCI image's layers made into a root disk by the OCI store and booted: vzkit's kernel and
initramfs mount it and inject the agent; commands run through the agent in the image's
userland, which sees what the layers left (whiteouts applied, owners and modes kept)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import vzkit
from vzkit.image.oci._store import OciLayer, PulledLayers, convert

from ..support.oci_layout import layout_image, umoci_image
from .conftest import VMFactory
from .test_root_disks import BUSYBOX_ONLY, busybox_of

MTIME = 1_764_000_000


def member(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, mode: int = 0o644,
           uid: int = 0, gid: int = 0, kind: bytes = tarfile.REGTYPE) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    if kind == tarfile.DIRTYPE:
        tar.addfile(info)
        return
    info.size = len(data or b"")
    tar.addfile(info, io.BytesIO(data or b""))


def tar_bytes(*entries: tuple[Any, ...]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, options in entries:
            member(tar, name, data, **options)
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_an_oci_image_boots_with_whiteouts_applied(vms: VMFactory, tmp_path: Path) -> None:
    directory: dict[str, Any] = {"mode": 0o755, "kind": tarfile.DIRTYPE}
    base = tar_bytes(
        ("bin", None, directory),
        ("bin/busybox", busybox_of(vms.images["x86_64"]), {"mode": 0o755}),
        ("etc", None, directory),
        ("etc/doomed", b"lower\n", {}),
        ("etc/os-release", b"ID=layered\n", {}),
        ("opt", None, directory),
        ("opt/o", None, directory),
        ("opt/o/lower-only", b"hidden by the opaque marker\n", {}),
        ("home", None, directory),
        ("home/app", None, {"mode": 0o750, "uid": 1000, "gid": 1000, "kind": tarfile.DIRTYPE}),
    )
    top = tar_bytes(
        ("etc/.wh.doomed", b"", {}),
        ("opt/o/.wh..wh..opq", b"", {}),
        ("opt/o/upper", b"upper\n", {}),
        ("etc/top", b"from the top layer\n", {"mode": 0o640, "uid": 1234, "gid": 4321}),
        ("bin/suid", b"#!/bin/busybox sh\n", {"mode": 0o4755}),
    )
    blobs = [gzip.compress(base), top]  # one gzip layer, one plain tar
    media = [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar",
    ]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(base), sha(top)]},
    }
    pulled = PulledLayers(
        config_digest=sha(repr(config).encode()),
        config=config,
        layers=[
            OciLayer(sha(b), m, lambda b=b: io.BytesIO(b))  # type: ignore[misc]
            for b, m in zip(blobs, media, strict=True)
        ],
        refs=("localhost/layered:1",),
    )
    image = convert(pulled, cache_dir=tmp_path / "cache")
    assert image.arch == "x86_64"

    vm = vms.create(
        root_disk=vzkit.RootDisk(base=image.path, digest=image.disk_digest),
        console=vzkit.ConsoleMode.LOG,
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)

    def sh(script: str) -> list[str]:
        proc = vm.guest.run([BUSYBOX_ONLY, "sh", "-c", script], timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().splitlines()

    assert sh("ls /etc; cat /etc/top /etc/os-release") == [
        "os-release", "top", "from the top layer", "ID=layered",
    ]  # fmt: skip
    assert sh("[ -e /etc/doomed ] || echo gone; ls -a /opt/o") == ["gone", ".", "..", "upper"]
    assert sh("busybox stat -c '%n %a %u:%g' /etc/top /home/app /bin/suid /bin/busybox") == [
        "/etc/top 640 1234:4321",
        "/home/app 750 1000:1000",
        "/bin/suid 4755 0:0",
        "/bin/busybox 755 0:0",
    ]
    # whiteout files never appear in the result
    assert sh("busybox find / -xdev -name '.wh.*' -o -name upper") == ["/opt/o/upper"]
    vm.stop(timeout=30)


def test_an_image_made_by_umoci_boots(vms: VMFactory, tmp_path: Path) -> None:
    """Layers written by a real tool (umoci): the second one deletes a file (a whiteout)."""
    busybox = busybox_of(vms.images["x86_64"])

    def base(rootfs: Path) -> None:
        (rootfs / "bin").mkdir()
        (rootfs / "bin/busybox").write_bytes(busybox)
        (rootfs / "bin/busybox").chmod(0o755)
        (rootfs / "etc").mkdir()
        (rootfs / "etc/doomed").write_text("lower\n")
        (rootfs / "etc/kept").write_text("kept\n")

    def top(rootfs: Path) -> None:
        (rootfs / "etc/doomed").unlink()
        (rootfs / "etc/added").write_text("top\n")
        (rootfs / "etc/kept").chmod(0o600)

    layout = umoci_image(tmp_path, base, top)
    image = convert(layout_image(layout, ("oci:layout:t",)), cache_dir=tmp_path / "cache")
    assert len(image.layers) == 2
    vm = vms.create(root_disk=vzkit.RootDisk(base=image.path), console=vzkit.ConsoleMode.LOG)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    proc = vm.guest.run(
        [BUSYBOX_ONLY, "sh", "-c", "ls /etc; cat /etc/added; busybox stat -c %a /etc/kept"],
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["added", "kept", "top", "600"]
    vm.stop(timeout=30)
