"""The registry on both backends: versions, resolution, races, O(1) resolve, aliases."""

from __future__ import annotations

import multiprocessing
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import NotFoundError, StorageError, VersionError
from airflow_aicenter.records import AliasRecord, BlobRef, Registration, RunRef, read, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.store import S3Options


def test_upload_creates_next_major(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    assert registry.upload(train_pkg, "churn").version == "1.0"
    (train_pkg / "extra.txt").write_text("v2")
    second = registry.upload(train_pkg, "churn")
    assert second.version == "2.0" and second.parent is None
    assert registry.packages() == ["churn"]
    assert [r.version for r in registry.versions("churn")] == ["1.0", "2.0"]


def test_training_creates_next_free_minor_and_resolves(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    registry.upload(train_pkg, "churn")  # 2.0
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
def test_unknown_versions_are_clear_errors(store: Store, train_pkg: Path, spec: str, message: str) -> None:
    registry = Registry(store)
    registry.upload(train_pkg, "churn")
    with pytest.raises(VersionError, match=message):
        registry.resolve("churn", spec)


def test_package_without_versions(store: Store) -> None:
    with pytest.raises(VersionError, match=r"has no versions .*aicenter package upload"):
        Registry(store).resolve("ghost", "latest")


def test_commit_needs_stored_content(store: Store) -> None:
    with pytest.raises(StorageError, match=r"is no longer in .*nothing was registered"):
        Registry(store).commit("churn", parent=None, blob=BlobRef(sha256="0" * 64, size=1), pipeline="upload")


def _register_many(store: Store, train_pkg: Path, n: int) -> tuple[Registry, list[str]]:
    registry = Registry(store)
    base = registry.upload(train_pkg, "race")
    with ThreadPoolExecutor(n) as pool:
        made = list(pool.map(lambda _: registry.commit("race", parent="1.0", blob=base.blob, pipeline="train").version, range(n)))
    return registry, made


def test_sixteen_concurrent_registrations_threads(store: Store, train_pkg: Path) -> None:
    registry, made = _register_many(store, train_pkg, 16)
    assert sorted(made, key=lambda v: int(v.split(".")[1])) == [f"1.{i}" for i in range(1, 17)]
    assert len(registry.versions("race")) == 17


def _commit_in_process(args: tuple[str, S3Options | None, str, int]) -> str:
    uri, options, sha, size = args
    registry = Registry(open_store(uri, options))
    return registry.commit("race", parent="1.0", blob=BlobRef(sha256=sha, size=size), pipeline="train").version


def test_sixteen_concurrent_registrations_processes(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    base = registry.upload(train_pkg, "race")
    options = getattr(store, "options", None)
    # forkserver, not spawn: sixteen separate processes all the same, forked from one server that
    # imported the registry once, instead of sixteen interpreters importing it each (most of the time).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["airflow_aicenter.registry", "airflow_aicenter.storage"])
    with ctx.Pool(16) as pool:
        made = pool.map(_commit_in_process, [(store.uri, options, base.blob.sha256, base.blob.size)] * 16)
    assert len(set(made)) == 16
    assert sorted(int(v.split(".")[1]) for v in made) == list(range(1, 17))


def test_stale_hint_is_never_wrong(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    for _ in range(5):
        registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train")
    store.put_bytes("packages/churn/hints/1", b"1")  # a writer that lost a race wrote an old hint
    assert registry.resolve("churn", "1").version == "1.5"
    assert registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train").version == "1.6"
    store.delete("packages/churn/hints/1")  # no hint at all: gallop from 0
    assert registry.latest_minor("churn", 1) == 6


def test_commit_once_is_idempotent_per_task_try(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    run = RunRef(dag_id="d", run_id="r", task_id="t", try_number=1)
    first = registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train")
    again = registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train")
    assert first.version == again.version == "1.1"
    # a crash between the version record and the run's marker leaves the marker as an intent
    # (no version): still found, not registered twice
    write(store, f"{run.prefix}/registration.json", Registration(package="churn", version=None))
    assert registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train").version == "1.1"
    other_task = RunRef(dag_id="d", run_id="r", task_id="t2", try_number=1)
    assert registry.commit_once("churn", run=other_task, parent="1.0", blob=base.blob, pipeline="train").version == "1.2"


def test_a_task_instance_makes_at_most_one_version_over_its_tries(store: Store, train_pkg: Path) -> None:
    """Under a real scheduler a task failed after registering 1.1 and, cleared and retried, registered 1.9
    as well. The retry finds its task instance's version (same dag, run, task, map index; any try)."""
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    try1 = RunRef(dag_id="d", run_id="r", task_id="train", map_index=1, try_number=1)
    try2 = try1.model_copy(update={"try_number": 2})
    assert registry.version_made_by("churn", try1) is None
    first = registry.commit_once("churn", run=try1, parent="1.0", blob=base.blob, pipeline="train")
    other_index = try1.model_copy(update={"map_index": 0})
    registry.commit_once("churn", run=other_index, parent="1.0", blob=base.blob, pipeline="train")  # 1.2, a sibling

    made = registry.version_made_by("churn", try2)  # what the operator asks before launching try 2
    assert made is not None and made.version == first.version == "1.1" and made.run is not None and made.run.try_number == 1
    assert registry.commit_once("churn", run=try2, parent="1.0", blob=base.blob, pipeline="train").version == "1.1"
    assert [r.version for r in registry.versions("churn")] == ["1.0", "1.1", "1.2"]
    assert read(store, f"{try2.prefix}/registration.json", Registration).version == "1.1"  # the try's record says so
    # another task, another dag run, an unmapped task of the same id: each its own instance
    for other in (try1.model_copy(update={"task_id": "train2"}), try1.model_copy(update={"run_id": "r2"}),
                  try1.model_copy(update={"map_index": -1})):
        assert registry.version_made_by("churn", other) is None


def test_a_retry_after_a_crash_between_intent_and_version_finds_the_version(store: Store, train_pkg: Path) -> None:
    """Try 1 committed its version but died before completing its records: try 2 still finds it."""
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    try1 = RunRef(dag_id="d", run_id="r", task_id="train", try_number=1)
    first = registry.commit_once("churn", run=try1, parent="1.0", blob=base.blob, pipeline="train")
    write(store, Registry.made_by_key("churn", try1), Registration(package="churn", version=None))  # the crash
    for _ in range(3):
        registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train")  # others commit meanwhile
    try2 = try1.model_copy(update={"try_number": 2})
    assert registry.version_made_by("churn", try2) == first
    assert registry.commit_once("churn", run=try2, parent="1.0", blob=base.blob, pipeline="train").version == "1.1"
    assert read(store, Registry.made_by_key("churn", try2), Registration).version == "1.1"
    assert len(registry.versions("churn")) == 5


def test_version_made_by_costs_constant_requests(tmp_path: Path, train_pkg: Path) -> None:
    counts = {}
    for n in (3, 60):
        store = open_store((tmp_path / f"s{n}").as_uri())
        registry = Registry(store)
        base = registry.upload(train_pkg, "churn")
        for i in range(n):
            run = RunRef(dag_id="d", run_id="r", task_id="train", map_index=i)
            registry.commit_once("churn", run=run, parent="1.0", blob=base.blob, pipeline="train")
        calls: list[str] = []
        for name in ("get_bytes", "head", "exists", "list", "list_dir"):
            original = getattr(store, name)

            def counted(*a: Any, _o: Any = original, _n: str = name, _calls: list[str] = calls, **k: Any) -> Any:
                _calls.append(_n)
                return _o(*a, **k)
            setattr(store, name, counted)
        made = registry.version_made_by("churn", RunRef(dag_id="d", run_id="r", task_id="train", map_index=1, try_number=3))
        assert made is not None and made.version == "1.2"
        counts[n] = len(calls)
    assert counts[3] == counts[60] == 2


def test_a_damaged_record_is_a_problem_of_its_package_only(store: Store, train_pkg: Path) -> None:
    """One corrupt alias record broke `aicenter package list` for every package."""
    registry = Registry(store)
    for name in ("alpha", "beta", "gamma"):
        registry.upload(train_pkg, name)
        registry.set_alias(name, "production", "1.0")
    store.put_bytes("packages/alpha/aliases/production/0000000000.json", b"{damaged")
    registry.commit("gamma", parent="1.0", blob=registry.get("gamma", "1.0").blob, pipeline="train")
    store.put_bytes("packages/gamma/versions/1.1.json", b"[]")
    summaries = {s.name: s for s in registry.summaries()}
    assert list(summaries) == ["alpha", "beta", "gamma"]
    alpha, beta, gamma = summaries["alpha"], summaries["beta"], summaries["gamma"]
    assert alpha.latest is not None and alpha.latest.version == "1.0" and alpha.aliases == {}
    [problem] = alpha.problems
    assert problem.startswith("alias 'production': ")
    assert "packages/alpha/aliases/production/0000000000.json is not a valid AliasRecord" in problem
    assert beta.problems == [] and beta.latest is not None and beta.aliases["production"].version == "1.0"
    assert gamma.latest is None and gamma.aliases["production"].version == "1.0"
    assert len(gamma.problems) == 1 and "packages/gamma/versions/1.1.json is not a valid VersionRecord" in gamma.problems[0]
    with pytest.raises(StorageError, match="is not a valid AliasRecord"):  # elsewhere a damaged record is still an error
        registry.aliases("alpha")


def test_download_verifies_and_roundtrips(store: Store, train_pkg: Path, tmp_path: Path) -> None:
    registry = Registry(store)
    registry.upload(train_pkg, "churn")
    _, path = registry.download("churn", "1.0", tmp_path / "out")
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["main.py", "requirements.txt", "train.py"]


def test_aliases_with_history_and_condition(store: Store, train_pkg: Path) -> None:
    registry = Registry(store)
    base = registry.upload(train_pkg, "churn")
    registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train", score=0.8)
    registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train", score=0.7)
    first = registry.set_alias("churn", "production", "1.1", set_by="me")
    assert first is not None and first.previous is None

    def better(cur: AliasRecord | None) -> bool:
        return cur is None or (registry.get("churn", cur.version).score or 0) < 0.7

    assert registry.set_alias("churn", "production", "1.2", condition=better) is None
    moved = registry.set_alias("churn", "production", "1.2", reason="rollback")
    assert moved is not None and moved.previous == "1.1" and moved.seq == 1
    assert registry.resolve("churn", "production").version == "1.2"
    assert [h.version for h in registry.alias_history("churn", "production")] == ["1.1", "1.2"]
    with pytest.raises(VersionError):
        registry.set_alias("churn", "latest", "1.1")


def test_resolve_is_constant_in_requests(tmp_path: Path, train_pkg: Path) -> None:
    """Resolving latest costs the same number of store requests with 5 or 200 versions."""
    counts = {}
    for n in (5, 200):
        store = open_store((tmp_path / f"s{n}").as_uri())
        registry = Registry(store)
        base = registry.upload(train_pkg, "churn")
        for _ in range(n):
            registry.commit("churn", parent="1.0", blob=base.blob, pipeline="train")
        calls: list[str] = []
        for name in ("get_bytes", "head", "list", "list_dir"):
            original = getattr(store, name)
            def counted(*a: Any, _o: Any = original, _n: str = name, _calls: list[str] = calls, **k: Any) -> Any:
                _calls.append(_n)
                return _o(*a, **k)
            setattr(store, name, counted)
        assert registry.resolve("churn", "latest").version == f"1.{n}"
        assert "list" not in calls and "list_dir" not in calls
        counts[n] = len(calls)
    assert counts[5] == counts[200]


def test_an_evaluation_is_recorded_once_per_task_try(store: Store, train_pkg: Path) -> None:
    from airflow_aicenter.records import EvaluationRecord

    registry = Registry(store)
    registry.upload(train_pkg, "churn")
    run = RunRef(dag_id="d", run_id="r", task_id="evaluate", try_number=1)
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.8, run=run))
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.8, run=run))  # reattached step
    retried = run.model_copy(update={"try_number": 2})
    registry.add_evaluation(EvaluationRecord(package="churn", version="1.0", score=0.9, run=retried))
    assert [e.score for e in registry.evaluations("churn", "1.0")] == [0.8, 0.9]


def test_checking_a_version_whose_content_was_deleted_says_so(store: Store, train_pkg: Path) -> None:
    """A deleted blob was reported as "not a zip file or is corrupt"."""
    registry = Registry(store)
    record = registry.upload(train_pkg, "churn")
    registry.check(record, "train")
    store.delete(f"blobs/sha256/{record.blob.sha256}")
    with pytest.raises(NotFoundError) as e:
        registry.check(record, "train")
    assert str(e.value) == (
        f"version churn:1.0 names content sha256:{record.blob.sha256}, which is missing from {store.uri} "
        "(deleted by hand, or by gc): upload the package again (`aicenter package upload PATH --name churn`) "
        "or use another version"
    )


def test_checking_a_version_follows_the_files_its_requirements_include(store: Store, train_pkg: Path) -> None:
    """A package whose requirements.txt includes others (-r, -c, nested) uploads and passes the pre-check.

    The pre-check extracted only the contract files, so upload accepted the package and the
    operator then refused it with "extra.txt is missing from the package".
    """
    (train_pkg / "requirements.txt").write_text("-r reqs/base.txt\n-c constraints.txt\n")
    (train_pkg / "reqs").mkdir()
    (train_pkg / "reqs" / "base.txt").write_text("numpy\n-r more.txt\n")
    (train_pkg / "reqs" / "more.txt").write_text("pandas\n")
    (train_pkg / "constraints.txt").write_text("numpy<3\n")
    registry = Registry(store)
    record = registry.upload(train_pkg, "churn")
    registry.check(record, "train")



@pytest.mark.parametrize("damage", ["damaged", "missing"])
def test_uploading_identical_content_verifies_and_repairs_the_stored_blob(store: Store, train_pkg: Path, damage: str) -> None:
    """Issue 20, finding 1: identical content makes no new version, and its stored blob is checked and rewritten."""
    registry = Registry(store)
    first = registry.upload_package(train_pkg, "churn")
    assert (first.record.version, first.created, first.repaired) == ("1.0", True, None)
    key = f"blobs/sha256/{first.record.blob.sha256}"
    good = store.get_bytes(key)
    if damage == "missing":
        store.delete(key)
    else:
        store.put_bytes(key, good[:-1] + bytes([good[-1] ^ 0xFF]))
    again = registry.upload_package(train_pkg, "churn")
    assert (again.record.version, again.created, again.repaired) == ("1.0", False, damage)
    assert store.get_bytes(key) == good
    intact = registry.upload_package(train_pkg, "churn")
    assert (intact.record.version, intact.created, intact.repaired) == ("1.0", False, None)
    forced = registry.upload_package(train_pkg, "churn", force=True)
    assert (forced.record.version, forced.created) == ("2.0", True)
