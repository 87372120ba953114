"""A real Debian container image made by tools vzkit did not write, cached between sessions.

The recipe (as root; the network must reach ``deb.debian.org``):

- layer 1: ``mmdebstrap --variant=minbase --arch=amd64 bookworm ROOTFS.tar MIRROR``, added
  verbatim with ``umoci raw add-layer``;
- layer 2: ``umoci unpack`` + changes + ``umoci repack`` (umoci writes the whiteouts): removes
  the file ``/etc/issue.net`` and the directory ``/usr/share/lintian`` (``.wh.issue.net``,
  ``.wh.lintian``), adds the user ``app`` (uid/gid 1000, home ``/home/app``, by ``useradd
  --root``), the directory ``/srv/app`` (``app``, 0750) and ``/srv/app/hello.txt``;
- layer 3: an opaque directory. umoci never writes ``.wh..wh..opq`` (it whites out each entry
  it sees removed, as layer 2 shows for a directory emptied), so this layer is a GNU ``tar``
  of ``etc/cron.daily/.wh..wh..opq`` plus ``etc/cron.daily/only-this``, added with ``umoci raw
  add-layer``: in the image ``/etc/cron.daily`` holds only ``only-this`` (layer 1 put
  ``apt-compat`` and ``dpkg`` there);
- the config by ``umoci config``: Env ``PATH=...`` and ``GREETING=hello-from-the-image``,
  WorkingDir ``/srv/app``, User ``app``, Cmd ``sh -c 'echo "$GREETING"; pwd; id -un'``
  (prints :data:`CMD_OUTPUT`), tag ``1``.

The same for arm64 under the tag ``1-arm64``, except that mmdebstrap cannot run arm64
maintainer scripts here without qemu-user, so its layer 1 is ``--variant=extract`` of the
Essential and ``required`` packages: unpacked, never configured (layer 2 also adds what their
scripts would: ``/bin/sh -> dash``, ``/etc/passwd`` and ``/etc/group`` from base-passwd).
It serves multi-arch and platform-choice tests; it has not been booted. ``multi`` is an OCI
index over both (amd64, arm64/v8), hand-written as buildx would (umoci makes no indexes).

Then ``skopeo copy`` of ``1`` into ``docker-archive:`` (named ``deb:1``) and ``oci-archive:``.

The result lives under ``$XDG_CACHE_HOME/vzkit-tests/oci-debian/<key>/`` (``~/.cache`` by
default) where the key hashes this file (the recipe), the versions of mmdebstrap, umoci and
skopeo, the suite and the mirror: a clean clone builds it once (about a minute), a re-run
finds it. A build runs in a temporary directory under a lock and is renamed into place when
complete, so a killed build leaves nothing that looks finished; leftovers of killed builds
and entries of older keys are removed by the next build.

Tests use it through :func:`session_debian_image` (once per session)::

    @pytest.fixture(scope="session")
    def debian_oci() -> DebianOciImage:
        return session_debian_image()

    def test_x(debian_oci: DebianOciImage) -> None:
        with local_registry() as reg:
            debian_oci.push(reg, "deb:1")  # docker://{reg.host}/deb:1, plain HTTP
            ...  # run CMD, expect CMD_OUTPUT; run GUEST_CHECK, expect GUEST_CHECK_OUTPUT

``deb-1.docker.tar`` holds uncompressed layers, named ``docker.io/library/deb:1`` by skopeo.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.registry import LocalRegistry, add_index

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ARCHES = ("amd64", "arm64")
TAGS = {"amd64": "1", "arm64": "1-arm64"}
INDEX_TAG = "multi"
PLATFORMS = {
    "amd64": {"architecture": "amd64", "os": "linux"},
    "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
}

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GREETING = "hello-from-the-image"
WORKDIR = "/srv/app"
USER = "app"
UID = 1000
CMD = ["sh", "-c", 'echo "$GREETING"; pwd; id -un']
CMD_OUTPUT = f"{GREETING}\n{WORKDIR}\n{USER}\n"
HELLO = "/srv/app/hello.txt"
HELLO_TEXT = "a file of the Debian test image\n"
WHITED_OUT = ("/etc/issue.net", "/usr/share/lintian")  # in layer 1, whited out by layer 2
OPAQUE_DIR = "/etc/cron.daily"  # made opaque by layer 3
OPAQUE_KEEPS = ("only-this",)  # all that is left in it
LAYERS = 3
# A command for a booted guest (any user) that shows what the layers left: nothing of
# WHITED_OUT, only OPAQUE_KEEPS in OPAQUE_DIR, layer 2's file, Debian's codename.
GUEST_CHECK = (
    f"for p in {' '.join(WHITED_OUT)}; do test -e $p && echo still-there $p; done; "
    f"ls -A {OPAQUE_DIR}; cat {HELLO}; . /etc/os-release; echo $VERSION_CODENAME"
)
GUEST_CHECK_OUTPUT = "".join(f"{name}\n" for name in OPAQUE_KEEPS) + HELLO_TEXT + "bookworm\n"

MMDEBSTRAP_TIMEOUT_S = 900
TOOL_TIMEOUT_S = 300


@dataclass(frozen=True)
class DebianOciImage:
    root: Path  # the cache entry
    layout: Path  # OCI layout: tags "1" (amd64), "1-arm64", "multi" (index)
    docker_archive: Path  # ``skopeo copy oci:layout:1 docker-archive:FILE:deb:1``
    oci_archive: Path  # ``skopeo copy oci:layout:1 oci-archive:FILE``
    build: dict[str, object]  # build.json: key, tools, seconds per step, sizes

    def push(self, registry: LocalRegistry, dest: str = "deb:1", *, tag: str = "1") -> None:
        """``skopeo copy oci:LAYOUT:TAG docker://REGISTRY/DEST`` (the whole index for
        ``tag="multi"``)."""
        registry.push(f"oci:{self.layout}:{tag}", dest, all_images=tag == INDEX_TAG)

    def manifest(self, tag: str = "1") -> dict[str, object]:
        """The image manifest of ``tag`` in the layout."""
        return dict(json.loads(self.blob(self.manifest_digest(tag))))

    def manifest_digest(self, tag: str = "1") -> str:
        index = json.loads((self.layout / "index.json").read_text())
        for entry in index["manifests"]:
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return str(entry["digest"])
        raise KeyError(tag)

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def run(argv: list[str | Path], *, timeout: float = TOOL_TIMEOUT_S, cwd: Path | None = None) -> str:
    """Run a tool to completion (reaped); its stdout, or an error with what it said."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=cwd, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def cache_base() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vzkit-tests" / "oci-debian"


def tool_versions() -> dict[str, str]:
    return {
        "mmdebstrap": run(["mmdebstrap", "--version"]).strip(),
        "umoci": run(["umoci", "--version"]).strip(),
        "skopeo": run(["skopeo", "--version"]).strip(),
        "tar": run(["tar", "--version"]).splitlines()[0],
    }


def cache_key(tools: dict[str, str]) -> str:
    recipe = Path(__file__).read_bytes()
    inputs = json.dumps({"tools": tools, "suite": SUITE, "mirror": MIRROR, "arches": ARCHES})
    return hashlib.sha256(recipe + inputs.encode()).hexdigest()[:20]


def debian_oci_image() -> DebianOciImage:
    """The image, from the cache or built now (as root; minutes on a clean machine)."""
    if os.geteuid() != 0:
        raise RuntimeError(
            "the Debian OCI test image is built as root (mmdebstrap's root mode, umoci "
            "unpack keeping owners): run the suite as root, or build it once as root"
        )
    tools = tool_versions()
    key = cache_key(tools)
    base = cache_base()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = base / key
    if not (entry / "build.json").exists():
        with _locked(base / ".lock"):
            if not (entry / "build.json").exists():
                _clean(base)
                work = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
                try:
                    _build(work, key, tools)
                    work.rename(entry)
                except BaseException:
                    shutil.rmtree(work, ignore_errors=True)
                    raise
    return _entry(entry)


def _entry(entry: Path) -> DebianOciImage:
    return DebianOciImage(
        root=entry,
        layout=entry / "layout",
        docker_archive=entry / "deb-1.docker.tar",
        oci_archive=entry / "deb-1.oci.tar",
        build=json.loads((entry / "build.json").read_text()),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between sessions (two suites on one machine build once)."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clean(base: Path) -> None:
    """Under the lock: remove leftovers of killed builds and entries of other keys."""
    for child in base.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)


def _build(work: Path, key: str, tools: dict[str, str]) -> None:
    t_start = time.monotonic()
    seconds: dict[str, float] = {}
    layout = work / "layout"
    run(["umoci", "init", "--layout", layout])
    for arch in ARCHES:
        tag = TAGS[arch]
        rootfs_tar = work / f"rootfs-{arch}.tar"
        t0 = time.monotonic()
        _mmdebstrap(arch, rootfs_tar)
        seconds[f"mmdebstrap {arch}"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        run(["umoci", "new", "--image", f"{layout}:{tag}"])
        run([
            "umoci", "raw", "add-layer", "--image", f"{layout}:{tag}",
            "--history.created_by", f"mmdebstrap --variant={_variant(arch)} {SUITE}",
            rootfs_tar,
        ])  # fmt: skip
        rootfs_tar.unlink()
        _layer2(layout, tag, arch, work / "bundle")
        _layer3(layout, tag, work / "opaque")
        _config(layout, tag, arch)
        seconds[f"umoci {arch}"] = round(time.monotonic() - t0, 1)
    add_index(layout, INDEX_TAG, {TAGS[arch]: PLATFORMS[arch] for arch in ARCHES})
    run(["umoci", "gc", "--layout", layout])
    t0 = time.monotonic()
    skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet"]
    run([*skopeo, f"oci:{layout}:1", f"docker-archive:{work / 'deb-1.docker.tar'}:deb:1"])
    run([*skopeo, f"oci:{layout}:1", f"oci-archive:{work / 'deb-1.oci.tar'}"])
    seconds["skopeo archives"] = round(time.monotonic() - t0, 1)
    seconds["total"] = round(time.monotonic() - t_start, 1)
    sizes = {name: (work / name).stat().st_size for name in ("deb-1.docker.tar", "deb-1.oci.tar")}
    sizes["layout"] = sum(p.stat().st_size for p in layout.rglob("*") if p.is_file())
    build = {"key": key, "tools": tools, "suite": SUITE, "seconds": seconds, "bytes": sizes}
    (work / "build.json").write_text(json.dumps(build, indent=2) + "\n")


def _variant(arch: str) -> str:
    return "minbase" if arch == "amd64" else "extract"


def _mmdebstrap(arch: str, out: Path) -> None:
    argv: list[str | Path] = ["mmdebstrap", "--quiet", f"--variant={_variant(arch)}"]
    if arch != "amd64":  # no maintainer scripts cross-arch: unpack Essential + required only
        argv.append("--include=?or(?essential,?priority(required))")
    run([*argv, f"--arch={arch}", SUITE, out, MIRROR], timeout=MMDEBSTRAP_TIMEOUT_S)


def _layer2(layout: Path, tag: str, arch: str, bundle: Path) -> None:
    """Unpack, change, repack: whiteouts of a file and a directory, the user ``app``."""
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", bundle])
    rootfs = bundle / "rootfs"
    if arch != "amd64":  # what the unconfigured packages' scripts would have made
        if not (rootfs / "bin" / "sh").is_symlink():
            (rootfs / "bin" / "sh").symlink_to("dash")
        for name in ("passwd", "group"):
            master = rootfs / "usr" / "share" / "base-passwd" / f"{name}.master"
            shutil.copyfile(master, rootfs / "etc" / name)
    for path in WHITED_OUT:
        target = rootfs / path.lstrip("/")
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    run([
        "useradd", "--root", rootfs, "--create-home", "--uid", str(UID), "--user-group",
        "--shell", "/bin/sh", USER,
    ])  # fmt: skip
    app = rootfs / WORKDIR.lstrip("/")
    app.parent.mkdir(mode=0o755, exist_ok=True)  # arm64's unconfigured tree has no /srv
    app.mkdir(mode=0o750)
    (app / "hello.txt").write_text(HELLO_TEXT)
    for path in (app, app / "hello.txt"):
        os.chown(path, UID, UID)
    app.chmod(0o750)
    run(["umoci", "repack", "--image", f"{layout}:{tag}", "--history.created_by",
         "umoci repack: whiteouts, useradd app, /srv/app", bundle])  # fmt: skip
    shutil.rmtree(bundle)


def _layer3(layout: Path, tag: str, work: Path) -> None:
    """A layer that makes ``OPAQUE_DIR`` opaque (GNU tar; umoci cannot write one)."""
    tree = work / "tree"
    opaque = tree / OPAQUE_DIR.lstrip("/")
    opaque.mkdir(parents=True)
    (opaque / ".wh..wh..opq").write_bytes(b"")
    for name in OPAQUE_KEEPS:
        (opaque / name).write_text("the only entry left after the opaque whiteout\n")
    for path in (tree, *(p for p in tree.rglob("*") if p.is_dir())):
        path.chmod(0o755)
    layer = work / "layer.tar"
    rel = OPAQUE_DIR.lstrip("/")
    run([
        "tar", "--create", "--file", layer, "--numeric-owner", "--owner=0", "--group=0",
        "--sort=name", "--directory", tree, "--no-recursion", rel.split("/")[0],
        "--recursion", rel,
    ])  # fmt: skip
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}",
         "--history.created_by", f"tar: {OPAQUE_DIR}/.wh..wh..opq", layer])  # fmt: skip
    shutil.rmtree(work)


def _config(layout: Path, tag: str, arch: str) -> None:
    """The config (umoci 0.4 has no ``--variant``: the index carries arm64's ``v8``)."""
    argv: list[str | Path] = [
        "umoci", "config", "--image", f"{layout}:{tag}", "--os", "linux",
        "--architecture", arch, "--config.env", PATH_ENV,
        "--config.env", f"GREETING={GREETING}", "--config.workingdir", WORKDIR,
        "--config.user", USER,
    ]  # fmt: skip
    for part in CMD:
        argv += ["--config.cmd", part]
    run(argv)


_BUILT: dict[str, DebianOciImage] = {}


def session_debian_image() -> DebianOciImage:
    """:func:`debian_oci_image`, once per session whichever module asks first; skipped (with
    the reason) when not root."""
    if "image" not in _BUILT:
        if os.geteuid() != 0:
            pytest.skip("the Debian OCI test image is built as root")
        _BUILT["image"] = debian_oci_image()
    return _BUILT["image"]
