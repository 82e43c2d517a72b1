"""Incremental staging: only new or changed files are staged; the snapshot is the whole dataset; nothing new skips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ConfigurationError, DatasetError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.records import Manifest, Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.incremental import (
    IncrementalStaging,
    NothingNew,
    check_carried,
    read_base,
    require_base,
    stage_incremental,
)
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.storage import S3Store, Store, open_store
from airflow_aicenter.storage.transfer import download_tree, run
from tests.conftest import RuntimeSpawner, write_files
from tests.packages import MAIN

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
    assert staging.compared_by_digest == 2  # the parent recorded no fingerprints: a and c downloaded to compare
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


# -- end to end: the runtime as the launchers start it -----------------------------------------
LISTING_TRAIN = '''
import json, os

def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        with open(os.path.join(os.environ["artifacts_directory"], "seen.json"), "w") as fh:
            json.dump(_files(training_directory), fh)
    def save(self):
        open("model.txt", "w").write("m")
'''


def runtime(store: Store, tmp_path: Path, env: dict[str, str], try_number: int, **fields: Any) -> tuple[Outcome, str, int]:
    registry = Registry(store)
    if not store.exists("packages/inc/versions/1.0.json"):
        registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": LISTING_TRAIN, "requirements.txt": ""}),
                        "inc")
    base = registry.resolve("inc", "1.0")
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/d/r/t/{try_number}", package="inc",
                   version=base.version, blob=base.blob, dataset=store.url(DATA), save_training_data=True, **fields)
    done = RuntimeSpawner(tmp_path / "runtime-specs").run(spec, env)
    return read(store, f"{spec.run_prefix}/outcome.json", Outcome), done.stderr, done.returncode


def seen(store: Store, try_number: int) -> list[str]:
    return json.loads(store.get_bytes(f"runs/d/r/t/{try_number}/artifacts/seen.json"))


def test_incremental_runs_train_on_what_changed_and_skip_when_nothing_did(store: Store, tmp_path: Path, request) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    put(store, {"a.csv": "a,1\n", "sub/b.csv": "b,1\n", "c.csv": "c,1\n"})
    parent, err, code = runtime(store, tmp_path, env, 1)
    assert code == 0 and parent.status == "succeeded", err
    assert seen(store, 1) == ["a.csv", "c.csv", "sub/b.csv"]

    put(store, {"sub/b.csv": "b,2\n", "d.csv": "d,1\n"})
    child, err, code = runtime(store, tmp_path, env, 2, incremental_base=parent.snapshots["data_directory"])
    assert code == 0 and child.status == "succeeded", err
    assert seen(store, 2) == ["d.csv", "sub/b.csv"]  # only what is new or changed
    assert "1 new, 1 changed, 2 unchanged (not staged), 0 removed" in err
    assert "compare by digest" not in err  # the parent's full staging recorded fingerprints: nothing downloaded to compare
    assert all(f.etag for f in read(store, "runs/d/r/t/1/data_directory.manifest.json", Manifest).files)
    whole = read(store, "runs/d/r/t/2/data_directory.manifest.json", Manifest)
    assert [f.path for f in whole.files] == ["a.csv", "c.csv", "d.csv", "sub/b.csv"] and whole.total_bytes == 16

    skipped, err, code = runtime(store, tmp_path, env, 3, incremental_base=child.snapshots["data_directory"])
    assert code == 0, err
    assert skipped.status == "skipped" and skipped.skipped is not None
    assert skipped.skipped.startswith("no new or changed files in") and "(4 unchanged, 0 removed)" in skipped.skipped
    assert skipped.blob is None and not store.exists("runs/d/r/t/3/artifacts/seen.json")  # no user code, no version
    assert "user_code" not in skipped.phases


def test_incremental_run_without_the_parent_snapshot_fails_before_compute(store: Store, tmp_path: Path, request) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    put(store, {"a.csv": "a,1\n"})
    outcome, err, code = runtime(store, tmp_path, env, 1, incremental_base=store.url("runs/x/y/z/1/data_directory.manifest.json"))
    assert "does not exist" in err
    assert code == 1 and outcome.status == "failed" and outcome.phase == "stage_data"
    assert outcome.error is not None and "training snapshot" in outcome.error and "does not exist" in outcome.error


def test_the_operator_refuses_a_parent_without_snapshot_before_compute(store: Store, tmp_path: Path) -> None:
    uploaded = Registry(store).upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": LISTING_TRAIN,
                                                                     "requirements.txt": ""}), "inc")
    with pytest.raises(ConfigurationError, match=r"needs the training-data snapshot of inc 1\.0, and it has none \(it was "
                                                  r"uploaded\); train it once with save_training_data=True"):
        require_base(uploaded)
    trained = uploaded.model_copy(update={"version": "1.1", "pipeline": "train", "snapshot": store.url("runs/x/m.json")})
    assert require_base(trained) == store.url("runs/x/m.json")
    with pytest.raises(ConfigurationError, match="trained without save_training_data=True"):
        require_base(trained.model_copy(update={"snapshot": None}))


def test_an_incremental_run_on_a_mounted_dataset_is_refused(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    mount = write_files(tmp_path / "volume", {"a.csv": "a,1\n"})
    outcome, err, code = runtime(store, tmp_path, {}, 1, dataset_mount=str(mount),
                                 incremental_base=store.url("runs/p/data_directory.manifest.json"))
    assert code == 1 and outcome.status == "failed", err
    assert outcome.error is not None and "a mounted volume claim is not staged" in outcome.error
