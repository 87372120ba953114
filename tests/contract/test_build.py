"""The object graph ``build_linux_vm_config`` and the ``create_*`` helpers produce.

Each test builds against the strict stand-in and compares the rendered graph with what the
seed builds for the same config; any call outside Apple's API surface fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vzkit
from vzkit.backends import vz as vzb
from vzkit.backends.vz import _build

from ._graph import find, render
from ._support import ARM64_IMAGE, FakeFactory, take_violations
from .fakeobjc import FakeRuntime

pytestmark = pytest.mark.contract

MIB = 1 << 20


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("vmlinuz", "initrd", "disk.img", "install.iso"):
        out[name] = tmp_path / name
        out[name].write_bytes(ARM64_IMAGE + b"\0" * 448)
    share = tmp_path / "src"
    share.mkdir()
    out["share"] = share
    out["state"] = tmp_path / "state"
    return out


def direct(files: dict[str, Path], **kw: object) -> vzkit.LinuxVMConfig:
    fields: dict[str, object] = {
        "kernel_path": files["vmlinuz"],
        "initrd_path": files["initrd"],
        "disk_path": files["disk.img"],
        "state_dir": files["state"],
    }
    fields.update(kw)
    return vzkit.LinuxVMConfig(**fields)  # type: ignore[arg-type]


def test_direct_boot_graph_is_the_seeds(fake: FakeRuntime, files: dict[str, Path]) -> None:
    cfg = direct(files, cpus=3, memory_gb=1.5)
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    state = files["state"]
    mac = tree["networkDevices"][0]["MACAddress"]["string"]
    machine_id = (state / "linux-machine.id").read_bytes()
    assert tree == {
        "class": "VZVirtualMachineConfiguration",
        "CPUCount": 3,
        "memorySize": 1536 * MIB,
        "platform": {
            "class": "VZGenericPlatformConfiguration",
            "machineIdentifier": {
                "class": "VZGenericMachineIdentifier",
                "dataRepresentation": machine_id,
            },
            "nestedVirtualizationEnabled": True,
        },
        "bootLoader": {
            "class": "VZLinuxBootLoader",
            "init": "initWithKernelURL:",
            "kernelURL": str(files["vmlinuz"]),
            "initialRamdiskURL": str(files["initrd"]),
            "commandLine": "console=tty0 console=hvc0 root=/dev/vda",
        },
        "storageDevices": [
            {
                "class": "VZVirtioBlockDeviceConfiguration",
                "init": "initWithAttachment:",
                "attachment": {
                    "class": "VZDiskImageStorageDeviceAttachment",
                    "init": "initWithURL:readOnly:cachingMode:synchronizationMode:error:",
                    "URL": str(files["disk.img"]),
                    "readOnly": False,
                    "cachingMode": 2,  # VZDiskImageCachingModeCached
                    "synchronizationMode": 2,  # VZDiskImageSynchronizationModeFsync
                },
            }
        ],
        "networkDevices": [
            {
                "class": "VZVirtioNetworkDeviceConfiguration",
                "attachment": {"class": "VZNATNetworkDeviceAttachment"},
                "MACAddress": {"class": "VZMACAddress", "string": mac},
            }
        ],
        "entropyDevices": [{"class": "VZVirtioEntropyDeviceConfiguration"}],
        "memoryBalloonDevices": [{"class": "VZVirtioTraditionalMemoryBalloonDeviceConfiguration"}],
        "socketDevices": [{"class": "VZVirtioSocketDeviceConfiguration"}],
        "serialPorts": [
            {
                "class": "VZVirtioConsoleDeviceSerialPortConfiguration",
                "attachment": {
                    "class": "VZFileSerialPortAttachment",
                    "init": "initWithURL:append:error:",
                    "URL": str(state / "console.log"),
                    "append": True,
                },
            }
        ],
        "directorySharingDevices": [],
    }
    assert int(mac[:2], 16) & 0x03 == 0x02  # locally administered, unicast
    assert (state / "mac-address").read_text().strip() == mac
    vzb.validate_config(vzb.build_linux_vm_config(cfg))


def test_machine_identifier_and_mac_persist_across_builds(
    fake: FakeRuntime, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = direct(files)
    first = render(fake, vzb.build_linux_vm_config(cfg))
    second = render(fake, vzb.build_linux_vm_config(cfg))
    ident = first["platform"]["machineIdentifier"]["dataRepresentation"]
    assert second["platform"]["machineIdentifier"] == {
        "class": "VZGenericMachineIdentifier",
        "init": "initWithDataRepresentation:",
        "dataRepresentation": ident,
    }
    mac = first["networkDevices"][0]["MACAddress"]["string"]
    assert second["networkDevices"][0]["MACAddress"] == {
        "class": "VZMACAddress",
        "init": "initWithString:",
        "string": mac,
    }
    (files["state"] / "linux-machine.id").write_bytes(b"garbage")
    third = render(fake, vzb.build_linux_vm_config(cfg))
    assert third["platform"]["machineIdentifier"]["dataRepresentation"] != ident
    assert "not a machine identifier" in caplog.text
    stored = (files["state"] / "linux-machine.id").read_bytes()
    assert third["platform"]["machineIdentifier"]["dataRepresentation"] == stored


@pytest.mark.parametrize(
    ("enabled", "supported", "expected"),
    [(True, True, True), (True, False, None), (False, True, None)],
)
def test_nested_virtualization_only_when_supported_and_enabled(
    fake: FakeRuntime, files: dict[str, Path], enabled: bool, supported: bool, expected: object
) -> None:
    fake.knobs.nested_supported = supported
    tree = render(fake, vzb.build_linux_vm_config(direct(files, nested_virtualization=enabled)))
    assert tree["platform"].get("nestedVirtualizationEnabled") == expected


def test_efi_boot_creates_then_reuses_the_variable_store(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    cfg = vzkit.LinuxVMConfig(
        disk_path=files["disk.img"], iso_path=files["install.iso"], state_dir=files["state"]
    )
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    nvram = str(files["state"] / "efi.nvram")
    assert tree["bootLoader"] == {
        "class": "VZEFIBootLoader",
        "variableStore": {
            "class": "VZEFIVariableStore",
            "init": "initCreatingVariableStoreAtURL:options:error:",
            "URL": nvram,
        },
    }
    assert Path(nvram).is_file()
    again = render(fake, vzb.build_linux_vm_config(cfg))
    assert again["bootLoader"]["variableStore"] == {
        "class": "VZEFIVariableStore",
        "init": "initWithURL:",
        "URL": nvram,
    }
    disks = [d["attachment"] for d in tree["storageDevices"]]
    assert [(d["URL"], d["readOnly"]) for d in disks] == [
        (str(files["disk.img"]), False),
        (str(files["install.iso"]), True),
    ]
    assert {(d["cachingMode"], d["synchronizationMode"]) for d in disks} == {(2, 2)}
    vzb.validate_config(vzb.build_linux_vm_config(cfg))


def test_volumes_get_unique_tags_and_their_modes(
    fake: FakeRuntime, files: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other" / "src"
    other.mkdir(parents=True)
    volumes = (
        vzkit.VolumeMount(files["share"]),
        vzkit.VolumeMount(other, read_only=True),
        vzkit.VolumeMount(tmp_path, "data"),
    )
    tree = render(fake, vzb.build_linux_vm_config(direct(files, volumes=volumes)))
    shares = [
        (d["tag"], d["share"]["directory"]["URL"], d["share"]["directory"]["readOnly"])
        for d in tree["directorySharingDevices"]
    ]
    assert shares == [
        ("src", str(files["share"]), False),
        ("src-1", str(other), True),
        ("data", str(tmp_path), False),
    ]
    assert {d["class"] for d in tree["directorySharingDevices"]} == {
        "VZVirtioFileSystemDeviceConfiguration"
    }
    assert {d["share"]["class"] for d in tree["directorySharingDevices"]} == {
        "VZSingleDirectoryShare"
    }
    # The default guest's init learns the tags (and which are read-only) from the cmdline.
    assert tree["bootLoader"]["commandLine"].endswith(" vzkit.shares=src,src-1,data vzkit.ro=src-1")


def test_volumes_at_guest_paths_reach_the_guest_on_the_cmdline(
    fake: FakeRuntime, files: dict[str, Path], tmp_path: Path
) -> None:
    volumes = (
        vzkit.parse_volume_spec(f"{files['share']}:/work/src:ro"),
        vzkit.VolumeMount(tmp_path, "data"),
    )
    tree = render(fake, vzb.build_linux_vm_config(direct(files, volumes=volumes)))
    assert [d["tag"] for d in tree["directorySharingDevices"]] == ["src", "data"]
    assert tree["bootLoader"]["commandLine"].endswith(
        " vzkit.shares=src,data vzkit.ro=src vzkit.mounts=src=/work/src"
    )


def test_bridged_network_uses_the_named_interface(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    cfg = direct(files, network=vzkit.parse_network_mode("bridged:en1"))
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    assert tree["networkDevices"][0]["attachment"] == {
        "class": "VZBridgedNetworkDeviceAttachment",
        "init": "initWithInterface:",
        "interface": {
            "class": "VZBridgedNetworkInterface",
            "identifier": "en1",
            "localizedDisplayName": "Ethernet (en1)",
        },
    }
    with pytest.raises(vzkit.ConfigError, match=r"'en9' \(available: en0, en1"):
        vzb.build_linux_vm_config(direct(files, network=vzkit.parse_network_mode("bridged:en9")))


def test_no_network_means_no_device(fake: FakeRuntime, files: dict[str, Path]) -> None:
    cfg = direct(files, network=vzkit.parse_network_mode("none"))
    assert render(fake, vzb.build_linux_vm_config(cfg))["networkDevices"] == []


@pytest.mark.parametrize("mode", ["vmnet", "host-only"])
def test_vmnet_modes_name_the_macos_version_they_need(
    make_fake: FakeFactory, files: dict[str, Path], mode: str
) -> None:
    make_fake(macos="15.0")
    cfg = direct(files, network=vzkit.parse_network_mode(mode))
    with pytest.raises(
        vzb.MacOSVersionError, match=r"needs macOS 26\.0 or later \(this is macOS 15\.0\)"
    ) as info:
        vzb.build_linux_vm_config(cfg)
    assert info.value.required == (26, 0)
    assert info.value.backend == "vz"
    make_fake(macos="26.0")
    with pytest.raises(vzkit.UnsupportedError, match="not implemented yet"):
        vzb.build_linux_vm_config(cfg)


def test_graphics_only_when_not_headless(fake: FakeRuntime, files: dict[str, Path]) -> None:
    tree = render(fake, vzb.build_linux_vm_config(direct(files)))
    assert "graphicsDevices" not in tree
    displays = (vzkit.parse_display_spec("720p"), vzkit.parse_display_spec("4k"))
    tree = render(fake, vzb.build_linux_vm_config(direct(files, headless=False, displays=displays)))
    scanouts = tree["graphicsDevices"][0]["scanouts"]
    assert [(s["widthInPixels"], s["heightInPixels"]) for s in scanouts] == [
        (1280, 720),
        (3840, 2160),
    ]
    assert tree["keyboards"] == [{"class": "VZUSBKeyboardConfiguration"}]
    assert tree["pointingDevices"] == [
        {"class": "VZUSBScreenCoordinatePointingDeviceConfiguration"}
    ]
    default = render(fake, vzb.build_linux_vm_config(direct(files, headless=False)))
    scanout = default["graphicsDevices"][0]["scanouts"][0]
    assert (scanout["widthInPixels"], scanout["heightInPixels"]) == (1920, 1080)


def test_optional_devices_follow_the_config(fake: FakeRuntime, files: dict[str, Path]) -> None:
    cfg = direct(
        files,
        vsock=False,
        balloon=False,
        entropy=False,
        console=vzkit.ConsoleMode.NONE,
        cmdline="console=hvc0 quiet",
        disk_path=None,
    )
    tree = render(fake, vzb.build_linux_vm_config(cfg))
    for key in (
        "socketDevices",
        "memoryBalloonDevices",
        "entropyDevices",
        "serialPorts",
        "storageDevices",
    ):
        assert tree[key] == [], key
    assert tree["bootLoader"]["commandLine"] == "console=hvc0 quiet"


def test_stdio_console_wraps_fds_0_and_1_without_owning_them(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    tree = render(fake, vzb.build_linux_vm_config(direct(files, console="stdio")))
    assert tree["serialPorts"][0]["attachment"] == {
        "class": "VZFileHandleSerialPortAttachment",
        "init": "initWithFileHandleForReading:fileHandleForWriting:",
        "fileHandleForReading": {"class": "NSFileHandle", "fd": 0},
        "fileHandleForWriting": {"class": "NSFileHandle", "fd": 1},
    }


def test_serial_console_over_caller_fds(fake: FakeRuntime) -> None:
    read_fd, write_fd = os.pipe()
    try:
        port = vzb.create_serial_console(read_fd, write_fd)
        attachment = render(fake, port)["attachment"]
        assert attachment["fileHandleForReading"]["fd"] == read_fd
        assert attachment["fileHandleForWriting"]["fd"] == write_fd
        del port, attachment
        os.fstat(read_fd)  # still ours: the handles do not close on dealloc
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_sizes_outside_what_the_host_allows_are_config_errors(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    with pytest.raises(vzkit.ConfigError, match=r"memory 64 MiB is outside .*\(128\.\.65536 MiB\)"):
        vzb.build_linux_vm_config(direct(files, memory_gb=0.0625))
    with pytest.raises(vzkit.ConfigError, match=r"cpus=12 is outside .*\(1\.\.10\)"):
        vzb.build_linux_vm_config(direct(files, cpus=12))


def test_foreign_arch_and_custom_cid_are_unsupported(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    with pytest.raises(vzkit.UnsupportedError, match="runs aarch64 guests on this Mac"):
        vzb.build_linux_vm_config(direct(files, arch="x86_64"))
    with pytest.raises(vzkit.UnsupportedError, match="CID is always 3") as info:
        vzb.build_linux_vm_config(direct(files, vsock_cid=7))
    assert info.value.feature == "vsock_cid"
    # published ports are the core's (vzkit._portfwd, through the agent): the build takes them
    vzb.build_linux_vm_config(direct(files, publish=(vzkit.parse_port_spec("8080:80"),)))


def test_a_root_disk_is_the_vms_own_copy_first(
    fake: FakeRuntime, files: dict[str, Path], tmp_path: Path
) -> None:
    root = vzkit.RootDisk(base=files["disk.img"], device="/dev/vda1")
    cfg = direct(files, root_disk=root, arch="aarch64", cmdline="console=hvc0")
    layer = tmp_path / "state" / "root-layer.img"
    layer.parent.mkdir(exist_ok=True)
    layer.write_bytes(b"\0" * 512)
    tree = render(fake, vzb.build_linux_vm_config(cfg, root_layer=layer))
    disks = [d["attachment"] for d in tree["storageDevices"]]
    assert [(d["URL"], d["readOnly"]) for d in disks] == [
        (str(layer), False),  # /dev/vda: the copy; the base is never attached
        (str(files["disk.img"]), False),  # the config's disk_path, second
    ]
    assert tree["bootLoader"]["commandLine"] == "console=hvc0 root=/dev/vda1 rootfstype=ext4"
    with pytest.raises(ValueError, match="per-VM layer"):
        vzb.build_linux_vm_config(cfg)
    qcow2 = direct(
        files, arch="aarch64", root_disk=vzkit.RootDisk(base=files["disk.img"], format="qcow2")
    )
    with pytest.raises(vzkit.UnsupportedError, match="raw images only") as info:
        vzb.build_linux_vm_config(qcow2, root_layer=layer)
    assert info.value.feature == "disk_format:qcow2"


def test_state_dir_is_required(fake: FakeRuntime, files: dict[str, Path]) -> None:
    cfg = vzkit.LinuxVMConfig(kernel_path=files["vmlinuz"])
    with pytest.raises(vzkit.ConfigError, match="needs a state_dir"):
        vzb.build_linux_vm_config(cfg)
    tree = render(fake, vzb.build_linux_vm_config(cfg, state_dir=files["state"]))
    assert tree["bootLoader"]["kernelURL"] == str(files["vmlinuz"])


def test_validate_config_maps_nserrors(fake: FakeRuntime, files: dict[str, Path]) -> None:
    config = vzb.build_linux_vm_config(direct(files))
    vzb.validate_config(config)
    fake.fail_next(
        "validateWithError:", code=2, description="Invalid configuration.", reason="Too few CPUs."
    )
    with pytest.raises(
        vzkit.ConfigError, match=r"Invalid configuration\. \(Too few CPUs\.\)"
    ) as info:
        vzb.validate_config(config)
    cause = info.value.__cause__
    assert isinstance(cause, vzb.NSErrorDetails)
    assert (cause.info.domain, cause.info.code) == ("VZErrorDomain", 2)
    fake.fail_next("validateWithError:", code=1, description="Internal error.")
    with pytest.raises(vzkit.ConfigError, match="Internal error"):
        vzb.validate_config(config)
    fake.knobs.entitled = False
    with pytest.raises(vzkit.BackendUnavailableError, match="vzkit codesign"):
        vzb.validate_config(config)


def test_create_disk_attachment_modes_and_errors(fake: FakeRuntime, files: dict[str, Path]) -> None:
    attachment = vzb.create_disk_attachment(
        files["disk.img"], True, caching=vzb.DiskCaching.UNCACHED, sync=vzb.DiskSync.NONE
    )
    tree = render(fake, attachment)
    assert (tree["readOnly"], tree["cachingMode"], tree["synchronizationMode"]) == (True, 1, 3)
    block = render(fake, vzb.create_block_device(attachment))
    assert block["class"] == "VZVirtioBlockDeviceConfiguration"
    assert block["attachment"] == tree
    with pytest.raises(vzkit.ConfigError, match="does not exist"):
        vzb.create_disk_attachment(files["state"] / "missing.img")


def test_create_directory_share_and_virtiofs(fake: FakeRuntime, files: dict[str, Path]) -> None:
    share = render(fake, vzb.create_directory_share(files["share"], True))
    assert share == {
        "class": "VZSingleDirectoryShare",
        "init": "initWithDirectory:",
        "directory": {
            "class": "VZSharedDirectory",
            "init": "initWithURL:readOnly:",
            "URL": str(files["share"]),
            "readOnly": True,
        },
    }
    with pytest.raises(vzkit.ConfigError, match="does not exist"):
        vzb.create_directory_share(files["share"] / "nope")
    devices = render(fake, vzb.create_virtiofs_devices([vzkit.VolumeMount(files["share"], "code")]))
    assert [d["tag"] for d in devices] == ["code"]


def test_create_network_device_and_attachment(fake: FakeRuntime) -> None:
    nat = vzkit.NetworkConfig()
    device = render(fake, vzb.create_network_device(nat, mac_address="02:00:00:00:00:01"))
    assert device["MACAddress"] == {
        "class": "VZMACAddress",
        "init": "initWithString:",
        "string": "02:00:00:00:00:01",
    }
    assert render(fake, vzb.create_network_attachment(nat)) == {
        "class": "VZNATNetworkDeviceAttachment"
    }
    macs = {render(fake, vzb.create_network_device(nat))["MACAddress"]["string"] for _ in range(4)}
    assert len(macs) == 4
    loopback = vzkit.parse_network_mode("nat:host-loopback")
    with pytest.raises(vzkit.UnsupportedError, match="not possible on the vz backend") as info:
        vzb.create_network_attachment(loopback)
    assert (info.value.backend, info.value.feature) == ("vz", "network:host-loopback")


def test_create_graphics_configs(fake: FakeRuntime) -> None:
    displays = [vzkit.parse_display_spec("retina")]
    mac = render(fake, vzb.create_mac_graphics_config(displays))
    assert mac["displays"] == [
        {
            "class": "VZMacGraphicsDisplayConfiguration",
            "init": "initWithWidthInPixels:heightInPixels:pixelsPerInch:",
            "widthInPixels": 2560,
            "heightInPixels": 1600,
            "pixelsPerInch": 227,
        }
    ]
    virtio = render(fake, vzb.create_virtio_graphics_config(displays))
    assert find(virtio, "VZVirtioGraphicsScanoutConfiguration")[0]["widthInPixels"] == 2560


def test_add_memory_balloon_device_once(fake: FakeRuntime) -> None:
    import Virtualization

    config = Virtualization.VZVirtualMachineConfiguration.alloc().init()
    vzb.add_memory_balloon_device(config)
    vzb.add_memory_balloon_device(config)
    assert render(fake, config)["memoryBalloonDevices"] == [
        {"class": "VZVirtioTraditionalMemoryBalloonDeviceConfiguration"}
    ]


def test_file_console_creation_failure_is_mapped(fake: FakeRuntime, tmp_path: Path) -> None:
    with pytest.raises(vzkit.VMError, match="cannot open console log"):
        vzb.create_file_serial_console(tmp_path / "missing-dir" / "console.log")
    assert take_violations(fake) == []


def test_default_cmdline_is_the_seeds() -> None:
    assert _build.DEFAULT_CMDLINE == "console=tty0 console=hvc0 root=/dev/vda"


def test_a_gzip_kernel_is_decompressed_once_into_the_state_dir(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    import gzip

    image = ARM64_IMAGE + b"ARM64 Image \x00" * 1000
    packed = files["vmlinuz"].with_name("vmlinuz-gz")
    packed.write_bytes(gzip.compress(image))
    cfg = direct(files, kernel_path=packed)
    loader = render(fake, vzb.build_linux_vm_config(cfg))["bootLoader"]
    unpacked = Path(loader["kernelURL"])
    assert unpacked.parent == files["state"]
    assert unpacked.read_bytes() == image
    stamp = unpacked.stat().st_mtime_ns
    again = render(fake, vzb.build_linux_vm_config(cfg))["bootLoader"]
    assert again["kernelURL"] == str(unpacked)
    assert unpacked.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert render(fake, vzb.build_linux_vm_config(direct(files)))["bootLoader"]["kernelURL"] == (
        str(files["vmlinuz"])  # an uncompressed kernel is used where it is
    )
    packed.write_bytes(gzip.compress(image)[:40])
    with pytest.raises(vzkit.ConfigError, match="gzip-compressed but cannot be decompressed"):
        vzb.build_linux_vm_config(cfg)
    assert sorted(p.name for p in files["state"].iterdir() if p.name.startswith(".")) == []


def test_a_cmdline_for_qemus_serial_port_gets_the_virtio_console(
    fake: FakeRuntime, files: dict[str, Path]
) -> None:
    qemu_style = direct(files, cmdline="console=ttyAMA0 quiet")
    loader = render(fake, vzb.build_linux_vm_config(qemu_style))["bootLoader"]
    assert loader["commandLine"] == "console=ttyAMA0 quiet console=hvc0"
    ready = direct(files, cmdline="console=hvc0 quiet")
    assert render(fake, vzb.build_linux_vm_config(ready))["bootLoader"]["commandLine"] == (
        "console=hvc0 quiet"
    )
    silent = direct(files, cmdline="quiet", console="none")
    assert render(fake, vzb.build_linux_vm_config(silent))["bootLoader"]["commandLine"] == "quiet"
    assert take_violations(fake) == []


def test_the_public_builder_refuses_a_qcow2_disk(fake: FakeRuntime, files: dict[str, Path]) -> None:
    """``build_linux_vm_config`` is public: it refuses a non-raw disk itself, not only the
    machine that calls it (VZ would attach the qcow2 file as raw bytes for the guest to
    rewrite)."""
    cfg = direct(files, disk_format="qcow2")
    with pytest.raises(vzkit.UnsupportedError, match="qemu-img convert -f qcow2 -O raw") as info:
        vzb.build_linux_vm_config(cfg)
    assert (info.value.backend, info.value.feature) == ("vz", "disk:qcow2")
    assert not files["state"].exists() or not any(files["state"].iterdir())
