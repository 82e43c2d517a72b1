"""The one rule behind "better" (issue 24 item 1), on records built with the registry, on both stores.

Same evaluation data first (the same snapshot digest when both evaluations snapshotted it, else
the same dataset URI), else full-run scores on the same training data snapshot split by the same
code, else refused with the reason and what would make the two comparable.
"""

from __future__ import annotations

from pathlib import Path

from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.promotion import compare, promote
from airflow_aicenter.records import EvaluationRecord, Manifest, ManifestEntry, Outcome, RunRef, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from tests.aicenter_helpers import SCORED_TRAIN, upload_package

HOLDOUT = "s3://b/churn-holdout"


def run_ref(task: str) -> RunRef:
    return RunRef(dag_id="d", run_id="r", task_id=task, try_number=1)


def snapshot(store: Store, run: RunRef, directory: str, files: dict[str, str], source: str) -> str:
    """A manifest of ``files`` (path -> one hex digit of the content digest) in ``run``'s folder; its URI."""
    key = run.key(f"{directory}.manifest.json")
    entries = [ManifestEntry(path=p, sha256=d * 64, size=1) for p, d in files.items()]
    write(store, key, Manifest(source=source, directory=directory, files=entries, file_count=len(entries),
                               total_bytes=len(entries)))
    return store.url(key)


def full(registry: Registry, task: str, score: float, data: str, files: dict[str, str] | None = None,
         parent: str = "1.0") -> str:
    """A version made by a full run scored on its own ``process_data`` split of ``data`` (a snapshot when ``files``)."""
    run = run_ref(task)
    snap = None if files is None else snapshot(registry.store, run, "data_directory", files, data)
    base = registry.get("scored", parent)
    return registry.commit("scored", parent=parent, blob=base.blob, pipeline="full", run=run, snapshot=snap,
                           score=score, evaluated_on=f"{data}#process_data").version


def evaluate(registry: Registry, task: str, version: str, score: float, data: str,
             files: dict[str, str] | None = None) -> None:
    """An evaluation run of ``version`` on ``data`` (its test data snapshotted when ``files``)."""
    run = run_ref(task)
    snapshots = {} if files is None else {"test_data_directory": snapshot(registry.store, run, "test_data_directory",
                                                                          files, data)}
    write(registry.store, run.key(OUTCOME), Outcome(status="succeeded", pipeline="evaluate", package="scored",
                                                    version=version, start_at=0, score=score, snapshots=snapshots))
    registry.add_evaluation(EvaluationRecord(package="scored", version=version, score=score, dataset=data, run=run))


def registry_with_package(store: Store, tmp_path: Path) -> Registry:
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    return registry


def test_own_split_scores_on_different_data_are_not_compared(store: Store, tmp_path: Path) -> None:
    registry = registry_with_package(store, tmp_path)
    old = full(registry, "old", 0.8675, "s3://b/churn-week1", {"rows.csv": "a"})
    new = full(registry, "new", 0.87, "s3://b/churn-week2", {"rows.csv": "b"})
    assert promote(registry, "scored", "production", old, score=0.8675).promoted
    decision = promote(registry, "scored", "production", new, score=0.87)
    assert not decision.promoted, "0.87 > 0.8675 on two different splits says nothing"
    assert registry.alias("scored", "production").version == old
    assert "not scored on the same data" in decision.reason
    assert "0.87 on its own process_data split of s3://b/churn-week2" in decision.reason
    assert "evaluate both on the same data: EvaluatePipelineOperator(" in decision.reason
    assert f"version='{old}'" in decision.reason and f"version='{new}'" in decision.reason


def test_the_same_evaluation_data_decides_over_own_split_scores(store: Store, tmp_path: Path) -> None:
    registry = registry_with_package(store, tmp_path)
    old = full(registry, "old", 0.8675, "s3://b/churn-week1")
    new = full(registry, "new", 0.87, "s3://b/churn-week2")
    evaluate(registry, "eval-old", old, 0.816667, HOLDOUT, {"h.csv": "c"})
    evaluate(registry, "eval-new", new, 0.813333, HOLDOUT, {"h.csv": "c"})
    registry.set_alias("scored", "production", old)
    worse = compare(registry, "scored", new, old)
    assert worse.comparable and not worse.better and (worse.ours.score, worse.theirs.score) == (0.813333, 0.816667)
    decision = promote(registry, "scored", "production", new, score=0.87)
    assert not decision.promoted
    assert decision.reason.startswith(f"score 0.813333 is not above 0.816667 of the current production version {old} "
                                      f"(on the same evaluation data {HOLDOUT}, snapshot ")
    # the other way round: the same comparison, the opposite answer (never both "better")
    registry.set_alias("scored", "production", new)
    back = promote(registry, "scored", "production", old, score=0.8675)
    assert back.promoted and back.reason.startswith(f"score 0.816667 > 0.813333 of the current production version {new} "
                                                    f"(on the same evaluation data {HOLDOUT}")


def test_the_same_uri_with_different_content_is_not_the_same_data(store: Store, tmp_path: Path) -> None:
    registry = registry_with_package(store, tmp_path)
    old = full(registry, "old", 0.5, "s3://b/d1")
    new = full(registry, "new", 0.6, "s3://b/d2")
    evaluate(registry, "eval-old", old, 0.9, HOLDOUT, {"h.csv": "c"})
    evaluate(registry, "eval-new", new, 0.95, HOLDOUT, {"h.csv": "d"})  # the holdout changed under its URI
    registry.set_alias("scored", "production", old)
    decision = promote(registry, "scored", "production", new, score=0.95)
    assert not decision.promoted and "not scored on the same data" in decision.reason
    # unsnapshotted evaluations on the same URI count as the same data (the URI is all that is known)
    other = full(registry, "other", 0.1, "s3://b/d3")
    evaluate(registry, "eval-other", other, 0.97, "s3://b/plain")
    evaluate(registry, "eval-old-plain", old, 0.96, "s3://b/plain")
    decision = promote(registry, "scored", "production", other, score=0.97)
    assert decision.promoted and decision.reason.endswith("(on the same evaluation data s3://b/plain)")


def test_own_split_scores_on_the_same_training_snapshot_are_like_for_like(store: Store, tmp_path: Path) -> None:
    registry = registry_with_package(store, tmp_path)
    old = full(registry, "old", 0.80, "s3://b/churn", {"rows.csv": "a"})
    new = full(registry, "new", 0.85, "s3://b/churn", {"rows.csv": "a"})
    registry.set_alias("scored", "production", old)
    decision = promote(registry, "scored", "production", new, score=0.85)
    assert decision.promoted and "full-run scores on the same training data s3://b/churn, snapshot " in decision.reason
    # the same URI without snapshots: nothing says the data was the same
    a = full(registry, "a", 0.9, "s3://b/churn")
    b = full(registry, "b", 0.95, "s3://b/churn")
    registry.set_alias("scored", "staging", a)
    refused = promote(registry, "scored", "staging", b, score=0.95)
    assert not refused.promoted and "save_training_data=True" in refused.reason


def test_no_score_and_first_promotion(store: Store, tmp_path: Path) -> None:
    registry = registry_with_package(store, tmp_path)
    first = full(registry, "first", 0.5, "s3://b/d")
    assert promote(registry, "scored", "production", first, score=0.5).reason == (
        "score 0.5; alias 'production' did not exist yet")
    base = registry.get("scored", "1.0")
    unscored = registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full").version
    refused = promote(registry, "scored", "production", unscored, score=None)
    assert not refused.promoted and "has no score" in refused.reason
    registry.set_alias("scored", "production", unscored)
    assert promote(registry, "scored", "production", first, score=0.5).reason.endswith(
        f"the current production version {unscored} has no score")


def test_the_approval_request_compares_by_the_same_rule(store: Store, tmp_path: Path) -> None:
    """The person sees the comparison promote_if='better' would make: the same URI with other content is not the same data."""
    from airflow_aicenter.approval import Candidate, request_body

    registry = registry_with_package(store, tmp_path)
    old = full(registry, "old", 0.80, "s3://b/churn", {"rows.csv": "a"})
    new = full(registry, "new", 0.85, "s3://b/churn", {"rows.csv": "b"})  # next week's data under the same URI
    body = request_body(registry, Candidate(registry.get("scored", new), 0.85, "s3://b/churn#process_data", {}),
                        "production", registry.get("scored", old), None)
    assert "**Not like with like**" in body and "not scored on the same data" in body
    assert "the data under s3://b/churn changed between the runs" in body
    assert "EvaluatePipelineOperator(task_id=..., package='scored'" in body
    evaluate(registry, "eval-old", old, 0.7, HOLDOUT, {"h.csv": "c"})
    evaluate(registry, "eval-new", new, 0.75, HOLDOUT, {"h.csv": "c"})
    body = request_body(registry, Candidate(registry.get("scored", new), 0.85, "s3://b/churn#process_data", {}),
                        "production", registry.get("scored", old), None)
    assert f"On the same evaluation data {HOLDOUT}, snapshot " in body and "the candidate scores higher (+0.05)" in body
    assert f"current {old}: 0.7 (evaluation of " in body and f"candidate {new}: 0.75 (evaluation of " in body
    assert compare(registry, "scored", new, old).better
