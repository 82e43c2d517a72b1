"""Moving many files between local folders and a store, concurrently and streaming.

The one place that moves file bytes: staging datasets and packages into a work folder,
uploading artifacts, and writing snapshot blobs. Files are streamed in chunks (a 2 GB model
never sits in memory) and hashed while they stream, so a digest costs no second read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import obstore

from airflow_aicenter.errors import AlreadyExistsError, DatasetError, StorageError
from airflow_aicenter.storage.store import Store

#: Concurrent requests per transfer; small files are latency-bound, so many in flight win.
CONCURRENCY = 64
CHUNK = 8 * 2**20
#: Download chunk: 1 MiB keeps 64 large files in flight at 64 MiB of buffers (not 512), at the
#: same speed (benchmarks/README.md, "download chunk").
DOWNLOAD_CHUNK = 2**20
#: Objects from this size on are received while a thread writes and hashes (PIPELINE_DEPTH
#: chunks queued at most): a large download is then bound by the network, not by the sum, and
#: the writes of many such files overlap (256 KiB rather than 8 MiB: 2x faster on 200 x 1 MB
#: files, benchmarks/README.md, "staging"). Smaller files are written inline: a thread hop
#: would cost more than the write.
PIPELINE_MIN = 256 * 2**10
PIPELINE_DEPTH = 4
#: Files up to this size go up in one request (create-once where asked); larger ones as
#: multipart uploads of CHUNK-sized parts, PARTS_IN_FLIGHT at a time.
SINGLE_PUT_MAX = CHUNK
PARTS_IN_FLIGHT = 4
#: File bytes one upload transfer holds in memory at once, whatever the sizes: 64 small files,
#: or two large ones with their parts in flight. Keeps the runtime's RSS flat (a 2 GB model
#: costs 40 MiB of buffers, not 2 GB twice: benchmarks/README.md, "memory").
MEMORY_BUDGET = 64 * 2**20
BLOB_PREFIX = "blobs/sha256/"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FileEntry:
    """A file by its path relative to a tree root, with its content digest and size."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BlobStats:
    files: int
    bytes: int
    uploaded_files: int
    uploaded_bytes: int


def blob_key(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def run(coro: Awaitable[T]) -> T:
    """Run a transfer from synchronous code (the runtime and the CLI are synchronous)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


async def gather_limited(items: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int = CONCURRENCY) -> list[R]:
    """``fn`` over ``items`` with at most ``limit`` in flight; the first error cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with sem:
            return await fn(item)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def sha256_file(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(path.name, digest.hexdigest(), size)


def local_files(root: Path) -> list[str]:
    """Files under ``root`` as sorted POSIX relative paths (links are not followed)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            if full.is_file() and not full.is_symlink():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


# -- download ------------------------------------------------------------------------------
async def download_file(store: Store, key: str, dest: Path, *, expect_sha256: str | None = None) -> FileEntry:
    """Stream ``key`` into ``dest`` (via a temp name), hashing as it goes; verify if asked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    try:
        with store._errors(key):
            result = await obstore.get_async(store.inner, key)
            with open(tmp, "wb") as fh:

                def sink(chunk: bytes) -> None:
                    fh.write(chunk)
                    digest.update(chunk)

                stream = result.stream(min_chunk_size=DOWNLOAD_CHUNK)
                if result.meta["size"] >= PIPELINE_MIN:
                    await _pipelined(stream, sink)
                else:
                    async for chunk in stream:
                        sink(chunk)
                size = fh.tell()
    except BaseException:  # a failed or cancelled download leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    hexdigest = digest.hexdigest()
    if expect_sha256 is not None and hexdigest != expect_sha256:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{store.url(key)} is corrupt: its content hashes to sha256:{hexdigest}, expected sha256:{expect_sha256}; "
            "the object was changed or damaged in the store: restore it from a backup or re-upload the package"
        )
    os.replace(tmp, dest)
    return FileEntry(key, hexdigest, size)


async def _pipelined(stream: AsyncIterator[bytes], sink: Callable[[bytes], None]) -> None:
    """Receive the next chunks while a thread writes and hashes the last one (both release the GIL).

    At most PIPELINE_DEPTH chunks wait, so memory stays bounded whatever the object's size.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=PIPELINE_DEPTH)

    async def receive() -> None:
        async for chunk in stream:
            await queue.put(chunk)
        await queue.put(None)

    receiver = asyncio.ensure_future(receive())
    try:
        while (chunk := await queue.get()) is not None:
            await asyncio.to_thread(sink, chunk)
        await receiver  # re-raises a failed receive
    finally:
        if not receiver.done():
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)


async def download_tree(store: Store, dest: Path, *, prefix: str = "", limit: int = CONCURRENCY) -> list[FileEntry]:
    """Copy every object under ``prefix`` into ``dest``; entries are relative to ``prefix``."""
    strip = len(prefix.rstrip("/") + "/") if prefix else 0
    keys = [info.key for info in store.list(prefix)]
    if not keys:
        raise DatasetError(
            f"dataset {store.url(prefix)} is empty or does not exist; upload the data there or fix the dataset URI"
        )
    dest_root = dest.resolve()

    async def one(key: str) -> FileEntry:
        rel = key[strip:]
        target = (dest_root / rel).resolve()
        if not target.is_relative_to(dest_root):
            raise DatasetError(f"dataset object {key!r} would be written outside the data folder; rename it")
        entry = await download_file(store, key, target)
        return FileEntry(rel, entry.sha256, entry.size)

    return sorted(await gather_limited(keys, one, limit), key=lambda e: e.path)


# -- upload --------------------------------------------------------------------------------
class MemoryBudget:
    """At most ``total`` bytes of file content held by one transfer's uploads at a time."""

    def __init__(self, total: int = MEMORY_BUDGET) -> None:
        self.total = self.free = total
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        n = min(n, self.total)
        async with self._cond:
            await self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            async with self._cond:
                self.free += n
                self._cond.notify_all()


def _check_digest(path: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise StorageError(
            f"{path} changed while it was being stored: it now hashes to sha256:{actual}, not sha256:{expected} as "
            "when it was read; nothing was stored. Package code must not modify staged data (data_directory, "
            "test_data_directory) or the package folder after save()"
        )


async def _file_chunks(path: Path, expect_sha256: str | None) -> AsyncIterator[bytes]:
    """The file in CHUNK pieces, hashed on the way; a digest mismatch aborts the (multipart) upload."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            yield chunk
    _check_digest(path, digest.hexdigest(), expect_sha256)


async def upload_file(
    store: Store, path: Path, key: str, *, create: bool = False, expect_sha256: str | None = None,
    budget: MemoryBudget | None = None,
) -> None:
    """Stream a local file to ``key``; with ``expect_sha256``, bytes that do not match store nothing.

    Up to SINGLE_PUT_MAX it is one request (create-once when ``create``); a larger file is a
    multipart upload holding PARTS_IN_FLIGHT parts in memory. S3 cannot make a multipart upload
    create-once, so a large ``create`` put must be a content-addressed blob (``expect_sha256``):
    a concurrent writer of the same key writes the same verified bytes, which is harmless.
    """
    budget = budget or MemoryBudget()
    size = path.stat().st_size
    with store._errors(key):
        if size <= SINGLE_PUT_MAX:
            async with budget.hold(size):
                data = path.read_bytes()
                if expect_sha256 is not None:
                    _check_digest(path, hashlib.sha256(data).hexdigest(), expect_sha256)
                await obstore.put_async(store.inner, key, data, mode="create" if create else "overwrite")
            return
        if create and expect_sha256 is None:
            raise ValueError(f"a create-once put of {path} ({size} bytes, multipart) needs expect_sha256")
        async with budget.hold(PARTS_IN_FLIGHT * CHUNK):
            await obstore.put_async(
                store.inner, key, _file_chunks(path, expect_sha256), chunk_size=CHUNK, max_concurrency=PARTS_IN_FLIGHT
            )


async def upload_tree(root: Path, store: Store, prefix: str, *, limit: int = CONCURRENCY) -> list[FileEntry]:
    """Upload every file under ``root`` to ``prefix/<relative path>``; returns (path, "", size)."""
    rels = local_files(root)
    budget = MemoryBudget()

    async def one(rel: str) -> FileEntry:
        path = root / rel
        await upload_file(store, path, f"{prefix.rstrip('/')}/{rel}", budget=budget)
        return FileEntry(rel, "", path.stat().st_size)

    return await gather_limited(rels, one, limit)


#: On S3, a snapshot of at least LIST_MIN_FILES files finds which blobs exist by listing
#: blobs/sha256/ (1,000 keys a page, LIST_RANGES key ranges at once) instead of one HEAD per
#: file, as long as the listing stays within LIST_PAGES_PER_1000 pages per 1,000 files; past
#: that (a store with far more blobs than the snapshot has files) the rest falls back to HEADs.
LIST_MIN_FILES = 1000
LIST_PAGES_PER_1000 = 20
LIST_RANGES = 4
_HEX = "0123456789abcdef"


async def stored_digests(store: Store, digests: set[str], ranges: int | None = None) -> tuple[set[str], set[str]]:
    """(present, unknown) among ``digests``, by listing the blob prefix in key ranges concurrently."""
    ranges = ranges or LIST_RANGES
    pages_left = [max(ranges, len(digests) * LIST_PAGES_PER_1000 // 1000)]
    present: set[str] = set()
    unknown: set[str] = {d for d in digests if d[:1] not in _HEX}
    step = 16 // ranges

    async def scan(lo: str, hi: str | None) -> None:
        mine = {d for d in digests if lo <= d[:1] and (hi is None or d[:1] < hi)}
        if not mine:
            return
        found: set[str] = set()
        offset = {"offset": BLOB_PREFIX + lo} if lo != "0" else {}
        try:
            async for page in obstore.list(store.inner, BLOB_PREFIX.rstrip("/"), chunk_size=1000, **offset):
                pages_left[0] -= 1
                for meta in page:
                    digest = meta["path"][len(BLOB_PREFIX):]
                    if hi is not None and digest[:1] >= hi:  # S3 lists in key order: this range is done
                        return
                    if digest in mine:
                        found.add(digest)
                if pages_left[0] < 0:
                    unknown.update(mine - found)
                    return
        finally:
            present.update(found)

    bounds = [_HEX[i] for i in range(0, 16, step)] + [None]
    with store._errors(BLOB_PREFIX):
        await asyncio.gather(*(scan(lo, hi) for lo, hi in zip(bounds, bounds[1:])))
    return present, unknown


async def ensure_blobs(
    store: Store, root: Path, entries: Sequence[FileEntry], *, known: Collection[str] = (), limit: int = CONCURRENCY
) -> BlobStats:
    """Make sure every entry's content exists as a blob; upload only the missing ones.

    A blob key is its digest, so unchanged data is never written twice: a second snapshot of
    the same data reads a listing (S3, many files) or HEADs, and writes nothing. A concurrent
    writer of the same blob is harmless. ``known`` digests are taken as stored without a check
    (the caller vouches for them, e.g. from a committed manifest).
    """
    unique: dict[str, FileEntry] = {}
    for entry in entries:
        unique.setdefault(entry.sha256, entry)
    for digest in known:
        unique.pop(digest, None)
    budget = MemoryBudget()
    listed: set[str] | None = None
    if store.scheme == "s3" and len(unique) >= LIST_MIN_FILES:
        present, unknown = await stored_digests(store, set(unique))
        listed = set(unique) - unknown  # known either way: present, or absent
        for digest in present:
            del unique[digest]

    async def one(entry: FileEntry) -> FileEntry | None:
        key = blob_key(entry.sha256)
        if (listed is None or entry.sha256 not in listed) and await store.head_async(key) is not None:
            return None
        try:
            await upload_file(store, root / entry.path, key, create=True, expect_sha256=entry.sha256, budget=budget)
        except AlreadyExistsError:
            return None
        return entry

    uploaded = [e for e in await gather_limited(list(unique.values()), one, limit) if e is not None]
    return BlobStats(
        files=len(entries),
        bytes=sum(e.size for e in entries),
        uploaded_files=len(uploaded),
        uploaded_bytes=sum(e.size for e in uploaded),
    )


def put_blob(store: Store, path: Path, sha256: str) -> bool:
    """Store one file as a blob if it is not there yet; True when bytes were written."""
    key = blob_key(sha256)
    if store.exists(key):
        return False
    try:
        run(upload_file(store, path, key, create=True, expect_sha256=sha256))
    except AlreadyExistsError:
        return False
    return True


def get_blob(store: Store, sha256: str, dest: Path) -> FileEntry:
    """Download a blob into ``dest`` and verify it against its digest."""
    return run(download_file(store, blob_key(sha256), dest, expect_sha256=sha256))
