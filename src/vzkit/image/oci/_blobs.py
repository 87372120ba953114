"""The content-addressed blob store: ``<cache>/oci/blobs/sha256/<hex>``, verified on the way in.

A blob enters the store only whole and only when its bytes hash to its name: it is written to
a fresh temporary file inside the store (``<cache>/oci/tmp/``), hashed while it is written,
checked against the expected digest and size, fsynced and renamed into place. A mismatch is a
:class:`~vzkit.image._download.ChecksumError` and leaves nothing behind. A reader that offers
more bytes than the descriptor's size is cut off there (the bytes beyond are never written).

Registry downloads are resumable: :meth:`BlobStore.ingest_file` hands the fetcher a stable
destination (``<cache>/oci/partial/<hex>``; the registry client keeps its bytes in
``<hex>.part`` until they verify, and a cut-off pull continues that file next time); one
process at a time ingests a digest (an ``flock`` on ``<hex>.ingest-lock``). Files are 0600 in 0700
directories: an image's layers are the guest's data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..._cache import user_cache_dir
from ..._fsutil import fsync_dir
from ..._private import private_dir
from ...errors import GuestError
from .._download import ChecksumError
from ._manifest import check_digest

__all__ = ["BlobStore", "ByteProgress"]

log = logging.getLogger(__name__)

ByteProgress = Callable[[int], None]
"""Called with the number of bytes just added (from whichever thread moves them)."""

_CHUNK = 1 << 20


class BlobStore:
    """The blobs under ``cache_dir`` (default: vzkit's user cache) ``/oci``."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.root = Path(cache_dir if cache_dir is not None else user_cache_dir()) / "oci"
        self.blob_dir = self.root / "blobs" / "sha256"
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether it is there or not)."""
        return self.blob_dir / check_digest(digest, "blob").removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise self._missing(digest) from None

    def open(self, digest: str) -> BinaryIO:
        """The blob for reading (never through a symlink planted in the store)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing(digest) from None
        return os.fdopen(fd, "rb")

    def read_bytes(self, digest: str, limit: int) -> bytes:
        """A small blob (a config, a manifest) whole; at most ``limit`` bytes."""
        with self.open(digest) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise GuestError(f"blob {digest} is larger than {limit} bytes")
        return data

    def digests(self) -> Iterator[str]:
        """The digests of the blobs in the store."""
        if self.blob_dir.is_dir():
            for entry in sorted(self.blob_dir.iterdir()):
                if len(entry.name) == 64 and entry.is_file():
                    yield f"sha256:{entry.name}"

    def remove(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def _missing(self, digest: str) -> GuestError:
        return GuestError(
            f"blob {digest} is not in the image store {self.blob_dir}; pull the image again"
        )

    # --- putting blobs in ---------------------------------------------------------------

    def ingest(
        self,
        digest: str,
        size: int | None,
        reader: BinaryIO,
        *,
        progress: ByteProgress | None = None,
        origin: str = "",
    ) -> Path:
        """Copy ``reader`` into the store as ``digest`` (``size`` bytes when known); a blob
        already there is kept and ``reader`` is not read. ``origin`` names the source in
        errors."""
        target = self.path(digest)
        if target.is_file():
            self._check_size(target, digest, size, origin)
            return target
        private_dir(self.tmp_dir)
        private_dir(self.blob_dir)
        tmp = self.tmp_dir / f"{digest[7:]}.{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            hasher = hashlib.sha256()
            written = 0
            limit = size if size is not None else -1
            with os.fdopen(fd, "wb") as out:
                while True:
                    want = _CHUNK if limit < 0 else min(_CHUNK, limit - written + 1)
                    block = reader.read(want)
                    if not block:
                        break
                    written += len(block)
                    if 0 <= limit < written:
                        raise self._mismatch(digest, origin, f"more than the {size} bytes expected")
                    hasher.update(block)
                    out.write(block)
                    if progress is not None:
                        progress(len(block))
                out.flush()
                os.fsync(out.fileno())
            if size is not None and written != size:
                raise self._mismatch(digest, origin, f"{written} bytes, expected {size}")
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise self._mismatch(digest, origin, f"its content hashes to {got}")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.blob_dir)
        return target

    def ingest_file(
        self,
        digest: str,
        size: int | None,
        fetch: Callable[[Path], None],
        *,
        origin: str = "",
        fetch_verifies: bool = False,
    ) -> Path:
        """Let ``fetch(partial)`` bring the blob into ``partial`` (continuing what an earlier,
        cut-off attempt left there), then verify it and move it into the store. One process at
        a time works on a digest; a second one waits, then finds the blob in the store.
        ``fetch_verifies``: ``fetch`` itself checked the SHA256 of what it wrote (the registry
        client does, and refuses a mismatch), so only the size is checked again here, not the
        whole blob hashed a second time."""
        target = self.path(digest)
        if target.is_file():
            self._check_size(target, digest, size, origin)
            return target
        private_dir(self.partial_dir)
        private_dir(self.blob_dir)
        partial = self.partial_dir / digest[7:]
        with self._partial_lock(partial):
            if target.is_file():
                return target
            try:
                fetch(partial)
                if fetch_verifies:
                    self._check_size(partial, digest, size, origin)
                else:
                    self._verify_file(partial, digest, size, origin)
            except ChecksumError:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise
            os.chmod(partial, 0o600)
            os.replace(partial, target)
            fsync_dir(self.blob_dir)
        return target

    @contextlib.contextmanager
    def _partial_lock(self, partial: Path) -> Iterator[None]:
        # Not ``<hex>.lock``: the registry client locks that one itself while it downloads.
        lock_path = partial.with_name(partial.name + ".ingest-lock")
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(lock_path)
                except FileNotFoundError:
                    current = None
                if current is not None and current.st_ino == os.fstat(fd).st_ino:
                    break  # we hold the lock file that is in place
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed it meanwhile: take the new one
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            os.close(fd)

    def _verify_file(self, path: Path, digest: str, size: int | None, origin: str) -> None:
        hasher = hashlib.sha256()
        length = 0
        with open(path, "rb") as fh:
            while block := fh.read(_CHUNK):
                hasher.update(block)
                length += len(block)
        if size is not None and length != size:
            raise self._mismatch(digest, origin, f"{length} bytes, expected {size}")
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            raise self._mismatch(digest, origin, f"its content hashes to {got}")

    def _check_size(self, target: Path, digest: str, size: int | None, origin: str) -> None:
        if size is not None and target.stat().st_size != size:
            raise self._mismatch(
                digest,
                origin,
                f"the stored blob has {target.stat().st_size} bytes, the descriptor says {size}",
            )

    @staticmethod
    def _mismatch(digest: str, origin: str, why: str) -> ChecksumError:
        where = origin or "the image source"
        return ChecksumError(
            f"blob {digest} from {where} does not verify ({why}); nothing was stored. "
            "The image is damaged or was tampered with: pull it again from a source you trust",
            url=origin,
        )
