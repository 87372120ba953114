"""The vhost-user-vsock device: vhost-user session, rx/tx virtqueues and the vsock muxer.

One :class:`VhostUserVsockDevice` serves one VM. Everything runs on one epoll loop, either on
a thread of its own (:meth:`~VhostUserVsockDevice.start`) or in the calling thread
(:meth:`~VhostUserVsockDevice.serve`, what the helper process ``python -m
vzkit.backends.qemu.vhost_vsock`` does). The front-end (QEMU) is attached either through an
already connected socket (``vhost_socket``: one end of a socketpair whose other end QEMU gets
as ``-chardev socket,fd=N``) or through a listening socket at ``vhost_path``.

QEMU's vhost-user-vsock hands the rx (0) and tx (1) queues to the back-end and keeps the event
queue (2) itself; the guest CID comes from the back-end's config space (``GET_CONFIG``).
:meth:`~VhostUserVsockDevice.close` stops the loop and releases every socket, descriptor,
mapping and the ``<uds>`` socket file; it is idempotent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ._conn import VsockStats
from ._credit import BUF_ALLOC, BYTE_BUDGET, CREDIT_STEP, UPDATE_DELAY_S
from ._hybrid import HybridListener
from ._reactor import EPOLLERR, EPOLLHUP, EPOLLIN, Reactor, Timer
from ._vhost_user import (
    F_VERSION_1,
    MAX_FDS,
    MessageReader,
    VhostUserBackend,
    VhostUserProtocolError,
)
from ._virtqueue import F_EVENT_IDX, F_INDIRECT_DESC, RingError, Virtqueue
from ._vsock import MAX_CONNECTIONS, VsockMuxer

__all__ = ["FD_RESERVE", "VhostUserVsockDevice", "connection_cap"]

log = logging.getLogger(__name__)

RX, TX = 0, 1
# Interrupts for consumed tx packets are coalesced: the guest only frees those packets (Linux
# queues a worker for it), so the call waits until an rx call goes out anyway, TX_CALL_BATCH
# packets are done, or TX_CALL_DELAY_S has passed (see docs/vsock.md, "Performance").
TX_CALL_DELAY_S = 0.002
TX_CALL_BATCH = 16
_REPLY_TIMEOUT_S = 5.0
_QUEUE_NAMES = ("rx", "tx")
_MAX_CID = 0xFFFFFFFF - 1
#: Descriptors kept free for the device itself beyond those open when it is made: epoll, its
#: wake-up eventfd, the hybrid and vhost-user sockets, six ring eventfds, the descriptors of
#: one vhost-user message (up to MAX_FDS; a message whose descriptors do not fit would end
#: the session) and a few in passing (an accepted stream before it is turned away).
FD_RESERVE = MAX_FDS + 32


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # not listdir's own
    except OSError:
        return 0


def connection_cap(max_connections: int | None = None) -> int:
    """How many connections (each one host socket) fit below this process's descriptor limit.

    The soft ``RLIMIT_NOFILE`` minus the descriptors open now minus :data:`FD_RESERVE`, and at
    most ``max_connections`` (default :data:`MAX_CONNECTIONS`); at least 1. The helper process
    raises its soft limit to the hard one before it asks.
    """
    cap = MAX_CONNECTIONS if max_connections is None else max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft - _open_fds() - FD_RESERVE)
    return max(1, cap)


class VhostUserVsockDevice:
    """A user-space virtio-vsock device for QEMU's ``vhost-user-vsock-pci``/``-device``.

    ``uds_path`` is the hybrid socket (host programs connect there and write
    ``CONNECT <port>\\n``; guest connections to host port P go to ``<uds_path>_<P>``).
    The front-end is ``vhost_socket`` (connected) or ``vhost_path`` (listened on).
    ``buf_alloc`` is the receive buffer advertised per connection (and the bound on what the
    device holds for a host that does not read); a host connection waits
    ``connect_timeout_s`` for the guest to accept and ``handshake_timeout_s`` for its request
    line. ``event_idx``/``indirect`` choose the ring features offered. With
    ``stop_on_disconnect`` the loop ends when the front-end hangs up (helper process).
    ``poll_interval_s`` looks at running rings that often even without a kick (a safety net;
    None: kicks only). ``credit_step``: forwarded guest bytes after which the guest hears our
    ``fwd_cnt`` (at most ``buf_alloc // 4``); ``update_delay_s``: a credit update owed at the
    end of a tx batch waits until the guest has sent nothing for that long (0: at once).
    ``tx_call_delay_s``: how long the interrupt for consumed tx packets may wait to go out
    with an rx interrupt (0: at once); it never waits for more than ``TX_CALL_BATCH`` packets.

    Limits: connections (live ones and those draining after a shutdown) and pending host
    handshakes together stay below ``max_connections`` as bounded by the descriptor limit
    (:func:`connection_cap`, computed here); the credit granted to the guest over all
    connections, and so what the device buffers for host sockets that do not read, stays
    within ``byte_budget``.
    """

    def __init__(
        self,
        uds_path: Path | str,
        *,
        guest_cid: int = 3,
        vhost_socket: socket.socket | None = None,
        vhost_path: Path | str | None = None,
        buf_alloc: int = BUF_ALLOC,
        connect_timeout_s: float = 5.0,
        handshake_timeout_s: float = 10.0,
        max_connections: int | None = None,
        byte_budget: int = BYTE_BUDGET,
        event_idx: bool = True,
        indirect: bool = True,
        stop_on_disconnect: bool = False,
        poll_interval_s: float | None = 0.25,
        credit_step: int = CREDIT_STEP,
        update_delay_s: float = UPDATE_DELAY_S,
        tx_call_delay_s: float = TX_CALL_DELAY_S,
    ) -> None:
        if not 3 <= guest_cid <= _MAX_CID:
            raise ValueError(f"guest CID must be between 3 and {_MAX_CID}, not {guest_cid}")
        if (vhost_socket is None) == (vhost_path is None):
            raise ValueError("give exactly one of vhost_socket= and vhost_path=")
        if not 4096 <= buf_alloc <= 0xFFFFFFFF:
            raise ValueError(f"buf_alloc must be between 4096 and 2**32 - 1, not {buf_alloc}")
        if byte_budget < 4096:
            raise ValueError(f"byte_budget must be at least 4096, not {byte_budget}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.uds_path = Path(uds_path)
        self.guest_cid = guest_cid
        self.vhost_path = Path(vhost_path) if vhost_path is not None else None
        self._vhost_socket = vhost_socket
        self._stop_on_disconnect = stop_on_disconnect
        self._poll_s = poll_interval_s  # a safety net for lost kicks; None: kicks only
        self._tx_call_delay_s = tx_call_delay_s
        self._tx_call_timer: Timer | None = None
        self._features = (
            (1 << F_VERSION_1) | (event_idx << F_EVENT_IDX) | (indirect << F_INDIRECT_DESC)
        )
        self._reactor = Reactor()
        self.max_connections = connection_cap(max_connections)
        self._muxer = VsockMuxer(
            self._reactor,
            guest_cid=guest_cid,
            uds_path=self.uds_path,
            buf_alloc=buf_alloc,
            connect_timeout_s=connect_timeout_s,
            max_connections=self.max_connections,
            byte_budget=byte_budget,
            credit_step=credit_step,
            update_delay_s=update_delay_s,
        )
        self._listener = HybridListener(
            self._reactor,
            self.uds_path,
            self._muxer.host_connect,
            handshake_timeout_s=handshake_timeout_s,
            max_pending=self.max_connections,
            in_use=lambda: self._muxer.open_connections,
        )
        self._muxer.other_fds = lambda: self._listener.pending
        self._session: socket.socket | None = None
        self._reader: MessageReader | None = None
        self._backend: VhostUserBackend | None = None
        self._server: socket.socket | None = None
        self._queues: list[Virtqueue | None] = [None, None]
        self._saved_bases: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._set_up = False
        self._closed = False
        self.sessions = 0  # vhost-user sessions seen (for tests)

    # -- public ----------------------------------------------------------------------------

    @property
    def stats(self) -> VsockStats:
        return self._muxer.stats

    @property
    def connections(self) -> int:
        return self._muxer.connections

    @property
    def open_connections(self) -> int:
        """Connections holding a host socket: live ones and ones draining after a shutdown."""
        return self._muxer.open_connections

    @property
    def buffered_bytes(self) -> int:
        """Guest bytes held for host sockets that have not taken them yet (all connections)."""
        return self._muxer.buffered_bytes

    @property
    def committed_bytes(self) -> int:
        """Credit granted to the guest and not known to be used up (at most ``byte_budget``)."""
        return self._muxer.committed_bytes

    @property
    def pending_handshakes(self) -> int:
        return self._listener.pending

    @property
    def rejected_handshakes(self) -> int:
        return self._listener.rejected

    @property
    def attached(self) -> bool:
        """Whether a front-end (QEMU) is connected."""
        return self._session is not None

    @property
    def running(self) -> bool:
        """Whether the guest driver has both rings running."""
        return self._muxer.rxq is not None and self._muxer.txq is not None

    def start(self) -> None:
        """Bind the sockets and run the device on a thread of its own."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the vsock device was already started or closed")
        self._setup()
        self._thread = threading.Thread(target=self._run, name="vzkit-vsock", daemon=True)
        self._thread.start()

    def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Bind the sockets and run the device in this thread until :meth:`stop`/:meth:`close`.

        ``on_ready`` is called once the hybrid socket accepts connections.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("the vsock device was already started or closed")
        self._thread = threading.current_thread()
        self._setup()
        if on_ready is not None:
            on_ready()
        self._run()

    def stop(self) -> None:
        """Ask the loop to end (thread and signal safe); :meth:`close` also waits for it."""
        self._stopping = True
        self._reactor.wake()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop and release everything. Idempotent."""
        thread = self._thread
        self.stop()
        if thread is threading.current_thread():
            return  # called from the loop itself: it tears down when it returns
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("vsock device thread did not stop within %.1f s", timeout)
                return
        if not self._closed:
            self._teardown()

    def __enter__(self) -> VhostUserVsockDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- loop ------------------------------------------------------------------------------

    def _setup(self) -> None:
        self._set_up = True
        try:
            self._listener.open()
            if self._vhost_socket is not None:
                sock, self._vhost_socket = self._vhost_socket, None
                self._attach(sock)
            else:
                assert self.vhost_path is not None
                path = os.fspath(self.vhost_path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._server = server
                server.bind(path)
                server.listen(4)
                server.setblocking(False)
                self._reactor.register(server.fileno(), EPOLLIN, self._on_server)
        except BaseException:
            self._teardown()
            raise

    def _run(self) -> None:
        try:
            while not self._stopping:
                rings = any(q is not None for q in self._queues)
                timeout = 0.0 if self._muxer.tx_more else self._poll_s if rings else None
                self._reactor.run_once(timeout)
                self._after_events()
        except Exception:
            log.exception("vsock device loop failed")
        finally:
            self._teardown()

    def _after_events(self) -> None:
        muxer = self._muxer
        if muxer.tx_more:
            muxer.on_tx_ready()
        muxer.flush()  # control packets queued by host-side events and timers
        for queue in (muxer.rxq, muxer.txq) if self._poll_s is not None else ():
            if queue is not None:
                try:
                    if queue.pending():  # a kick may have been missed; cheap to look
                        (muxer.on_rx_ready if queue is muxer.rxq else muxer.on_tx_ready)()
                except RingError as err:
                    log.warning("vsock: %s; the ring stops until it is restarted", err)
        if self._backend is None:
            return
        muxer.stats.loop_iterations += 1
        rx_called = self._call(RX)
        txq = self._queues[TX]
        if txq is None:
            return
        txq.publish()
        if rx_called or self._tx_call_delay_s <= 0 or txq.unsignalled >= TX_CALL_BATCH:
            self._call(TX)
        elif txq.unsignalled and self._tx_call_timer is None:
            self._tx_call_timer = self._reactor.call_later(self._tx_call_delay_s, self._late_call)

    def _late_call(self) -> None:
        self._tx_call_timer = None
        self._call(TX)

    def _call(self, index: int) -> bool:
        """Interrupt the guest for ring ``index`` if it wants one; True if it was called.
        (A deferred tx call that finds its ring stopped or restarted finds nothing to do.)"""
        if index == TX and self._tx_call_timer is not None:
            self._tx_call_timer.cancel()
            self._tx_call_timer = None
        queue, backend = self._queues[index], self._backend
        if queue is None or backend is None or not queue.need_notify():
            return False
        fd = backend.rings[index].call_fd
        if fd is None:
            return False
        stats = self._muxer.stats
        if index == RX:
            stats.calls_rx += 1
        else:
            stats.calls_tx += 1
        with contextlib.suppress(OSError):
            os.eventfd_write(fd, 1)
        return True

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_session("device closed")
        self._muxer.close()
        self._listener.close()
        server, self._server = self._server, None
        if server is not None:
            server.close()
            if self.vhost_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.vhost_path)
        if self._vhost_socket is not None:
            self._vhost_socket.close()
            self._vhost_socket = None
        self._reactor.close()

    # -- vhost-user session ----------------------------------------------------------------

    def _on_server(self, mask: int) -> None:
        assert self._server is not None
        try:
            sock, _ = self._server.accept()
        except OSError:
            return
        if self._session is not None:
            log.warning("vhost-user: a second front-end connected; closing it")
            sock.close()
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._session = sock
        self._reader = MessageReader(sock)
        self._backend = VhostUserBackend(
            self, num_queues=2, features=self._features, config=self._config
        )
        self._muxer.online = True
        self.sessions += 1
        self._reactor.register(sock.fileno(), EPOLLIN, self._on_session)
        log.debug("vhost-user front-end attached")

    def _config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def _on_session(self, mask: int) -> None:
        reader, backend, sock = self._reader, self._backend, self._session
        if reader is None or backend is None or sock is None:
            return
        try:
            messages = reader.read()
            for msg in messages or ():
                reply = backend.handle(msg)
                if reply is not None:
                    sock.settimeout(_REPLY_TIMEOUT_S)  # replies are small; QEMU waits for them
                    try:
                        sock.sendall(reply)
                    finally:
                        sock.setblocking(False)
        except (VhostUserProtocolError, OSError) as err:
            log.error("vhost-user: %s; dropping the front-end", err)
            messages = None
        if messages is None:
            self._end_session("front-end disconnected")
            if self._stop_on_disconnect:
                self._stopping = True

    def _end_session(self, reason: str) -> None:
        sock, self._session = self._session, None
        for index in (RX, TX):
            self._drop_queue(index)
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        self._muxer.online = False
        self._muxer.reset_all(reason)
        if sock is not None:
            self._reactor.unregister(sock.fileno())
            sock.close()
            log.info("vhost-user session ended: %s", reason)

    # -- rings (RingHooks) -----------------------------------------------------------------

    def _drop_queue(self, index: int) -> int | None:
        queue = self._queues[index]
        if queue is None:
            return None
        self._queues[index] = None
        backend = self._backend
        if backend is not None:
            kick = backend.rings[index].kick_fd
            if kick is not None:
                self._reactor.unregister(kick)
        base = queue.last_avail
        queue.publish()  # everything we consumed is handed back before the ring stops
        queue.release()
        self._sync()
        return base

    def _build_queue(self, index: int, base: int) -> None:
        backend = self._backend
        assert backend is not None
        assert backend.memory is not None
        ring = backend.rings[index]
        try:
            queue = Virtqueue(
                backend.memory,
                size=ring.num,
                desc_addr=ring.desc_addr,
                avail_addr=ring.avail_addr,
                used_addr=ring.used_addr,
                last_avail=base,
                event_idx=backend.event_idx,
                indirect=backend.indirect,
                name=_QUEUE_NAMES[index],
            )
        except RingError as err:
            log.error("vhost-user: cannot start the %s ring: %s", _QUEUE_NAMES[index], err)
            return
        self._queues[index] = queue
        if ring.kick_fd is not None:
            os.set_blocking(ring.kick_fd, False)
            self._reactor.register(
                ring.kick_fd, EPOLLIN, functools.partial(self._on_kick, index, ring.kick_fd)
            )
        log.debug("vhost-user: %s ring started (size %d, base %d, event_idx=%s, indirect=%s)",
                  _QUEUE_NAMES[index], ring.num, base, backend.event_idx,
                  backend.indirect)  # fmt: skip
        self._sync()

    def ring_started(self, index: int) -> None:
        backend = self._backend
        assert backend is not None
        self._drop_queue(index)
        self._build_queue(index, backend.rings[index].base)

    def ring_stopped(self, index: int) -> int:
        base = self._drop_queue(index)
        backend = self._backend
        if base is None:
            return backend.rings[index].base if backend is not None else 0
        log.debug("vhost-user: %s ring stopped at %d", _QUEUE_NAMES[index], base)
        return base

    def ring_enabled(self, index: int, enabled: bool) -> None:
        self._sync()

    def memory_changing(self) -> None:
        for index in (RX, TX):
            base = self._drop_queue(index)
            if base is not None:
                self._saved_bases[index] = base

    def memory_changed(self) -> None:
        saved, self._saved_bases = self._saved_bases, {}
        for index, base in saved.items():
            self._build_queue(index, base)

    def device_reset(self) -> None:
        self._muxer.reset_all("device reset by the front-end")

    def _sync(self) -> None:
        """Hand the muxer the queues that are started and enabled."""
        backend = self._backend
        muxer = self._muxer
        live = [
            q if q is not None and backend is not None and backend.rings[i].enabled else None
            for i, q in enumerate(self._queues)
        ]
        rx_new = live[RX] is not None and muxer.rxq is not live[RX]
        tx_new = live[TX] is not None and muxer.txq is not live[TX]
        muxer.rxq, muxer.txq = live[RX], live[TX]
        if rx_new:
            muxer.on_rx_ready()
        if tx_new:
            muxer.on_tx_ready()

    def _on_kick(self, index: int, fd: int, mask: int) -> None:
        if mask & (EPOLLHUP | EPOLLERR):
            self._reactor.unregister(fd)
            return
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            log.warning("vhost-user: kick descriptor of ring %d failed: %s", index, err)
            self._reactor.unregister(fd)
            return
        if index == RX:
            self._muxer.stats.kicks_rx += 1
            self._muxer.on_rx_ready()
        else:
            self._muxer.stats.kicks_tx += 1
            self._muxer.on_tx_ready()
