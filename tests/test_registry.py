"""The registry on both backends: versions, resolution, races, O(1) resolve, aliases."""

from __future__ import annotations

import multiprocessing
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_aicenter.errors import PackageError, VersionError
from airflow_aicenter.records import BlobRef, Registration, RunRef, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.store import S3Options
from tests.conftest import write_files

MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
TRAIN = (
    "class Main:\n    def __init__(self):\n        pass\n    def train(self, training_directory):\n        pass\n"
    "    def save(self):\n        pass\n"
)


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": ""})


def test_upload_creates_next_major(store, pkg):
    registry = Registry(store)
    assert registry.upload(pkg, "churn").version == "1.0"
    (pkg / "extra.txt").write_text("v2")
    second = registry.upload(pkg, "churn")
    assert second.version == "2.0" and second.parent is None
    assert registry.packages() == ["churn"]
    assert [r.version for r in registry.versions("churn")] == ["1.0", "2.0"]


def test_training_creates_next_free_minor_and_resolves(store, pkg):
    registry = Registry(store)
    base = registry.upload(pkg, "churn")
    registry.upload(pkg, "churn")  # 2.0
    blob = base.blob
    assert registry.commit("churn", parent="1.0", blob=blob, pipeline="train").version == "1.1"
    assert registry.commit("churn", parent="1.0", blob=blob, pipeline="train").version == "1.2"
    assert registry.commit("churn", parent="1.1", blob=blob, pipeline="train").version == "1.3"
    assert registry.commit("churn", parent="2.0", blob=blob, pipeline="train").version == "2.1"
    assert registry.resolve("churn", "1").version == "1.3"
    assert registry.resolve("churn", "latest").version == "2.1"
    assert registry.resolve("churn", "1.2").parent == "1.0"


@pytest.mark.parametrize("spec, message", [
    ("9.9", "has no version 9.9"),
    ("4", "has no major version 4"),
    ("1.2.3", 'use "M.m"'),
    ("production", "has no alias 'production'"),
])
def test_unknown_versions_are_clear_errors(store, pkg, spec, message):
    registry = Registry(store)
    registry.upload(pkg, "churn")
    with pytest.raises(VersionError, match=message):
        registry.resolve("churn", spec)


def test_package_without_versions(store):
    with pytest.raises(VersionError, match="has no versions .*aicenter package upload"):
        Registry(store).resolve("ghost", "latest")


def test_commit_needs_stored_content(store):
    with pytest.raises(PackageError, match="is not in"):
        Registry(store).commit("churn", parent=None, blob=BlobRef(sha256="0" * 64, size=1), pipeline="upload")


def _register_many(store, pkg, n):
    registry = Registry(store)
    base = registry.upload(pkg, "race")
    with ThreadPoolExecutor(n) as pool:
        made = list(pool.map(lambda _: registry.commit("race", parent="1.0", blob=base.blob, pipeline="train").version, range(n)))
    return registry, made


def test_sixteen_concurrent_registrations_threads(store, pkg):
    registry, made = _register_many(store, pkg, 16)
    assert sorted(made, key=lambda v: int(v.split(".")[1])) == [f"1.{i}" for i in range(1, 17)]
    assert len(registry.versions("race")) == 17


def _commit_in_process(args):
    uri, options, sha, size = args
    registry = Registry(open_store(uri, options))
    return registry.commit("race", parent="1.0", blob=BlobRef(sha256=sha, size=size), pipeline="train").version


def test_sixteen_concurrent_registrations_processes(store, pkg):
    registry = Registry(store)
    base = registry.upload(pkg, "race")
    options = getattr(store, "options", None)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(16) as pool:
        made = pool.map(_commit_in_process, [(store.uri, options, base.blob.sha256, base.blob.size)] * 16)
    assert len(set(made)) == 16
    assert sorted(int(v.split(".")[1]) for v in made) == list(range(1, 17))


def test_stale_hint_is_never_wrong(store, pkg):
    registry = Registry(store)
    base = registry.upload(pkg, "churn")
    for _ in range(5):
        registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train")
    store.put_bytes("packages/churn/hints/1", b"1")  # a writer that lost a race wrote an old hint
    assert registry.resolve("churn", "1").version == "1.5"
    assert registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train").version == "1.6"
    store.delete("packages/churn/hints/1")  # no hint at all: gallop from 0
    assert registry.latest_minor("churn", 1) == 6


def test_commit_once_is_idempotent_per_task_try(store, pkg):
    registry = Registry(store)
    base = registry.upload(pkg, "churn")
    run = RunRef(dag_id="d", run_id="r", task_id="t", try_number=1)
    first = registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train")
    again = registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train")
    assert first.version == again.version == "1.1"
    # a crash between the version record and the run's marker leaves the marker as an intent
    # (no version): still found, not registered twice
    write(store, f"{run.prefix}/registration.json", Registration(package="churn", version=None))
    assert registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train").version == "1.1"
    other = RunRef(dag_id="d", run_id="r", task_id="t", try_number=2)
    assert registry.commit_once("churn", run=other, parent="1.0", blob=base.blob, pipeline="train").version == "1.2"


def test_download_verifies_and_roundtrips(store, pkg, tmp_path):
    registry = Registry(store)
    registry.upload(pkg, "churn")
    record, path = registry.download("churn", "1.0", tmp_path / "out")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["main.py", "requirements.txt", "train.py"]


def test_aliases_with_history_and_condition(store, pkg):
    registry = Registry(store)
    base = registry.upload(pkg, "churn")
    registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train", score=0.8)
    registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train", score=0.7)
    assert registry.set_alias("churn", "production", "1.1", set_by="me").previous is None
    better = lambda cur: cur is None or (registry.get("churn", cur.version).score or 0) < 0.7  # noqa: E731
    assert registry.set_alias("churn", "production", "1.2", condition=better) is None
    moved = registry.set_alias("churn", "production", "1.2", reason="rollback")
    assert moved.previous == "1.1" and moved.seq == 1
    assert registry.resolve("churn", "production").version == "1.2"
    assert [h.version for h in registry.alias_history("churn", "production")] == ["1.1", "1.2"]
    with pytest.raises(VersionError):
        registry.set_alias("churn", "latest", "1.1")


def test_resolve_is_constant_in_requests(tmp_path, pkg):
    """Resolving latest costs the same number of store requests with 5 or 200 versions."""
    counts = {}
    for n in (5, 200):
        store = open_store((tmp_path / f"s{n}").as_uri())
        registry = Registry(store)
        base = registry.upload(pkg, "churn")
        for _ in range(n):
            registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train")
        calls = []
        for name in ("get_bytes", "head", "list", "list_dir"):
            original = getattr(store, name)
            def counted(*a, _o=original, _n=name, **k):
                calls.append(_n)
                return _o(*a, **k)
            setattr(store, name, counted)
        assert registry.resolve("churn", "latest").version == f"1.{n}"
        assert "list" not in calls and "list_dir" not in calls
        counts[n] = len(calls)
    assert counts[5] == counts[200]


def test_an_evaluation_is_recorded_once_per_task_try(store, pkg):
    from airflow_aicenter.records import EvaluationRecord

    registry = Registry(store)
    registry.upload(pkg, "churn")
    run = RunRef(dag_id="d", run_id="r", task_id="evaluate", try_number=1)
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.8, run=run))
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.8, run=run))  # reattached step
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.9, run=run.model_copy(update={"try_number": 2})))
    assert [e.score for e in registry.evaluations("churn", "1.0")] == [0.8, 0.9]
