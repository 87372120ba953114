"""The device as a helper process: ``python -m vzkit.backends.qemu.vhost_vsock``.

Follows QEMU's back-end program conventions (``docs/interop/vhost-user.rst``): ``--fd=N``
(an inherited, connected vhost-user socket) or ``--socket-path=PATH`` (listen there),
``--print-capabilities``, no daemonizing, exit on SIGTERM; ``--ready-fd=N`` gets ``READY\n``
once the hybrid socket is bound. It also exits when the front-end
disconnects (QEMU is gone), removing its hybrid socket file.

At start the helper raises its soft ``RLIMIT_NOFILE`` to the hard limit; the device caps its
connections below that (:func:`~._device.connection_cap`). ``--max-connections`` lowers the
cap, ``--byte-budget`` sets what the guest may make the device buffer (all connections).

For measurements (``bench/vsock.py``): with ``VZKIT_VSOCK_STATS=PATH`` in the environment the
helper writes its counters (:class:`VsockStats`) as JSON to PATH on ``SIGUSR1`` and when it
exits; with ``VZKIT_VSOCK_PROFILE=PATH`` it runs under :mod:`cProfile` and writes the profile
to PATH when it exits. ``VZKIT_VSOCK_TUNE=key=value,...`` overrides the tuning options
(``buf_alloc``, ``credit_step``, ``update_delay_ms``, ``tx_call_delay_ms``) so one benchmark
can compare them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ._credit import BUF_ALLOC, BYTE_BUDGET, CREDIT_STEP, UPDATE_DELAY_S
from ._device import TX_CALL_DELAY_S, VhostUserVsockDevice

__all__ = ["helper_argv", "main", "raise_fd_limit"]

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, err)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def helper_argv(
    uds_path: Path | str,
    *,
    fd: int,
    guest_cid: int = 3,
    buf_alloc: int | None = None,
    ready_fd: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line of a helper serving the vhost-user socket inherited as ``fd``.

    With ``ready_fd`` (an inherited pipe's write end) the helper writes ``READY\n`` there
    once ``uds_path`` accepts connections, then closes it (EOF without READY: it failed).
    """
    argv = [python, "-m", "vzkit.backends.qemu.vhost_vsock", f"--fd={fd}",
            f"--uds-path={os.fspath(uds_path)}", f"--guest-cid={guest_cid}"]  # fmt: skip
    if buf_alloc is not None:
        argv.append(f"--buf-alloc={buf_alloc}")
    if ready_fd is not None:
        argv.append(f"--ready-fd={ready_fd}")
    return argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vzkit.backends.qemu.vhost_vsock",
        description="vhost-user-vsock back-end with Firecracker-style hybrid Unix sockets",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--fd", type=int, help="inherited connected vhost-user socket")
    source.add_argument("--socket-path", type=Path, help="listen for the front-end here")
    parser.add_argument("--uds-path", type=Path, help="hybrid vsock socket (host side)")
    parser.add_argument("--guest-cid", type=int, default=3)
    parser.add_argument("--buf-alloc", type=int, default=BUF_ALLOC)
    parser.add_argument(
        "--byte-budget",
        type=int,
        default=BYTE_BUDGET,
        help="bytes the guest may make the device buffer, all connections",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="connection cap (default: what the descriptor limit allows)",
    )
    parser.add_argument("--credit-step", type=int, default=CREDIT_STEP)
    parser.add_argument("--update-delay-ms", type=float, default=UPDATE_DELAY_S * 1000)
    parser.add_argument("--tx-call-delay-ms", type=float, default=TX_CALL_DELAY_S * 1000)
    parser.add_argument("--ready-fd", type=int, help="write READY here once the socket is bound")
    parser.add_argument("--print-capabilities", action="store_true")
    parser.add_argument("--log-level", default=os.environ.get("VZKIT_VSOCK_LOG", "WARNING"))
    return parser


_TUNABLE = {
    "buf_alloc": int,
    "credit_step": int,
    "update_delay_ms": float,
    "tx_call_delay_ms": float,
}


def _apply_tune(args: argparse.Namespace, spec: str) -> None:
    """``key=value,...`` from ``VZKIT_VSOCK_TUNE`` over the parsed options."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        convert = _TUNABLE.get(key.strip())
        if not sep or convert is None:
            raise SystemExit(f"VZKIT_VSOCK_TUNE: expected one of {sorted(_TUNABLE)}=VALUE, "
                             f"not {item!r}")  # fmt: skip
        try:
            setattr(args, key.strip(), convert(value))
        except ValueError:
            raise SystemExit(f"VZKIT_VSOCK_TUNE: bad value in {item!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _apply_tune(args, os.environ.get("VZKIT_VSOCK_TUNE", ""))
    if args.print_capabilities:
        print(json.dumps({"type": "vsock", "features": []}))
        return 0
    if args.uds_path is None or (args.fd is None and args.socket_path is None):
        _parser().error("--uds-path and one of --fd/--socket-path are required")
    logging.basicConfig(
        level=args.log_level.upper(), format="vzkit-vsock[%(process)d] %(levelname)s %(message)s"
    )
    raise_fd_limit()
    vhost_socket = None
    if args.fd is not None:
        vhost_socket = socket.socket(fileno=args.fd)
    device = VhostUserVsockDevice(
        args.uds_path,
        guest_cid=args.guest_cid,
        vhost_socket=vhost_socket,
        vhost_path=args.socket_path,
        buf_alloc=args.buf_alloc,
        byte_budget=args.byte_budget,
        max_connections=args.max_connections,
        stop_on_disconnect=True,
        credit_step=args.credit_step,
        update_delay_s=args.update_delay_ms / 1000,
        tx_call_delay_s=args.tx_call_delay_ms / 1000,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        device.stop()

    def ready() -> None:
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, b"READY\n")
            with contextlib.suppress(OSError):
                os.close(args.ready_fd)

    stats_path = os.environ.get("VZKIT_VSOCK_STATS")

    def dump_stats(signum: int = 0, frame: FrameType | None = None) -> None:
        if stats_path:
            with contextlib.suppress(OSError):
                tmp = f"{stats_path}.{os.getpid()}.tmp"
                Path(tmp).write_text(json.dumps(device.stats.as_dict()))
                os.replace(tmp, stats_path)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, dump_stats)
    profile_path = os.environ.get("VZKIT_VSOCK_PROFILE")
    try:
        if profile_path:
            import cProfile

            cProfile.runctx("device.serve(on_ready=ready)", globals(), locals(), profile_path)
        else:
            device.serve(on_ready=ready)
    finally:
        device.close()
        dump_stats()
    return 0
