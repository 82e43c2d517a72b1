"""A re-snapshot repairs the blobs its last manifest vouches for (issue 20, finding 2).

The last manifest of a source vouches for its blobs, so a re-snapshot does not read them
back; what it must still notice is a blob changed since that manifest was written. Blobs are
create-once: an intact one is never modified after the manifest naming it, so a blob that is
missing, of another size, or modified after the manifest is checked in full and rewritten
from the staged file. Each test damages a blob the way a disk or a careless hand would (one
byte flipped in place, same size), on both stores, and re-snapshots the same source.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import DatasetError
from airflow_aicenter.layout import BLOBS, blob_key
from airflow_aicenter.records import Manifest, read
from airflow_aicenter.runtime.incremental import check_carried, stage_incremental
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.storage import S3Options, Store, open_store, transfer
from airflow_aicenter.storage.store import local_path
from airflow_aicenter.storage.transfer import BlobStats, FileEntry, blob_state, sha256_file
from tests.resilience.support import FaultPlan, FaultProxy

SOURCE = "s3://data/churn"
LARGE = 17 * 2**20  # above the old 16 MiB limit, and a multipart upload on S3


class ReadCounting:
    """The real store, counting the blobs read back (transfer checks a key readable before each GET)."""

    def __init__(self, inner: Store) -> None:
        self._inner, self.reads = inner, 0

    def check_readable(self, key: str) -> None:
        self.reads += key.startswith(BLOBS)
        self._inner.check_readable(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class HeadCounting:
    """The real store, counting the HEADs of blobs."""

    def __init__(self, inner: Store) -> None:
        self._inner, self.heads = inner, 0

    async def head_async(self, key: str) -> Any:
        self.heads += key.startswith(BLOBS)
        return await self._inner.head_async(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def dataset(root: Path) -> list[FileEntry]:
    """A 17 MiB file and two small ones."""
    root.mkdir(parents=True)
    (root / "large.bin").write_bytes(os.urandom(LARGE))
    (root / "a.csv").write_bytes(b"a,b\n1,2\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.csv").write_bytes(b"c\n3\n" * 100)
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        e = sha256_file(path)
        out.append(FileEntry(path.relative_to(root).as_posix(), e.sha256, e.size))
    return out


def snap(store: Any, root: Path, files: list[FileEntry], n: int, logs: list[str]) -> BlobStats:
    return take_snapshot(store, root, files, source=SOURCE, directory="data_directory",
                         key=f"runs/d/r/t/{n}/data_directory.manifest.json", log=logs.append)


def after_the_manifest(store: Store) -> None:
    """Let the store's clock pass the manifest's, as it has when damage happens: S3 reports
    Last-Modified in whole seconds, a file system its mtime at the kernel's clock tick (a few ms).

    A change within that same tick as the manifest write looks no later than it (the residual
    window, covered by the digest check on every download and by `aicenter verify`).

    On S3 the wait ends just into the next whole second of this machine's clock (the test S3 server's, whose
    Last-Modified, like the comparison, drops the fraction): the manifest, written before now, is in an earlier
    second than anything written after. Half a second on average instead of a fixed 1.1 s.
    """
    if store.scheme == "s3":
        now = time.time()
        time.sleep(math.floor(now) + 1.02 - now)
    else:
        time.sleep(0.05)


def flip_in_place(store: Store, digest: str, offset: int) -> None:
    """One bit of the stored blob flipped, its size unchanged: in the file itself, or a PUT over the S3 key."""
    key = blob_key(digest)
    if store.scheme == "file":
        with open(local_path(store.uri) / key, "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([byte[0] ^ 0x01]))
    else:
        data = bytearray(store.get_bytes(key))
        data[offset] ^= 0x01
        store.put_bytes(key, bytes(data))
    assert blob_state(store, digest) == "damaged"


def large(files: list[FileEntry]) -> FileEntry:
    return next(e for e in files if e.path == "large.bin")


def test_a_re_snapshot_repairs_a_vouched_for_blob_with_one_byte_flipped(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    after_the_manifest(store)
    big = large(files)
    flip_in_place(store, big.sha256, 9 * 2**20 + 3)

    logs: list[str] = []
    stats = snap(store, root, files, 2, logs)
    assert blob_state(store, big.sha256) == "ok", "the re-snapshot must rewrite the damaged blob from the staged file"
    assert (stats.uploaded_files, stats.uploaded_bytes) == (1, big.size)
    assert any("repaired" in line and big.sha256[:12] in line for line in logs), logs

    counting = ReadCounting(store)  # repaired now: the next re-snapshot trusts it again, reading nothing back
    again = snap(counting, root, files, 3, logs)
    assert again.uploaded_files == 0 and counting.reads <= 1  # at most the repaired blob, rewritten after manifest 2


def test_a_re_snapshot_repairs_a_truncated_vouched_for_blob(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    small = next(e for e in files if e.path == "sub/b.csv")
    store.put_bytes(blob_key(small.sha256), (root / "sub" / "b.csv").read_bytes()[:-1])

    logs: list[str] = []
    stats = snap(store, root, files, 2, logs)
    assert blob_state(store, small.sha256) == "ok"
    assert stats.uploaded_files == 1
    assert any("repaired" in line and small.sha256[:12] in line for line in logs), logs


def test_a_deleted_vouched_for_blob_is_uploaded_again(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    big = large(files)
    store.delete(blob_key(big.sha256))

    logs: list[str] = []
    stats = snap(store, root, files, 2, logs)
    assert blob_state(store, big.sha256) == "ok"
    assert (stats.uploaded_files, stats.uploaded_bytes) == (1, big.size)
    assert any("missing" in line and big.sha256[:12] in line for line in logs), logs


def test_a_vouched_for_blob_rewritten_intact_is_hashed_not_uploaded(store: Store, tmp_path: Path) -> None:
    """A blob written again after the manifest (a repair, `aicenter verify --repair`) is read back once, then trusted."""
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    after_the_manifest(store)
    small = next(e for e in files if e.path == "a.csv")
    store.put_bytes(blob_key(small.sha256), (root / "a.csv").read_bytes())

    counting = ReadCounting(store)
    logs: list[str] = []
    stats = snap(counting, root, files, 2, logs)
    assert stats.uploaded_files == 0 and counting.reads == 1
    assert not any("repaired" in line for line in logs), logs
    counting.reads = 0
    after_the_manifest(store)
    assert snap(counting, root, files, 3, logs).uploaded_files == 0 and counting.reads == 0


def test_an_unchanged_re_snapshot_reads_no_blob_back(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    after_the_manifest(store)
    counting = ReadCounting(store)
    logs: list[str] = []
    stats = snap(counting, root, files, 2, logs)
    assert (stats.uploaded_files, counting.reads) == (0, 0)
    assert logs == []


def test_on_s3_a_large_snapshot_finds_the_damage_by_listing(s3_server: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """From LIST_MIN_FILES files on, the blobs' metadata comes from a listing of blobs/, not a HEAD each."""
    monkeypatch.setattr(transfer, "LIST_MIN_FILES", 2)
    store = open_store(f"s3://{s3_server.create_bucket()}/aicenter", s3_server.options)
    root = tmp_path / "data"
    files = dataset(root)
    snap(store, root, files, 1, [])
    after_the_manifest(store)
    big, small = large(files), next(e for e in files if e.path == "a.csv")
    flip_in_place(store, big.sha256, 5)
    store.delete(blob_key(small.sha256))

    counting = HeadCounting(store)
    logs: list[str] = []
    stats = snap(counting, root, files, 2, logs)
    assert counting.heads == 0, "the listing answers for every vouched-for blob"
    assert (stats.uploaded_files, stats.uploaded_bytes) == (2, big.size + small.size)
    assert blob_state(store, big.sha256) == blob_state(store, small.sha256) == "ok"
    assert any("repaired 2 blobs" in line for line in logs), logs


def test_where_blob_heads_are_refused_nothing_is_named_repaired(s3_server: Any, tmp_path: Path) -> None:
    """Run credentials list no blob, and a server may refuse their HEADs (403): such a blob is not vouched
    for, ensure_blobs creates it only where absent, and no blob is named as missing or repaired."""
    bucket = s3_server.create_bucket()
    direct = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    root = tmp_path / "data"
    files = dataset(root)
    snap(direct, root, files, 1, [])
    small = next(e for e in files if e.path == "a.csv")
    direct.delete(blob_key(small.sha256))
    plan = FaultPlan(rules=[(lambda method, path: method == "HEAD" and "/blobs/" in path, "denied", 10_000)])
    with FaultProxy(s3_server.port, plan) as proxy:
        options = S3Options(endpoint_url=proxy.endpoint, region="us-east-1", access_key_id="testing",
                            secret_access_key="testing-secret")
        logs: list[str] = []
        stats = snap(open_store(f"s3://{bucket}/aicenter", options), root, files, 2, logs)
    assert plan.injected, "the HEADs of blobs were refused"
    # the absent one is created (the 17 MiB one is sent again too: a multipart upload cannot be create-only)
    assert stats.uploaded_files in (1, 2)
    assert blob_state(direct, small.sha256) == "ok"
    assert not any("repaired" in line or "missing" in line for line in logs), logs


def test_an_incremental_run_does_not_carry_a_damaged_blob_into_its_snapshot(store: Store, tmp_path: Path) -> None:
    """The unchanged files of an incremental run go into its snapshot without being staged: their blobs are
    checked by the same rule against the parent's snapshot, so no manifest vouches for a damaged blob (the
    next re-snapshot would trust it). A full run then repairs it."""
    root = tmp_path / "data"
    files = dataset(root)
    key = "runs/parent/data_directory.manifest.json"
    snap(store, root, files, 0, [])
    store.copy("runs/d/r/t/0/data_directory.manifest.json", key)
    base = read(store, key, Manifest)
    check_carried(store, base, base.files, store.url(key))  # intact: nothing to say

    after_the_manifest(store)
    small = next(e for e in files if e.path == "sub/b.csv")
    flip_in_place(store, small.sha256, 7)
    with pytest.raises(DatasetError, match=rf"sub/b.csv.*sha256:{small.sha256[:12]}.*is damaged.*without incremental=True"):
        check_carried(store, base, base.files, store.url(key))
    logs: list[str] = []
    assert snap(store, root, files, 1, logs).uploaded_files == 1  # the full run's snapshot
    assert blob_state(store, small.sha256) == "ok"


def test_a_carried_blob_damaged_while_the_incremental_run_computes_fails_its_snapshot(
    store: Store, tmp_path: Path
) -> None:
    """check_carried ran before compute; a carried blob damaged during training must not be vouched for by the
    run's snapshot either (no re-snapshot would repair it): the snapshot checks the carried blobs again."""
    data = "datasets/d"
    for name, body in {"a.csv": b"a,1\n" * 50, "b.csv": b"b,1\n" * 60}.items():
        store.put_bytes(f"{data}/{name}", body)
    source = open_store(store.url(data), store.options if store.scheme == "s3" else None, create=False)
    parent = tmp_path / "parent"
    entries = transfer.run(transfer.download_tree(source, parent))
    take_snapshot(store, parent, entries, source=store.url(data), directory="data_directory", key="runs/p/m.json",
                  log=print)
    base = read(store, "runs/p/m.json", Manifest)
    store.put_bytes(f"{data}/c.csv", b"c,1\n")
    staging = stage_incremental(source, tmp_path / "data", base, print)
    check_carried(store, base, staging.carried, store.url("runs/p/m.json"))  # before compute: intact

    after_the_manifest(store)
    b = next(e for e in staging.carried if e.path == "b.csv")
    flip_in_place(store, b.sha256, 3)  # while the run computes
    with pytest.raises(DatasetError, match=rf"b.csv.*sha256:{b.sha256[:12]}.*damaged.*without incremental=True"):
        take_snapshot(store, tmp_path / "data", staging.staged, source=store.url(data), directory="data_directory",
                      key="runs/c/m.json", log=print, carried=staging.carried, fingerprints=staging.fingerprints)
    assert store.head("runs/c/m.json") is None, "no manifest vouches for the damaged blob"
