"""Shares on the qemu backend without a VM: virtiofsd probing, share plans, argv, daemons."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest

import vzkit
from vzkit._process import live_children
from vzkit.backends.qemu import _argv, _virtiofs
from vzkit.backends.qemu._argv import Plan
from vzkit.backends.qemu._devices import build_argv
from vzkit.backends.qemu._virtiofs import (
    ShareDevice,
    ShareKind,
    Shares,
    Virtiofsd,
    VirtiofsSandbox,
    parse_virtiofsd_help,
    plan_share,
    virtiofsd_argv,
)

C_HELP = """\
usage: /usr/lib/qemu/virtiofsd [options]

    -h   --help                print help
    -V   --version             print version
    -o sandbox=namespace|chroot
                               sandboxing mode:
    -o source=PATH             shared directory tree
    -o allow_root              allow access by root
    --socket-path=PATH         path for the vhost-user socket
    --fd=FDNUM                 fd number of vhost-user socket
"""
C_VERSION = "virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"

RUST_HELP = """\
Launch a virtiofsd backend.

Usage: virtiofsd [OPTIONS]

Options:
      --shared-dir <shared-dir>        Shared directory path
      --readonly                       Share the directory read-only
      --socket-path <socket-path>      vhost-user socket path
      --fd <fd>                        File descriptor for the listening socket
      --sandbox <sandbox>              Sandbox mechanism [default: namespace]
  -V, --version                        Print version
"""
RUST_OLD_HELP = RUST_HELP.replace(
    "      --readonly                       Share the directory read-only\n", ""
)


def test_probe_parses_the_c_virtiofsd() -> None:
    found = parse_virtiofsd_help(Path("/usr/lib/qemu/virtiofsd"), C_HELP, C_VERSION)
    assert found == Virtiofsd(
        Path("/usr/lib/qemu/virtiofsd"), rust=False, version="7.2.22", readonly=False, fd=True
    )
    assert found.flavour == "c"


def test_probe_parses_the_rust_virtiofsd_with_and_without_readonly() -> None:
    new = parse_virtiofsd_help(Path("/usr/libexec/virtiofsd"), RUST_HELP, "virtiofsd 1.11.1\n")
    assert new == Virtiofsd(Path("/usr/libexec/virtiofsd"), True, "1.11.1", True, True)
    assert new.flavour == "rust"
    old = parse_virtiofsd_help(Path("/x"), RUST_OLD_HELP, "virtiofsd 1.10.0")
    assert old is not None
    assert old.rust
    assert not old.readonly
    assert old.version == "1.10.0"


def test_probe_rejects_what_is_not_a_virtiofsd() -> None:
    assert parse_virtiofsd_help(Path("/bin/true"), "", "") is None
    assert parse_virtiofsd_help(Path("/x"), "usage: frobnicate [--readonly]", "") is None


def _fake_daemon(tmp_path: Path, name: str, help_text: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nprintf '%s' '{help_text}'\n")  # builtins only: PATH is faked
    path.chmod(0o755)
    return path


def test_find_virtiofsd_prefers_the_override_then_path_then_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rust = _fake_daemon(tmp_path, "rust-virtiofsd", RUST_HELP)
    (tmp_path / "bin").mkdir()
    c_daemon = _fake_daemon(tmp_path / "bin", "virtiofsd", C_HELP)
    monkeypatch.setattr(_virtiofs, "CANDIDATES", (str(tmp_path / "missing"),))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("VZKIT_VIRTIOFSD", raising=False)
    found = _virtiofs.find_virtiofsd()
    assert found is not None
    assert found.path == c_daemon
    assert not found.rust
    monkeypatch.setenv("VZKIT_VIRTIOFSD", str(rust))
    found = _virtiofs.find_virtiofsd()
    assert found is not None
    assert found.path == rust
    assert found.readonly
    monkeypatch.setenv("VZKIT_VIRTIOFSD", str(tmp_path / "not-there"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert _virtiofs.find_virtiofsd() is None


def test_a_daemon_is_asked_once_per_binary_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = _fake_daemon(tmp_path, "virtiofsd", C_HELP)
    asked: list[str] = []
    real = _virtiofs._run_text

    def run_text(argv: list[str]) -> str:
        asked.append(argv[-1])
        return real(argv)

    monkeypatch.setattr(_virtiofs, "_run_text", run_text)
    first = _virtiofs._probe(daemon)
    assert _virtiofs._probe(daemon) == first
    assert asked == ["--help", "--version"]  # the second start asked nothing
    daemon.write_text(daemon.read_text() + "\n# upgraded\n")  # a new binary is asked again
    assert _virtiofs._probe(daemon) == first
    assert asked == ["--help", "--version"] * 2


C = Virtiofsd(Path("/usr/lib/qemu/virtiofsd"), rust=False, version="7.2.22")
RUST_RO = Virtiofsd(Path("/usr/libexec/virtiofsd"), rust=True, version="1.11.1", readonly=True)
RUST_OLD = Virtiofsd(Path("/usr/libexec/virtiofsd"), rust=True, version="1.10.0")
RW = vzkit.VolumeMount("/srv/src", "src")
RO = vzkit.VolumeMount("/srv/data", "data", True)


@pytest.mark.parametrize(
    ("vol", "daemon", "root", "kind", "ro_bind"),
    [
        (RW, C, True, ShareKind.VIRTIOFS, False),
        (RO, C, True, ShareKind.VIRTIOFS, True),  # read-only bind in a private mount ns
        (RW, C, False, ShareKind.NINEP, False),  # the C daemon needs root
        (RO, C, False, ShareKind.NINEP, False),
        (RO, RUST_RO, False, ShareKind.VIRTIOFS, False),  # --readonly
        (RO, RUST_RO, True, ShareKind.VIRTIOFS, False),
        (RO, RUST_OLD, True, ShareKind.VIRTIOFS, True),
        (RO, RUST_OLD, False, ShareKind.NINEP, False),  # 9p readonly=on: QEMU enforces it
        (RW, RUST_OLD, False, ShareKind.VIRTIOFS, False),
        (RO, None, True, ShareKind.NINEP, False),  # no virtiofsd (QEMU on macOS)
    ],
)
def test_plan_share_enforces_read_only_on_the_host(
    vol: vzkit.VolumeMount, daemon: Virtiofsd | None, root: bool, kind: ShareKind, ro_bind: bool
) -> None:
    share = plan_share(vol, daemon, root=root)
    assert (share.kind, share.ro_bind) == (kind, ro_bind)
    assert (share.tag, share.path, share.read_only) == (vol.tag, vol.host_path, vol.read_only)


def test_plan_share_can_be_forced_to_9p() -> None:
    assert plan_share(RW, C, root=True, force_9p=True).kind is ShareKind.NINEP


def test_share_device_config_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VZKIT_SHARE_DEVICE", raising=False)
    assert vzkit.LinuxVMConfig().share_device == "virtiofs"
    assert not _virtiofs.forced_9p("a", "virtiofs")
    assert _virtiofs.forced_9p("a", "9P")
    assert [_virtiofs.forced_9p(t, "9p:a,b") for t in "abc"] == [True, True, False]
    # The variable feeds the config's default (read there only), an explicit value wins.
    monkeypatch.setenv("VZKIT_SHARE_DEVICE", "9P")
    assert vzkit.LinuxVMConfig().share_device == "9p"
    monkeypatch.setenv("VZKIT_SHARE_DEVICE", "9p:a,b")
    assert vzkit.LinuxVMConfig().share_device == "9p:a,b"
    assert vzkit.LinuxVMConfig(share_device="virtiofs").share_device == "virtiofs"
    for bad in ("nfs", "9p:", "9p:a,,b", "9p:a b"):
        with pytest.raises(vzkit.ConfigError, match="is not one of 'virtiofs', '9p'"):
            vzkit.LinuxVMConfig(share_device=bad)


def test_c_virtiofsd_argv_escapes_commas_and_backslashes() -> None:
    share = ShareDevice("t", Path("/srv/a,b\\c d"), False)
    assert virtiofsd_argv(C, share, 9) == [
        "/usr/lib/qemu/virtiofsd", "--fd=9",
        "-o", "source=/srv/a\\,b\\\\c d",
        "-o", "sandbox=namespace",
    ]  # fmt: skip
    chroot = ShareDevice("t", Path("/s"), False, sandbox=VirtiofsSandbox.CHROOT)
    assert virtiofsd_argv(C, chroot, 9)[-2:] == ["-o", "sandbox=chroot"]


def test_read_only_c_virtiofsd_runs_behind_a_read_only_bind() -> None:
    share = ShareDevice("data", Path("/srv/my data"), True, ro_bind=True)
    argv = virtiofsd_argv(C, share, 9)
    assert argv[:9] == [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "vzkit-ro-share",
    ]  # fmt: skip
    assert argv[9:] == ["/srv/my data", *virtiofsd_argv(C, ShareDevice("d", share.path, True), 9)]


def test_rust_virtiofsd_argv_uses_readonly_and_never_runs_unsandboxed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for euid in (1000, 0):  # not root: virtiofsd makes a user namespace for its sandbox
        monkeypatch.setattr(os, "geteuid", lambda euid=euid: euid)
        share = ShareDevice("data", Path("/srv/a,b"), True)
        assert virtiofsd_argv(RUST_RO, share, 5) == [
            "/usr/libexec/virtiofsd", "--fd=5", "--shared-dir", "/srv/a,b",
            "--sandbox", "namespace", "--readonly",
        ]  # fmt: skip
    chroot = ShareDevice("d", Path("/s"), False, sandbox=VirtiofsSandbox.CHROOT)
    assert virtiofsd_argv(RUST_RO, chroot, 5)[-2:] == ["--sandbox", "chroot"]


@pytest.mark.parametrize(
    ("root", "namespaces", "expected"),
    [
        (True, True, VirtiofsSandbox.NAMESPACE),
        (False, True, VirtiofsSandbox.NAMESPACE),  # the Rust daemon's user namespace
        (True, False, VirtiofsSandbox.CHROOT),  # e.g. in a container without CAP_SYS_ADMIN
        (False, False, None),  # nothing can confine it: no virtiofsd at all
    ],
)
def test_sandbox_mode_is_namespace_else_chroot_else_none(
    monkeypatch: pytest.MonkeyPatch, root: bool, namespaces: bool, expected: object
) -> None:
    monkeypatch.setattr(_virtiofs, "namespaces_usable", lambda root: namespaces)
    assert _virtiofs.sandbox_mode(root) is expected


def test_without_a_sandbox_shares_fall_back_to_9p() -> None:
    assert plan_share(RW, RUST_RO, root=False, sandbox=None).kind is ShareKind.NINEP
    share = plan_share(RO, C, root=True, sandbox=VirtiofsSandbox.CHROOT)
    assert (share.kind, share.sandbox, share.ro_bind) == (
        ShareKind.VIRTIOFS,
        VirtiofsSandbox.CHROOT,
        True,
    )


def test_namespace_probe_tries_the_namespaces_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The probe runs ``unshare`` with the namespaces virtiofsd makes, once per process."""
    calls = tmp_path / "calls"
    fake = tmp_path / "unshare"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" != --user ]\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    _virtiofs.namespaces_usable.cache_clear()
    try:
        assert _virtiofs.namespaces_usable(True) is True
        assert _virtiofs.namespaces_usable(True) is True
        assert _virtiofs.namespaces_usable(False) is False  # no user namespaces "here"
        assert calls.read_text().splitlines() == [
            "--mount --pid --net --fork true",
            "--user --map-root-user --mount --pid --net --fork true",
        ]
    finally:
        _virtiofs.namespaces_usable.cache_clear()


# -- the QEMU side ------------------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"x")
    return path


def _plan(kernel: Path, *shares: ShareDevice, **changes: object) -> Plan:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64",
        kernel_path=kernel,
        cmdline="console=ttyS0",
        vsock=False,
        console=vzkit.ConsoleMode.NONE,
        **changes,
    )
    return Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, shares=shares, shared_memory=True
    )


def test_virtiofs_and_9p_devices_pinned(kernel: Path) -> None:
    plan = _plan(
        kernel,
        ShareDevice("src", Path("/srv/src"), False, fd=21),
        ShareDevice("data", Path("/srv/a,b"), True, ShareKind.NINEP),
        ShareDevice("café", Path("/srv/café"), False, ShareKind.NINEP),
    )
    assert _argv.share_args(plan) == [
        "-chardev", "socket,id=fs0,fd=21",
        "-device", "vhost-user-fs-pci,id=fs0-dev,chardev=fs0,tag=src,queue-size=1024",
        "-fsdev", "local,id=fsdev1,path=/srv/a,,b,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,id=fs1-dev,fsdev=fsdev1,mount_tag=data",
        "-fsdev", "local,id=fsdev2,path=/srv/café,security_model=none",
        "-device", "virtio-9p-pci,id=fs2-dev,fsdev=fsdev2,mount_tag=café",
    ]  # fmt: skip
    argv = build_argv(plan)
    assert argv[argv.index("-append") + 1] == (
        "console=ttyS0 vzkit.shares=src,data,caf%C3%A9 vzkit.ro=data"
    )
    assert "memory-backend=mem0" in argv[argv.index("-machine") + 1]


def test_virtiofs_device_needs_shared_memory_and_a_socket(kernel: Path) -> None:
    plan = _plan(kernel, ShareDevice("src", Path("/srv/src"), False, fd=21))
    with pytest.raises(ValueError, match="shared guest memory"):
        build_argv(Plan(config=plan.config, binary=Path("q"), accel="tcg", qmp_fd=3,
                        shares=plan.shares))  # fmt: skip
    with pytest.raises(ValueError, match="no virtiofsd socket"):
        build_argv(_plan(kernel, ShareDevice("src", Path("/srv/src"), False)))


def test_no_shares_leave_the_cmdline_alone(kernel: Path) -> None:
    argv = build_argv(_plan(kernel))
    assert argv[argv.index("-append") + 1] == "console=ttyS0"
    assert "-fsdev" not in argv
    assert "vhost-user-fs-pci" not in " ".join(argv)


def test_published_ports_become_hostfwd(kernel: Path) -> None:
    plan = _plan(
        kernel,
        publish=(vzkit.parse_port_spec("8080:80"), vzkit.parse_port_spec("0.0.0.0:5353:53/udp")),
    )
    assert _argv.network_args(plan)[1] == (
        "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:0.0.0.0:5353-:53"
    )


def test_ports_the_network_cannot_publish_are_left_to_the_agent(kernel: Path) -> None:
    """host-only publishes with slirp's hostfwd on Linux; on macOS (vmnet) and with network
    none QEMU publishes nothing, and the machine says so (the core's forwarder takes them)."""
    port = vzkit.parse_port_spec("8080:80")
    host_only = vzkit.NetworkConfig(vzkit.NetworkMode.HOST_ONLY)
    plan = _plan(kernel, publish=(port,), network=host_only)
    assert "hostfwd=tcp:127.0.0.1:8080-:80" in _argv.network_args(plan)[1]
    assert _argv.native_ports(plan.config, "linux") == (port,)
    darwin = Plan(config=plan.config, binary=Path("q"), accel="tcg", qmp_fd=3, host_os="darwin")
    assert "hostfwd" not in _argv.network_args(darwin)[1]
    assert _argv.native_ports(plan.config, "darwin") == ()
    none = _plan(kernel, publish=(port,), network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE))
    assert _argv.network_args(none) == []
    assert _argv.native_ports(none.config, "linux") == ()
    assert _argv.native_ports(plan.config.replace(network=vzkit.NetworkConfig()), "darwin") == (
        port,
    )


# -- owned daemons ------------------------------------------------------------------------

# A stand-in virtiofsd: accepts one connection on --fd=N and echoes what it reads.
FAKE_DAEMON = textwrap.dedent(
    """\
    import socket, sys
    if "--help" in sys.argv:
        print("    --fd=FDNUM\\n    -o source=PATH")
        sys.exit(0)
    fd = int(next(a for a in sys.argv if a.startswith("--fd="))[5:])
    conn, _ = socket.socket(fileno=fd).accept()
    while data := conn.recv(4096):
        conn.sendall(data)
    """
)


@pytest.fixture
def fake_virtiofsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "fake-virtiofsd"
    script.write_text(f"#!{sys.executable}\n{FAKE_DAEMON}")
    script.chmod(0o755)
    monkeypatch.setenv("VZKIT_VIRTIOFSD", str(script))
    monkeypatch.delenv("VZKIT_SHARE_DEVICE", raising=False)
    return script


def test_shares_start_connect_and_reap_their_daemons(
    tmp_path: Path, fake_virtiofsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    dirs = [tmp_path / "a,b", tmp_path / "c"]
    for d in dirs:
        d.mkdir()
    vols = vzkit.assign_volume_tags([vzkit.VolumeMount(d) for d in dirs])

    async def main() -> None:
        shares = Shares()
        devices = await shares.start(vols, tmp_path, tmp_path)
        assert [(d.tag, d.kind) for d in devices] == [
            ("a_b", ShareKind.VIRTIOFS),
            ("c", ShareKind.VIRTIOFS),
        ]
        assert sorted(live_children()) == sorted(shares.pids.values())
        assert not list(tmp_path.glob("*.sock"))  # the socket paths are gone already
        for device in devices:  # the fd QEMU would inherit talks to that share's daemon
            assert device.fd is not None
            sock = socket.socket(fileno=os.dup(device.fd))
            sock.sendall(device.tag.encode())
            assert sock.recv(100) == device.tag.encode()
            sock.close()
        dead = shares.pids["c"]
        os.kill(dead, signal.SIGKILL)  # a daemon dies mid-run ...
        async with asyncio.timeout(10):
            while dead in live_children():  # (reaped: vzkit saw it die)
                await asyncio.sleep(0.02)  # poll interval
        await shares.close()  # ... and close() still reaps everything
        await shares.close()  # idempotent
        assert live_children() == {}
        assert shares.qemu_fds == ()

    asyncio.run(main())


def test_a_daemon_that_dies_is_reported_with_its_status_and_log(
    tmp_path: Path, fake_virtiofsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    vols = vzkit.assign_volume_tags([vzkit.VolumeMount(d) for d in dirs])
    died: list[tuple[str, int, str]] = []

    async def main() -> None:
        shares = Shares(lambda tag, rc, tail: died.append((tag, rc, tail)))
        await shares.start(vols, tmp_path, tmp_path)
        with (tmp_path / "virtiofsd-1.log").open("a") as log:  # what the daemon said last
            log.write("fake-virtiofsd: something broke\n")
        os.kill(shares.pids["b"], signal.SIGKILL)
        async with asyncio.timeout(10):
            while not died:
                await asyncio.sleep(0.02)  # poll interval
        assert died == [("b", -9, "fake-virtiofsd: something broke")]
        shares.qemu_started()  # "QEMU" closes its end: "a" exits with 0, which is no failure
        async with asyncio.timeout(10):  # every watch has acted on its daemon's exit
            while live_children() or not all(task.done() for task in shares._watches):
                await asyncio.sleep(0.02)  # poll interval
        await shares.close()
        assert died == [("b", -9, "fake-virtiofsd: something broke")]

    asyncio.run(main())


def test_shares_fall_back_to_9p_without_root(
    tmp_path: Path, fake_virtiofsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    vols = vzkit.assign_volume_tags([vzkit.VolumeMount(tmp_path, "t", True)])

    async def main() -> None:
        shares = Shares()
        (device,) = await shares.start(vols, tmp_path, tmp_path)
        assert device.kind is ShareKind.NINEP
        assert device.read_only
        assert device.fd is None
        assert live_children() == {}
        await shares.close()

    asyncio.run(main())


def test_shares_forced_to_9p_start_no_daemon(
    tmp_path: Path, fake_virtiofsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vols = vzkit.assign_volume_tags([vzkit.VolumeMount(tmp_path)])

    async def main() -> None:
        shares = Shares()
        (device,) = await shares.start(vols, tmp_path, tmp_path, "9p")
        assert device.kind is ShareKind.NINEP
        assert live_children() == {}

    asyncio.run(main())
