"""``vzkit run --image REF`` with OCI images made by real tools (umoci for the layout and its
config, skopeo for the archives and the push to a real registry): the image's Env,
WorkingDir, User and Cmd take effect, ``-- CMD`` replaces Cmd, ``--entrypoint`` the
entrypoint, the ``oci:``, ``oci-archive:``, ``docker-archive:`` and ``docker://`` transports
boot, whiteouts hide what they should, and a registry image runs again from the cache with the
registry gone. The userland is the default guest's static busybox (vzkit's kernel and
initramfs boot the disk and inject the agent)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vzkit.image import GuestImage

from ..support import oci_debian as deb
from ..support.registry import LocalRegistry, local_registry
from .test_root_disks import busybox_of
from .test_run_cli import VZKIT, vzkit_run

#: What the image's Cmd prints: its env, working directory and user.
SHOW = 'echo "$GREETING"; pwd; id -u; id -un; [ -e /etc/doomed ] || echo doomed-is-gone'


def umoci(*args: str | Path) -> None:
    subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True, timeout=120)


@dataclass(frozen=True)
class Images:
    layout: Path  # oci:LAYOUT:1
    oci_archive: Path
    docker_archive: Path


@pytest.fixture(scope="module")
def images(guest_images: dict[str, GuestImage], tmp_path_factory: pytest.TempPathFactory) -> Images:
    """A two-layer busybox image: layer 1 the userland, /etc/doomed and a user ``app``;
    layer 2 deletes /etc/doomed (a whiteout). Its config: Env, WorkingDir, User, Cmd."""
    work = tmp_path_factory.mktemp("oci-run")
    layout = work / "layout"
    busybox = busybox_of(guest_images["x86_64"])
    umoci("init", "--layout", layout)
    umoci("new", "--image", f"{layout}:1")
    for step in (1, 2):
        bundle = work / f"bundle{step}"
        umoci("unpack", "--image", f"{layout}:1", bundle)  # as root: owners are real
        rootfs = bundle / "rootfs"
        if step == 1:
            for name in ("bin", "etc", "home/app", "tmp"):
                (rootfs / name).mkdir(parents=True)
            (rootfs / "bin/busybox").write_bytes(busybox)
            (rootfs / "bin/busybox").chmod(0o755)
            os.symlink("busybox", rootfs / "bin/sh")
            os.symlink("busybox", rootfs / "bin/id")
            (rootfs / "tmp").chmod(0o1777)
            (rootfs / "etc/passwd").write_text(
                "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
            )
            (rootfs / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
            (rootfs / "etc/doomed").write_text("lower layer\n")
            os.chown(rootfs / "home/app", 1000, 1000)
        else:
            (rootfs / "etc/doomed").unlink()
            (rootfs / "etc/top").write_text("from layer 2\n")
        umoci("repack", "--image", f"{layout}:1", bundle)
    umoci(
        "config", "--image", f"{layout}:1", "--config.env", "GREETING=hello-from-the-image",
        "--config.workingdir", "/home/app", "--config.user", "app",
        "--config.exposedports", "8080/tcp",
        "--config.cmd", "/bin/sh", "--config.cmd", "-c", "--config.cmd", SHOW,
    )  # fmt: skip
    oci_archive, docker_archive = work / "image.oci.tar", work / "image.docker.tar"
    for dest in (f"oci-archive:{oci_archive}", f"docker-archive:{docker_archive}:bb:1"):
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:1", dest],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    return Images(layout, oci_archive, docker_archive)


@pytest.fixture(scope="module")
def registry(images: Images) -> Iterator[LocalRegistry]:
    with local_registry() as reg:
        reg.push(f"oci:{images.layout}:1", "bb:1")
        yield reg


def lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode().splitlines()


IMAGE_SAYS = ["hello-from-the-image", "/home/app", "1000", "app", "doomed-is-gone"]


def test_the_images_cmd_env_workdir_and_user_take_effect(images: Images) -> None:
    ref = f"oci:{images.layout}:1"
    assert lines(vzkit_run("--image", ref)) == IMAGE_SAYS  # no COMMAND: the image's Cmd
    # -- CMD replaces Cmd; Env, WorkingDir and User stay
    assert lines(vzkit_run("--image", ref, "--", "sh", "-c", SHOW)) == IMAGE_SAYS
    # -e, -w and -u win over the image's
    mine = vzkit_run("--image", ref, "-e", "GREETING=mine", "-w", "/tmp", "-u", "root",
                     "--", "sh", "-c", SHOW)  # fmt: skip
    assert lines(mine) == ["mine", "/tmp", "0", "root", "doomed-is-gone"]
    # --entrypoint: COMMAND becomes its arguments, the image's Cmd is dropped
    entry = vzkit_run("--image", ref, "--entrypoint", "/bin/busybox", "--", "cat", "/etc/top")
    assert lines(entry) == ["from layer 2"]


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_the_archive_transports_boot(images: Images, transport: str) -> None:
    path = images.oci_archive if transport == "oci-archive" else images.docker_archive
    proc = vzkit_run("--image", f"{transport}:{path}", "--", "sh", "-c", f"{SHOW}; cat /etc/top")
    assert lines(proc) == [*IMAGE_SAYS, "from layer 2"]


def test_a_registry_image_is_pulled_listed_and_runs_again_without_the_registry(
    images: Images, tmp_path: Path
) -> None:
    with local_registry() as reg:
        reg.push(f"oci:{images.layout}:1", "bb:run-again")
        ref = f"docker://{reg.host}/bb:run-again"
        refused = vzkit_run("--image", ref, "--", "true")  # plain HTTP only when asked
        assert refused.returncode == 125, refused.stderr.decode()
        assert b"does not answer over TLS" in refused.stderr
        assert b"--insecure-registry" in refused.stderr
        pulled = subprocess.run(
            [*VZKIT, "image", "pull", "--insecure-registry", "--json", ref],
            capture_output=True, timeout=300,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr.decode()
        info = json.loads(pulled.stdout)
        assert info["refs"][0] == ref  # canonical
        assert info["name"] == f"{reg.host}/bb:run-again"  # familiar
        assert (info["arch"], info["user"], info["working_dir"]) == ("x86_64", "app", "/home/app")
        assert info["exposed_ports"] == ["8080/tcp"]
    # the registry is gone: the cached image boots as it is
    assert lines(vzkit_run("--image", ref)) == IMAGE_SAYS
    listed = subprocess.run([*VZKIT, "image", "list", "--json"], capture_output=True, timeout=60)
    rows = [r for r in json.loads(listed.stdout) if r["kind"] == "oci"]
    assert any(ref in r["refs"] for r in rows)
    shown = subprocess.run([*VZKIT, "image", "inspect", ref], capture_output=True, timeout=60)
    assert b"8080/tcp" in shown.stdout, shown.stderr.decode()
    removed = subprocess.run([*VZKIT, "image", "rm", ref], capture_output=True, timeout=60)
    assert removed.returncode == 0, removed.stderr.decode()
    gone = subprocess.run([*VZKIT, "image", "inspect", ref], capture_output=True, timeout=60)
    assert gone.returncode == 2


def test_docker_transport_runs_with_insecure_registry(registry: LocalRegistry) -> None:
    ref = f"docker://{registry.host}/bb:1"
    proc = vzkit_run(
        "--insecure-registry", "--image", ref, "--", "sh", "-c", "cat /etc/top; id -un"
    )
    assert lines(proc) == ["from layer 2", "app"]


def test_pull_picks_the_arch_and_names_what_an_image_has(images: Images) -> None:
    ref = f"oci:{images.layout}:1"
    for option in (["--arch", "aarch64"], ["--platform", "linux/arm64"]):
        proc = subprocess.run([*VZKIT, "image", "pull", *option, ref], capture_output=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 1, proc.stderr.decode()
        assert b"it has only linux/amd64" in proc.stderr
    proc = subprocess.run([*VZKIT, "image", "pull", "--platform", "linux/s390x", ref],
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert b"vzkit boots linux/amd64 and linux/arm64" in proc.stderr
    both = subprocess.run([*VZKIT, "image", "pull", "--arch", "x86_64", "--platform",
                           "linux/amd64", ref], capture_output=True, timeout=120)  # fmt: skip
    assert both.returncode == 2
    assert b"not both" in both.stderr
    pulled = subprocess.run([*VZKIT, "image", "pull", "--platform", "linux/amd64", ref],
                            capture_output=True, timeout=120)  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert b"arch    x86_64" in pulled.stdout


@pytest.fixture(scope="module")
def debian_oci() -> deb.DebianOciImage:
    """A Debian image made by mmdebstrap + umoci (three layers: whiteouts, an opaque
    directory, a user ``app``), built once per machine (tests/support/oci_debian.py)."""
    return deb.session_debian_image()


def test_a_debian_image_from_the_registry_runs_with_its_config(
    debian_oci: deb.DebianOciImage,
) -> None:
    """The issue's own check: ``vzkit run --image docker://127.0.0.1:PORT/deb:1 -- sh -c
    'cat /etc/os-release; id -u'``, the image's Cmd with no command, its whiteouts and opaque
    directory; then the archive and layout transports of the same image boot."""
    with local_registry() as reg:
        debian_oci.push(reg, "deb:1")
        ref = f"docker://{reg.host}/deb:1"
        proc = vzkit_run("--insecure-registry", "--image", ref, "--",
                         "sh", "-c", "cat /etc/os-release; id -u")  # fmt: skip
        out = lines(proc)
        assert 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' in out
        assert out[-1] == str(deb.UID)  # the image's User
        own = vzkit_run("--insecure-registry", "--image", ref)  # no command: Cmd
        assert own.returncode == 0, own.stderr.decode()[-3000:]
        assert own.stdout.decode() == deb.CMD_OUTPUT  # Env, WorkingDir, User
    check = ["--", "sh", "-c", deb.GUEST_CHECK]
    for image in (f"docker-archive:{debian_oci.docker_archive}", f"oci:{debian_oci.layout}:1"):
        proc = vzkit_run("--image", image, *check)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        assert proc.stdout.decode() == deb.GUEST_CHECK_OUTPUT, image
