"""Debian images in the cache, without a VM: the inputs key, lookups by reference and digest,
last use, rm and prune, the CLI over them, a cache hit that builds nothing, and failed or
interrupted builds that leave nothing behind. (tests/e2e/test_debian_image.py builds one.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner, Result

import vzkit._imagebuild as imagebuild
from vzkit.cli import main
from vzkit.cli._run import run_config
from vzkit.errors import ConfigError, GuestError, SpecError
from vzkit.image._debian import ResolvedDebian
from vzkit.image._debian_image import (
    commit_debian_image,
    debian_images_dir,
    debian_images_lock,
    find_debian_image,
    inputs_key,
    list_debian_images,
    mark_used,
    normal_packages,
    prune_debian_images,
    remove_debian_image,
)
from vzkit.image._debian_resolve import Resolution
from vzkit.image._mirror import DebianSource, PackageRecord

DAY = 86400.0


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("VZKIT_CACHE_DIR", str(path))
    return path


def record(name: str, sha: str = "ab") -> PackageRecord:
    return PackageRecord(
        name=name, version="1.0", architecture="amd64", filename=f"pool/{name}_1.0_amd64.deb",
        size=10, sha256=sha * 32, depends="", base_url="http://deb.example/debian",
    )  # fmt: skip


def resolved(*records: PackageRecord, suite: str = "bookworm") -> ResolvedDebian:
    source = DebianSource(url="http://deb.example/debian", suite=suite)
    resolution = Resolution(packages=(), reasons={}, core=frozenset({"libc6"}))
    return ResolvedDebian(suite, "amd64", (source,), None, resolution, records)  # type: ignore[arg-type]


def fake_image(
    cache: Path,
    digest: str,
    *,
    packages: tuple[str, ...] = (),
    arch: str = "x86_64",
    created: float = 1_000_000.0,
    inputs: str = "",
) -> Path:
    """A cache entry as a build commits it (a small sparse root.img)."""
    root = debian_images_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".build-{digest[:8]}"
    work.mkdir()
    with open(work / "root.img", "wb") as fh:
        fh.truncate(64 << 20)
    (work / "manifest.json").write_text(json.dumps({"packages": [
        {"name": "libc6", "version": "2.36-9"}, {"name": "python3", "version": "3.11.2-1"},
    ]}))  # fmt: skip
    info = {
        "ref": "debian:bookworm", "suite": "bookworm", "arch": arch, "packages": list(packages),
        "package_count": 2, "digest": f"sha256:{digest}", "inputs": inputs or digest,
        "build_s": 300.0, "created": created,
    }  # fmt: skip
    return commit_debian_image(work, root, info).directory


def _used(directory: Path, when: float) -> None:
    (directory / "last-used").touch()
    os.utime(directory / "last-used", (when, when))


def test_the_inputs_key_follows_every_input() -> None:
    base = inputs_key(resolved(record("libc6"), record("python3")), ())
    assert base == inputs_key(resolved(record("libc6"), record("python3")), ())
    assert base != inputs_key(resolved(record("libc6"), record("python3", "cd")), ())
    assert base != inputs_key(resolved(record("libc6"), record("python3")), ("jq",))
    assert base != inputs_key(resolved(record("libc6")), ())
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        assert base != inputs_key(resolved(record("libc6"), record("python3")), ())
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]


def test_package_names_are_sorted_unique_and_checked() -> None:
    assert normal_packages(["jq", " curl", "jq", ""]) == ("curl", "jq")
    with pytest.raises(ConfigError, match="not a Debian package name: 'Bad;rm'"):
        normal_packages(["Bad;rm"])


def test_an_entry_is_found_by_reference_packages_arch_and_digest(cache: Path) -> None:
    plain = fake_image(cache, "a1" * 32, created=1.0)
    newer = fake_image(cache, "a2" * 32, created=2.0)
    with_jq = fake_image(cache, "b1" * 32, packages=("jq",))
    arm = fake_image(cache, "c1" * 32, arch="aarch64")
    assert (plain / "root.img").stat().st_mode & 0o777 == 0o600
    found = find_debian_image("debian", arch="x86_64", cache_dir=cache)
    assert found is not None
    assert found.directory == newer
    on_arm = find_debian_image("debian:bookworm", arch="aarch64", cache_dir=cache)
    assert on_arm is not None
    assert on_arm.directory == arm
    jq = find_debian_image("debian", packages=["jq"], cache_dir=cache)
    assert jq is not None
    assert jq.directory == with_jq
    assert jq.name == "debian:bookworm+jq"
    assert find_debian_image("debian", packages=["curl"], cache_dir=cache) is None
    named = find_debian_image("debian:bookworm+jq", arch="x86_64", cache_dir=cache)
    assert named is not None
    assert named.directory == with_jq  # the name image list shows
    by_digest = find_debian_image("sha256:b1b1b1", cache_dir=cache)
    assert by_digest is not None
    assert by_digest.directory == with_jq
    by_prefix = find_debian_image("a1a1a1a1", cache_dir=cache)
    assert by_prefix is not None
    assert by_prefix.directory == plain
    assert find_debian_image("ffffff", cache_dir=cache) is None


def test_an_ambiguous_digest_is_refused(cache: Path) -> None:
    fake_image(cache, "abcdef01" * 8)
    fake_image(cache, "abcdef02" * 8)
    with pytest.raises(ConfigError, match="names 2 images: give more digits"):
        find_debian_image("sha256:abcdef", cache_dir=cache)
    found = find_debian_image("abcdef02", cache_dir=cache)
    assert found is not None
    assert found.digest == "sha256:" + "abcdef02" * 8
    with pytest.raises(SpecError, match="not a Debian image reference"):
        find_debian_image("abc", cache_dir=cache)  # too short for a digest


def test_last_use_orders_the_list_and_prune_drops_the_stale(cache: Path) -> None:
    old = fake_image(cache, "a1" * 32, created=1.0)
    new = fake_image(cache, "a2" * 32, created=2.0)
    jq = fake_image(cache, "b1" * 32, packages=("jq",), created=1.5)
    now = 100 * DAY
    _used(old, now - 30 * DAY)
    _used(new, now - 1 * DAY)
    _used(jq, now - 10 * DAY)
    assert [i.directory for i in list_debian_images(cache)] == [new, jq, old]
    found = find_debian_image("debian", packages=["jq"], cache_dir=cache)
    assert found is not None
    mark_used(found)
    assert list_debian_images(cache)[0].directory == jq
    (debian_images_dir(cache) / ".build-interrupted").mkdir()
    # default: what a newer build of the same image replaced, and build leftovers
    assert [i.directory for i in prune_debian_images(cache_dir=cache)] == [old]
    assert not (debian_images_dir(cache) / ".build-interrupted").exists()
    assert [i.directory for i in prune_debian_images(unused_days=5, cache_dir=cache, now=now)] == []
    gone = prune_debian_images(unused_days=0.5, cache_dir=cache, now=now + DAY)
    assert [i.directory for i in gone] == [new]
    assert [i.directory for i in list_debian_images(cache)] == [jq]
    remove_debian_image(list_debian_images(cache)[0], cache)
    assert list_debian_images(cache) == []


def _no_network(monkeypatch: pytest.MonkeyPatch, result: ResolvedDebian) -> list[str]:
    """``resolve_debian`` answers ``result``; returns the log of the build steps that ran."""
    steps: list[str] = []
    monkeypatch.setattr(imagebuild, "resolve_debian", lambda **kw: result)

    def prepare(dest: Path, **kw: Any) -> Any:
        steps.append("prepare")
        (Path(dest) / "tree" / "etc").mkdir(parents=True)  # half a tree, then the failure
        raise GuestError("unpack failed: disk full")

    monkeypatch.setattr(imagebuild, "prepare_debian_tree", prepare)
    return steps


def test_a_second_build_of_the_same_inputs_builds_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = resolved(record("libc6"), record("jq"))
    steps = _no_network(monkeypatch, packages)
    entry = fake_image(cache, "d1" * 32, packages=("jq",), inputs=inputs_key(packages, ("jq",)))
    found = imagebuild.build_debian_image("debian", arch="x86_64", packages=["jq"])
    assert found.directory == entry
    assert steps == []  # no download, no unpack, no VM
    with pytest.raises(GuestError, match="disk full"):  # other packages: a real build
        imagebuild.build_debian_image("debian", arch="x86_64", packages=["curl"])
    assert steps == ["prepare"]


@pytest.mark.parametrize("fault", [GuestError("dpkg failed"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_build_leaves_nothing_in_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    """Up to the VM for real (tree, ext4 disk); the second stage then fails or is cut off."""
    tree_made: list[Path] = []

    def prepare(dest: Path, **kw: Any) -> Any:
        from vzkit.image._debian import PreparedTree

        tree = Path(dest) / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc/os-release").write_text("ID=debian\n")
        (Path(dest) / "manifest.json").write_text("{}")
        tree_made.append(tree)
        manifest = type("M", (), {"digest": "e1" * 32, "packages": (), "trust": "verified"})
        return PreparedTree(tree, {}, manifest)  # type: ignore[arg-type]

    def second_stage(disk: Path, *args: Any) -> None:
        assert disk.stat().st_size >= imagebuild.MIN_DEBIAN_DISK
        assert disk.stat().st_mode & 0o777 == 0o600
        assert disk.parent.parent == debian_images_dir(cache)  # same file system as the cache
        raise fault

    monkeypatch.setattr(imagebuild, "resolve_debian", lambda **kw: resolved(record("libc6")))
    monkeypatch.setattr(imagebuild, "prepare_debian_tree", prepare)
    monkeypatch.setattr(imagebuild, "_second_stage", second_stage)
    with pytest.raises(type(fault)):
        imagebuild.build_debian_image("debian", arch="x86_64")
    assert tree_made
    assert sorted(p.name for p in debian_images_dir(cache).iterdir()) == [".lock", ".lock-x86_64"]
    assert list_debian_images(cache) == []


def test_builders_of_two_arches_run_beside_each_other_and_a_remover_waits_for_both(
    tmp_path: Path,
) -> None:
    """While an x86_64 build holds its lock, an aarch64 builder gets in; a second x86_64
    builder and a remover (which deletes build directories) wait until it is released."""
    import threading

    entered = {name: threading.Event() for name in ("aarch64", "x86_64 again", "remover")}

    def take(name: str, arch: str | None) -> None:
        with debian_images_lock(tmp_path, arch=arch):
            entered[name].set()

    threads = [
        threading.Thread(target=take, args=("aarch64", "aarch64")),
        threading.Thread(target=take, args=("x86_64 again", "x86_64")),
        threading.Thread(target=take, args=("remover", None)),
    ]
    with debian_images_lock(tmp_path, arch="x86_64"):
        for t in threads:
            t.start()
        assert entered["aarch64"].wait(10)
        # The two that must wait: given time to get in wrongly (0.3 s is ample for a lock
        # that is free), they have not.
        assert not entered["x86_64 again"].wait(0.3)
        assert not entered["remover"].is_set()
    for t in threads:
        t.join(10)
    assert all(e.is_set() for e in entered.values())


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="vzkit")


def test_cli_lists_inspects_removes_and_prunes_debian_images(cache: Path) -> None:
    old = fake_image(cache, "a1" * 32, created=1.0)
    fake_image(cache, "a2" * 32, created=2.0)
    fake_image(cache, "b1" * 32, packages=("jq",), created=3.0)
    listed = run("image", "list")
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["IMAGE", "ARCH", "DIGEST", "SIZE", "ON", "DISK", "USED"]
    assert [r.split()[:4] for r in rows] == [
        ["debian:bookworm+jq", "x86_64", "b1" * 6, "64.0MiB"],
        ["debian:bookworm", "x86_64", "a2" * 6, "64.0MiB"],
        ["debian:bookworm", "x86_64", "a1" * 6, "64.0MiB"],
    ]
    entries = json.loads(run("image", "list", "--json").stdout)
    assert [(e["kind"], e["name"], e["digest"][7:9]) for e in entries] == [
        ("debian", "debian:bookworm+jq", "b1"), ("debian", "debian:bookworm", "a2"),
        ("debian", "debian:bookworm", "a1"),
    ]  # fmt: skip
    assert entries[0]["size"] == 64 << 20
    assert entries[0]["packages"] == ["jq"]
    inspected = json.loads(run("image", "inspect", "debian+jq", "--json").stdout)
    assert inspected["digest"] == "sha256:" + "b1" * 32
    assert inspected["installed"] == ["libc6=2.36-9", "python3=3.11.2-1"]
    other_arch = run("image", "inspect", "debian", "--arch", "aarch64")
    assert other_arch.exit_code == 2
    assert "no cached image 'debian'" in other_arch.stderr
    text = run("image", "inspect", "a2a2a2")
    assert text.exit_code == 0
    assert "sha256:" + "a2" * 32 in text.stdout
    missing = run("image", "inspect", "debian+curl")
    assert missing.exit_code == 2
    assert "no cached image 'debian+curl'" in missing.stderr
    dry = json.loads(run("image", "prune", "--json", "--unused-days", "36500").stdout)
    assert dry == {"removed": [], "freed_bytes": 0}
    pruned = run("image", "prune")
    assert (
        pruned.stdout
        == f"removed debian:bookworm (x86_64, {'a1' * 6})\n1 image(s) removed, 0 B freed\n"
    )
    assert not old.exists()
    removed = run("image", "rm", "debian:bookworm+jq", "default")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == f"removed debian:bookworm+jq (x86_64, {'b1' * 6})\n"
    assert [i.name for i in list_debian_images(cache)] == ["debian:bookworm"]
    pruned_json = json.loads(run("image", "prune", "--unused-days", "0", "--json").stdout)
    assert [i["name"] for i in pruned_json["removed"]] == ["debian:bookworm"]
    fake_image(cache, "c1" * 32)
    removed_json = json.loads(run("image", "rm", "c1c1c1", "--json").stdout)
    assert removed_json == {"removed": [f"debian:bookworm (x86_64, {'c1' * 6})"]}
    assert run("image", "list").stdout == "no images (vzkit image build makes one)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["debian", "--deb-dir", "."], "--deb-dir, --source and --refresh are for the default"),
        (["debian", "--refresh"], "--deb-dir, --source and --refresh are for the default"),
        (["--packages", "jq"], "--packages is for Debian images"),
        (["ubuntu"], "not a Debian image reference: 'ubuntu'"),
        (["debian:sid"], "unsupported Debian suite 'sid'"),
        (["debian", "--packages", "jq,Bad;x"], "not a Debian package name: 'Bad;x'"),
    ],
)
def test_image_build_refuses_bad_combinations(cache: Path, args: list[str], message: str) -> None:
    result = run("image", "build", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert list_debian_images(cache) == []


def test_image_build_debian_reports_the_cached_image(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packages = resolved(record("libc6"), record("jq"), record("curl"))
    _no_network(monkeypatch, packages)
    fake_image(
        cache, "f1" * 32, packages=("curl", "jq"), inputs=inputs_key(packages, ("curl", "jq"))
    )
    result = run(
        "image",
        "build",
        "debian:bookworm",
        "--arch",
        "x86_64",
        "--packages",
        "jq",
        "--packages",
        "curl",
    )
    assert result.exit_code == 0, result.output
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert fields["image"] == "debian:bookworm+curl,jq"
    assert fields["digest"] == "sha256:" + "f1" * 32
    assert fields["size"].startswith("64.0 MiB")
    as_json = run("image", "build", "debian+jq,curl", "--arch", "x86_64", "--json")
    assert as_json.exit_code == 0, as_json.output
    info = json.loads(as_json.stdout)
    assert (info["name"], info["digest"]) == ("debian:bookworm+curl,jq", "sha256:" + "f1" * 32)
    assert info["path"].endswith("/root.img")


def test_run_image_boots_the_cached_image_on_a_layer(cache: Path, tmp_path: Path) -> None:
    entry = fake_image(cache, "a1" * 32)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"x")
    opts: dict[str, object] = dict.fromkeys(("config_file", "graphics", "rootfs", "root", "init"))
    cfg = run_config(False, {**opts, "kernel_path": kernel, "image": "debian", "arch": "x86_64"})
    assert cfg.root_disk is not None
    assert cfg.root_disk.base == entry / "root.img"  # read-only base; the VM gets a layer
    assert cfg.disk_path is None
    assert (entry / "last-used").exists()
    with pytest.raises(ConfigError, match="give one of --image, --rootfs and --root"):
        run_config(False, {**opts, "kernel_path": kernel, "image": "debian", "rootfs": tmp_path})
    with pytest.raises(ConfigError, match="no cached image 'abcdef12' for x86_64"):
        run_config(False, {**opts, "kernel_path": kernel, "image": "abcdef12", "arch": "x86_64"})
    jq = fake_image(cache, "b1" * 32, packages=("jq",))
    with_jq = run_config(False, {**opts, "kernel_path": kernel, "image": "debian+jq"})
    assert with_jq.root_disk is not None
    assert with_jq.root_disk.base == jq / "root.img"
    plain = run_config(False, {**opts, "kernel_path": kernel, "image": "default"})
    assert plain.root_disk is None


class _FakeProcess:
    def __init__(self, lines: list[bytes], code: int) -> None:
        import io

        self.stdout = io.BufferedReader(io.BytesIO(b"".join(lines)))  # type: ignore[arg-type]
        self.code = code

    def __enter__(self) -> _FakeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self) -> int:
        return self.code

    def kill(self) -> None:
        _FakeVM.made[-1].calls.append("kill")


class _Interrupted:
    def readline(self) -> bytes:
        raise KeyboardInterrupt


class _InterruptedProcess(_FakeProcess):
    def __init__(self) -> None:
        self.stdout = _Interrupted()  # type: ignore[assignment]

    def wait(self) -> int:
        raise AssertionError("a Ctrl-C must not wait for dpkg")


class _FakeVM:
    """What the second stage uses of a VirtualMachine; records what it was asked."""

    made: ClassVar[list[_FakeVM]] = []
    interrupt: ClassVar[bool] = False

    def __init__(self, config: Any, backend: str) -> None:
        self.config = config
        self.calls: list[str] = []
        self.guest = self
        _FakeVM.made.append(self)

    def __enter__(self) -> _FakeVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append("closed")

    def start(self, timeout: float) -> None:
        self.calls.append("start")

    def wait_ready(self, timeout: float) -> None:
        self.calls.append("ready")

    def popen(self, argv: list[str], **kw: Any) -> _FakeProcess:
        self.calls.append(" ".join(argv[-2:]))
        if _FakeVM.interrupt:
            return _InterruptedProcess()
        lines = [b"vzkit stage2: installing base-passwd\n"]
        lines += [f"line {n}\n".encode() for n in range(100)]
        lines += [b"dpkg: error processing package foo (--configure):\n"]
        return _FakeProcess(lines, 1)

    def run(self, argv: list[str], **kw: Any) -> None:
        self.calls.append("run")

    def stop(self, timeout: float) -> None:
        self.calls.append("stop")


def test_a_failed_second_stage_shows_the_end_of_dpkgs_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vzkit._vm
    from vzkit._progress import Progress
    from vzkit._state import Arch

    monkeypatch.setattr(vzkit._vm, "VirtualMachine", _FakeVM)
    monkeypatch.setattr(_FakeVM, "made", [])
    monkeypatch.setattr(imagebuild, "_plain_guest_config", lambda arch, **kw: kw)
    disk = tmp_path / "root.img"
    with pytest.raises(GuestError) as caught, Progress("test") as progress:
        imagebuild._second_stage(disk, Arch.X86_64, tmp_path / "debs", progress, "qemu")
    message = str(caught.value)
    assert "failed in the build VM (exit 1)" in message
    assert "  dpkg: error processing package foo (--configure):" in message
    assert "line 99" in message
    assert "line 60" not in message  # the tail only (40 lines)
    assert "The downloaded packages are kept" in message
    [vm] = _FakeVM.made
    assert vm.calls == ["start", "ready", "sh /mnt/debs", "closed"]  # no stop: closed
    config = vm.config
    assert config["disk_path"] == disk  # booted read-write, not through a layer
    assert config["root"] == "/dev/vda"
    assert config["network"].mode.value == "none"
    [share] = config["volumes"]
    assert (share.tag, share.read_only) == ("debs", True)


def test_ctrl_c_in_the_second_stage_kills_dpkg_and_closes_the_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vzkit._vm
    from vzkit._progress import Progress
    from vzkit._state import Arch

    monkeypatch.setattr(vzkit._vm, "VirtualMachine", _FakeVM)
    monkeypatch.setattr(_FakeVM, "interrupt", True)
    monkeypatch.setattr(_FakeVM, "made", [])
    monkeypatch.setattr(imagebuild, "_plain_guest_config", lambda arch, **kw: kw)
    with pytest.raises(KeyboardInterrupt), Progress("test") as progress:
        imagebuild._second_stage(tmp_path / "d.img", Arch.X86_64, tmp_path, progress, "qemu")
    [vm] = _FakeVM.made
    assert vm.calls == ["start", "ready", "sh /mnt/debs", "kill", "closed"]


def test_a_fixed_uuid_sets_the_file_systems_uuid_and_hash_seed(tmp_path: Path) -> None:
    """What the Debian build passes (derived from the manifest's digest): mke2fs keeps one
    -E only, so the hash seed and root_owner must share it."""
    import shutil
    import subprocess

    from vzkit.image._rootdisk import build_root_disk, find_e2fsprogs

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    if os.geteuid() == 0:  # the root directory must not be root's already in the tree
        os.chown(tree, 1234, 1234)
    fixed = "144301a0-8020-69e0-563f-b0e3659010ee"
    disk = build_root_disk(tree, tmp_path / "d.img", size=32 << 20, uuid=fixed)
    mke2fs, _ = find_e2fsprogs()
    dumpe2fs = shutil.which("dumpe2fs", path=str(Path(mke2fs).parent))
    assert dumpe2fs is not None
    header = subprocess.run([dumpe2fs, "-h", str(disk)], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in header.splitlines())}
    assert fields["Filesystem UUID"] == fixed
    assert fields["Directory Hash Seed"] == fixed
    listing = subprocess.run(
        [str(Path(mke2fs).with_name("debugfs")), "-R", "stat /", str(disk)],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "User:     0   Group:     0" in listing  # root_owner=0:0 still applied
