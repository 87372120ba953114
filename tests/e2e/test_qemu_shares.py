"""Shared folders on the qemu backend, end to end: VirtioFS through owned virtiofsd processes.

One boot checks most of issue 6's "Done when" lines at once (TCG boots are slow and the
machine is shared): 8 shares, among them a read-write one, a read-only one and one whose
path holds commas, spaces and non-ASCII characters.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children, pid_alive
from vzkit.backends.qemu._machine import QemuMachine

from .conftest import VMFactory

SECRET = "host secret outside every share\n"


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root`` with its mode and content hash (links: their target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            digest = os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir"
        out[str(path.relative_to(root))] = (st.st_mode, digest)
    return out


def _sh(vm: vzkit.VirtualMachine, script: str, timeout: float = 60) -> tuple[int, str]:
    done = vm.guest.run(["sh", "-c", script], timeout=timeout)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def _machine(vm: vzkit.VirtualMachine) -> QemuMachine:
    machine = vm._core.machine
    assert isinstance(machine, QemuMachine)
    return machine


@pytest.fixture
def host_dirs(tmp_path: Path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    dirs = {
        "rw": tmp_path / "rw",
        "ro": tmp_path / "ro",
        "odd": tmp_path / "a,b c-é✓",
        **{f"x{i}": tmp_path / f"extra{i}" for i in range(5)},
    }
    for name, path in dirs.items():
        path.mkdir()
        (path / "hello.txt").write_text(f"hello from {name}\n")
    (dirs["ro"] / "keep").mkdir()
    (dirs["ro"] / "keep" / "file").write_text("do not touch\n")
    # Links that point outside the share on the host: absolute, and relative through "..".
    (dirs["rw"] / "abs-link").symlink_to(outside / "secret.txt")
    (dirs["rw"] / "rel-link").symlink_to(Path("..") / "outside" / "secret.txt")
    (dirs["ro"] / "abs-link").symlink_to(outside / "secret.txt")
    os.mknod(dirs["rw"] / "zero-node", stat.S_IFCHR | 0o666, os.makedev(1, 5))  # needs root
    return dirs


def test_eight_shares_read_write_read_only_and_odd_paths(
    vms: VMFactory, host_dirs: dict[str, Path]
) -> None:
    volumes = (
        vzkit.parse_volume_spec(f"{host_dirs['rw']}:rw"),
        vzkit.parse_volume_spec(f"{host_dirs['ro']}:ro:ro"),
        vzkit.parse_volume_spec(str(host_dirs["odd"])),  # auto tag: a_b_c-é✓
        *(vzkit.parse_volume_spec(str(host_dirs[f"x{i}"])) for i in range(5)),
    )
    ro_before = _tree(host_dirs["ro"])
    vm = vms.create(volumes=volumes)
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    machine = _machine(vm)
    daemons = machine._shares.pids
    assert len(daemons) == 8  # one owned virtiofsd per share
    assert all(pid_alive(pid) for pid in daemons.values())

    # The agent reports the mounts: every share at /mnt/<tag>, VirtioFS, the ro one ro.
    mounts = {
        line.split()[1]: line.split()
        for line in vm.guest.read_file("/proc/mounts").decode().splitlines()
    }
    tags = ["rw", "ro", "a_b_c-é✓", *(f"extra{i}" for i in range(5))]
    for tag in tags:
        assert mounts[f"/mnt/{tag}"][2] == "virtiofs", mounts
    assert mounts["/mnt/ro"][3].split(",")[0] == "ro"
    assert mounts["/mnt/rw"][3].split(",")[0] == "rw"
    for tag in tags:  # a host file is never a device or a set-id program in the guest
        assert {"nodev", "nosuid"} <= set(mounts[f"/mnt/{tag}"][3].split(",")), mounts
    # A device node on the host (here /dev/zero's numbers) cannot be opened through a share.
    code, out = _sh(vm, "head -c 4 /mnt/rw/zero-node >/dev/null")
    assert code != 0, out
    assert "Permission denied" in out, out
    # Each virtiofsd runs in its namespace sandbox: its own network namespace, for one.
    for pid in daemons.values():
        assert b"sandbox=namespace" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    # The guest reads host files through every share, the odd path included.
    for tag, name in zip(tags, ["rw", "ro", "odd", *(f"x{i}" for i in range(5))], strict=True):
        assert vm.guest.read_file(f"/mnt/{tag}/hello.txt") == f"hello from {name}\n".encode()

    # Writes through the rw share reach the host (also in the odd one).
    code, out = _sh(vm, "echo written > /mnt/rw/new.txt && mkdir /mnt/rw/d && sync")
    assert code == 0, out
    assert (host_dirs["rw"] / "new.txt").read_text() == "written\n"
    assert (host_dirs["rw"] / "d").is_dir()
    vm.guest.write_file("/mnt/a_b_c-é✓/from-guest", b"x" * 100_000)
    assert (host_dirs["odd"] / "from-guest").read_bytes() == b"x" * 100_000

    # Guest root cannot write, create, delete or remount-rw its way into the ro share.
    attempts = {
        "write": "echo changed > /mnt/ro/hello.txt",
        "append": "echo more >> /mnt/ro/keep/file",
        "create": "echo new > /mnt/ro/new.txt",
        "mkdir": "mkdir /mnt/ro/newdir",
        "delete": "rm /mnt/ro/hello.txt",
        "rmdir": "rm -r /mnt/ro/keep",
        "rename": "mv /mnt/ro/hello.txt /mnt/ro/moved.txt",
        "chmod": "chmod 777 /mnt/ro/hello.txt",
        "touch": "touch /mnt/ro/hello.txt",
        "truncate": "truncate -s 0 /mnt/ro/hello.txt",
        "symlink": "ln -s /etc/passwd /mnt/ro/link",
    }
    for what, command in attempts.items():
        code, out = _sh(vm, command)
        assert code != 0, f"{what} succeeded on the read-only share: {out}"
    # Remounting read-write is allowed by the guest kernel, but the host still refuses.
    code, out = _sh(vm, "mount -o remount,rw /mnt/ro && grep ' /mnt/ro ' /proc/mounts")
    assert code == 0, out
    assert " rw," in out  # the guest believes it is writable now ...
    for what, command in attempts.items():
        code, out = _sh(vm, command)
        assert code != 0, f"{what} succeeded after remount,rw: {out}"
        assert "Read-only file system" in out or "read-only" in out.lower(), (what, out)
    # A fresh mount of the same tag, read-write, fares no better.
    code, out = _sh(vm, "mkdir -p /mnt/again && mount -t virtiofs ro /mnt/again && "
                        "echo x > /mnt/again/hello.txt")  # fmt: skip
    assert code != 0, out
    assert _tree(host_dirs["ro"]) == ro_before

    # Links that point outside a share resolve in the guest, never on the host.
    for link in ("/mnt/rw/abs-link", "/mnt/rw/rel-link", "/mnt/ro/abs-link"):
        code, out = _sh(vm, f"cat {link}")
        assert SECRET.strip() not in out, link
    code, out = _sh(vm, "cat /mnt/rw/../outside/secret.txt; ls -a /mnt/rw/..")
    assert SECRET.strip() not in out
    # Guest-made links are plain links on the host, pointing where the guest said.
    code, out = _sh(vm, "ln -s /etc/hostname /mnt/rw/guest-link && cat /mnt/rw/guest-link")
    assert (code, out) == (0, "vzkit\n")
    assert os.readlink(host_dirs["rw"] / "guest-link") == "/etc/hostname"

    vm.close()
    assert live_children() == {}
    assert not any(pid_alive(pid) for pid in daemons.values())


def test_virtiofsd_killed_mid_run_ends_the_vm_in_error_with_the_reason(
    vms: VMFactory, host_dirs: dict[str, Path]
) -> None:
    """A guest would hang on a share whose virtiofsd died (QEMU cannot reconnect it): the VM
    ends in ERROR saying which share's daemon died and how, and nothing is left running."""
    vm = vms.create(
        volumes=(
            vzkit.parse_volume_spec(f"{host_dirs['rw']}:dies"),
            vzkit.parse_volume_spec(f"{host_dirs['ro']}:lives:ro"),
        )
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    machine = _machine(vm)
    qemu = vm.pid
    assert qemu is not None
    pids = machine._shares.pids
    assert vm.guest.read_file("/mnt/dies/hello.txt") == b"hello from rw\n"
    os.kill(pids["dies"], signal.SIGKILL)
    assert vm.wait(timeout=30) is vzkit.VMState.ERROR
    error = vm.last_error
    assert isinstance(error, vzkit.VMError)
    assert str(error).startswith("virtiofsd for share 'dies' exited with -9: "), error
    assert str(error).endswith("; the VM was stopped (its guest would hang on that share)")
    assert not pid_alive(qemu)
    vm.close()
    assert live_children() == {}
    assert not pid_alive(pids["lives"])


def test_share_removed_before_start_is_a_config_error(
    vms: VMFactory, host_dirs: dict[str, Path]
) -> None:
    vm = vms.create(volumes=(vzkit.parse_volume_spec(str(host_dirs["x0"])),))
    for entry in host_dirs["x0"].iterdir():
        entry.unlink()
    host_dirs["x0"].rmdir()
    with pytest.raises(vzkit.ConfigError, match=r"shared directory .* does not exist"):
        vm.start(timeout=60)
    assert vm.state is vzkit.VMState.STOPPED
    assert live_children() == {}


def test_vzkit_run_volume(host_dirs: dict[str, Path]) -> None:
    """``vzkit run -v HOST:TAG[:ro]`` mounts at /mnt/TAG; read-only holds there too."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "vzkit.cli", "run",
            "-v", f"{host_dirs['ro']}:data:ro", "-v", f"{host_dirs['rw']}:out",
            "--", "sh", "-c",
            "cat /mnt/data/hello.txt; cp /mnt/data/hello.txt /mnt/out/copy; "
            "rm /mnt/data/hello.txt || echo refused",
        ],
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines() == ["hello from ro", "refused"]
    assert (host_dirs["rw"] / "copy").read_text() == "hello from ro\n"
    assert (host_dirs["ro"] / "hello.txt").exists()


@pytest.fixture(scope="session")
def generic_kernel_image() -> vzkit.image.GuestImage:
    """The bench's guest variant on Debian's generic kernel: the cloud kernel has no 9p."""
    bench = Path(__file__).parents[2] / "bench" / "shares.py"
    spec = importlib.util.spec_from_file_location("vzkit_bench_shares", bench)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    image: vzkit.image.GuestImage = module.generic_kernel_image("x86_64")
    return image


def test_9p_fallback_enforces_read_only_in_qemu(
    vms: VMFactory,
    host_dirs: dict[str, Path],
    generic_kernel_image: vzkit.image.GuestImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no virtiofsd can serve (QEMU on macOS, not root with the C one): virtio-9p."""
    monkeypatch.setenv("VZKIT_SHARE_DEVICE", "9p")
    image = generic_kernel_image
    ro_before = _tree(host_dirs["ro"])
    vm = vms.create(
        kernel_path=image.kernel,
        initrd_path=image.initrd,
        cmdline=image.cmdline(),
        volumes=(
            vzkit.parse_volume_spec(f"{host_dirs['rw']}:rw"),
            vzkit.parse_volume_spec(f"{host_dirs['ro']}:ro:ro"),
            vzkit.parse_volume_spec(str(host_dirs["odd"])),
        ),
    )
    vm.start(timeout=60)
    vm.guest.wait_ready(timeout=120)
    assert _machine(vm)._shares.pids == {}  # no virtiofsd: QEMU serves 9p itself
    mounts = {
        line.split()[1]: line.split()
        for line in vm.guest.read_file("/proc/mounts").decode().splitlines()
    }
    assert [mounts[f"/mnt/{t}"][2] for t in ("rw", "ro", "a_b_c-é✓")] == ["9p"] * 3
    for tag in ("rw", "ro", "a_b_c-é✓"):
        assert {"nodev", "nosuid"} <= set(mounts[f"/mnt/{tag}"][3].split(",")), mounts
    assert vm.guest.read_file("/mnt/a_b_c-é✓/hello.txt") == b"hello from odd\n"
    code, out = _sh(vm, "echo via 9p > /mnt/rw/new.txt")
    assert code == 0, out
    assert (host_dirs["rw"] / "new.txt").read_text() == "via 9p\n"
    code, out = _sh(vm, "mount -o remount,rw /mnt/ro; echo x > /mnt/ro/hello.txt")
    assert code != 0, out
    for command in ("touch /mnt/ro/new", "rm /mnt/ro/hello.txt", "mkdir /mnt/ro/d"):
        code, out = _sh(vm, command)
        assert code != 0, (command, out)
    code, out = _sh(vm, "cat /mnt/rw/abs-link /mnt/rw/rel-link")
    assert SECRET.strip() not in out
    assert _tree(host_dirs["ro"]) == ro_before
