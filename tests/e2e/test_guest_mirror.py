"""The default image built from deb.debian.org by the mirror client (no apt) is byte-identical
to the one built from ``apt-get download``: same packages, same kernel, same initramfs.

Needs the network to reach the Debian mirrors (and apt on the host for the comparison).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from vzkit._cache import user_cache_dir
from vzkit.cli import main
from vzkit.image import DebPackage, GuestImage
from vzkit.image._image import default_image, image_trust, list_images

ARCH = "x86_64"


def _cache(root: Path) -> Path:
    """A fresh cache that shares only zig's compiler cache with the user's (speed)."""
    root.mkdir()
    zig = user_cache_dir() / "zig"
    zig.mkdir(parents=True, exist_ok=True)
    (root / "zig").symlink_to(zig)
    return root


def _debs(cache: Path) -> dict[str, str]:
    return {
        DebPackage(p).name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((cache / "debs" / ARCH).glob("*.deb"))
    }


def _same(a: GuestImage, b: GuestImage) -> None:
    assert a.kernel_version == b.kernel_version
    assert a.kernel.read_bytes() == b.kernel.read_bytes()
    assert a.initrd.read_bytes() == b.initrd.read_bytes()
    assert a.kernel.parent.name == b.kernel.parent.name  # same content key


def test_mirror_image_is_byte_identical_to_the_apt_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("VZKIT_DEB_SOURCE", "VZKIT_DEBIAN_MIRROR", "VZKIT_DEBIAN_SECURITY_MIRROR"):
        monkeypatch.delenv(var, raising=False)
    mirror_cache = _cache(tmp_path / "mirror")
    result = CliRunner().invoke(
        main,
        ["image", "build", "--arch", ARCH, "--mirror", "https://deb.debian.org/debian"],
        env={"VZKIT_CACHE_DIR": str(mirror_cache), "VZKIT_PROGRESS": "0"},
    )
    assert result.exit_code == 0, result.output
    [(mirror_dir, via_mirror)] = list_images(mirror_cache)
    # gpgv and debian-archive-keyring are installed here: the Release signatures were checked
    assert "trust   verified" in result.stdout
    assert image_trust(mirror_dir) == "verified"
    assert "NOT signature-checked" not in result.stderr
    mirror_debs = _debs(mirror_cache)
    kernels = [name for name in mirror_debs if name.startswith("linux-image-6")]
    assert sorted(mirror_debs) == ["busybox-static", *kernels, "linux-image-cloud-amd64"]
    assert len(kernels) == 1
    assert via_mirror.kernel_version in kernels[0]
    # bookworm, bookworm-updates and bookworm-security indexes, verified and kept by hash
    assert len(list((mirror_cache / "debs" / ARCH / ".mirror").glob("*.xz"))) == 3
    assert not list(mirror_cache.rglob("*.part"))

    apt_cache = _cache(tmp_path / "apt")
    via_apt = default_image(ARCH, cache_dir=apt_cache, source="apt")
    assert image_trust(via_apt.kernel.parent) == "apt"
    if _debs(apt_cache) == mirror_debs:
        _same(via_mirror, via_apt)
    else:  # apt's lists and the mirror disagree on versions: compare with the same .debs
        reference = default_image(
            ARCH, cache_dir=_cache(tmp_path / "debdir"), deb_dir=mirror_cache / "debs" / ARCH
        )
        _same(via_mirror, reference)
