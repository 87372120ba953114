"""The blob store: only whole, verified blobs enter; private modes; resumable partials."""

from __future__ import annotations

import hashlib
import io
import stat
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from vzkit.errors import GuestError
from vzkit.image._download import ChecksumError
from vzkit.image.oci._blobs import BlobStore
from vzkit.image.oci._errors import ImageFormatError

DATA = b"layer bytes " * 1000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(store: BlobStore) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())


def test_a_verified_blob_is_stored_privately(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    seen: list[int] = []
    path = store.ingest(DIGEST, len(DATA), io.BytesIO(DATA), progress=seen.append)
    assert path == tmp_path / "oci" / "blobs" / "sha256" / DIGEST[7:]
    assert path.read_bytes() == DATA
    assert sum(seen) == len(DATA)
    assert store.has(DIGEST)
    assert store.size(DIGEST) == len(DATA)
    assert _mode(path) == 0o600
    for directory in (store.root, store.root / "blobs", store.blob_dir, store.tmp_dir):
        assert _mode(directory) == 0o700
    with store.open(DIGEST) as fh:
        assert fh.read() == DATA
    assert store.read_bytes(DIGEST, len(DATA)) == DATA
    assert list(store.digests()) == [DIGEST]
    assert _leftovers(store) == [f"blobs/sha256/{DIGEST[7:]}"]


def test_a_blob_already_there_is_not_read_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.ingest(DIGEST, len(DATA), io.BytesIO(DATA))
    reader = io.BytesIO(b"never read")
    store.ingest(DIGEST, len(DATA), reader)
    assert reader.tell() == 0
    with pytest.raises(ChecksumError, match="the descriptor says 5"):
        store.ingest(DIGEST, 5, io.BytesIO(DATA))


@pytest.mark.parametrize(
    ("data", "size", "says"),
    [
        (DATA[:-1] + b"X", len(DATA), "hashes to sha256:"),
        (DATA[:-10], len(DATA), f"{len(DATA) - 10} bytes, expected {len(DATA)}"),
        (DATA + b"more", len(DATA), f"more than the {len(DATA)} bytes expected"),
        (DATA + b"more", None, "hashes to sha256:"),
    ],
)
def test_a_mismatching_blob_is_refused_and_nothing_is_kept(
    tmp_path: Path, data: bytes, size: int | None, says: str
) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ChecksumError) as info:
        store.ingest(DIGEST, size, io.BytesIO(data), origin="oci:/somewhere")
    assert says in str(info.value)
    assert "oci:/somewhere" in str(info.value)
    assert "nothing was stored" in str(info.value)
    assert not store.has(DIGEST)
    assert _leftovers(store) == []


def test_an_oversized_reader_is_cut_off_at_the_size(tmp_path: Path) -> None:
    class Endless(io.RawIOBase):
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            buffer[:] = b"\0" * len(buffer)
            self.served += len(buffer)
            return len(buffer)

    endless = Endless()
    with pytest.raises(ChecksumError, match="more than the 1000 bytes"):
        BlobStore(tmp_path).ingest(DIGEST, 1000, endless)  # type: ignore[arg-type]
    assert endless.served <= 1001


def test_a_failing_reader_leaves_nothing(tmp_path: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("connection reset")

    store = BlobStore(tmp_path)
    with pytest.raises(OSError, match="connection reset"):
        store.ingest(DIGEST, len(DATA), Broken())
    assert _leftovers(store) == []


def test_bad_digests_and_missing_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for bad in ("sha256:../../etc/passwd", "md5:abc", "sha256:" + "A" * 64):
        with pytest.raises(ImageFormatError, match="not a sha256 digest"):
            store.path(bad)
    with pytest.raises(GuestError, match="pull the image again"):
        store.open(DIGEST)
    with pytest.raises(GuestError):
        store.size(DIGEST)
    store.remove(DIGEST)  # nothing there: no error


def test_a_symlink_planted_in_the_store_is_not_followed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.blob_dir.mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"secret")
    store.path(DIGEST).symlink_to(tmp_path / "secret")
    with pytest.raises(OSError, match="symbolic links"):  # ELOOP from O_NOFOLLOW
        store.open(DIGEST)


def test_ingest_file_continues_a_partial_and_verifies(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    calls: list[int] = []

    def fetch(partial: Path) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        calls.append(have)
        with open(partial, "ab") as fh:
            fh.write(DATA[have:])

    store.partial_dir.mkdir(parents=True)
    (store.partial_dir / DIGEST[7:]).write_bytes(DATA[:100])  # a cut-off earlier pull
    path = store.ingest_file(DIGEST, len(DATA), fetch, origin="docker://x/y")
    assert calls == [100]
    assert path.read_bytes() == DATA
    assert _mode(path) == 0o600
    assert _leftovers(store) == [f"blobs/sha256/{DIGEST[7:]}"]
    store.ingest_file(DIGEST, len(DATA), fetch)
    assert calls == [100]  # in the store: no fetch


def test_ingest_file_refuses_what_the_fetcher_got_wrong(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def fetch(partial: Path) -> None:
        partial.write_bytes(DATA[:-1] + b"!")

    with pytest.raises(ChecksumError, match="docker://x/y"):
        store.ingest_file(DIGEST, len(DATA), fetch, origin="docker://x/y")
    assert _leftovers(store) == []


def test_a_fetcher_that_verifies_is_not_hashed_again_but_its_size_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path)
    hashed: list[Path] = []
    real = BlobStore._verify_file

    def counting(self: BlobStore, path: Path, *args: Any) -> None:
        hashed.append(path)
        real(self, path, *args)

    monkeypatch.setattr(BlobStore, "_verify_file", counting)
    path = store.ingest_file(DIGEST, len(DATA), lambda p: p.write_bytes(DATA),
                             fetch_verifies=True)  # fmt: skip
    assert path.read_bytes() == DATA
    assert hashed == []  # the fetcher's own check stands
    other = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ChecksumError):  # a short file is still refused
        store.ingest_file(other, 5, lambda p: p.write_bytes(b"oth"), fetch_verifies=True)
    assert not store.has(other)
    store.ingest_file(other, 5, lambda p: p.write_bytes(b"other"))
    assert len(hashed) == 1  # the default: the store hashes what it was given


def test_concurrent_ingests_of_one_digest_store_one_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    errors: list[BaseException] = []
    inside = threading.Event()
    release = threading.Event()
    fetches: list[int] = []

    def fetch(partial: Path) -> None:
        fetches.append(1)
        inside.set()
        assert release.wait(10)
        partial.write_bytes(DATA)

    def run() -> None:
        try:
            store.ingest_file(DIGEST, len(DATA), fetch)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    first = threading.Thread(target=run)
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=run)
    second.start()  # waits on the digest's lock while the first one fetches
    release.set()
    first.join(10)
    second.join(10)
    assert errors == []
    assert fetches == [1]
    assert store.path(DIGEST).read_bytes() == DATA
    assert _leftovers(store) == [f"blobs/sha256/{DIGEST[7:]}"]


def test_a_big_blob_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    size = 96 << 20
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)

    class Stream(io.RawIOBase):
        left = size

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            n = self.left if n < 0 else min(n, self.left)
            assert n <= 2 << 20, "the store asked for more than a chunk at once"
            out = (block * (n // len(block) + 1))[:n] if n else b""
            self.left -= n
            return out

    tracemalloc.start()
    try:
        BlobStore(tmp_path).ingest("sha256:" + digest.hexdigest(), size, Stream())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes for a {size}-byte blob"
