"""The ``nat`` network on Linux: an owned passt process, so the guest stays off the host's loopback.

QEMU's user-mode network (libslirp) sends whatever the guest addresses to its gateway
(10.0.2.2) to the host's 127.0.0.1: every service on the host's loopback is open to every
guest. libslirp can refuse that (``disable_host_loopback``), but QEMU's ``-netdev user`` has no
option for it (QEMU 7.2 to 9.x). passt (https://passt.top) is the maintained user-mode network
for QEMU: with ``--no-map-gw`` the gateway address is just an address, not the host.

The guest gets slirp's addresses by DHCP (10.0.2.15/24, gateway 10.0.2.2) and, as DNS servers,
the host's own resolvers, reached through the NAT like any address (:func:`host_resolvers`:
``/etc/resolv.conf``, or systemd-resolved's upstreams when that file names only its loopback
stub, which the guest may not reach). passt's ``--dns-forward`` (slirp's 10.0.2.3) is not
used: passt 2023.03 (Debian 12) also rewrites the source of answers the guest asked the
resolver for directly, and the guest drops them. Published ports (``-p``) become passt's
``-t``/``-u`` bindings. ``nat:host-loopback`` leaves the gateway mapped to the host (slirp's
behaviour), and passt then serves a loopback resolver at the gateway itself.

passt gets one end of a socketpair (``--fd``), QEMU the other (``-netdev stream`` on an
inherited fd): no socket path. It runs in the foreground as an owned process, logs to a 0600
file in the state dir, and is reaped at teardown; it sandboxes itself (namespaces, seccomp,
and it drops root to ``nobody``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ..._config import LinuxVMConfig
from ..._network import NetworkMode, PortForward, PortProtocol
from ..._private import open_private
from ..._process import OwnedProcess, spawn
from ...errors import VMError

__all__ = [
    "GUEST_ADDRESS",
    "Passt",
    "check_ports",
    "find_passt",
    "host_resolvers",
    "passt_argv",
    "uses_passt",
]

log = logging.getLogger(__name__)

GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
RESOLV_CONFS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
_REAP_GRACE_S = 2.0


def find_passt() -> Path | None:
    found = shutil.which("passt")
    return Path(found) if found else None


def host_resolvers(paths: Sequence[str | Path] = RESOLV_CONFS) -> list[str]:
    """The host's IPv4 resolvers a guest can reach through the NAT: the first file of ``paths``
    that names any that are not loopback addresses (a stub such as 127.0.0.53 is skipped)."""
    for path in paths:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        found = []
        for line in lines:
            words = line.split()
            if len(words) < 2 or words[0] != "nameserver":
                continue
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback:
                found.append(str(address))
        if found:
            return found
    return []


def uses_passt(config: LinuxVMConfig, host_os: str) -> bool:
    """Whether this VM's network is served by passt: ``nat`` on Linux."""
    return config.network.mode is NetworkMode.NAT and host_os.startswith("linux")


def passt_argv(
    binary: Path, config: LinuxVMConfig, fd: int, resolvers: Sequence[str] = ()
) -> list[str]:
    """passt serving the guest on the connected socket ``fd`` (see the module docstring);
    ``resolvers`` are the DNS servers it offers (:func:`host_resolvers`; not with
    ``nat:host-loopback``, where passt finds them itself)."""
    argv = [
        str(binary), "--foreground", "--stderr", "--quiet", f"--fd={fd}", "--ipv4-only",
        "--address", GUEST_ADDRESS, "--netmask", "24", "--gateway", GATEWAY,
        "--no-dhcp-search",
    ]  # fmt: skip
    if not config.network.host_loopback:
        argv.append("--no-map-gw")
        for resolver in resolvers:
            argv += ["--dns", resolver]
    for port in config.publish:
        flag = "--tcp-ports" if port.protocol is PortProtocol.TCP else "--udp-ports"
        argv += [flag, f"{port.host_address}/{port.host_port}:{port.guest_port}"]
    return argv


def check_ports(ports: tuple[PortForward, ...]) -> None:
    """Refuse to start when a published port cannot be bound on the host.

    passt binds them as it starts and exits when it cannot; QEMU would then run with a dead
    network. Binding each one here first turns the usual cause (the port is in use) into an
    error at start, as QEMU's own ``hostfwd`` gives.
    """
    for port in ports:
        kind = socket.SOCK_STREAM if port.protocol is PortProtocol.TCP else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((port.host_address, port.host_port))
            except OSError as err:
                raise VMError(
                    f"cannot publish {port}: {port.host_address}:{port.host_port}/"
                    f"{port.protocol.value} cannot be bound on the host ({err.strerror})"
                ) from err


class Passt:
    """The passt process of one VM run: started before QEMU, reaped after it."""

    def __init__(self) -> None:
        self._proc: OwnedProcess | None = None
        self._qemu_end: socket.socket | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def qemu_fd(self) -> int | None:
        """QEMU's end of the socketpair until QEMU has inherited it."""
        return self._qemu_end.fileno() if self._qemu_end is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start_nat(self, config: LinuxVMConfig, log_path: Path) -> int | None:
        """Start passt for the ``nat`` network on Linux; its socket's fd for QEMU, else None.

        Without passt, QEMU's user-mode network serves ``nat``, and there the guest reaches
        the host's loopback services at 10.0.2.2: that is said once per start (and by doctor).
        """
        if not uses_passt(config, sys.platform):
            return None
        binary = find_passt()
        if binary is None:
            if not config.network.host_loopback:
                log.warning(
                    "passt is not installed: the nat network falls back to QEMU's user-mode "
                    "network, where the guest reaches the host's loopback services at "
                    "10.0.2.2 (install passt, e.g. apt-get install passt)"
                )
            return None
        return await self.start(binary, config, log_path)

    async def start(self, binary: Path, config: LinuxVMConfig, log_path: Path) -> int:
        """Start passt; return the fd QEMU must inherit."""
        await self.close()
        check_ports(config.publish)
        resolvers = [] if config.network.host_loopback else host_resolvers()
        if not resolvers and not config.network.host_loopback:
            log.warning(
                "the host has no resolver the guest can reach through the NAT (only loopback "
                "ones): the guest gets no DNS server ('nat:host-loopback' would give it one)"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = passt_argv(binary, config, ours.fileno(), resolvers)
            with open_private(log_path) as stderr:
                self._proc = await spawn(
                    argv, name="passt", pass_fds=(ours.fileno(),), stderr=stderr
                )
        except BaseException:
            theirs.close()
            raise
        finally:
            ours.close()
        self._qemu_end = theirs
        self._watch = asyncio.ensure_future(self._watch_exit(self._proc))
        log.info(
            "passt (pid %d) serves the guest's NAT network%s",
            self._proc.pid,
            " with the host's loopback at the gateway" if config.network.host_loopback else "",
        )
        return theirs.fileno()

    async def _watch_exit(self, proc: OwnedProcess) -> None:
        rc = await proc.wait()
        if self._closing:
            return
        if rc == 0:  # QEMU closed its end (the VM stopped)
            log.debug("passt (pid %d) finished", proc.pid)
        else:
            log.warning("passt (pid %d) exited with %d: the guest lost its network", proc.pid, rc)

    def qemu_started(self) -> None:
        """QEMU holds its end now: close ours so QEMU's exit reaches passt."""
        end, self._qemu_end = self._qemu_end, None
        if end is not None:
            end.close()

    async def close(self) -> None:
        """Stop and reap passt; idempotent."""
        self.qemu_started()
        proc, self._proc = self._proc, None
        self._closing = True
        try:
            if proc is not None:
                await proc.kill(grace=_REAP_GRACE_S)
            watch, self._watch = self._watch, None
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        finally:
            self._closing = False
