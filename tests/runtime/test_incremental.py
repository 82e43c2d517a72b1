"""Incremental staging: only new or changed files are staged; the snapshot is the whole dataset; nothing new skips."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_aicenter.errors import DatasetError
from airflow_aicenter.records import Manifest, read
from airflow_aicenter.runtime.incremental import IncrementalStaging, NothingNew, check_carried, read_base, stage_incremental
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.storage import S3Store, Store, open_store
from airflow_aicenter.storage.transfer import blob_key, download_tree, run

DATA = "datasets/d"


def dataset_store(store: Store) -> Store:
    options = store.options if isinstance(store, S3Store) else None
    return open_store(store.url(DATA), options, create=False)


def put(store: Store, files: dict[str, str]) -> None:
    for rel, text in files.items():
        store.put_bytes(f"{DATA}/{rel}", text.encode())


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def full_snapshot(store: Store, tmp_path: Path, key: str) -> Manifest:
    """The parent's training snapshot as a normal (non-incremental) run takes it: no fingerprints."""
    folder = tmp_path / "parent"
    entries = run(download_tree(dataset_store(store), folder))
    take_snapshot(store, folder, entries, source=store.url(DATA), directory="data_directory", key=key, log=print)
    return read(store, key, Manifest)


def incremental_snapshot(store: Store, folder: Path, staging: IncrementalStaging, key: str) -> Manifest:
    take_snapshot(store, folder, staging.staged, source=store.url(DATA), directory="data_directory", key=key, log=print,
                  carried=staging.carried, fingerprints=staging.fingerprints)
    return read(store, key, Manifest)


def test_only_new_and_changed_files_are_staged_and_the_snapshot_is_the_whole_dataset(store: Store, tmp_path: Path) -> None:
    put(store, {"a.csv": "a,1\n", "sub/b.csv": "b,1\n", "c.csv": "c,1\n", "gone.csv": "x\n"})
    base = full_snapshot(store, tmp_path, "runs/p/data_directory.manifest.json")
    put(store, {"sub/b.csv": "b,2\n", "new/d.csv": "d,1\n"})  # b changed (same size), d new
    store.delete(f"{DATA}/gone.csv")

    logs: list[str] = []
    staging = stage_incremental(dataset_store(store), tmp_path / "data", base, logs.append)
    assert files_in(tmp_path / "data") == ["new/d.csv", "sub/b.csv"]
    assert (tmp_path / "data" / "sub" / "b.csv").read_text() == "b,2\n"
    assert (staging.new, staging.changed, staging.removed, len(staging.carried)) == (1, 1, 1, 2)
    assert staging.compared_by_digest == 3  # the parent recorded no fingerprints: a, b, c compared by digest
    assert "1 new, 1 changed, 2 unchanged (not staged), 1 removed" in logs[0]

    snap = incremental_snapshot(store, tmp_path / "data", staging, "runs/c/data_directory.manifest.json")
    assert [f.path for f in snap.files] == ["a.csv", "c.csv", "new/d.csv", "sub/b.csv"]
    assert snap.file_count == 4 and snap.total_bytes == 16
    assert all(f.etag for f in snap.files)  # every file fingerprinted for the next incremental run
    for entry in snap.files:
        assert store.exists(blob_key(entry.sha256))


def test_with_fingerprints_unchanged_files_are_not_downloaded(store: Store, tmp_path: Path) -> None:
    put(store, {"a.csv": "a,1\n", "b.csv": "b,1\n"})
    base = full_snapshot(store, tmp_path, "runs/p/m.json")
    put(store, {"c.csv": "c,1\n"})
    first = stage_incremental(dataset_store(store), tmp_path / "one", base, print)
    snap = incremental_snapshot(store, tmp_path / "one", first, "runs/one/m.json")

    put(store, {"b.csv": "b,22\n"})
    second = stage_incremental(dataset_store(store), tmp_path / "two", snap, print)
    assert second.compared_by_digest == 0 and [e.path for e in second.staged] == ["b.csv"]
    assert files_in(tmp_path / "two") == ["b.csv"]
    assert [e.path for e in second.carried] == ["a.csv", "c.csv"]


def test_nothing_new_or_changed_is_a_skip_with_its_reason(store: Store, tmp_path: Path) -> None:
    put(store, {"a.csv": "a,1\n", "b.csv": "b,1\n"})
    base = full_snapshot(store, tmp_path, "runs/p/m.json")
    store.delete(f"{DATA}/b.csv")
    with pytest.raises(NothingNew, match=r"no new or changed files in .* \(1 unchanged, 1 removed\)"):
        stage_incremental(dataset_store(store), tmp_path / "data", base, print)
    assert files_in(tmp_path / "data") == []  # the copy made to compare is gone


def test_a_missing_base_snapshot_or_blob_is_a_clear_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"training snapshot .*does not exist; train without incremental=True"):
        read_base(store, store.url("runs/p/data_directory.manifest.json"))
    put(store, {"a.csv": "a,1\n"})
    base = full_snapshot(store, tmp_path, "runs/p/m.json")
    assert read_base(store, store.url("runs/p/m.json")) == base
    store.delete(blob_key(base.files[0].sha256))
    with pytest.raises(DatasetError, match="which is gone from the store"):
        check_carried(store, base, base.files, store.url("runs/p/m.json"))
