"""Shared folders on the qemu backend: one owned virtiofsd per share, or virtio-9p.

Two virtiofsd flavours exist and both are looked for (:func:`find_virtiofsd`):

* the C one shipped with QEMU up to 7.2 (``/usr/lib/qemu/virtiofsd``): ``-o source=DIR``,
  ``-o sandbox=chroot|namespace``, no read-only option, needs root (both sandboxes do);
* the Rust one (``virtiofsd`` on ``PATH``, ``/usr/libexec/virtiofsd``): ``--shared-dir``,
  ``--sandbox``, and ``--readonly`` from version 1.11.

Which flags a binary has is probed from its ``--help`` (:func:`parse_virtiofsd_help`).

**virtiofsd always runs sandboxed**, never with ``--sandbox none``: in its ``namespace`` sandbox
(new mount, pid and net namespaces, ``pivot_root`` into the shared directory; the Rust daemon
run by an unprivileged user makes a user namespace for them) wherever this process can create
those namespaces (:func:`sandbox_mode` tries once), else, as root, in its ``chroot`` sandbox.
An unprivileged user without user namespaces cannot sandbox virtiofsd at all: the share is
served by QEMU's virtio-9p instead (inside QEMU's seccomp sandbox), and that is logged.

**Read-only is enforced on the host**, never by the guest's mount flags: the Rust virtiofsd
gets ``--readonly``; the C one is started inside a private mount namespace (``unshare
--mount --propagation private``) in which the directory is bind-mounted read-only over
itself, so the daemon cannot write there whatever the guest asks (needs root, as the C daemon
does anyway). Where neither is possible (no virtiofsd, as with QEMU on macOS; not root with
only the C daemon), the share becomes a virtio-9p device with ``readonly=on``, which QEMU
itself enforces. ``LinuxVMConfig.share_device="9p"`` forces 9p for every share, ``9p:TAG,...``
for some (the bench serves one directory both ways; ``$VZKIT_SHARE_DEVICE`` feeds its default).

Each virtiofsd gets a listening Unix socket as an inherited fd (``--fd``). vzkit connects to
it before the daemon starts and hands the connected end to QEMU as an inherited fd too
(``-chardev socket,fd=N``), then unlinks the path: nothing is left on disk and no other
process can connect in between. The socket lives for a moment in the machine's runtime dir
(private, short enough for ``sun_path``).

A virtiofsd that dies mid-run is reported to its owner (``on_died(tag, status, stderr
tail)``; the qemu machine then ends the VM in ERROR with that reason: its guest would hang on
the share, and QEMU cannot reconnect a vhost-user-fs device), and :meth:`Shares.close` still
reaps everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..._config import virtiofsd_override
from ..._private import open_private
from ..._process import OwnedProcess, spawn
from ..._volume import VolumeMount
from ...errors import VMError

__all__ = [
    "ShareDevice",
    "ShareKind",
    "Shares",
    "VirtiofsSandbox",
    "Virtiofsd",
    "find_virtiofsd",
    "forced_9p",
    "parse_virtiofsd_help",
    "plan_share",
    "sandbox_mode",
    "virtiofsd_argv",
]

log = logging.getLogger(__name__)

#: Where distributions install virtiofsd (``PATH`` is searched first).
CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
_PROBE_TIMEOUT_S = 10.0
_REAP_GRACE_S = 2.0
_STDERR_TAIL = 1000
_VERSION = re.compile(r"virtiofsd\D*?(\d+(?:\.\d+)+)")


class ShareKind(enum.StrEnum):
    VIRTIOFS = "virtiofs"
    NINEP = "9p"


class VirtiofsSandbox(enum.StrEnum):
    """virtiofsd's confinement (its ``--sandbox`` / ``-o sandbox=``); never ``none``."""

    NAMESPACE = "namespace"
    CHROOT = "chroot"


@dataclass(frozen=True, slots=True)
class Virtiofsd:
    """A virtiofsd binary and what its ``--help`` says it can do."""

    path: Path
    rust: bool  # --shared-dir style (else the C daemon's -o source=)
    version: str = ""
    readonly: bool = False  # --readonly (Rust >= 1.11)
    fd: bool = True  # --fd=N: serve a listening socket we pass in

    @property
    def flavour(self) -> str:
        return "rust" if self.rust else "c"


def parse_virtiofsd_help(path: Path, help_text: str, version_text: str = "") -> Virtiofsd | None:
    """What a virtiofsd can do, from its ``--help`` (and ``--version``) output.

    ``None`` when the text is not a virtiofsd's help (e.g. the binary failed to run).
    """
    rust = "--shared-dir" in help_text
    c_style = "source=" in help_text
    if not (rust or c_style):
        return None
    match = _VERSION.search(version_text) or _VERSION.search(help_text)
    return Virtiofsd(
        path=path,
        rust=rust,
        version=match.group(1) if match else "",
        readonly=rust and re.search(r"--readonly\b", help_text) is not None,
        fd="--fd" in help_text,
    )


def _run_text(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def _probe(path: Path) -> Virtiofsd | None:
    """What the binary at ``path`` can do; asked once per binary version (every VM start
    with shares looks), not once per start."""
    if not os.access(path, os.X_OK) or not path.is_file():
        return None
    st = path.stat()
    return _probe_binary(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _probe_binary(path: Path, mtime_ns: int, size: int) -> Virtiofsd | None:
    found = parse_virtiofsd_help(
        path, _run_text([str(path), "--help"]), _run_text([str(path), "--version"])
    )
    if found is not None:
        log.debug("found virtiofsd %s (%s %s)", path, found.flavour, found.version or "?")
    return found


def find_virtiofsd() -> Virtiofsd | None:
    """The first usable virtiofsd: ``$VZKIT_VIRTIOFSD``, ``PATH``, then :data:`CANDIDATES`."""
    seen: list[Path] = []
    override = virtiofsd_override()
    if override:
        seen.append(Path(override))
    on_path = shutil.which("virtiofsd")
    if on_path:
        seen.append(Path(on_path))
    seen += [Path(p) for p in CANDIDATES]
    for path in dict.fromkeys(seen):
        found = _probe(path)
        if found is not None and found.fd:
            return found
    return None


@dataclass(frozen=True, slots=True)
class ShareDevice:
    """One share as QEMU sees it: a vhost-user-fs device on ``fd``, or a 9p export of ``path``."""

    tag: str
    path: Path
    read_only: bool
    kind: ShareKind = ShareKind.VIRTIOFS
    fd: int | None = None  # the connected vhost-user socket QEMU inherits (virtiofs only)
    ro_bind: bool = False  # read-only enforced by a read-only bind in a private mount ns
    sandbox: VirtiofsSandbox = VirtiofsSandbox.NAMESPACE  # virtiofsd's (virtiofs only)


@functools.cache
def namespaces_usable(root: bool) -> bool:
    """Whether this process can make the namespaces virtiofsd's ``namespace`` sandbox needs:
    mount, pid and net, inside a user namespace when not root (tried once with ``unshare``)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    user = () if root else ("--user", "--map-root-user")
    argv = [unshare, *user, "--mount", "--pid", "--net", "--fork", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("namespace probe failed: %s", err)
        return False
    if done.returncode != 0:
        log.debug("namespace probe failed: %s", done.stderr.decode(errors="replace").strip())
    return done.returncode == 0


def sandbox_mode(root: bool) -> VirtiofsSandbox | None:
    """virtiofsd's sandbox here: ``namespace`` if possible, else ``chroot`` for root (which
    ``chroot(2)`` needs), else ``None``: no sandbox can be had, so no virtiofsd runs."""
    if namespaces_usable(root):
        return VirtiofsSandbox.NAMESPACE
    return VirtiofsSandbox.CHROOT if root else None


def plan_share(
    vol: VolumeMount,
    daemon: Virtiofsd | None,
    *,
    root: bool,
    force_9p: bool = False,
    sandbox: VirtiofsSandbox | None = VirtiofsSandbox.NAMESPACE,
) -> ShareDevice:
    """Decide how one (tagged) share is served; see the module docstring for the rules.
    ``sandbox`` is what :func:`sandbox_mode` found (``None``: virtiofsd cannot be confined)."""
    ninep = ShareDevice(vol.tag, vol.host_path, vol.read_only, ShareKind.NINEP)
    if force_9p or daemon is None or sandbox is None:
        return ninep
    if not daemon.rust and not root:
        return ninep  # the C virtiofsd's sandboxes (chroot, namespaces) need root
    if not vol.read_only or daemon.readonly:
        return ShareDevice(vol.tag, vol.host_path, vol.read_only, sandbox=sandbox)
    if root and shutil.which("unshare") and shutil.which("mount"):
        return ShareDevice(vol.tag, vol.host_path, True, ro_bind=True, sandbox=sandbox)
    return ninep


def forced_9p(tag: str, share_device: str) -> bool:
    """Whether the config's ``share_device`` asks for 9p for this share: ``9p`` (every share)
    or ``9p:TAG,TAG`` (those tags; the bench compares both devices on one directory)."""
    kind, sep, tags = share_device.strip().partition(":")
    if kind.lower() != "9p":
        return False
    return not sep or tag in tags.split(",")


def _c_option(path: Path) -> str:
    """A path as a value inside the C virtiofsd's ``-o`` list (``\\`` and ``,`` escaped)."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,")


#: Run in the wrapper's private mount namespace: bind "$1" read-only over itself, then exec.
_RO_BIND_SCRIPT = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'


def virtiofsd_argv(daemon: Virtiofsd, share: ShareDevice, listen_fd: int) -> list[str]:
    """The command line serving ``share`` on the listening socket ``listen_fd``."""
    if daemon.rust:
        argv = [
            str(daemon.path),
            f"--fd={listen_fd}",
            "--shared-dir", str(share.path),
            "--sandbox", share.sandbox.value,
        ]  # fmt: skip
        if share.read_only and daemon.readonly and not share.ro_bind:
            argv.append("--readonly")
    else:
        argv = [
            str(daemon.path),
            f"--fd={listen_fd}",
            "-o", f"source={_c_option(share.path)}",
            "-o", f"sandbox={share.sandbox.value}",
        ]  # fmt: skip
    if not share.ro_bind:
        return argv
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", _RO_BIND_SCRIPT, "vzkit-ro-share", str(share.path), *argv,
    ]  # fmt: skip


#: ``on_died(tag, exit status, tail of its stderr)``: a virtiofsd ended with a failure.
DiedFn = Callable[[str, int, str], None]


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _STDERR_TAIL))
            return fh.read().decode(errors="replace").strip()
    except OSError:
        return ""


class Shares:
    """The virtiofsd processes of one VM run: started before QEMU, reaped at teardown.

    ``on_died`` hears of a virtiofsd that exits with a failure status before :meth:`close`
    (one that exits with 0 saw QEMU close its end: the VM stopped)."""

    def __init__(self, on_died: DiedFn | None = None) -> None:
        self._on_died = on_died
        self._procs: list[tuple[str, OwnedProcess]] = []
        self._qemu_ends: list[socket.socket] = []
        self._watches: list[asyncio.Task[None]] = []
        self._closing = False
        self.devices: tuple[ShareDevice, ...] = ()

    @property
    def qemu_fds(self) -> tuple[int, ...]:
        """The sockets QEMU must inherit (``pass_fds``)."""
        return tuple(s.fileno() for s in self._qemu_ends)

    @property
    def pids(self) -> dict[str, int]:
        """tag → pid of the virtiofsd serving it (running or not)."""
        return {tag: proc.pid for tag, proc in self._procs}

    async def start(
        self,
        volumes: Sequence[VolumeMount],
        runtime_dir: Path,
        log_dir: Path,
        share_device: str = "virtiofs",
    ) -> tuple[ShareDevice, ...]:
        """Start a virtiofsd per virtiofs share; return every share's device.
        ``share_device`` is the config's (see :func:`forced_9p`)."""
        await self.close()  # anything left from a previous run
        if not volumes:
            return self.devices
        forced = [forced_9p(vol.tag, share_device) for vol in volumes]
        daemon = None if all(forced) else await asyncio.to_thread(find_virtiofsd)
        root = os.geteuid() == 0
        sandbox = await asyncio.to_thread(sandbox_mode, root) if daemon is not None else None
        if daemon is not None and sandbox is not VirtiofsSandbox.NAMESPACE:
            log.warning(
                "cannot create namespaces for virtiofsd's sandbox here: %s",
                "using its chroot sandbox" if sandbox else "shares use virtio-9p instead",
            )
        devices = []
        for index, vol in enumerate(volumes):
            if not vol.host_path.is_dir():  # check_inputs ran, but the path can go since
                raise VMError(f"share {vol.tag!r}: {str(vol.host_path)!r} is not a directory")
            device = plan_share(vol, daemon, root=root, force_9p=forced[index], sandbox=sandbox)
            if device.kind is ShareKind.VIRTIOFS:
                assert daemon is not None
                fd = await self._start_daemon(daemon, device, index, runtime_dir, log_dir)
                device = dataclasses.replace(device, fd=fd)
            devices.append(device)
        self.devices = tuple(devices)
        return self.devices

    async def _start_daemon(
        self, daemon: Virtiofsd, share: ShareDevice, index: int, runtime_dir: Path, log_dir: Path
    ) -> int:
        path = runtime_dir / f"fs{index}.sock"
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            listener.listen(1)
            qemu_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._qemu_ends.append(qemu_end)
            qemu_end.connect(str(path))  # queued until virtiofsd accepts: first in line
            path.unlink()
            argv = virtiofsd_argv(daemon, share, listener.fileno())
            log_path = log_dir / f"virtiofsd-{index}.log"
            with open_private(log_path) as stderr:
                proc = await spawn(
                    argv,
                    name=f"virtiofsd[{share.tag}]",
                    pass_fds=(listener.fileno(),),
                    stderr=stderr,
                )
        finally:
            listener.close()
            path.unlink(missing_ok=True)
        log.info(
            "virtiofsd (%s, %s sandbox) serves %r as %r%s",
            daemon.flavour,
            share.sandbox.value,
            str(share.path),
            share.tag,
            " read-only" if share.read_only else "",
        )
        self._procs.append((share.tag, proc))
        self._watches.append(asyncio.ensure_future(self._watch(share.tag, proc, log_path)))
        return qemu_end.fileno()

    async def _watch(self, tag: str, proc: OwnedProcess, log_path: Path) -> None:
        rc = await proc.wait()
        if self._closing:
            return
        if rc == 0:  # QEMU closed its end (the VM stopped): reaped again at close()
            log.debug("virtiofsd for share %r (pid %d) finished", tag, proc.pid)
            return
        tail = _tail(log_path)
        log.warning("virtiofsd for share %r (pid %d) exited with %d: %s", tag, proc.pid, rc, tail)
        if self._on_died is not None:
            try:
                self._on_died(tag, rc, tail)
            except Exception:  # the owner's bug must not kill the watch silently
                log.exception("the handler of virtiofsd %r's exit failed", tag)

    def qemu_started(self) -> None:
        """QEMU holds its ends now: close ours so a QEMU exit reaches the daemons."""
        ends, self._qemu_ends = self._qemu_ends, []
        for sock in ends:
            sock.close()

    async def close(self) -> None:
        """Stop and reap every virtiofsd (also after one died on its own); idempotent."""
        self.qemu_started()
        procs, self._procs = self._procs, []
        self._closing = True
        await asyncio.gather(*(proc.kill(grace=_REAP_GRACE_S) for _, proc in procs))
        watches, self._watches = self._watches, []
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        self._closing = False
        self.devices = ()
