"""The ``vzkit`` command line: parse, build a config, call the library, render.

Library errors become exit codes at this edge only (:mod:`vzkit._cli_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import click

from . import __version__
from ._cli_errors import EXIT_USAGE, F
from ._cli_errors import handle_errors as _handle_errors
from ._cli_macos import codesign_cmd, macos_group
from ._config import MAX_CPUS, MAX_MEMORY_GB, MIN_MEMORY_MB, ConsoleMode, LinuxVMConfig
from ._disk import DiskFormat, create_disk_image
from ._display import DisplayList
from ._network import parse_network_mode, parse_port_spec
from ._snapshot import SnapshotManager, format_rfc3339
from ._state import Arch, VMState
from ._volume import parse_volume_spec
from .errors import ConfigError, GuestError, SpecError, VzkitError


def _spec_callback(
    parse: Callable[[str], Any],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            if isinstance(value, tuple):
                return tuple(parse(v) for v in value)
            return parse(value)
        except SpecError as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from err

    return callback


def vm_options(func: F) -> F:
    """The options that describe a Linux VM, shared by ``config`` and (later) ``run``."""
    options = [
        click.option(
            "--cpus", type=click.IntRange(min=0), help=f"Virtual CPUs, 1-{MAX_CPUS} (default 2)."
        ),
        click.option(
            "--memory",
            "memory_gb",
            type=float,
            help=f"Memory in GB, {MIN_MEMORY_MB / 1024:g}-{MAX_MEMORY_GB}, e.g. 0.5 (default 1).",
        ),
        click.option(
            "--arch", type=click.Choice([a.value for a in Arch]), help="Guest architecture."
        ),
        click.option(
            "--kernel",
            "kernel_path",
            type=click.Path(path_type=Path),
            help="Kernel for direct boot.",
        ),
        click.option(
            "--initrd", "initrd_path", type=click.Path(path_type=Path), help="Initial ramdisk."
        ),
        click.option("--cmdline", help="Kernel command line."),
        click.option(
            "--disk", "disk_path", type=click.Path(path_type=Path), help="Main disk image."
        ),
        click.option(
            "--disk-format",
            type=click.Choice([f.value for f in DiskFormat]),
            help="Format of --disk (default raw; never guessed from the disk's content).",
        ),
        click.option(
            "--iso", "iso_path", type=click.Path(path_type=Path), help="ISO attached read-only."
        ),
        click.option(
            "--state-dir", type=click.Path(path_type=Path), help="Per-VM state directory."
        ),
        click.option(
            "--volume",
            "-v",
            "volumes",
            multiple=True,
            metavar="PATH[:TAG][:ro|rw]",
            callback=_spec_callback(parse_volume_spec),
            help="Share a host directory (repeatable).",
        ),
        click.option(
            "--network",
            metavar="MODE",
            callback=_spec_callback(parse_network_mode),
            help="nat (default; the guest cannot reach the host's loopback services), "
            "nat:host-loopback (it can, at 10.0.2.2), none, vmnet, host-only or bridged:IFACE.",
        ),
        click.option(
            "--publish",
            "-p",
            "publish",
            multiple=True,
            metavar="[ADDR:]HOST:GUEST[/tcp|udp]",
            callback=_spec_callback(parse_port_spec),
            help="Forward a host port (127.0.0.1 unless ADDR) to the guest (repeatable; nat).",
        ),
        click.option(
            "--display",
            "displays",
            multiple=True,
            metavar="SPEC",
            callback=DisplayList.click_callback,
            help="WxH[@PPI] or 4k/1080p/720p/retina (repeatable); implies --graphics.",
        ),
        click.option(
            "--graphics/--headless", default=None, help="Attach a display (default headless)."
        ),
        click.option(
            "--console",
            type=click.Choice([c.value for c in ConsoleMode]),
            help="Serial console target.",
        ),
        click.option(
            "--accel",
            "accelerator",
            metavar="NAME",
            help="Accelerator: kvm, hvf, tcg (default: best that works).",
        ),
        click.option(
            "--cpu",
            "cpu_model",
            metavar="MODEL",
            help="Guest CPU as QEMU's -cpu takes it, e.g. max, cortex-a72 (default: host under "
            "kvm/hvf, else max; max,pauth-impdef=on for aarch64).",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="Start from a TOML/JSON config file; options override it.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(config_file: Path | None, graphics: bool | None, **opts: Any) -> LinuxVMConfig:
    """Merge a config file (if any) with the options that were given."""
    base = LinuxVMConfig.load(config_file) if config_file is not None else None
    changes = {k: v for k, v in opts.items() if v is not None and v != ()}
    if graphics is not None:
        changes["headless"] = not graphics
    elif changes.get("displays"):
        changes["headless"] = False
    if base is None:
        return LinuxVMConfig(**changes)
    return base.replace(**changes)


class _EchoWarnings(logging.Handler):
    """Shows the guest image builder's warnings (e.g. unsigned package indexes) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"vzkit: warning: {record.getMessage()}", err=True)


def _show_guest_warnings() -> None:
    logger = logging.getLogger("vzkit.guest")
    if not any(isinstance(h, _EchoWarnings) for h in logger.handlers):
        logger.addHandler(_EchoWarnings(logging.WARNING))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vzkit")
def main() -> None:
    """vzkit: build and run lightweight virtual machines.

    Backends: Apple's Virtualization framework (macOS) and QEMU (Linux, macOS).
    """
    _show_guest_warnings()


@main.command("config")
@vm_options
@click.option(
    "--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True
)
@click.option(
    "--save", "save_to", type=click.Path(path_type=Path, dir_okay=False), help="Also write it here."
)
@_handle_errors
def config_cmd(fmt: str, save_to: Path | None, **opts: Any) -> None:
    """Validate VM options and print the resulting configuration."""
    cfg = build_config(**opts)
    click.echo(cfg.to_toml() if fmt == "toml" else cfg.to_json(), nl=False)
    if save_to is not None:
        cfg.save(save_to)


@main.group()
def disk() -> None:
    """Disk images."""


@disk.command("create")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("size_gb", type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice([f.value for f in DiskFormat]),
    default="raw",
    show_default=True,
)
@_handle_errors
def disk_create(path: Path, size_gb: int, fmt: str) -> None:
    """Create a sparse disk image of SIZE_GB GiB (an existing file is left untouched)."""
    existed = path.exists()
    created = create_disk_image(path, size_gb, format=fmt)
    click.echo(f"{'kept existing' if existed else 'created'} {created}")


@main.group()
def snapshot() -> None:
    """VM state snapshots."""


@snapshot.command("list")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def snapshot_list(vm_dir: Path, as_json: bool) -> None:
    """List the snapshots of VM_DIR, newest first."""
    metas = SnapshotManager(vm_dir).list()
    if as_json:
        click.echo(json.dumps([m.to_json_dict() for m in metas], indent=2))
        return
    if not metas:
        click.echo("no snapshots")
        return
    click.echo(f"{'NAME':<24} {'CREATED':<28} {'SIZE':>12}  STATE")
    for m in metas:
        click.echo(f"{m.name:<24} {format_rfc3339(m.created):<28} {m.size:>12}  {m.vm_state}")


@snapshot.command("rm")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("names", nargs=-1, required=True)
@_handle_errors
def snapshot_rm(vm_dir: Path, names: tuple[str, ...]) -> None:
    """Delete snapshots of VM_DIR by name."""
    manager = SnapshotManager(vm_dir)
    for name in names:
        manager.delete(name)
        click.echo(f"deleted {name}")


@snapshot.command("save", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "--backend", type=click.Choice(["auto", "qemu", "vz"]), default="auto", show_default=True
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def snapshot_save(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    **opts: Any,
) -> None:  # fmt: skip
    """Boot a VM, run COMMAND in it (optional set-up), then save it as snapshot NAME of VM_DIR.

    The VM options must be given again to restore it ('vzkit run --from-snapshot NAME
    --vm-dir VM_DIR' or 'vzkit snapshot restore'); a mismatch is reported field by field.
    """
    from ._vm import VirtualMachine

    cfg = _run_config(False, opts)
    with VirtualMachine(cfg, backend=backend) as vm:
        vm.start(timeout=boot_timeout)
        vm.guest.wait_ready(timeout=boot_timeout)
        if command:
            proc = vm.guest.run(list(command))
            sys.stdout.buffer.write(proc.stdout)
            sys.stderr.buffer.write(proc.stderr)
            if proc.returncode != 0:
                raise GuestError(f"the set-up command exited with {proc.returncode}; not saved")
        meta = SnapshotManager(vm_dir).save(vm, name)
    click.echo(f"saved {name} ({meta.size} bytes of machine state) in {meta.file_path.parent}")


@snapshot.command("restore", context_settings={"allow_interspersed_args": False})
@vm_options
@click.option(
    "--backend", type=click.Choice(["auto", "qemu", "vz"]), default="auto", show_default=True
)
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.argument("vm_dir", type=click.Path(path_type=Path, file_okay=False))
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def snapshot_restore(
    vm_dir: Path, name: str, command: tuple[str, ...], backend: str, boot_timeout: float,
    **opts: Any,
) -> None:  # fmt: skip
    """Restore snapshot NAME of VM_DIR into a new VM and run COMMAND in it (like 'vzkit run
    --from-snapshot'); without COMMAND the console is attached to this terminal."""
    _run_and_exit(command, backend, (), None, False, boot_timeout, opts, (vm_dir, name))


#: ``vzkit run``'s own failures (the VM could not boot, ...), as ``docker run`` uses 125.
EXIT_RUN_FAILED = 125


def _pump(src: IO[bytes], dst: IO[bytes], close_dst: bool = False) -> None:
    """Copy a stream until EOF, chunk by chunk (bounded memory)."""
    try:
        while chunk := src.read1(65536) if hasattr(src, "read1") else src.read(65536):
            dst.write(chunk)
            dst.flush()
    except (OSError, ValueError, VzkitError):
        pass
    finally:
        if close_dst:
            with contextlib.suppress(OSError, ValueError, VzkitError):
                dst.close()


def _exit_code(returncode: int) -> int:
    """The command's exit code, or 128+N when a signal N ended it (as shells report it)."""
    return 128 - returncode if returncode < 0 else returncode


@main.command(
    "run", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": False}
)
@vm_options
@click.option(
    "--backend",
    type=click.Choice(["auto", "qemu", "vz"]),
    default="auto",
    show_default=True,
    help="Which hypervisor backend runs the VM.",
)
@click.option("-e", "--env", "env", multiple=True, metavar="NAME=VALUE", help="Set a variable.")
@click.option("-w", "--workdir", metavar="DIR", help="Working directory in the guest.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin even when it is a terminal.")
@click.option("--boot-timeout", type=float, default=180.0, show_default=True, help="Seconds.")
@click.option(
    "--from-snapshot",
    metavar="NAME",
    help="Restore snapshot NAME of --vm-dir instead of booting (see 'vzkit snapshot save').",
)
@click.option(
    "--vm-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=".",
    show_default=True,
    help="The directory whose snapshots/ holds --from-snapshot.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_cmd(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    interactive: bool,
    boot_timeout: float,
    from_snapshot: str | None,
    vm_dir: Path,
    **opts: Any,
) -> None:
    """Boot a fresh VM, run COMMAND in it and exit with its exit code.

    Uses vzkit's default guest (a Debian kernel, busybox and the vzkit agent; built on first
    use) unless --kernel is given. Without COMMAND, the guest's console is attached to this
    terminal. The VM is torn down afterwards, also on Ctrl-C.

    \b
      vzkit run -- uname -a
      vzkit run --memory 1 -v .:src:ro -- sh -c 'ls /mnt/src'
      vzkit run -p 8080:80 -- busybox httpd -f -p 80
      vzkit run --from-snapshot warm --vm-dir ./vm -- python3 job.py
    """
    snap = (vm_dir, from_snapshot) if from_snapshot is not None else None
    _run_and_exit(command, backend, env, workdir, interactive, boot_timeout, opts, snap)


def _run_and_exit(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    interactive: bool,
    boot_timeout: float,
    opts: dict[str, Any],
    snap: tuple[Path, str] | None,
) -> None:
    # Ctrl-C and SIGTERM tear the VM down even when this process was started with SIGINT
    # ignored (as shells do for background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = _run(command, backend, env, workdir, interactive, boot_timeout, opts, snap)
    except (SpecError, ConfigError) as err:
        click.echo(f"vzkit: error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except VzkitError as err:
        click.echo(f"vzkit: error: {err}", err=True)
        sys.exit(EXIT_RUN_FAILED)
    except KeyboardInterrupt:
        click.echo("vzkit: interrupted; the VM was torn down", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("vzkit: terminated; the VM was torn down", err=True)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so clean-up runs."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _run_config(interactive_console: bool, opts: dict[str, Any]) -> LinuxVMConfig:
    changes = {k: v for k, v in opts.items() if v is not None and v != ()}
    if interactive_console:
        changes.setdefault("console", ConsoleMode.STDIO)
    if changes.get("kernel_path") is not None or changes.get("config_file") is not None:
        return build_config(**{**dict.fromkeys(opts), **changes})
    from .guest._image import default_guest_config

    graphics = changes.pop("graphics", None)
    changes.pop("config_file", None)
    if graphics is not None:
        changes["headless"] = not graphics
    return default_guest_config(changes.pop("arch", None), **changes)


def _run(
    command: tuple[str, ...],
    backend: str,
    env: tuple[str, ...],
    workdir: str | None,
    interactive: bool,
    boot_timeout: float,
    opts: dict[str, Any],
    snap: tuple[Path, str] | None = None,
) -> int:
    from ._vm import VirtualMachine

    environment: dict[Any, Any] | None = None  # str -> str; typed for the client's Mapping
    if env:
        environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
        for item in env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise SpecError(f"--env wants NAME=VALUE, got {item!r}")
            environment[name] = value
    cfg = _run_config(not command, opts)
    with VirtualMachine(cfg, backend=backend) as vm:
        if snap is not None:  # paused at the saved instant; resume steps the guest clock
            SnapshotManager(snap[0]).restore(vm, snap[1], timeout=boot_timeout)
            vm.resume(timeout=boot_timeout)
        else:
            vm.start(timeout=boot_timeout)
        if not command:  # the console is this terminal; run until the guest powers off
            state = vm.wait()
            return 0 if state is VMState.STOPPED else 1
        vm.guest.wait_ready(timeout=boot_timeout)
        forward_stdin = interactive or not sys.stdin.isatty()
        proc = vm.guest.popen(list(command), stdin=forward_stdin, env=environment, cwd=workdir)
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
        ]
        if proc.stdin is not None:
            pumps.append(
                threading.Thread(
                    target=_pump, args=(sys.stdin.buffer, proc.stdin, True), daemon=True
                )
            )
        for pump in pumps:
            pump.start()
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: end the command, then the VM goes
            with contextlib.suppress(VzkitError):
                proc.kill()
            raise
        for pump in pumps[:2]:
            pump.join(timeout=30)
        if cfg.disk_path is not None:  # let the guest flush its disk before it goes
            vm.stop(timeout=20)
        return _exit_code(returncode)


@main.group()
def image() -> None:
    """The default guest image (kernel + initramfs with the vzkit agent)."""


@image.command("build")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Default: the host's.")
@click.option(
    "--deb-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Use pre-downloaded .deb files instead of downloading them.",
)
@click.option(
    "--source",
    type=click.Choice(["auto", "apt", "mirror", "deb-dir"]),
    help="Where packages come from: apt-get download, a Debian mirror, or --deb-dir. "
    "Default: $VZKIT_DEB_SOURCE, else apt when available, else the mirror.",
)
@click.option(
    "--mirror",
    metavar="URL",
    help="Debian mirror to download from (implies --source mirror). "
    "Default: $VZKIT_DEBIAN_MIRROR, else https://deb.debian.org/debian.",
)
@click.option("--refresh", is_flag=True, help="Look for newer packages first.")
@_handle_errors
def image_build(
    arch: str | None, deb_dir: Path | None, source: str | None, mirror: str | None, refresh: bool
) -> None:
    """Build (or find in the cache) the default guest image."""
    from .guest._image import default_image, image_trust

    if (source == "deb-dir") != (deb_dir is not None) and source is not None:
        raise click.UsageError("--source deb-dir goes with --deb-dir DIR (and only with it)")
    if source == "deb-dir":
        source = None
    built = default_image(arch, deb_dir=deb_dir, refresh=refresh, source=source, mirror=mirror)
    click.echo(f"kernel  {built.kernel}\ninitrd  {built.initrd}\nversion {built.kernel_version}")
    click.echo(f"trust   {image_trust(built.kernel.parent)}")


@image.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
def image_list(as_json: bool) -> None:
    """List cached guest images, newest first.

    TRUST says how the packages were verified: verified (mirror, signed Release checked),
    apt (apt-get download), unsigned (mirror, no signature check), local (--deb-dir) or
    unknown.
    """
    from .guest._image import image_trust, list_images

    rows = [
        {
            "image": directory.name,
            "path": str(directory),
            "arch": img.arch,
            "kernel_version": img.kernel_version,
            "initrd_bytes": img.initrd.stat().st_size,
            "trust": image_trust(directory),
        }
        for directory, img in list_images()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no images (vzkit image build makes one)")
        return
    click.echo(f"{'IMAGE':<28} {'ARCH':<8} {'KERNEL':<22} {'INITRD':>10}  TRUST")
    for r in rows:
        click.echo(
            f"{r['image']:<28} {r['arch']:<8} {r['kernel_version']:<22} "
            f"{r['initrd_bytes']:>10}  {r['trust']}"
        )


@image.command("rm")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), help="Only this arch.")
@_handle_errors
def image_rm(arch: str | None) -> None:
    """Delete cached guest images."""
    from .guest._image import remove_images

    for path in remove_images(arch=arch):
        click.echo(f"removed {path}")


@main.command()
@_handle_errors
def doctor() -> None:
    """Say which backends can run here, with what, and why not."""
    from .backends import KNOWN_BACKENDS, load_backend
    from .errors import BackendUnavailableError

    for name in KNOWN_BACKENDS:
        try:
            load_backend(name)
        except BackendUnavailableError as err:
            click.echo(f"{name:<5} unavailable: {err}")
            continue
        click.echo(f"{name:<5} available")
        if name == "qemu":
            _doctor_qemu()


def _doctor_qemu() -> None:
    from .backends.qemu import _discover

    for guest in Arch:
        try:
            binary = _discover.find_qemu(guest)
        except VzkitError as err:
            click.echo(f"      {guest.value}: {err}")
            continue
        offered = _discover.accelerators(binary)
        line = f"      {guest.value}: {binary} (accelerators: {', '.join(sorted(offered))}"
        if "kvm" in offered:
            verdict = _discover.cached_kvm_probe(binary)
            kvm = {True: "works", False: "does not work here", None: "not probed yet"}
            line += f"; KVM {kvm[verdict]}"
        click.echo(line + ")")
        sandbox = asyncio.run(_discover.sandbox_probe(binary))
        if sandbox.supported:
            click.echo(f"      {guest.value}: QEMU runs under its seccomp sandbox (-sandbox on)")
        else:
            click.echo(
                f"      {guest.value}: QEMU runs WITHOUT a seccomp sandbox "
                f"(this binary cannot: {sandbox.detail})"
            )
        try:
            firmware = _discover.find_firmware(guest)
            click.echo(f"      {guest.value} EFI firmware: {firmware.code}")
        except VzkitError as err:
            click.echo(f"      {guest.value} EFI firmware: {err}")
    _doctor_devices()


def _doctor_devices() -> None:
    """Which vsock transport and which share daemon a VM would get here."""
    import os

    from .backends.qemu._passt import find_passt
    from .backends.qemu._virtiofs import VirtiofsSandbox, find_virtiofsd, sandbox_mode
    from .backends.qemu._vsock import VHOST_DEVICE

    if sys.platform != "linux":
        click.echo("      vsock: not on this host (QEMU's vhost devices need Linux)")
    elif os.access(VHOST_DEVICE, os.R_OK | os.W_OK):
        click.echo(f"      vsock: kernel vhost-vsock ({VHOST_DEVICE})")
    else:
        click.echo(f"      vsock: vzkit's user-space vhost-user-vsock device (no {VHOST_DEVICE})")
    if sys.platform.startswith("linux"):
        passt = find_passt()
        if passt is not None:
            click.echo(f"      nat: passt {passt} (the guest cannot reach the host's loopback)")
        else:
            click.echo(
                "      nat: QEMU's user-mode network, where the guest CAN reach the host's "
                "loopback services at 10.0.2.2 (install passt to close that)"
            )
    daemon = find_virtiofsd()
    if daemon is None:
        click.echo("      shares: virtio-9p (no virtiofsd found)")
    else:
        if daemon.readonly:
            ro = "read-only shares with --readonly"
        elif os.geteuid() == 0:
            ro = "read-only shares from a private read-only bind"
        else:
            ro = "read-only shares on virtio-9p (the bind needs root)"
        click.echo(f"      shares: VirtioFS, {daemon.flavour} virtiofsd {daemon.path} ({ro})")
        sandbox = sandbox_mode(os.geteuid() == 0)
        if sandbox is VirtiofsSandbox.NAMESPACE:
            click.echo("      shares: virtiofsd runs in its namespace sandbox")
        elif sandbox is VirtiofsSandbox.CHROOT:
            click.echo("      shares: virtiofsd runs in its chroot sandbox (no namespaces here)")
        else:
            click.echo(
                "      shares: virtio-9p, not VirtioFS (virtiofsd cannot be sandboxed here: "
                "no user namespaces for this user)"
            )


main.add_command(codesign_cmd)
main.add_command(macos_group)

if __name__ == "__main__":  # pragma: no cover
    main()
