"""Zero-copy re-snapshots: the last manifest of a source vouches for its blobs; never trusted blindly.

Repairs of vouched-for blobs damaged in place: test_snapshot_repair.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.layout import BLOBS, blob_key, snapshot_hint_key
from airflow_aicenter.records import Manifest, read
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import FileEntry, sha256_file

SOURCE = "s3://data/churn"


class CountingStore:
    """The real store, with a count of existence checks and of blobs read back (hashed).

    transfer checks a key readable before each GET, so ``reads`` counts the blob GETs.
    """

    def __init__(self, inner: Store) -> None:
        self._inner, self.checks, self.reads = inner, 0, 0

    def check_readable(self, key: str) -> None:
        self.reads += key.startswith(BLOBS)
        self._inner.check_readable(key)

    def exists(self, key: str) -> bool:
        self.checks += key.startswith(BLOBS)
        return self._inner.exists(key)

    async def head_async(self, key: str) -> Any:
        self.checks += key.startswith(BLOBS)
        return await self._inner.head_async(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def make_data(root: Path, n: int = 40) -> list[FileEntry]:
    for i in range(n):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}.csv").write_text(f"row,{i}\n" * (i + 1))
    return entries(root)


def entries(root: Path) -> list[FileEntry]:
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        e = sha256_file(path)
        out.append(FileEntry(path.relative_to(root).as_posix(), e.sha256, e.size))
    return out


def snap(store: Any, root: Path, files: list[FileEntry], n: int, source: str | None = SOURCE, logs: list | None = None):
    return take_snapshot(store, root, files, source=source, directory="data_directory",
                         key=f"runs/d/r/t/{n}/data_directory.manifest.json", log=(logs if logs is not None else []).append)


def test_unchanged_data_is_neither_written_nor_read_back(store: Store, tmp_path: Path) -> None:
    files = make_data(tmp_path / "data")
    counting = CountingStore(store)
    first = snap(counting, tmp_path / "data", files, 1)
    assert first.uploaded_files == 40 and counting.checks == 40

    counting.checks = counting.reads = 0
    second = snap(counting, tmp_path / "data", files, 2)
    assert (second.uploaded_files, second.uploaded_bytes) == (0, 0)
    assert counting.reads == 0  # vouched for: a HEAD each (metadata), no blob read back
    assert counting.checks == 40
    manifest = read(store, "runs/d/r/t/2/data_directory.manifest.json", Manifest)
    assert {e.sha256 for e in manifest.files} == {e.sha256 for e in files} and manifest.source == SOURCE


def test_changed_files_are_the_only_ones_written(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    snap(store, root, make_data(root), 1)
    (root / "d0" / "f0.csv").write_text("changed\n")
    (root / "new.csv").write_text("new\n")
    stats = snap(store, root, entries(root), 2)
    assert stats.uploaded_files == 2
    assert store.get_bytes(blob_key(sha256_file(root / "new.csv").sha256)) == b"new\n"


def test_a_hint_whose_blobs_are_gone_is_not_trusted(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    files = make_data(root)
    snap(store, root, files, 1)
    for entry in files:  # someone emptied the blob store behind the manifest's back
        store.delete(blob_key(entry.sha256))
    logs: list[str] = []
    stats = snap(store, root, files, 2, logs=logs)
    assert stats.uploaded_files == 40
    assert all(store.exists(blob_key(e.sha256)) for e in files)
    assert any("gone" in line for line in logs)


@pytest.mark.parametrize("garbage", [
    b"{not json",
    b'{"source": "s3://other", "manifest": "runs/d/r/t/1/data_directory.manifest.json"}',
    b'{"source": "s3://data/churn", "manifest": "runs/missing.json"}',
])
def test_an_unusable_hint_falls_back_to_checking_every_file(store: Store, tmp_path: Path, garbage: bytes) -> None:
    root = tmp_path / "data"
    files = make_data(root, n=12)
    store.put_bytes(snapshot_hint_key(SOURCE), garbage)
    counting = CountingStore(store)
    stats = snap(counting, root, files, 1)
    assert stats.uploaded_files == 12 and counting.checks == 12
    # and the snapshot replaced it with a good hint: nothing read back the next time
    counting.reads = 0
    assert snap(counting, root, files, 2).uploaded_files == 0 and counting.reads == 0


def test_a_snapshot_without_a_source_leaves_no_hint(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "data"
    snap(store, root, make_data(root, n=3), 1, source=None)
    assert not [i.key for i in store.list("snapshots/")]
