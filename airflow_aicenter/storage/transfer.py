"""Moving many files between local folders and a store, concurrently and streaming.

The one place that moves file bytes: staging datasets and packages into a work folder,
uploading artifacts, and writing snapshot blobs. Files are streamed in chunks (a 2 GB model
never sits in memory) and hashed while they stream, so a digest costs no second read.
Large S3 objects are read as concurrent ranged GETs written at their offsets, because one
connection to S3 moves 50-100 MB/s; large files go up as concurrent multipart parts.

Every transfer runs its requests under an AdaptiveLimit: obstore retries each request with
backoff and jitter (store.RETRY_CONFIG); a request that still fails with an overload or a
connection error halves the transfer's concurrency and is tried again after a jittered wait,
so a struggling server sees fewer requests, not the same number again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import itertools
import os
import random
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, TypeVar

import obstore
import obstore.exceptions as obx

if TYPE_CHECKING:
    from obstore import GetOptions

    from airflow_aicenter.secrets import Redactor

from airflow_aicenter.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    ArchiveError,
    DatasetError,
    NotFoundError,
    PackageError,
    StorageError,
)
from airflow_aicenter.kernel_copy import read_back
from airflow_aicenter.layout import BLOBS, blob_key
from airflow_aicenter.package.contents import KnownDigest, PackageContents, PackageFile, contents_of, decode, encode
from airflow_aicenter.package.validate import find_package_root
from airflow_aicenter.records import BlobRef
from airflow_aicenter.storage.cache import BlobCache, PlacedFiles
from airflow_aicenter.storage.store import LocalStore, ObjectInfo, Store, unstorable, walk_files

#: Concurrent requests per transfer; small files are latency-bound, so many in flight win: with
#: 20 ms to first byte (a real S3 link), 10,000 files take at least 10,000 / 64 x 20 ms = 3.1 s at
#: 64 in flight and 0.8 s at 256 (s5cmd's default). Memory stays bounded by MEMORY_BUDGET (uploads)
#: and DOWNLOAD_BUDGET (downloads), not by this number.
CONCURRENCY = 256
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
#: Bytes of object content one download transfer holds at once: a small body whole, a streamed
#: object its queued chunks, a ranged one a chunk per part in flight.
DOWNLOAD_BUDGET = 96 * 2**20
#: download_tree takes objects up to this size as one body, then writes and hashes it on a worker
#: thread in one go (one thread hop per file instead of a queue, a temp file and a rename).
WHOLE_MAX = 4 * 2**20
#: S3 objects from this size on are read as RANGE_PART-sized ranged GETs, RANGES_IN_FLIGHT at a
#: time, each written at its offset (os.pwrite) and hashed in order as the parts complete. Below
#: it, one stream: a range costs a request and its first-byte latency, and on moto every range
#: reads the whole object (3.5x slower for 200 MB, benchmarks/README.md).
RANGED_MIN = 64 * 2**20
RANGE_PART = 16 * 2**20
RANGES_IN_FLIGHT = 12
#: Files up to this size go up in one request (create-once where asked); larger ones as
#: multipart uploads of CHUNK-sized parts, PARTS_IN_FLIGHT at a time.
SINGLE_PUT_MAX = CHUNK
PARTS_IN_FLIGHT = 4
#: File bytes one upload transfer holds in memory at once, whatever the sizes: 64 small files,
#: or two large ones with their parts in flight. Keeps the runtime's RSS flat (a 2 GB model
#: costs 40 MiB of buffers, not 2 GB twice: benchmarks/README.md, "memory").
MEMORY_BUDGET = 64 * 2**20
#: A request that obstore gave up on (its own retries spent) is tried again this many times in
#: all, after a wait drawn from [0, RETRY_WAIT * 2**attempt] (full jitter), at most RETRY_WAIT_MAX.
TRANSFER_ATTEMPTS = 3
RETRY_WAIT = 1.0
RETRY_WAIT_MAX = 8.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FileEntry:
    """A file by its path relative to a tree root, with its content digest and size."""

    path: str
    sha256: str
    size: int


#: How a damaged or missing blob is put back: both ways hash what they write and rewrite the blob in place.
REPAIR_ADVICE = (
    "`aicenter verify --repair SOURCE` rewrites it from a folder or zip that holds the original content, and for a "
    "package version, uploading the same package again (`aicenter package upload PATH --name NAME`) rewrites it"
)



class DamagedBlobError(StorageError):
    """A stored blob does not hash to its name and these credentials may not rewrite it.

    Not retryable: the blob stays damaged until someone who may overwrite blobs repairs it.
    """

    retryable = False


def _refused_repair(store: Store, sha256: str) -> DamagedBlobError:
    """The error for a damaged blob whose overwrite was refused (run credentials may only create blobs)."""
    return DamagedBlobError(
        f"blob sha256:{sha256} ({store.url(blob_key(sha256))}) is damaged: its stored content does not hash to its "
        "name, and these credentials may not overwrite it (a run's credentials may only create blobs); nothing was "
        f"stored. Repair it: {REPAIR_ADVICE}; then run the task again"
    )


#: What a blob was found to be: stored intact, absent, or present with other content (hashed).
BlobState = Literal["ok", "missing", "damaged"]


@dataclass(frozen=True)
class BlobStats:
    """What storing a set of files as content-addressed objects did: all of them, and those actually sent.

    One type for snapshots (ensure_blobs) and checkpoint syncs; ``seq`` is the checkpoint
    manifest a sync committed, None for a snapshot.
    """

    files: int
    bytes: int
    uploaded_files: int
    uploaded_bytes: int
    seq: int | None = None


def run(coro: Awaitable[T]) -> T:
    """Run a transfer from synchronous code (the runtime and the CLI are synchronous)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- concurrency and retries -----------------------------------------------------------------
#: What an overloaded or flaky server looks like in obstore's final error: 503 SlowDown, 500,
#: 429, a reset or dropped connection, a body cut short, a timeout.
_TRANSIENT = (
    "SlowDown", "Slow Down", "503", "500", "429", "Service Unavailable", "InternalError", "connection",
    "Connection", "reset", "body error", "timed out", "timeout", "Timeout", "broken pipe", "error sending request",
    "IncompleteBody", "unexpected EOF",
)


def is_transient(exc: BaseException) -> bool:
    """True for an error that another try may not have: overload, connection, timeout, cut body.

    A multipart upload that broke off is one too, whatever the last error says: obstore then
    aborts the upload, and the abort's own answer (404 NoSuchUpload when the server already
    dropped it) replaces the fault that caused it. The whole file is sent again.
    """
    cause = exc.__cause__ if isinstance(exc, StorageError) else exc
    if cause is not None and "uploadId=" in str(cause):
        return True
    if isinstance(exc, (NotFoundError, AlreadyExistsError, AccessDeniedError)):
        return False
    if cause is None:
        return False  # ours: a digest mismatch, a refused name, a changed file
    if isinstance(cause, (obx.NotFoundError, obx.AlreadyExistsError, obx.PreconditionError, obx.PermissionDeniedError,
                          obx.UnauthenticatedError, obx.NotSupportedError)):
        return False
    if isinstance(cause, (ConnectionError, TimeoutError)):
        return True
    return isinstance(cause, obx.BaseError) and any(mark in str(cause) for mark in _TRANSIENT)


class AdaptiveLimit:
    """How many requests a transfer keeps in flight: halved on each overload, regrown slowly.

    Additive increase, multiplicative decrease (as TCP does): every ``limit`` successes in a
    row add one slot, up to the starting ``limit``; each transient failure halves it (to 1 at
    least). ``lowest`` records how far it went down. Waiters queue in order and a release hands
    its slot to the next one (no wake-up of every waiter: 10,000 small files stay O(n)).
    """

    def __init__(self, limit: int = CONCURRENCY) -> None:
        self.max = self.limit = self.lowest = max(1, limit)
        self.in_flight = 0
        self._streak = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # the slot was handed over: give it back
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def succeeded(self) -> None:
        self._streak += 1
        if self._streak >= self.limit and self.limit < self.max:
            self.limit += 1
            self._streak = 0
            self._wake()

    def overloaded(self) -> None:
        self.limit = max(1, self.limit // 2)
        self.lowest = min(self.lowest, self.limit)
        self._streak = 0

    async def call(self, fn: Callable[[], Awaitable[R]]) -> R:
        """``fn()`` in a slot; a transient failure shrinks the limit and tries again (TRANSFER_ATTEMPTS)."""
        for attempt in range(TRANSFER_ATTEMPTS):
            await self.acquire()
            try:
                result = await fn()
            except Exception as exc:
                self.release()
                if attempt + 1 >= TRANSFER_ATTEMPTS or not is_transient(exc):
                    raise
                self.overloaded()
                await asyncio.sleep(random.uniform(0, min(RETRY_WAIT_MAX, RETRY_WAIT * 2**attempt)))
            except BaseException:
                self.release()
                raise
            else:
                self.release()
                self.succeeded()
                return result
        raise AssertionError("unreachable")


def _limit(limit: int | AdaptiveLimit) -> AdaptiveLimit:
    return limit if isinstance(limit, AdaptiveLimit) else AdaptiveLimit(limit)


async def gather_limited(
    items: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int | AdaptiveLimit = CONCURRENCY
) -> list[R]:
    """``fn`` over ``items`` under an AdaptiveLimit (retries included), results in order.

    A pool of workers (as many as the limit allows at most) takes the items in turn, instead
    of one task per item: 10,000 small files are 64 tasks, not 10,000 waiting ones. The first
    error cancels the rest.
    """
    limiter = _limit(limit)
    todo = list(enumerate(items))
    results: list[R] = [None] * len(todo)  # type: ignore[list-item]
    feed = iter(todo)

    async def worker() -> None:
        for i, item in feed:
            results[i] = await limiter.call(lambda item=item: fn(item))  # type: ignore[misc]

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limiter.max, len(todo)))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return results


def sha256_file(path: Path) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileEntry(path.name, digest.hexdigest(), size)


def local_files(root: Path) -> list[str]:
    """Files under ``root`` as sorted POSIX relative paths.

    Links are followed inside ``root`` only: one that leaves it is a StorageError naming it
    (store.walk_files), so an artifacts folder or a mounted dataset never carries /etc/passwd.
    """
    return sorted(rel for rel, _ in walk_files(root))


# -- download ------------------------------------------------------------------------------
async def download_file(
    store: Store, key: str, dest: Path, *, expect_sha256: str | None = None, size: int | None = None,
    etag: str | None = None, tmp: Path | None = None, limit: AdaptiveLimit | None = None,
) -> FileEntry:
    """Stream ``key`` into ``dest`` (via a temp name), hashing as it goes; verify if asked.

    ``size`` (from a listing or HEAD) lets a large S3 object be read as concurrent ranges;
    ``etag`` pins those ranges to one version of the object. The temp file is ``tmp`` when
    given (download_tree keeps them in a folder of its own), else a random name beside ``dest``.
    """
    store.check_readable(key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
    try:
        with store._errors(key):
            if isinstance(store, LocalStore):  # the file store's own read path: a kernel copy, hashed from the copy
                local = store  # cancelled (a sibling failed), the copy stops between two chunks: nothing writes after
                hexdigest, got = await _stoppable(lambda stop: local.read_into(key, tmp, stop=stop))
            elif size is not None and size >= RANGED_MIN and store.scheme == "s3" and store.ranged_reads:
                hexdigest, got = await _ranged(store, key, tmp, size=size, etag=etag,
                                             limit=limit or AdaptiveLimit(RANGES_IN_FLIGHT))
            else:
                hexdigest, got = await _streamed(store, key, tmp)
    except BaseException:  # a failed or cancelled download leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    if expect_sha256 is not None and hexdigest != expect_sha256:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{store.url(key)} is corrupt: its content hashes to sha256:{hexdigest}, expected sha256:{expect_sha256}; "
            f"the object was changed or damaged in the store: {REPAIR_ADVICE}"
        )
    os.replace(tmp, dest)
    return FileEntry(key, hexdigest, got)


async def _streamed(store: Store, key: str, tmp: Path) -> tuple[str, int]:
    """One GET, streamed to ``tmp`` and hashed on the way."""
    digest = hashlib.sha256()
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
        return digest.hexdigest(), fh.tell()


class _RangesIgnored(Exception):
    """The server answered a ranged GET with the whole object (rclone serve s3 does)."""


async def _ranged(store: Store, key: str, tmp: Path, *, size: int, etag: str | None, limit: AdaptiveLimit) -> tuple[str, int]:
    """Concurrent ranged GETs written at their offsets; the digest follows the parts in order.

    Memory is one DOWNLOAD_CHUNK per part in flight: parts go to disk as they arrive and the
    hasher reads them back from the page cache once every earlier part is on disk. A part that
    fails resumes from its last written byte under the transfer's AdaptiveLimit. A server that
    ignores ``Range`` gets one plain stream instead (remembered for the rest of this store's life).
    """
    bounds = [(start, min(start + RANGE_PART, size)) for start in range(0, size, RANGE_PART)]
    done = [asyncio.Event() for _ in bounds]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)

        async def part(i: int) -> None:
            start, end = bounds[i]
            pos = [start]

            async def fetch() -> None:
                options: GetOptions = {"range": (pos[0], end)}
                if etag:
                    options["if_match"] = etag
                try:
                    result = await obstore.get_async(store.inner, key, options=options)
                except obx.GenericError as exc:
                    if "non-partial" in str(exc):  # obstore's words for a 200 answer to a range
                        raise _RangesIgnored from exc
                    raise
                if result.range[0] != pos[0] or result.meta["size"] != size:
                    raise _RangesIgnored
                async for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK):
                    if pos[0] + len(chunk) > end:
                        raise _RangesIgnored
                    await asyncio.to_thread(_pwrite_all, fd, chunk, pos[0])  # a slow disk must not stall the loop
                    pos[0] += len(chunk)
                if pos[0] != end:
                    raise StorageError(f"{store.url(key)}: bytes {start}-{end} ended at {pos[0]}")

            await limit.call(fetch)
            done[i].set()

        async def hasher() -> str:
            digest = hashlib.sha256()
            with open(tmp, "rb", buffering=0) as reader:
                for i, (start, end) in enumerate(bounds):
                    await done[i].wait()
                    await asyncio.to_thread(_hash_range, reader, digest, start, end)
            return digest.hexdigest()

        parts = [asyncio.ensure_future(part(i)) for i in range(len(bounds))]
        hashing = asyncio.ensure_future(hasher())
        try:
            await asyncio.gather(*parts)
            hexdigest = await hashing
        except _RangesIgnored:
            store.ranged_reads = False
            for task in [*parts, hashing]:
                task.cancel()
            await asyncio.gather(*parts, hashing, return_exceptions=True)
            os.close(fd)
            fd = -1
            return await _streamed(store, key, tmp)
        except BaseException:
            for task in [*parts, hashing]:
                task.cancel()
            await asyncio.gather(*parts, hashing, return_exceptions=True)
            raise
        return hexdigest, size
    finally:
        if fd >= 0:
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``: a pwrite may write less (a disk filling up) and that must
    not leave a hole of zeros that the hasher, which reads the file, would take for content."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def _hash_range(reader: BinaryIO, digest: hashlib._Hash, start: int, end: int) -> None:
    """Hash bytes [start, end) of the file the parts were written to, read back through one small buffer.

    The buffer stays in the core's cache: hashing read that way costs a quarter less CPU than
    through a read-only mapping, whose page faults cost more than the copy (kernel_copy.read_back).
    """
    read_back(reader.fileno(), start, end - start, digest.update)


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


async def download_tree(
    store: Store, dest: Path, *, prefix: str = "", limit: int | AdaptiveLimit = CONCURRENCY
) -> list[FileEntry]:
    """Copy every object under ``prefix`` into ``dest``; entries are relative to ``prefix``.

    S3 folder markers (zero-byte ``name/`` keys) are skipped, a ``name/`` key with content is
    refused by name (it cannot be read as a file); a key that is also a folder
    (``x`` and ``x/y``) and, on a file store, a name obstore cannot read are DatasetErrors
    naming them, found before any byte is read. Temporary files live in a folder of their own
    beside ``dest`` (inside it where ``dest`` is a mount: _staging_folder), so no dataset file
    name can collide with one.

    Small files are where the time goes (10,000 x 4 KB): per file the event loop only sends the
    GET and takes the body; creating, writing and hashing the file happen on a worker thread
    (file system calls release the GIL, so they overlap the network and use the second core),
    written in place with no temporary name, and folders are made once beforehand.
    """
    strip = len(prefix.rstrip("/") + "/") if prefix else 0
    infos = [info for info in store.list(prefix) if info.key[strip:]]
    if not infos:
        raise DatasetError(
            f"dataset {store.url(prefix)} is empty or does not exist; upload the data there or fix the dataset URI"
        )
    limiter = _limit(limit)
    infos = await _without_folder_markers(store, infos, limiter, prefix)
    rels = [info.key[strip:] for info in infos]
    _check_dataset_names(store, rels)
    for info, rel in zip(infos, rels, strict=True):
        if rel.startswith("/") or ".." in rel.split("/"):
            raise DatasetError(f"dataset object {info.key!r} would be written outside the data folder; rename it")
    dest.mkdir(parents=True, exist_ok=True)
    dest_root = dest.resolve()
    for folder in sorted({os.path.dirname(rel) for rel in rels} - {""}):
        os.makedirs(dest_root / folder, exist_ok=True)
    staging = _staging_folder(dest_root, rels)
    ranges = AdaptiveLimit(RANGES_IN_FLIGHT)
    budget = MemoryBudget(DOWNLOAD_BUDGET)
    try:

        async def one(numbered: tuple[int, ObjectInfo]) -> FileEntry:
            try:
                return await fetch(numbered)
            except NotFoundError:
                if marker := await _diagnose_unreadable(store, numbered[1], prefix):
                    raise marker from None
                raise

        async def fetch(numbered: tuple[int, ObjectInfo]) -> FileEntry:
            n, info = numbered
            rel = rels[n]
            target = dest_root / rel
            if info.size <= WHOLE_MAX and isinstance(store, LocalStore):  # one read, one write, hashed in memory

                def small() -> FileEntry:
                    data = memoryview(store.get_bytes(info.key))
                    return FileEntry(rel, _write_new(target, data), len(data))

                async with budget.hold(info.size):
                    with store._errors(info.key):
                        return await asyncio.to_thread(small)
            if info.size <= WHOLE_MAX:  # S3: nothing (an empty file: _without_folder_markers already asked S3), or one body
                async with budget.hold(info.size):
                    with store._errors(info.key):
                        data = memoryview(b"")
                        if info.size:
                            data = memoryview(await (await obstore.get_async(store.inner, info.key)).bytes_async())
                        return FileEntry(rel, await asyncio.to_thread(_write_new, target, data), len(data))
            chunks = RANGES_IN_FLIGHT if info.size >= RANGED_MIN else PIPELINE_DEPTH + 1
            async with budget.hold(min(info.size, chunks * DOWNLOAD_CHUNK)):
                entry = await download_file(store, info.key, target, size=info.size, etag=info.etag,
                                            tmp=staging / f"{n}.part", limit=ranges)
            return FileEntry(rel, entry.sha256, entry.size)

        entries = await gather_limited(list(enumerate(infos)), one, limiter)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(entries, key=lambda e: e.path)


def _staging_folder(dest_root: Path, rels: list[str]) -> Path:
    """A new folder for download_tree's temporaries, from which a rename into ``dest_root`` works.

    Beside ``dest_root`` where a file renames from there into it, so no temporary ever shows in
    the data folder; a rename cannot cross mounts (EXDEV), and in a pod ``data/`` and
    ``test_data/`` are mounts of their own (a bind mount of the same file system too), so there
    the folder is made inside ``dest_root`` under a name that no dataset file or folder uses.
    """
    staging = Path(tempfile.mkdtemp(prefix=".aicenter-staging-", dir=dest_root.parent))
    probe = staging / "probe"
    probe.touch()
    landed = dest_root / staging.name  # a fresh random name: no dataset entry (checked below if it moves inside)
    try:
        os.replace(probe, landed)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno != errno.EXDEV:
            raise
    else:
        landed.unlink()
        return staging
    taken = {rel.split("/", 1)[0] for rel in rels}
    while (staging := Path(tempfile.mkdtemp(prefix=".aicenter-staging-", dir=dest_root))).name in taken:
        staging.rmdir()
    return staging


def _write_new(target: Path, data: memoryview) -> str:
    """Write a small file whole (a failed write leaves no file) and return its digest."""
    try:
        with open(target, "wb") as fh:
            fh.write(data)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


async def _without_folder_markers(
    store: Store, infos: list[ObjectInfo], limiter: AdaptiveLimit, prefix: str = ""
) -> list[ObjectInfo]:
    """Drop S3 folder markers: obstore lists ``name/`` as ``name``, which a GET or HEAD cannot find.

    An empty ``name/`` is what the S3 console's "Create folder" makes: skipped. One with content
    cannot be read through its listed name at all, so it is refused by name (marker_error)
    rather than failing later as "``name`` does not exist". Only the keys that can be such an
    object cheaply are asked about (a HEAD each): empty ones, and those that are also the
    folder of another key; any other one is diagnosed if its GET fails (download_tree).
    """
    if store.scheme != "s3":
        return infos
    folders = {key.rsplit("/", i)[0] for key in (info.key for info in infos) for i in range(1, key.count("/") + 1)}
    suspects = [info for info in infos if info.size == 0 or info.key in folders]
    if not suspects:
        return infos

    async def is_marker(info: ObjectInfo) -> bool:
        return await store.head_async(info.key) is None

    gone = await gather_limited(suspects, is_marker, limiter)
    for info, marker in zip(suspects, gone, strict=True):
        if marker and info.size:
            raise marker_error(store, info, prefix)
    markers = {info.key for info, marker in zip(suspects, gone, strict=True) if marker}
    return [info for info in infos if info.key not in markers]


def marker_error(store: Store, info: ObjectInfo, prefix: str) -> DatasetError:
    """A dataset object whose key ends in '/' and holds bytes: neither a folder marker nor a readable file."""
    strip = len(prefix.rstrip("/") + "/") if prefix else 0
    return DatasetError(
        f"dataset object {info.key[strip:] + '/'!r} in {store.url(prefix.rstrip('/'))} ends in '/' but holds "
        f"{info.size} bytes: S3 tools take a key ending in '/' for a folder, and it cannot be staged as a file; "
        f"delete it ({store.url(info.key)}/) if it is an empty folder's marker written with content by mistake, or "
        "move its content to a name without the trailing '/'"
    )


async def _diagnose_unreadable(store: Store, info: ObjectInfo, prefix: str) -> DatasetError | None:
    """For a listed object whose GET found nothing: the marker error when it is a ``name/`` with content.

    A HEAD that finds nothing while a listing still shows the object (not deleted meanwhile)
    means its real key is ``name/``.
    """
    if store.scheme != "s3" or not info.size or await store.head_async(info.key) is not None:
        return None
    with store._errors(info.key):
        async for page in obstore.list(store.inner, info.key, chunk_size=1000):
            if any(meta["path"] == info.key for meta in page):
                return marker_error(store, info, prefix)
    return None


def _check_dataset_names(store: Store, rels: list[str]) -> None:
    keys = set(rels)
    for rel in rels:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in keys:
                raise DatasetError(
                    f"dataset {store.url()} has both an object {folder!r} and an object {rel!r} below it; a file and a "
                    "folder cannot share a name on disk: rename or remove one of them"
                )
        if store.scheme == "file" and (reason := unstorable(rel)):
            raise DatasetError(f"dataset file {rel!r} in {store.url()} cannot be read: {reason}; rename the file")


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
    budget: MemoryBudget | None = None, size: int | None = None,
) -> None:
    """Stream a local file to ``key``; with ``expect_sha256``, bytes that do not match store nothing.

    Up to SINGLE_PUT_MAX it is one request (create-once when ``create``); a larger file is a
    multipart upload holding PARTS_IN_FLIGHT parts in memory. S3 cannot make a multipart upload
    create-once, so a large ``create`` put must be a content-addressed blob (``expect_sha256``):
    a concurrent writer of the same key writes the same verified bytes, which is harmless.
    A file store takes any size in one kernel copy (LocalStore.put_file), create-once included.
    """
    if isinstance(store, LocalStore):  # the file store's own write path: a kernel copy, no bytes through Python

        def check(hexdigest: str) -> None:
            _check_digest(path, hexdigest, expect_sha256)

        verify = check if expect_sha256 is not None else None  # an artifact is not hashed: nothing reads its digest
        await _stoppable(lambda stop: store.put_file(key, path, create=create, check=verify, stop=stop))
        return
    budget = budget or MemoryBudget()
    size = path.stat().st_size if size is None else size
    with store._errors(key):
        if size <= SINGLE_PUT_MAX:
            async with budget.hold(size):
                data = await asyncio.to_thread(path.read_bytes)  # file system calls off the loop (10,000 small files)
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


async def _stoppable(fn: Callable[[threading.Event], R]) -> R:
    """``fn(stop)`` on a worker thread; cancelled, it sets ``stop`` and waits for the thread to end.

    A thread cannot be killed: a cancelled upload must not go on copying and land its object
    later, after its caller was told it was cancelled; ``fn`` checks ``stop`` between chunks.
    """
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, fn, stop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await future
        raise


def check_names(root: Path, rels: Sequence[str], *, secrets: Redactor | None = None, label: str | None = None) -> None:
    """Refuse, before any byte is sent, a tree with a file name that not every store can hold,
    or (with ``secrets``) one that holds a secret value in any form the Redactor knows.

    A name becomes a store key, a line of the log and of ``outcome.json``, a row in the UI: a
    secret in it would land in all of them, so such a tree is refused whole. The error names
    the folder (``label``, else ``root``) and the file with the secret masked, never the value.
    """
    if secrets:
        holding = [secrets.redact(rel) for rel in rels if secrets.spans(rel)]
        if holding:
            listed = ", ".join(repr(name) for name in holding[:3]) + (f" and {len(holding) - 3} more" if len(holding) > 3 else "")
            raise PackageError(
                f"{label or root}: the name of {listed} holds a secret value (of a secret env variable or a store "
                "credential; masked here); nothing was uploaded: rename the file(s) so that no name is made from a "
                "secret, e.g. name files after a hash or a run number instead"
            )
    bad = [(rel, reason) for rel in rels if (reason := unstorable(rel))]
    if bad:
        listed = "; ".join(f"{rel!r}: {reason}" for rel, reason in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise StorageError(
            f"cannot store the files of {root}: {listed}{more}; rename the file(s) (printable UTF-8 names, "
            "no control characters, no '#<digits>' ending); nothing was uploaded"
        )


async def upload_tree(
    root: Path, store: Store, prefix: str, *, limit: int | AdaptiveLimit = CONCURRENCY, secrets: Redactor | None = None,
    label: str | None = None,
) -> list[FileEntry]:
    """Upload every file under ``root`` to ``prefix/<relative path>``; returns (path, "", size).

    Every name is checked first (check_names: storable, and with ``secrets`` holding no secret),
    and links are followed inside ``root`` only (local_files), so a bad name or link fails the
    upload before anything is stored.
    """
    files = sorted(walk_files(root, label=label))
    check_names(root, [rel for rel, _ in files], secrets=secrets, label=label)
    budget = MemoryBudget()
    base = prefix.strip("/")

    async def one(file: tuple[str, os.stat_result]) -> FileEntry:
        rel, st = file
        await upload_file(store, root / rel, f"{base}/{rel}" if base else rel, budget=budget, size=st.st_size)
        return FileEntry(rel, "", st.st_size)

    return await gather_limited(files, one, limit)


#: On S3, a snapshot of at least LIST_MIN_FILES files finds which blobs exist by listing
#: blobs/sha256/ (1,000 keys a page, LIST_RANGES key ranges at once) instead of one HEAD per
#: file, as long as the listing stays within LIST_PAGES_PER_1000 pages per 1,000 files; past
#: that (a store with far more blobs than the snapshot has files) the rest falls back to HEADs.
LIST_MIN_FILES = 1000
LIST_PAGES_PER_1000 = 20
LIST_RANGES = 4
_HEX = "0123456789abcdef"


async def stored_digests(
    store: Store, digests: set[str], ranges: int | None = None
) -> tuple[dict[str, ObjectInfo], set[str]]:
    """({digest: what the listing says of its blob} for those present, unknown) among ``digests``, by listing
    the blob prefix (size and Last-Modified: a re-snapshot compares the latter with its last manifest's)."""
    ranges = ranges or LIST_RANGES
    pages_left = [max(ranges, len(digests) * LIST_PAGES_PER_1000 // 1000)]
    present: dict[str, ObjectInfo] = {}
    unknown: set[str] = {d for d in digests if d[:1] not in _HEX}
    step = 16 // ranges

    async def scan(lo: str, hi: str | None) -> None:
        mine = {d for d in digests if lo <= d[:1] and (hi is None or d[:1] < hi)}
        if not mine:
            return
        found: dict[str, ObjectInfo] = {}
        offset = {"offset": BLOBS + lo} if lo != "0" else {}
        try:
            async for page in obstore.list(store.inner, BLOBS.rstrip("/"), chunk_size=1000, **offset):
                pages_left[0] -= 1
                for meta in page:
                    digest = meta["path"][len(BLOBS):]
                    if hi is not None and digest[:1] >= hi:  # S3 lists in key order: this range is done
                        return
                    if digest in mine:
                        found[digest] = ObjectInfo(meta["path"], meta["size"], meta.get("last_modified"), meta.get("e_tag"))
                if pages_left[0] < 0:
                    unknown.update(mine - set(found))
                    return
        finally:
            present.update(found)

    bounds: list[str | None] = [_HEX[i] for i in range(0, 16, step)] + [None]
    with store._errors(BLOBS):
        await asyncio.gather(*(scan(lo or "0", hi) for lo, hi in itertools.pairwise(bounds)))
    return present, unknown


async def _hashes_to(store: Store, key: str, sha256: str, size: int | None = None) -> bool:
    """Whether the stored object ``key`` hashes to ``sha256`` (streamed, nothing kept).

    With ``size``, an object of another size is known to differ as soon as the GET answers:
    its body is not read.
    """
    store.check_readable(key)
    if isinstance(store, LocalStore):  # the file store's own read path: plain reads (an obstore read of 1 GiB: 5-9 s)

        def local() -> bool:
            fd, stored = store.open_read(key)
            try:
                return (size is None or stored == size) and _sha256_fd(fd) == sha256
            finally:
                os.close(fd)

        return await asyncio.to_thread(local)
    digest = hashlib.sha256()
    with store._errors(key):
        result = await obstore.get_async(store.inner, key)
        if size is not None and result.meta["size"] != size:
            return False
        async for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == sha256


async def ensure_blobs(
    store: Store, root: Path, entries: Sequence[FileEntry], *, known: Collection[str] = (), limit: int = CONCURRENCY
) -> BlobStats:
    """Make sure every entry's content exists, intact, as a blob; upload only what is missing or damaged.

    A blob key is its digest, so unchanged data is never written twice. Which blobs exist comes
    from a listing (S3, many files) or HEADs; a stored blob of another size is damaged and is
    rewritten, and every one of the right size is read back and hashed before it is trusted,
    whatever its size: a byte flipped in place keeps the size, and a sample or a size limit let
    such a blob stand (issue 20). Reading it back costs about what hashing the local file did
    (100 MiB on this project's 2-core machine: 0.24-0.7 s on the file store, 0.24-0.35 s on a
    loopback moto server, against 0.18 s for the local sha256 and 0.01 s for a HEAD; on a real
    S3 link it is a download at 50-100 MB/s a connection), and only blobs that are already
    stored and not in ``known`` pay it: a re-snapshot of the same source passes as ``known`` the
    digests its last manifest lists whose blobs are unmodified since (snapshot.py), and reads none
    of them back. ``known`` digests are taken as stored without a check: the caller vouches for
    them (a committed manifest names only blobs that were verified when it was written).
    A concurrent writer of the same blob is harmless (it writes the same verified bytes).
    """
    unique: dict[str, FileEntry] = {}
    for entry in entries:
        unique.setdefault(entry.sha256, entry)
    for digest in known:
        unique.pop(digest, None)
    budget = MemoryBudget()
    listed: dict[str, ObjectInfo] | None = None
    unknown: set[str] = set()
    if store.scheme == "s3" and len(unique) >= LIST_MIN_FILES:
        try:
            listed, unknown = await stored_digests(store, set(unique))
        except AccessDeniedError:  # a run's credentials list no blob (credentials.py): look each one up
            listed = None
    limiter = AdaptiveLimit(limit)

    async def state(entry: FileEntry) -> BlobState:
        if listed is not None and entry.sha256 not in unknown:
            size = None if (seen := listed.get(entry.sha256)) is None else seen.size
        else:
            info = await _lookup(store, blob_key(entry.sha256))
            size = None if info is None else info.size
        if size is None:
            return "missing"
        if size != entry.size:
            return "damaged"
        try:
            return "ok" if await _hashes_to(store, blob_key(entry.sha256), entry.sha256, entry.size) else "damaged"
        except NotFoundError:  # deleted since the listing or HEAD
            return "missing"

    states = await gather_limited(list(unique.values()), state, limiter)
    upload = [(e, s) for e, s in zip(unique.values(), states, strict=True) if s != "ok"]

    async def one(item: tuple[FileEntry, BlobState]) -> FileEntry | None:
        entry, found = item
        try:
            await upload_file(store, root / entry.path, blob_key(entry.sha256), create=found == "missing",
                              expect_sha256=entry.sha256, budget=budget)
        except AlreadyExistsError:
            return None
        except AccessDeniedError as exc:
            if found == "damaged":
                raise _refused_repair(store, entry.sha256) from exc
            raise
        return entry

    uploaded = [e for e in await gather_limited(upload, one, limiter) if e is not None]
    return BlobStats(
        files=len(entries),
        bytes=sum(e.size for e in entries),
        uploaded_files=len(uploaded),
        uploaded_bytes=sum(e.size for e in uploaded),
    )


async def _lookup(store: Store, key: str) -> ObjectInfo | None:
    """HEAD a blob before creating it; a refused HEAD counts as absent.

    S3 answers 403, not 404, for an absent key to whoever may not list it, and run credentials
    list no blob (credentials.py): for them a missing blob looks refused. Absent is the safe
    reading: the create-only upload that follows stores it, finds it there (412: another writer,
    or a blob these credentials may not read) or is refused by name.
    """
    try:
        return await store.head_async(key)
    except AccessDeniedError:
        return None


async def store_blob_async(store: Store, path: Path, sha256: str) -> BlobState:
    """Store ``path`` as the blob ``sha256`` unless an intact copy is there; the state it was found in.

    A HEAD first (a missing blob costs nothing more); a blob of another size is damaged; one of
    the right size is read back and hashed, whatever its size. "missing" or "damaged" means the
    file's bytes were written (verified against ``sha256`` as they were sent), unless a
    concurrent writer created the missing blob first, with the same verified bytes.
    """
    key = blob_key(sha256)
    size = path.stat().st_size
    info = await _lookup(store, key)
    found: BlobState
    if info is None:
        found = "missing"
    elif info.size != size:
        found = "damaged"
    else:
        try:
            found = "ok" if await _hashes_to(store, key, sha256, size) else "damaged"
        except NotFoundError:
            found = "missing"
    if found != "ok":
        try:
            await upload_file(store, path, key, create=found == "missing", expect_sha256=sha256)
        except AlreadyExistsError:
            pass
        except AccessDeniedError as exc:
            if found == "damaged":
                raise _refused_repair(store, sha256) from exc
            raise
    return found


def store_blob(store: Store, path: Path, sha256: str) -> BlobState:
    """store_blob_async from synchronous code, under the transfer retries (a package upload, `aicenter verify`)."""
    return run(AdaptiveLimit(1).call(lambda: store_blob_async(store, path, sha256)))


def put_blob(store: Store, path: Path, sha256: str) -> bool:
    """Store one file as a blob unless an intact copy is there; True when the blob was missing or damaged.

    The stored copy is hashed in full before it is trusted (store_blob_async), so a damaged
    blob of any size is repaired by putting its content again.
    """
    return store_blob(store, path, sha256) != "ok"



async def blob_state_async(store: Store, sha256: str) -> BlobState:
    """Whether the blob ``sha256`` is stored intact: its whole content is streamed and hashed.

    Nothing short of the hash is trusted, whatever the size: a blob with one byte flipped has
    the right size, and a truncated or padded one hashes differently too ("damaged").
    """
    try:
        return "ok" if await _hashes_to(store, blob_key(sha256), sha256) else "damaged"
    except NotFoundError:
        return "missing"


def blob_state(store: Store, sha256: str) -> BlobState:
    """``"ok"``, ``"missing"`` or ``"damaged"`` for the blob ``sha256`` (`aicenter verify`, re-upload).

    Reads the whole object (streamed, nothing kept) under the transfer retries, so a transient
    error is retried rather than reported as damage; a persistent one raises StorageError.
    """
    return run(AdaptiveLimit(1).call(lambda: blob_state_async(store, sha256)))


def missing_blob(store: Store, sha256: str) -> NotFoundError:
    return NotFoundError(
        f"blob sha256:{sha256} is missing from the store ({store.url(blob_key(sha256))}): it was deleted after the "
        f"record naming it was written (by `aicenter gc` or by hand); {REPAIR_ADVICE}"
    )


def extract_blob(store: Store, sha256: str, target: Path, scratch: Path) -> tuple[Path, int]:
    """Extract the package zip stored as blob ``sha256`` into ``target``, verified; (package root, zip size).

    On the file store the blob is read in place, once: opened read-only, and extracted
    through that descriptor (``/proc/self/fd/N``) while its digest is taken in the same pass,
    stored entries hashed from the copies just written (extract_zip's ``expect_sha256``), so
    what is verified is what lands in ``target``, which appears only if the digest matches. No
    copy of the zip, and no link: nothing can write the store's blob through the package
    folder. Elsewhere, and where /proc is not there, the blob is downloaded to ``scratch``
    (get_blob verifies it), extracted and removed.
    """
    from airflow_aicenter.package.archive import extract_zip

    if isinstance(store, LocalStore) and os.path.isdir("/proc/self/fd"):
        key = blob_key(sha256)
        try:
            fd, size = store.open_read(key)
        except NotFoundError:
            raise missing_blob(store, sha256) from None
        try:
            path = Path(f"/proc/self/fd/{fd}")
            try:  # a sandbox that hides /proc or refuses its links gets the copy below
                os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass
            else:
                try:
                    return extract_zip(path, target, expect_sha256=sha256), size
                except (StorageError, ArchiveError) as exc:
                    # a damaged blob can fail as a zip before its digest is reached: name it as damaged
                    actual = _sha256_fd(fd)
                    if actual != sha256:
                        raise StorageError(
                            f"{store.url(key)} is corrupt: its content hashes to sha256:{actual}, expected sha256:{sha256}; "
                            f"the object was changed or damaged in the store: {REPAIR_ADVICE}"
                        ) from None
                    raise type(exc)(str(exc).replace(str(path), store.url(key))) from None
        finally:
            os.close(fd)
    entry = get_blob(store, sha256, scratch)
    try:
        return extract_zip(scratch, target), entry.size
    finally:
        scratch.unlink(missing_ok=True)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def get_blob(store: Store, sha256: str, dest: Path) -> FileEntry:
    """Download a blob into ``dest`` and verify it against its digest; a missing blob says so."""
    key = blob_key(sha256)

    async def get() -> FileEntry:
        try:
            info = await store.head_async(key)
        except AccessDeniedError:  # S3's answer for an absent key to credentials that may not list it (a run's)
            raise NotFoundError(
                f"blob sha256:{sha256} is missing from the store or not readable with these credentials "
                f"({store.url(key)}); if it was deleted (by `aicenter gc` or by hand), {REPAIR_ADVICE}"
            ) from None
        if info is None:
            raise missing_blob(store, sha256)
        try:
            return await download_file(store, key, dest, expect_sha256=sha256, size=info.size, etag=info.etag)
        except NotFoundError:
            raise missing_blob(store, sha256) from None

    return run(AdaptiveLimit(1).call(get))


# -- per-file package versions ---------------------------------------------------------------
#: A manifest larger than this is refused before it is read (it is held in memory): 64 MiB lists ~400,000 files.
MANIFEST_MAX = 64 * 2**20
#: Files of a per-file version fetched at once from S3 (each may be a ranged download of its own).
PACKAGE_FILES_IN_FLIGHT = 32
#: ... and from the file store, where each is a kernel copy hashed as it goes: bound by the CPU (sha256, a core
#: each; the copy runs a chunk ahead on a helper thread, kernel_copy), so about one per core, the largest first.
LOCAL_FILES_IN_FLIGHT = max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))


@dataclass(frozen=True)
class PackagePut:
    """What storing a package folder as a per-file version did: its ref and manifest, and what was sent.

    ``blobs``: the file blobs (all of them, and those written because the store lacked them or
    held them damaged); ``manifest_written``: whether the manifest blob itself was written.
    """

    ref: BlobRef
    contents: PackageContents
    blobs: BlobStats
    manifest_written: bool

    @property
    def written_bytes(self) -> int:
        return self.blobs.uploaded_bytes + (self.ref.size if self.manifest_written else 0)


def store_package_files(
    store: Store, root: Path, *, known: KnownDigest | None = None, stored: Collection[str] = ()
) -> PackagePut:
    """Store the package folder ``root`` as a per-file version: the blobs the store lacks, then the manifest.

    Files are listed and hashed as write_zip would pack them (contents_of; ``known`` may give
    a digest without reading the file). Each file blob goes through ensure_blobs, so an
    existing blob is trusted only under the issue-20 rules: read back and hashed in full unless
    its digest is in ``stored`` (the caller vouches for it: a committed manifest's blob
    unmodified since, snapshot.check_vouched), rewritten when missing or damaged. The manifest
    is written last (store_blob_async: the same rules), so a manifest never names a blob that
    is not there. The manifest's bytes are canonical (contents.encode): the same files give
    the same ``sha256``, and identical content is recognised by it.
    """
    contents = contents_of(root, known=known)
    entries = [FileEntry(f.path, f.sha256, f.size) for f in contents.files]
    stats = run(ensure_blobs(store, root, entries, known=stored))
    data = encode(contents)
    sha256 = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="aicenter-manifest-") as tmp:
        path = Path(tmp) / "manifest.json"
        path.write_bytes(data)
        found = store_blob(store, path, sha256)
    return PackagePut(BlobRef(sha256=sha256, size=len(data), kind="files"), contents, stats, found != "ok")


def put_package_files(
    store: Store, root: Path, *, known: KnownDigest | None = None, stored: Collection[str] = ()
) -> tuple[BlobRef, int]:
    """store_package_files, as (the version's ref, kind "files"; the bytes written to the store)."""
    put = store_package_files(store, root, known=known, stored=stored)
    return put.ref, put.written_bytes


def read_package_contents(
    store: Store, ref: BlobRef, *, cache: BlobCache | None = None
) -> tuple[PackageContents, int]:
    """The manifest a per-file ``ref`` names, verified by its digest; (contents, bytes fetched from the store).

    From the local blob cache when it holds it (0 bytes fetched), else fetched (into the cache
    when there is one). Either way its bytes are hashed before they are decoded.
    """
    key = blob_key(ref.sha256)
    where = f"blob sha256:{ref.sha256} ({store.url(key)})"
    if ref.size > MANIFEST_MAX:
        raise PackageError(
            f"the package manifest {where} is {ref.size} bytes, over the limit of {MANIFEST_MAX}: it cannot be a "
            "manifest airflow-aicenter wrote; upload the package folder again (`aicenter package upload FOLDER`)")
    fetched = 0
    data: bytes | None = None
    if cache is not None and (entry := cache.lookup(ref.sha256, ref.size)) is not None:
        data = entry.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:  # sealed yet changed: fetch it again
            cache._drop(entry)
            data = None
    if data is None:
        try:
            data = store.get_bytes(key)
        except NotFoundError:
            raise missing_blob(store, ref.sha256) from None
        fetched = len(data)
        if (actual := hashlib.sha256(data).hexdigest()) != ref.sha256:
            raise DamagedBlobError(
                f"the package manifest {where} is damaged: its content hashes to sha256:{actual}; {REPAIR_ADVICE}; "
                "then run the task again")
        if cache is not None:
            with contextlib.suppress(OSError):  # a cache that cannot be written only costs a fetch next time
                tmp = cache.new_temp(ref.sha256)
                tmp.write_bytes(data)
                cache.publish(tmp, ref.sha256, len(data))
    return decode(data, where=where), fetched


def stage_package(
    store: Store, ref: BlobRef, target: Path, scratch: Path, *, cache: BlobCache | None, link: bool = True,
    placed: PlacedFiles | None = None,
) -> tuple[Path, int]:
    """Put the package version ``ref`` in ``target``, verified; (the package root, bytes fetched from the store).

    ``"zip"``: extract_blob (the zip read in place on the file store, else downloaded to
    ``scratch``). ``"files"``: the manifest (read_package_contents), then every file: from the
    local blob cache when it holds the blob, else fetched once from the store into the cache,
    its digest taken while it streams (a blob that does not hash to its name is never cached
    or placed, and the error names the package file and the repair), then placed with its
    mode. ``link``: files of mode 0644 are hard-linked to the cache's read-only entry (no
    copy: what makes a warm staging of GBs instant); False gives every file a private copy
    (a kernel copy, a reflink where the file system shares extents), for a folder package
    code writes (a training's, which becomes the next version) and where several runs on a
    node must not share an inode. Without a cache, files are downloaded straight into place.
    A cold staging through the cache costs what one without it costs: each blob is one pass
    (a kernel copy hashed from the copy, into the cache's ``tmp/``), then a seal and two links
    (about 1 ms; measured at 2 GB, the same CPU seconds either way); with ``link`` False each
    file then takes one more kernel copy (its private one: +0.5 CPU-s at 2 GB). The blobs are
    fetched in parallel, the largest first (_fetch_order).
    ``target`` must not exist or be empty, and appears only complete. ``placed`` (and the
    cache's own table) learns the digest of every file placed, verified as it was fetched or
    copied, so storing the folder later need not hash the files no one touched (PlacedFiles).
    """
    if ref.kind == "zip":
        return extract_blob(store, ref.sha256, target, scratch)
    contents, fetched = read_package_contents(store, ref, cache=cache)
    _check_package_size(contents, store.url(blob_key(ref.sha256)))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"package target {target} already exists and is not an empty folder")
    from airflow_aicenter.package.archive import publishing

    with publishing(target) as staging:
        for folder in sorted({os.path.dirname(f.path) for f in contents.files} - {""}):
            (staging / folder).mkdir(parents=True, exist_ok=True)
        first: dict[str, PackageFile] = {}
        for f in contents.files:
            first.setdefault(f.sha256, f)
        if cache is not None:
            fetched += run(_fill_cache(store, cache, list(first.values())))
            for f in contents.files:
                dest = staging / f.path
                if link and f.mode == 0o644:
                    cache.link(f.sha256, dest, size=f.size)
                else:
                    cache.copy(f.sha256, dest, size=f.size, mode=f.mode)
            if placed is not None:
                for f in contents.files:
                    placed.remember(staging / f.path, f.sha256)
            with contextlib.suppress(OSError):  # a cache that cannot be trimmed still serves this run
                cache.trim(keep={*contents.digests(), ref.sha256})
        else:
            fetched += run(_download_files(store, staging, list(first.values())))
            for f in contents.files:
                dest = staging / f.path
                if first[f.sha256] is not f:
                    shutil.copyfile(staging / first[f.sha256].path, dest)
                os.chmod(dest, f.mode)
            if placed is not None:  # after every chmod: each file's times as they stay
                for f in contents.files:
                    placed.remember(staging / f.path, f.sha256)
        for folder in {os.path.dirname(f.path) for f in contents.files} - {""}:
            (staging / folder).chmod(0o755)
    return find_package_root(target), fetched  # as for a zip: main.py's folder (paths are relative to it already)


def _check_package_size(contents: PackageContents, where: str) -> None:
    """The limits a zip version is extracted under (archive.MAX_TOTAL_BYTES, 20,000 files) hold for per-file ones."""
    from airflow_aicenter.package.archive import MAX_TOTAL_BYTES

    if len(contents.files) > MAX_PACKAGE_FILES:
        raise PackageError(
            f"the package manifest {where} lists {len(contents.files)} files, more than the limit of {MAX_PACKAGE_FILES}: "
            "remove generated files or pack many small files into one, and upload the package again")
    if contents.total_size > MAX_TOTAL_BYTES:
        raise PackageError(
            f"the package manifest {where} adds up to {contents.total_size} bytes, over the limit of {MAX_TOTAL_BYTES}: "
            "keep large data in datasets, not in the package")


MAX_PACKAGE_FILES = 20_000


def _damaged_file(store: Store, f: PackageFile, actual: str) -> DamagedBlobError:
    return DamagedBlobError(
        f"package file {f.path!r} is damaged in the store: its blob sha256:{f.sha256} ({store.url(blob_key(f.sha256))}) "
        f"hashes to sha256:{actual}; nothing was staged. Repair it: {REPAIR_ADVICE}; then run the task again")


def _missing_file(store: Store, f: PackageFile, *, refused: bool = False) -> NotFoundError:
    gone = ("is missing from the store or not readable with these credentials" if refused else
            "is missing from the store")
    return NotFoundError(
        f"package file {f.path!r} {gone}: its blob sha256:{f.sha256} ({store.url(blob_key(f.sha256))}) was deleted "
        f"after the version naming it was written (by `aicenter gc` or by hand)"
        f"{', or the run credentials do not cover it' if refused else ''}; nothing was staged. {REPAIR_ADVICE}; "
        "then run the task again")


async def _fetch_file(store: Store, f: PackageFile, dest: Path, ranges: AdaptiveLimit) -> None:
    """Download the blob of ``f`` to ``dest`` (via a temp name), its digest taken while it streams; verified.

    Only an object large enough for ranged reads is looked up first (its ETag pins the ranges
    to one version of it); a smaller one is one GET.
    """
    key = blob_key(f.sha256)
    info = None
    if f.size >= RANGED_MIN and not isinstance(store, LocalStore):
        try:
            info = await store.head_async(key)
        except AccessDeniedError:  # S3's answer for an absent key to credentials that may not list it (a run's)
            raise _missing_file(store, f, refused=True) from None
        if info is None:
            raise _missing_file(store, f)
    try:
        got = await download_file(store, key, dest, size=f.size, etag=None if info is None else info.etag, limit=ranges)
    except NotFoundError:
        raise _missing_file(store, f) from None
    except AccessDeniedError:
        raise _missing_file(store, f, refused=True) from None
    if got.sha256 != f.sha256 or got.size != f.size:
        dest.unlink(missing_ok=True)
        raise _damaged_file(store, f, got.sha256)


def _fetch_order(store: Store, files: list[PackageFile]) -> tuple[list[PackageFile], int]:
    """The blobs of one staging in the order they are fetched, and how many at once.

    The largest first: a 1.5 GB file started last would be the whole tail of the staging. On
    the file store a few at once (LOCAL_FILES_IN_FLIGHT: each copy is hashed, a core's work); on
    S3 more, as the network wants. The first failure cancels the rest (gather_limited), and a
    file-store copy in flight stops between two chunks (download_file).
    """
    ordered = sorted(files, key=lambda f: -f.size)
    return ordered, LOCAL_FILES_IN_FLIGHT if isinstance(store, LocalStore) else PACKAGE_FILES_IN_FLIGHT


async def _fill_cache(store: Store, cache: BlobCache, files: list[PackageFile]) -> int:
    """Fetch into the cache the blobs of ``files`` (one per digest) that it lacks; the bytes fetched."""
    missing, in_flight = _fetch_order(store, [f for f in files if cache.lookup(f.sha256, f.size) is None])
    if not missing:
        return 0
    cache.prepare()
    ranges = AdaptiveLimit(RANGES_IN_FLIGHT)

    async def one(f: PackageFile) -> int:
        tmp = cache.new_temp(f.sha256)
        try:
            await _fetch_file(store, f, tmp, ranges)
            await asyncio.to_thread(cache.publish, tmp, f.sha256, f.size)
        finally:
            tmp.unlink(missing_ok=True)
        return f.size

    return sum(await gather_limited(missing, one, in_flight))


async def _download_files(store: Store, staging: Path, files: list[PackageFile]) -> int:
    """Without a cache: each blob of ``files`` (one per digest) downloaded into its place; the bytes fetched."""
    ranges = AdaptiveLimit(RANGES_IN_FLIGHT)

    async def one(f: PackageFile) -> int:
        await _fetch_file(store, f, staging / f.path, ranges)
        return f.size

    ordered, in_flight = _fetch_order(store, files)
    return sum(await gather_limited(ordered, one, in_flight))
