"""The public surface of ``vzkit``, and what importing it does (and must not do)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import vzkit

EXPECTED_ALL = [
    "MIN_MEMORY_MB",
    "Arch",
    "ArgumentError",
    "BackendUnavailableError",
    "Balloon",
    "BalloonInfo",
    "ConfigError",
    "ConsoleMode",
    "Disk",
    "DiskBus",
    "DiskFormat",
    "DisplayConfig",
    "DisplayList",
    "GuestCommand",
    "GuestError",
    "LinuxVMConfig",
    "MacKeyboard",
    "MacPointer",
    "MacVMConfig",
    "NetworkConfig",
    "NetworkMode",
    "PortForward",
    "PortProtocol",
    "ProcessDefaults",
    "RootDisk",
    "RootInit",
    "SnapshotError",
    "SnapshotManager",
    "SnapshotMeta",
    "SpecError",
    "StateError",
    "UnsupportedError",
    "VMError",
    "VMExistsError",
    "VMInfo",
    "VMNotFoundError",
    "VMState",
    "VMTimeoutError",
    "VirtualMachine",
    "VolumeMount",
    "VzkitError",
    "__version__",
    "assign_volume_tags",
    "build_debian_image",
    "connect",
    "create",
    "create_disk_image",
    "default_display_config",
    "default_guest_config",
    "default_linux_display_config",
    "exec_call",
    "format_size",
    "host_arch",
    "list_vms",
    "parse_disk_spec",
    "parse_display_spec",
    "parse_network_mode",
    "parse_port_spec",
    "parse_size",
    "parse_volume_spec",
    "pull_image",
    "remove_vm",
    "run",
    "start",
]


def test_all_is_pinned() -> None:
    assert vzkit.__all__ == EXPECTED_ALL


def test_every_name_in_all_exists() -> None:
    for name in vzkit.__all__:
        assert hasattr(vzkit, name), name


def test_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from vzkit import *", namespace)
    assert set(EXPECTED_ALL) <= set(namespace)


def test_version_and_typed_marker() -> None:
    assert isinstance(vzkit.__version__, str)
    assert vzkit.__version__
    assert (Path(vzkit.__file__).parent / "py.typed").is_file()


# Run in a fresh interpreter without ``site`` (so no sitecustomize or .pth code runs first):
# forbid every way of starting a process, then import vzkit and report what got imported.
_PROBE = textwrap.dedent(
    """
    import json, os, subprocess, sys

    def _forbidden(*args, **kwargs):
        raise AssertionError("importing vzkit started a process")

    subprocess.Popen.__init__ = _forbidden
    for _name in (
        "fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen",
        "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
        "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
    ):
        if hasattr(os, _name):
            setattr(os, _name, _forbidden)
    import _posixsubprocess
    _posixsubprocess.fork_exec = _forbidden

    sys.path[:0] = json.loads(sys.argv[1])
    before = set(sys.modules)
    import vzkit

    vzkit.LinuxVMConfig()  # the default config (host_arch) starts nothing either
    vzkit.parse_display_spec("4k")
    vzkit.LinuxVMConfig().to_toml()  # a third-party module, imported on first use
    print(json.dumps({"file": vzkit.__file__, "new": sorted(set(sys.modules) - before)}))
    """
)

_FORBIDDEN_TOP = {
    "objc",
    "Foundation",
    "Virtualization",
    "dispatch",
    "CoreFoundation",
    "AppKit",
    "Cocoa",
    "PyObjCTools",
    "libdispatch",
    "qemu",
    "qemu_qmp",
    "qmp",
}


def test_import_starts_no_process_and_loads_no_platform_bindings() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _PROBE, json.dumps(sys.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert Path(report["file"]).resolve() == Path(vzkit.__file__).resolve()
    new: list[str] = report["new"]
    assert "vzkit" in new
    assert "tomli_w" in new  # sanity: the probe really saw the package's imports
    offending = [
        mod
        for mod in new
        if mod.split(".")[0] in _FORBIDDEN_TOP
        # the backend registry (vzkit.backends) is pure; the backends themselves load lazily
        or mod.startswith(("vzkit.backends.qemu", "vzkit.backends.vz"))
        or "qemu" in mod.lower().split(".")
    ]
    assert offending == []
