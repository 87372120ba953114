"""``pull``: an image from any source into the blob store, for one platform.

The steps: parse the reference, open its source, resolve the manifest for the platform (the
host's arch unless told), store the manifest and config, then fetch the layers that are not
in the store yet, a few at a time, each verified by the store before it is kept. Progress is
one callback, ``progress(done_bytes, total_bytes)`` (``vzkit._progress.Progress.update`` fits),
called from the fetching threads under a lock; layers already in the store count as done from
the start. The first failure stops the other fetches (a registry fetch keeps its partial file,
so the next pull continues it).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ._blobs import BlobStore
from ._errors import ImageFormatError
from ._manifest import Descriptor, ImageConfig
from ._platform import Platform, parse_platform
from ._ref import ImageReference, Transport, parse_reference
from ._sources import ImageSource, LayoutSource, RegistryClientLike, RegistrySource

__all__ = ["PullProgress", "PulledImage", "open_source", "pull", "pull_from"]

log = logging.getLogger(__name__)

PullProgress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)`` over all the image's blobs."""

DEFAULT_JOBS = 3
"""Layer fetches at once: enough to hide a registry's per-request latency, few enough to leave
bandwidth to each (containerd and skopeo use 3 and 6 by default)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PulledImage:
    """An image whose blobs are all in the store: its config, and its layers in order (media
    type, ``sha256:`` digest and size each); :meth:`open_layer` reads one."""

    reference: ImageReference
    platform: Platform
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    store: BlobStore = field(compare=False, repr=False)

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def size(self) -> int:
        """The bytes of the layers as stored (compressed)."""
        return sum(layer.size for layer in self.layers)

    def open_layer(self, layer: int | Descriptor) -> BinaryIO:
        """Layer ``layer`` (an index into :attr:`layers`, or one of its descriptors) as stored
        (compressed as its media type says)."""
        descriptor = self.layers[layer] if isinstance(layer, int) else layer
        return self.store.open(descriptor.digest)

    def read_config(self) -> bytes:
        """The config blob's bytes (what ``config`` was parsed from)."""
        return self.store.read_bytes(self.config_digest, 8 << 20)


def open_source(
    reference: ImageReference,
    *,
    insecure: bool = False,
    client: RegistryClientLike | None = None,
) -> ImageSource:
    """The source for ``reference``; a registry's client is made here unless given."""
    from ._archives import DockerArchiveSource, OciArchiveSource

    if reference.transport is Transport.OCI:
        return LayoutSource(reference)
    if reference.transport is Transport.OCI_ARCHIVE:
        return OciArchiveSource(reference)
    if reference.transport is Transport.DOCKER_ARCHIVE:
        return DockerArchiveSource(reference)
    if client is None:
        from ._registry import RegistryClient  # the HTTP client: loaded only for a registry

        if reference.registry is None:  # pragma: no cover - parse_reference sets it
            raise ImageFormatError(f"{reference}: no registry named")
        client = RegistryClient(reference.registry, insecure=insecure)
    return RegistrySource(client, reference)


def pull(
    reference: ImageReference | str,
    *,
    platform: str | Platform | None = None,
    cache_dir: Path | None = None,
    progress: PullProgress | None = None,
    insecure: bool = False,
    jobs: int = DEFAULT_JOBS,
) -> PulledImage:
    """Bring ``reference`` (text in skopeo's syntax, or parsed) for ``platform``
    (``"linux/arm64"``; default: the host's arch) into the blob store under ``cache_dir``
    (default: vzkit's cache). ``insecure`` lets a registry be reached over plain HTTP."""
    ref = reference if isinstance(reference, ImageReference) else parse_reference(reference)
    wanted = parse_platform(platform)
    source = open_source(ref, insecure=insecure)
    try:
        return pull_from(source, wanted, BlobStore(cache_dir), progress=progress, jobs=jobs)
    finally:
        source.close()


class _Stopped(BaseException):
    """Another fetch failed (or Ctrl-C): this one stops at its next chunk. A BaseException,
    like ``KeyboardInterrupt``, so that no retry loop's ``except Exception`` swallows it."""


class _Tally:
    """The bytes done across fetch threads, reported through one callback."""

    def __init__(self, total: int, progress: PullProgress | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def add(self, amount: int) -> None:
        if self.stop.is_set():
            raise _Stopped
        with self._lock:
            self.done += amount
            if self.progress is not None:
                self.progress(self.done, self.total)


def pull_from(
    source: ImageSource,
    platform: Platform,
    store: BlobStore,
    *,
    progress: PullProgress | None = None,
    jobs: int = DEFAULT_JOBS,
) -> PulledImage:
    """:func:`pull` with the source, platform and store given (tests, a client of one's own)."""
    resolved = source.resolve(platform)
    manifest = resolved.manifest
    origin = str(source.reference)
    store.ingest(
        resolved.manifest_digest,
        len(resolved.manifest_bytes),
        io.BytesIO(resolved.manifest_bytes),
        origin=origin,
    )
    store.ingest(
        manifest.config.digest,
        manifest.config.size,
        io.BytesIO(resolved.config_bytes),
        origin=origin,
    )
    unique: dict[str, Descriptor] = {}
    for layer in manifest.layers:
        unique.setdefault(layer.digest, layer)
    missing = [d for d in unique.values() if not store.has(d.digest)]
    tally = _Tally(sum(d.size for d in unique.values()), progress)
    tally.add(sum(d.size for d in unique.values() if store.has(d.digest)))
    log.info(
        "pulling %s for %s: %d layers, %d to fetch", origin, platform, len(unique), len(missing)
    )
    if missing:
        _fetch_all(source, store, missing, tally, max(1, min(jobs, len(missing))))
    for layer in unique.values():
        if not store.has(layer.digest):  # a source that returned without storing
            raise ImageFormatError(f"{origin}: layer {layer.digest} did not arrive")
    return PulledImage(
        reference=source.reference,
        platform=platform,
        manifest_digest=resolved.manifest_digest,
        manifest_media_type=manifest.media_type,
        config_digest=manifest.config.digest,
        config=resolved.config,
        layers=manifest.layers,
        store=store,
    )


def _fetch_all(
    source: ImageSource, store: BlobStore, missing: list[Descriptor], tally: _Tally, jobs: int
) -> None:
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="vzkit-pull")
    try:
        futures = [pool.submit(source.fetch, d, store, tally.add) for d in missing]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            tally.stop.set()
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            first = next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
            assert first is not None
            raise first
    except BaseException:
        tally.stop.set()  # Ctrl-C: the running fetches stop at their next chunk
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
