"""Moving many files between local folders and a store, concurrently and streaming.

The one place that moves file bytes: staging datasets and packages into a work folder,
uploading artifacts, and writing snapshot blobs. Files are streamed in chunks (a 2 GB model
never sits in memory) and hashed while they stream, so a digest costs no second read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import obstore

from airflow_aicenter.errors import AlreadyExistsError, DatasetError, StorageError
from airflow_aicenter.storage.store import Store

#: Concurrent requests per transfer; small files are latency-bound, so many in flight win.
CONCURRENCY = 64
CHUNK = 8 * 2**20
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
    size = 0
    with store._errors(key):
        result = await obstore.get_async(store.inner, key)
        with open(tmp, "wb") as fh:
            async for chunk in result.stream(min_chunk_size=CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    hexdigest = digest.hexdigest()
    if expect_sha256 is not None and hexdigest != expect_sha256:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"{store.url(key)} is corrupt: its content hashes to sha256:{hexdigest}, expected sha256:{expect_sha256}; "
            "the object was changed or damaged in the store: restore it from a backup or re-upload the package"
        )
    os.replace(tmp, dest)
    return FileEntry(key, hexdigest, size)


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
async def upload_file(store: Store, path: Path, key: str, *, create: bool = False) -> None:
    """Stream a local file to ``key`` (multipart for large files)."""
    with store._errors(key):
        await obstore.put_async(store.inner, key, path, mode="create" if create else "overwrite", chunk_size=CHUNK)


async def upload_tree(root: Path, store: Store, prefix: str, *, limit: int = CONCURRENCY) -> list[FileEntry]:
    """Upload every file under ``root`` to ``prefix/<relative path>``; returns (path, "", size)."""
    rels = local_files(root)

    async def one(rel: str) -> FileEntry:
        path = root / rel
        await upload_file(store, path, f"{prefix.rstrip('/')}/{rel}")
        return FileEntry(rel, "", path.stat().st_size)

    return await gather_limited(rels, one, limit)


async def ensure_blobs(store: Store, root: Path, entries: Sequence[FileEntry], *, limit: int = CONCURRENCY) -> BlobStats:
    """Make sure every entry's content exists as a blob; upload only the missing ones.

    A blob key is its digest, so unchanged data is never written twice: a second snapshot of
    the same data is HEAD requests only. A concurrent writer of the same blob is harmless.
    """
    unique: dict[str, FileEntry] = {}
    for entry in entries:
        unique.setdefault(entry.sha256, entry)

    async def one(entry: FileEntry) -> FileEntry | None:
        key = blob_key(entry.sha256)
        if await store.head_async(key) is not None:
            return None
        try:
            await upload_file(store, root / entry.path, key, create=True)
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
        run(upload_file(store, path, key, create=True))
    except AlreadyExistsError:
        return False
    return True


def get_blob(store: Store, sha256: str, dest: Path) -> FileEntry:
    """Download a blob into ``dest`` and verify it against its digest."""
    return run(download_file(store, blob_key(sha256), dest, expect_sha256=sha256))
