"""OCI images in the cache: layers to an ext4 root disk once per config, references that
move, lookup, rm, prune, and nothing left by a failed conversion."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from vzkit.errors import ConfigError
from vzkit.image._download import ChecksumError
from vzkit.image.oci import _store
from vzkit.image.oci._errors import ImageFormatError
from vzkit.image.oci._store import (
    OciLayer,
    PulledLayers,
    convert,
    find_oci_image,
    list_oci_images,
    mark_used,
    oci_images_dir,
    prune_oci_images,
    remove_oci_image,
)

from .test_debian_unpack import MTIME, M
from .test_oci_layers import CAP, tar_of
from .test_rootdisk import debugfs

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LOWER = [
    M("etc", "dir"), M("etc/doomed", data=b"old"), M("etc/os-release", data=b"ID=test\n"),
    M("dev", "dir"), M("dev/null", "chr", mode=0o666, dev=(1, 3)),
    M("home", "dir"), M("home/app", "dir", mode=0o750, uid=1000, gid=1000),
    M("bin", "dir"), M("bin/ping", data=b"p", mode=0o755, xattrs={"security.capability": CAP}),
]  # fmt: skip
UPPER = [M("etc/.wh.doomed"), M("bin/su", data=b"s", mode=0o4755), M("var/lib/new", data=b"n")]


def mtime(image: Path, path: str) -> int:
    found = re.search(r"mtime: 0x([0-9a-f]+)", debugfs(image, f"stat {path}"))
    assert found, path
    return int(found.group(1), 16)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pulled(*layers: list[M], refs: tuple[str, ...] = ("docker.io/library/t:1",),
           config: dict[str, Any] | None = None, salt: str = "") -> PulledLayers:  # fmt: skip
    tars = [tar_of(members) for members in layers]
    blobs = [gzip.compress(t) for t in tars]
    body = config or {
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-11-30T12:00:00.123456789Z",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
            "WorkingDir": "/home/app",
            "User": "1000:1000",
            "Entrypoint": ["/bin/ping"],
            "Cmd": ["-c", "1"],
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
            "Labels": {"org.example": "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]},
        "salt": salt,  # another config, same layers
    }
    return PulledLayers(
        config_digest=sha(json.dumps(body, sort_keys=True).encode()),
        config=body,
        layers=[OciLayer(sha(b), GZIP, lambda b=b: io.BytesIO(b)) for b in blobs],  # type: ignore[misc]
        manifest_digest=sha(b"manifest" + salt.encode()),
        refs=refs,
    )


def test_layers_become_a_root_disk_with_the_config_kept(tmp_path: Path) -> None:
    lines: list[str] = []
    image = convert(pulled(LOWER, UPPER), cache_dir=tmp_path, progress=lines.append)
    assert image.directory == oci_images_dir(tmp_path) / image.digest.removeprefix("sha256:")
    assert stat.S_IMODE(image.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(image.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in image.directory.iterdir()) == ["image.json", "root.img"]
    assert (image.refs, image.arch, image.os) == (("docker.io/library/t:1",), "x86_64", "linux")
    assert image.env == ("PATH=/usr/bin:/bin", "LANG=C.UTF-8")
    assert (image.working_dir, image.user) == ("/home/app", "1000:1000")
    assert (image.entrypoint, image.cmd) == (("/bin/ping",), ("-c", "1"))
    assert image.exposed_ports == ("53/udp", "8080/tcp")
    assert image.labels == {"org.example": "yes"}
    assert len(image.layers) == 2
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.disk_digest)
    assert lines[0].endswith("9 entries, 0 whiteouts")
    assert lines[1].endswith("2 entries, 1 whiteouts")

    assert "doomed" not in debugfs(image.path, "ls /etc")
    assert "new" in debugfs(image.path, "ls /var/lib")
    home = debugfs(image.path, "stat /home/app")
    assert re.search(r"User:\s+1000\s+Group:\s+1000", home)
    assert "Mode:  0750" in home
    assert "Mode:  04755" in debugfs(image.path, "stat /bin/su")
    null = debugfs(image.path, "stat /dev/null")
    assert "Type: character special" in null
    assert "Mode:  0666" in null
    caps = debugfs(image.path, "ea_get -x /bin/ping security.capability")
    assert caps.split("=", 1)[1].split() == [f"{b:02x}" for b in CAP]
    # Times: the members' own; the config's created for the directories no layer names.
    assert mtime(image.path, "/var/lib/new") == MTIME
    assert mtime(image.path, "/var/lib") == 1_796_040_000  # 2026-11-30T12:00:00Z


def test_a_name_with_a_newline_keeps_root_as_owner(tmp_path: Path) -> None:
    odd = [M("etc", "dir"), M("etc/odd\nname", data=b"x", uid=5), M("etc/plain", data=b"y", uid=5)]
    image = convert(pulled(odd), cache_dir=tmp_path)
    assert re.search(r"User:\s+5\s", debugfs(image.path, "stat /etc/plain"))
    assert "odd\\x0aname" in debugfs(image.path, "ls /etc")


def test_the_second_conversion_converts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = convert(pulled(LOWER), cache_dir=tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(_store, "apply_layers", fail)
    again = convert(pulled(LOWER), cache_dir=tmp_path)
    assert again.directory == first.directory
    assert again.path.stat().st_mtime_ns == first.path.stat().st_mtime_ns
    both = convert(pulled(LOWER, refs=("localhost:5000/t:2",)), cache_dir=tmp_path)
    assert both.refs == ("localhost:5000/t:2", "docker.io/library/t:1")  # the newest first


def test_references_move_and_prune_removes_what_none_names(tmp_path: Path) -> None:
    old = convert(pulled(LOWER, refs=("r:1",)), cache_dir=tmp_path)
    new = convert(pulled(LOWER, refs=("r:1", "r:latest"), salt="v2"), cache_dir=tmp_path)
    assert new.digest != old.digest
    assert find_oci_image("r:1", cache_dir=tmp_path) == new
    stale = {i.digest: i for i in list_oci_images(cache_dir=tmp_path)}[old.digest]
    assert stale.refs == ()
    (oci_images_dir(tmp_path) / ".build-leftover").mkdir()
    assert [i.digest for i in prune_oci_images(cache_dir=tmp_path)] == [old.digest]
    assert [i.digest for i in list_oci_images(cache_dir=tmp_path)] == [new.digest]
    assert not (oci_images_dir(tmp_path) / ".build-leftover").exists()


def test_lookup_by_reference_or_digest_and_removal(tmp_path: Path) -> None:
    image = convert(pulled(LOWER), cache_dir=tmp_path)
    assert find_oci_image(image.digest, cache_dir=tmp_path) == image
    assert len({image, image}) == 1  # hashable, labels and all
    assert find_oci_image(image.short_digest[:8], cache_dir=tmp_path) == image
    assert find_oci_image("docker.io/library/t:1", cache_dir=tmp_path) == image
    assert find_oci_image("t:2", cache_dir=tmp_path) is None
    mark_used(image)
    used = find_oci_image(image.digest, cache_dir=tmp_path)
    assert used is not None
    assert used.last_used >= image.created
    assert prune_oci_images(unused_days=1, cache_dir=tmp_path, now=used.last_used + 3600) == []
    remove_oci_image(image, cache_dir=tmp_path)
    assert list_oci_images(cache_dir=tmp_path) == []


def test_a_digest_prefix_naming_two_images_is_refused(tmp_path: Path) -> None:
    a = pulled(LOWER, refs=())
    b = pulled(LOWER, refs=(), salt="b")
    same = "sha256:abcdef" + "0" * 57
    for n, item in enumerate((a, b)):
        digest = same + str(n)
        convert(PulledLayers(config_digest=digest, config=item.config, layers=item.layers),
                cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(ConfigError, match="names 2 images: give more digits"):
        find_oci_image("abcdef", cache_dir=tmp_path)


def test_a_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    good = pulled(LOWER)
    config = json.loads(json.dumps(good.config))
    config["rootfs"]["diff_ids"] = [sha(b"another layer")]
    with pytest.raises(ChecksumError, match="its uncompressed content has digest"):
        convert(PulledLayers(config_digest=good.config_digest, config=config,
                             layers=good.layers), cache_dir=tmp_path)  # fmt: skip
    left = sorted(p.name for p in oci_images_dir(tmp_path).iterdir())
    assert left == [".lock", ".lock-x86_64"]  # the store's and the arch's lock files only


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["rootfs"].update(diff_ids=[]), "names 0 layers .rootfs.diff_ids., the"),
        (lambda c: c["rootfs"].update(diff_ids=["md5:x"]), "must be a list of sha256 digests"),
        (lambda c: c["config"].update(Env="A=1"), "Env must be a list of strings"),
        (lambda c: c["config"].update(Cmd=[1]), "Cmd must be a list of strings"),
        (lambda c: c["config"].update(Labels={"a": 1}), "Labels must map strings"),
        (lambda c: c.update(config=[]), "'config' must be an object"),
        (lambda c: c["config"].update(ExposedPorts=[]), "ExposedPorts and Labels must be"),
    ],
)
def test_bad_configs_are_format_errors(tmp_path: Path, change: Any, message: str) -> None:
    good = pulled(LOWER)
    config = json.loads(json.dumps(good.config))
    change(config)
    with pytest.raises(ImageFormatError, match=message):
        convert(PulledLayers(config_digest=good.config_digest, config=config,
                             layers=good.layers), cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(ImageFormatError, match="is not sha256:<64 hex>"):
        convert(PulledLayers(config_digest="sha256:12", config=good.config, layers=good.layers),
                cache_dir=tmp_path)  # fmt: skip


def test_a_tag_names_one_image_per_arch_and_arches_convert_beside_each_other(
    tmp_path: Path,
) -> None:
    """The same tag pulled for amd64 and arm64: two images, each keeping the tag; an arm64
    conversion goes ahead while an x86_64 converter holds its lock."""
    import threading

    from vzkit.image._entries import store_lock

    amd = pulled(LOWER, refs=("docker://r/t:1",))
    arm_config = json.loads(json.dumps(amd.config))
    arm_config["architecture"] = "arm64"
    arm = PulledLayers(config_digest=sha(json.dumps(arm_config, sort_keys=True).encode()),
                       config=arm_config, layers=amd.layers, refs=("docker://r/t:1",))  # fmt: skip
    done: list[Any] = []
    with store_lock(oci_images_dir(tmp_path), builder="x86_64"):
        worker = threading.Thread(target=lambda: done.append(convert(arm, cache_dir=tmp_path)))
        worker.start()
        worker.join(20)
    assert done, "the arm64 conversion waited for the x86_64 converter's lock"
    convert(amd, cache_dir=tmp_path)
    for arch in ("x86_64", "aarch64"):
        image = find_oci_image("docker://r/t:1", arch=arch, cache_dir=tmp_path)
        assert image is not None
        assert image.arch == arch
        assert image.refs == ("docker://r/t:1",)
