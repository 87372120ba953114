"""The QEMU command line is a pure function of the plan: pinned here without booting."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from pathlib import Path

import pytest

import vzkit
from vzkit._disk import DiskImage
from vzkit.backends.qemu import _argv
from vzkit.backends.qemu._argv import Plan, esc
from vzkit.backends.qemu._devices import build_argv


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("vmlinuz", "initrd.img", "disk.img", "cd.iso", "OVMF_CODE.fd", "efi.nvram"):
        path = tmp_path / name
        path.write_bytes(b"x")
        out[name] = path
    return out


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_escape_doubles_commas() -> None:
    assert esc("/a,b/c,,d") == "/a,,b/c,,,,d"
    assert esc(Path("/plain")) == "/plain"
    with pytest.raises(ValueError, match="NUL"):
        esc("a\x00b")


def test_direct_boot_x86_64_pinned(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        cpus=2,
        memory_gb=0.5,
        arch="x86_64",
        kernel_path=files["vmlinuz"],
        initrd_path=files["initrd.img"],
        cmdline="console=ttyS0 quiet",
        disk_path=files["disk.img"],
    )
    plan = Plan(
        config=cfg,
        binary=Path("/usr/bin/qemu-system-x86_64"),
        accel="tcg",
        qmp_fd=7,
        console_log=Path("/s/console.log"),
        mac_address="02:00:00:00:00:01",
    )
    assert build_argv(plan) == [
        "/usr/bin/qemu-system-x86_64",
        "-nodefaults", "-no-user-config", "-no-reboot", "-S",
        "-chardev", "socket,id=qmp0,fd=7",
        "-mon", "chardev=qmp0,mode=control",
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", "2",
        "-m", "512M",
        "-kernel", str(files["vmlinuz"]),
        "-initrd", str(files["initrd.img"]),
        "-append", "console=ttyS0 quiet",
        "-blockdev",
        '{"driver":"raw","node-name":"disk0","cache":{"direct":false},'
        f'"file":{{"driver":"file","filename":"{files["disk.img"]}"}}}}',
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev",
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,id=net0-dev,mac=02:00:00:00:00:01",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0,id=rng0-dev",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-chardev", "file,id=con0,path=/s/console.log,append=on",
        "-serial", "chardev:con0",
        "-device", "pcie-root-port,id=vsock-port,chassis=31",
        "-display", "none",
        "-device", "pvpanic,id=panic0",
        "-action", "panic=exit-failure",
    ]  # fmt: skip


def test_aarch64_uses_virt_and_its_console(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="aarch64",
        kernel_path=files["vmlinuz"],
        network=vzkit.NetworkConfig(vzkit.NetworkMode.NONE),
        entropy=False,
        balloon=False,
        console=vzkit.ConsoleMode.NONE,
    )
    argv = build_argv(Plan(config=cfg, binary=Path("qemu-system-aarch64"), accel="tcg", qmp_fd=3))
    assert _opt(argv, "-machine") == ["virt,accel=tcg,gic-version=max"]
    assert _opt(argv, "-append") == ["console=ttyAMA0"]  # default cmdline for the arch
    assert "-netdev" not in argv
    assert "-serial" not in argv
    assert not any("balloon" in a or "rng" in a for a in argv)
    assert argv[-4:] == ["-device", "pvpanic-pci,id=panic0", "-action", "panic=exit-failure"]


def test_kvm_uses_host_cpu(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"])
    argv = build_argv(
        Plan(config=cfg, binary=Path("q"), accel="kvm", qmp_fd=3, console_log=Path("/l"))
    )
    assert _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-machine") == ["q35,accel=kvm"]


def test_paths_with_commas_spaces_and_unicode_are_escaped(tmp_path: Path) -> None:
    weird = tmp_path / "dir, with commas ünï"
    weird.mkdir()
    disk = weird / "disk,1.img"
    disk.write_bytes(b"")
    cfg = vzkit.LinuxVMConfig(arch="x86_64", disk_path=disk, iso_path=disk)
    plan = Plan(
        config=cfg,
        binary=Path("q"),
        accel="tcg",
        qmp_fd=3,
        console_log=weird / "console,log",
        firmware_code=weird / "code,fd",
        nvram=weird / "efi,nvram",
    )
    argv = build_argv(plan)
    joined = "\n".join(argv)
    assert json.loads(_opt(argv, "-blockdev")[0])["file"]["filename"] == str(disk)  # JSON
    assert f"path={str(weird / 'console,log').replace(',', ',,')},append=on" in joined
    pflash = _opt(argv, "-drive")
    assert pflash == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={esc(weird / 'code,fd')}",
        f"if=pflash,format=raw,unit=1,file={esc(weird / 'efi,nvram')}",
    ]
    # The ISO is attached read-only.
    assert any(a.startswith("driver=raw,node-name=iso0,read-only=on") for a in argv)


def test_pty_console_keeps_a_log(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"], console="pty")
    argv = build_argv(
        Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l,og"))
    )
    assert _opt(argv, "-chardev")[1] == "pty,id=con0,logfile=/l,,og,logappend=on"


@pytest.mark.parametrize(
    ("spec", "host_os", "netdev"),
    [
        ("nat", "linux", "user,id=net0"),
        ("nat", "darwin", "user,id=net0"),
        ("host-only", "linux", "user,id=net0,restrict=on"),
        ("host-only", "darwin", "vmnet-host,id=net0"),
        ("vmnet", "darwin", "vmnet-shared,id=net0"),
        ("bridged:br0", "linux", "bridge,id=net0,br=br0"),
        ("bridged:en0", "darwin", "vmnet-bridged,id=net0,ifname=en0"),
    ],
)
def test_network_modes_map_to_what_qemu_offers(
    files: dict[str, Path], spec: str, host_os: str, netdev: str
) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=files["vmlinuz"], network=vzkit.parse_network_mode(spec)
    )
    plan = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, host_os=host_os)
    assert _argv.network_args(plan) == [
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,id=net0-dev",
    ]  # fmt: skip


def test_vmnet_on_linux_raises_with_a_sentence(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=files["vmlinuz"], network=vzkit.parse_network_mode("vmnet")
    )
    plan = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, host_os="linux")
    with pytest.raises(vzkit.UnsupportedError, match="'vmnet' needs macOS") as info:
        _argv.network_args(plan)
    assert (info.value.backend, info.value.feature) == ("qemu", "network:vmnet")


def test_graphics_adds_virtio_gpu_and_vnc(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="aarch64",
        kernel_path=files["vmlinuz"],
        headless=False,
        displays=(vzkit.parse_display_spec("1280x720"), vzkit.parse_display_spec("4k")),
    )
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, vnc_socket=Path("/r,un/v.sock")
    )
    args = _argv.display_args(plan)
    assert args[:4] == [
        "-device", "virtio-gpu-pci,id=gpu0,max_outputs=2,xres=1280,yres=720",
        "-display", "none",
    ]  # fmt: skip
    assert _opt(args, "-vnc") == ["unix:/r,,un/v.sock"]
    assert "usb-kbd,bus=usb0.0" in args


def test_efi_boot_needs_firmware_in_plan(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", disk_path=files["disk.img"])
    with pytest.raises(ValueError, match="EFI boot needs firmware"):
        build_argv(
            Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"))
        )


def test_machine_type_q35_by_default_microvm_on_request(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = {"kernel_path": files["vmlinuz"]}
    monkeypatch.delenv("VZKIT_QEMU_MACHINE", raising=False)
    assert _argv.machine_type(vzkit.LinuxVMConfig(arch="aarch64", **direct)) == "virt"
    assert _argv.machine_type(vzkit.LinuxVMConfig(arch="x86_64", **direct)) == "q35"
    headless = vzkit.LinuxVMConfig(arch="x86_64", machine_type="microvm", **direct)
    assert _argv.machine_type(headless) == "microvm"
    # $VZKIT_QEMU_MACHINE only feeds the config's default, where microvm fits
    monkeypatch.setenv("VZKIT_QEMU_MACHINE", "microvm")
    assert vzkit.LinuxVMConfig(arch="x86_64", **direct).machine_type == "microvm"
    graphics = vzkit.LinuxVMConfig(arch="x86_64", headless=False, **direct)
    efi = vzkit.LinuxVMConfig(arch="x86_64", disk_path=files["disk.img"])
    arm = vzkit.LinuxVMConfig(arch="aarch64", **direct)
    assert graphics.machine_type == efi.machine_type == arm.machine_type == ""
    assert _argv.machine_type(graphics) == _argv.machine_type(efi) == "q35"  # need PCI/firmware
    monkeypatch.delenv("VZKIT_QEMU_MACHINE")
    with pytest.raises(vzkit.UnsupportedError, match="'microvm' needs a directly booted"):
        _argv.machine_type(efi.replace(machine_type="microvm"))
    with pytest.raises(vzkit.UnsupportedError, match=r"'microvm' is not supported .* aarch64"):
        _argv.machine_type(arm.replace(machine_type="microvm"))
    with pytest.raises(vzkit.UnsupportedError, match=r"'pc' is not supported .*'q35' or"):
        _argv.machine_type(efi.replace(machine_type="pc"))
    with pytest.raises(vzkit.ConfigError, match="not a machine type name"):
        efi.replace(machine_type="q35,accel=kvm")
    argv = build_argv(
        Plan(config=headless, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"))
    )
    assert _opt(argv, "-machine") == ["microvm,accel=tcg"]
    assert "virtio-balloon-device,id=balloon0" in argv  # virtio-mmio on microvm
    assert not any("pvpanic" in a for a in argv)  # its ACPI tables would not list one
    assert argv[-2:] == ["-action", "panic=exit-failure"]
    assert "virtio-rng-device,rng=rng0,id=rng0-dev" in argv


def test_agent_port_is_a_named_virtio_console_port_on_an_inherited_fd(
    files: dict[str, Path],
) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"])
    plan = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, agent_fd=9)
    assert _argv.agent_port_args(plan) == [
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", "socket,id=agent0,fd=9",
        "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=org.vzkit.agent.0",
    ]  # fmt: skip
    assert _argv.agent_port_args(Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3)) == []


def test_shared_memory_is_a_memfd_backend_the_machine_uses(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", memory_gb=0.5, kernel_path=files["vmlinuz"])
    cfg = dataclasses.replace(cfg, console="none")
    plan = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, shared_memory=True)
    argv = build_argv(plan)
    assert _opt(argv, "-machine") == ["q35,accel=tcg,memory-backend=mem0"]
    assert "memory-backend-memfd,id=mem0,size=512M,share=on" in _opt(argv, "-object")
    plain = build_argv(Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3))
    assert not any("memory-backend" in a for a in plain)


def test_vsock_device_user_space_kernel_or_none(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"], vsock_cid=42)
    user = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, vsock_fd=11)
    assert _argv.vsock_args(user) == [
        "-device", "pcie-root-port,id=vsock-port,chassis=31",
        "-chardev", "socket,id=vsock0-chr,fd=11",
        "-device", "vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr,bus=vsock-port",
    ]  # fmt: skip
    kernel = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, vhost_vsock_fd=12, vsock_cid=77
    )
    assert _argv.vsock_args(kernel) == [
        "-device", "pcie-root-port,id=vsock-port,chassis=31",
        "-device", "vhost-vsock-pci,id=vsock0,guest-cid=77,vhostfd=12,bus=vsock-port",
    ]  # fmt: skip
    micro = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, vsock_fd=11,
                 machine="microvm")  # fmt: skip
    assert _argv.vsock_args(micro)[-1] == "vhost-user-vsock-device,id=vsock0,chardev=vsock0-chr"
    off = dataclasses.replace(cfg, vsock=False)
    assert _argv.vsock_args(Plan(config=off, binary=Path("q"), accel="tcg", qmp_fd=3)) == []
    # No device yet (a restore plugs one in later): the empty hot-plug port only.
    assert _argv.vsock_args(Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3)) == [
        "-device", "pcie-root-port,id=vsock-port,chassis=31",
    ]  # fmt: skip


def test_restore_plan_waits_for_incoming_on_the_overlay(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=files["vmlinuz"], disk_path=files["disk.img"]
    )
    plan = Plan(config=cfg, binary=Path("/q"), accel="tcg", qmp_fd=3, console_log=Path("/c"))
    argv = build_argv(plan)
    assert "-incoming" not in argv
    assert json.loads(_opt(argv, "-blockdev")[0])["file"]["filename"] == str(files["disk.img"])
    overlay = Path("/state/restored-disk0.qcow2")
    backing = DiskImage(Path("/snap/disk0.raw"), vzkit.DiskFormat.RAW)
    restored = dataclasses.replace(plan, incoming=True, disk_override=overlay, disk_backing=backing)
    argv = build_argv(restored)
    assert _opt(argv, "-incoming") == ["defer"]
    shared = build_argv(dataclasses.replace(restored, shared_memory=True))
    assert "memory-backend-memfd,id=mem0,size=1024M,share=on,prealloc=on,prealloc-threads=2" in (
        _opt(shared, "-object")
    )
    assert "-S" in argv
    (blockdev,) = _opt(argv, "-blockdev")
    node = json.loads(blockdev)
    assert (node["driver"], node["node-name"]) == ("qcow2", "disk0")
    assert node["file"]["filename"] == str(overlay)
    assert node["backing"]["file"]["filename"] == "/snap/disk0.raw"  # see test_qemu_disk


def test_pvpanic_comes_after_every_other_device(files: dict[str, Path]) -> None:
    """On virt the PCI pvpanic takes the next free slot: the devices a snapshot saved before
    it existed keep their addresses only if it is added last (only ``-incoming`` follows)."""
    cfg = vzkit.LinuxVMConfig(arch="aarch64", kernel_path=files["vmlinuz"], headless=False)
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"), incoming=True
    )
    argv = build_argv(plan)
    devices = _opt(argv, "-device")
    assert devices[-1] == "pvpanic-pci,id=panic0"
    assert argv[-6:] == [
        "-device", "pvpanic-pci,id=panic0",
        "-action", "panic=exit-failure",
        "-incoming", "defer",
    ]  # fmt: skip


# -- confinement: QEMU's seccomp sandbox and the nat network through passt --------------------


def test_sandbox_denies_spawn_privileges_obsolete_and_resource_control(
    files: dict[str, Path],
) -> None:
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"])
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, sandbox=True, console_log=Path("/l")
    )
    argv = build_argv(plan)
    assert _opt(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "-sandbox" not in build_argv(dataclasses.replace(plan, sandbox=False))


@pytest.mark.parametrize(
    ("host_os", "expected"),
    [
        ("linux", "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny"),
        ("darwin", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
    ],
)
def test_bridged_on_linux_without_a_tap_lets_qemu_run_its_bridge_helper(
    files: dict[str, Path], host_os: str, expected: str
) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=files["vmlinuz"], network=vzkit.parse_network_mode("bridged:br0")
    )
    plan = Plan(config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, sandbox=True, host_os=host_os)
    assert _argv.sandbox_args(plan) == ["-sandbox", expected]


def test_nat_through_passt_is_a_stream_netdev_on_an_inherited_fd(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64",
        kernel_path=files["vmlinuz"],
        publish=(vzkit.parse_port_spec("8080:80"),),  # passt publishes it, not hostfwd
    )
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, passt_fd=11, console_log=Path("/l")
    )
    assert _argv.network_args(plan) == [
        "-netdev", "stream,id=net0,server=off,addr.type=fd,addr.str=11",
        "-device", "virtio-net-pci,netdev=net0,id=net0-dev",
    ]  # fmt: skip
    # without passt (not installed, or not Linux): QEMU's user-mode network, as before
    assert _opt(build_argv(dataclasses.replace(plan, passt_fd=None)), "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80"
    ]


def test_passt_argv_keeps_the_host_loopback_from_the_guest() -> None:
    from vzkit.backends.qemu._passt import passt_argv, uses_passt

    cfg = vzkit.LinuxVMConfig(
        publish=(
            vzkit.parse_port_spec("8080:80"),
            vzkit.parse_port_spec("0.0.0.0:5353:53/udp"),
        )
    )
    assert passt_argv(Path("/usr/bin/passt"), cfg, 7, ["192.0.2.53"]) == [
        "/usr/bin/passt", "--foreground", "--stderr", "--quiet", "--fd=7", "--ipv4-only",
        "--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2",
        "--no-dhcp-search",
        "--no-map-gw", "--dns", "192.0.2.53",
        "--tcp-ports", "127.0.0.1/8080:80",
        "--udp-ports", "0.0.0.0/5353:53",
    ]  # fmt: skip
    asked = dataclasses.replace(cfg, network=vzkit.parse_network_mode("nat:host-loopback"))
    loopback_argv = passt_argv(Path("passt"), asked, 7, ["192.0.2.53"])
    assert "--no-map-gw" not in loopback_argv
    assert "--dns" not in loopback_argv  # passt serves a loopback resolver at the gateway
    assert uses_passt(cfg, "linux")
    assert not uses_passt(cfg, "darwin")
    host_only = dataclasses.replace(cfg, network=vzkit.parse_network_mode("host-only"))
    assert not uses_passt(host_only, "linux")


def test_machine_sandbox_policy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The machine asks for the filter whenever the binary has it (bridged included)."""
    from vzkit.backends.qemu import _discover, _hostprep

    probe = _discover.SandboxProbe(True)

    async def sandbox_probe(binary: Path) -> _discover.SandboxProbe:
        return probe

    monkeypatch.setattr(_discover, "sandbox_probe", sandbox_probe)
    assert asyncio.run(_hostprep.sandbox(Path("q")))
    probe = _discover.SandboxProbe(False, "-sandbox is not supported by this QEMU binary")
    assert not asyncio.run(_hostprep.sandbox(Path("q")))
    assert "runs without its seccomp sandbox: -sandbox is not supported" in caplog.text


def test_bridged_with_a_tap_from_vzkit_keeps_the_whole_sandbox(files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(
        arch="x86_64", kernel_path=files["vmlinuz"], network=vzkit.parse_network_mode("bridged:br0")
    )
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, sandbox=True, tap_fd=9,
        host_os="linux", console_log=Path("/l"),
    )  # fmt: skip
    argv = build_argv(plan)
    assert _opt(argv, "-netdev") == ["tap,id=net0,fd=9"]
    assert _opt(argv, "-sandbox") == [_argv.SANDBOX]


def test_a_published_port_in_use_is_an_error_before_anything_starts() -> None:
    from vzkit.backends.qemu._passt import check_ports

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        spec = vzkit.parse_port_spec(f"{port}:80")
        with pytest.raises(vzkit.VMError) as info:
            check_ports((spec,))
        assert str(info.value) == (
            f"cannot publish 127.0.0.1:{port}:80/tcp: 127.0.0.1:{port}/tcp cannot be bound "
            "on the host (Address already in use)"
        )
    check_ports((spec,))  # free again


def test_host_resolvers_skip_loopback_stubs(tmp_path: Path) -> None:
    from vzkit.backends.qemu._passt import host_resolvers

    stub = tmp_path / "resolv.conf"
    stub.write_text("# systemd-resolved\nnameserver 127.0.0.53\noptions edns0\n")
    upstream = tmp_path / "upstream.conf"
    upstream.write_text("nameserver 192.0.2.53\nnameserver ::1\nnameserver 2001:db8::1\n"
                        "nameserver bogus\nnameserver 198.51.100.7 # second\n")  # fmt: skip
    assert host_resolvers([stub, upstream]) == ["192.0.2.53", "198.51.100.7"]
    assert host_resolvers([upstream, stub]) == ["192.0.2.53", "198.51.100.7"]
    assert host_resolvers([stub, tmp_path / "missing"]) == []


def test_cpu_model_default_per_accelerator_and_arch(files: dict[str, Path]) -> None:
    """Issue 20: aarch64 under TCG runs max with QEMU's cheap pointer-auth algorithm (about
    3x faster to boot than max); KVM/HVF pass the host CPU; a config's model wins."""
    kernel = files["vmlinuz"]
    arm = vzkit.LinuxVMConfig(arch="aarch64", kernel_path=kernel)
    x86 = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=kernel)
    assert arm.cpu_model == x86.cpu_model == ""
    assert _argv.cpu_model(arm, "tcg") == "neoverse-n1"
    assert _argv.cpu_model(x86, "tcg") == "max"
    assert _argv.cpu_model(arm, "kvm") == _argv.cpu_model(x86, "kvm") == "host"
    assert _argv.cpu_model(arm, "hvf") == "host"
    a72 = arm.replace(cpu_model="cortex-a72")
    assert _argv.cpu_model(a72, "tcg") == "cortex-a72"
    plan = Plan(config=arm, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"))
    assert plan.cpu == "neoverse-n1"
    assert _opt(build_argv(plan), "-cpu") == ["neoverse-n1"]
    plan = Plan(config=a72, binary=Path("q"), accel="tcg", qmp_fd=3, console_log=Path("/l"))
    assert _opt(build_argv(plan), "-cpu") == ["cortex-a72"]
    assert vzkit.LinuxVMConfig.from_json(a72.to_json()).cpu_model == "cortex-a72"


@pytest.mark.parametrize("bad", ["max pauth", "max,file=/etc/passwd", "../x", ",max", "a\x00"])
def test_cpu_model_is_refused_unless_a_cpu_option_string(bad: str) -> None:
    with pytest.raises(vzkit.ConfigError, match="is not a CPU model"):
        vzkit.LinuxVMConfig(arch="aarch64", cpu_model=bad)


def test_a_snapshot_restores_only_with_its_cpu_model_and_machine_type() -> None:
    from vzkit.backends.qemu._migrate import hardware_diff

    saved = {"accel": "tcg", "arch": "aarch64", "cpu": "max,pauth-impdef=on", "machine": "virt"}
    assert hardware_diff(saved, cpu="max,pauth-impdef=on", machine="virt") == []
    assert hardware_diff(saved, cpu="max", machine="virt") == [
        "it was saved with CPU model 'max,pauth-impdef=on', this VM would run 'max' "
        "(set cpu_model='max,pauth-impdef=on' in its config to restore it)"
    ]
    x86 = {"accel": "tcg", "arch": "x86_64", "cpu": "max", "machine": "q35"}
    assert hardware_diff(x86, cpu="max", machine="microvm") == [
        "it was saved on machine type 'q35', this VM would run 'microvm' "
        "(set machine_type='q35' in its config to restore it)"
    ]
    # Snapshots from before the CPU model was recorded ran max under TCG, host under KVM:
    # an aarch64 one is refused by today's default (another pointer-auth algorithm).
    old = {"accel": "tcg", "arch": "aarch64"}
    assert hardware_diff(old, cpu="max", machine="virt") == []
    assert (
        "saved with CPU model 'max'"
        in hardware_diff(old, cpu=_argv.AARCH64_TCG_CPU, machine="virt")[0]
    )
    assert hardware_diff({"accel": "kvm", "arch": "x86_64"}, cpu="host", machine="q35") == []


def test_the_qemu_machine_describes_the_hardware_a_restore_would_build(tmp_path: Path) -> None:
    """Before anything starts, the machine resolves the run a restore would make: the same
    items ``snapshot_info()`` reports after it, compared by ``hardware_diff``."""
    from vzkit.backends.qemu import _machine, _migrate

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    cfg = vzkit.LinuxVMConfig(kernel_path=kernel, accelerator="tcg", cpu_model="Nehalem")
    machine = _machine.QemuMachine(cfg, lambda old, new: None)
    planned = asyncio.run(_migrate.planned_info(cfg))
    assert planned == {"accel": "tcg", "arch": "x86_64", "cpu": "Nehalem", "machine": "q35"}
    assert planned.keys() == machine.snapshot_info().keys()
    assert asyncio.run(machine.hardware_mismatches(planned)) == []
    saved = {**planned, "cpu": "max", "accel": "kvm"}  # how it ran is not compared
    assert asyncio.run(machine.hardware_mismatches(saved)) == [
        "it was saved with CPU model 'max', this VM would run 'Nehalem' "
        "(set cpu_model='max' in its config to restore it)"
    ]
    assert machine.state is vzkit.VMState.STOPPED  # nothing started
    assert machine.pid is None


def test_the_device_table_gives_the_fds_qemu_inherits_and_the_migration_verdicts(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from vzkit.backends.qemu import _devices
    from vzkit.backends.qemu._virtiofs import ShareDevice, ShareKind

    names = [d.name for d in _devices.DEVICES]
    assert names == [
        "root-disk", "disk", "iso", "disks", "nic", "nics", "rng", "balloon", "sound", "console",
        "agent-port", "vsock", "agent-key", "shares", "display", "pvpanic",
    ]  # fmt: skip
    cfg = vzkit.LinuxVMConfig(arch="x86_64", kernel_path=files["vmlinuz"])
    shares = (
        ShareDevice("code", tmp_path, False, fd=21),
        ShareDevice("docs", tmp_path, True, ShareKind.NINEP),
    )
    plan = Plan(
        config=cfg, binary=Path("q"), accel="tcg", qmp_fd=3, agent_fd=4, console_log=Path("/l"),
        vsock_fd=5, agent_key_fd=6, passt_fd=7, shares=shares, shared_memory=True,
    )  # fmt: skip
    assert _devices.pass_fds(plan) == (3, 7, 4, 5, 6, 21)  # QMP first, then device order
    argv = build_argv(plan)
    text = " ".join(argv)
    for fd in (3, 4, 5, 21):  # each inherited fd is named on the command line
        assert re.search(rf"\bfd={fd}\b", text), fd
    assert "addr.str=7" in text  # passt's stream socket
    assert "file=/proc/self/fd/6" in text  # the agent key's fw_cfg item
    assert _devices.migration_blockers(plan) == [
        f"vhost-user-fs (the VirtioFS share 'code' of {str(tmp_path)!r})"
    ]
    micro = Plan(
        config=cfg.replace(machine_type="microvm"), binary=Path("q"), accel="tcg", qmp_fd=3,
        console_log=Path("/l"),
    )  # fmt: skip
    assert _devices.migration_blockers(micro) == [
        "the vsock device (microvm has no PCI hot-plug to unplug it around a save)"
    ]
    vsock = next(d for d in _devices.DEVICES if d.name == "vsock")
    assert "_vsock_plug" in vsock.hotplug
