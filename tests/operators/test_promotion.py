"""Promotion (``promote_to`` / ``promote_if``): better promotes, worse does not, races lose nothing.

The scores are controlled: the package's evaluate() returns the run's ``SCORE`` env parameter.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from airflow_aicenter.errors import AlreadyExistsError, ConfigurationError, VersionError
from airflow_aicenter.promotion import promote, version_score
from airflow_aicenter.records import EvaluationRecord
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import SCORED_TRAIN, small_dataset, upload_package
from tests.operators.kube_api import make_context


def versions_with_scores(registry: Registry, tmp_path, scores: list[float | None]) -> list[str]:
    """1.1, 1.2, ... of package "scored", each with the given record score."""
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    base = registry.get("scored", "1.0")
    return [registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full", score=s).version for s in scores]


def test_better_promotes_and_worse_does_not(store, tmp_path):
    registry = Registry(store)
    v1, v2, v3, v4, v5 = versions_with_scores(registry, tmp_path, [0.5, 0.4, 0.5, None, 0.9])

    first = promote(registry, "scored", "production", v1, score=0.5)
    assert first.promoted and first.from_version is None and "did not exist yet" in first.reason
    worse = promote(registry, "scored", "production", v2, score=0.4)
    assert not worse.promoted and worse.reason.startswith("score 0.4 is not above 0.5 of the current production version 1.1")
    equal = promote(registry, "scored", "production", v3, score=0.5)
    assert not equal.promoted, "better means strictly above"
    unscored = promote(registry, "scored", "production", v4, score=None)
    assert not unscored.promoted and "has no score" in unscored.reason and "promote_if='always'" in unscored.reason
    better = promote(registry, "scored", "production", v5, score=0.9)
    assert better.promoted and (better.from_version, better.to_version) == ("1.1", "1.5")
    assert better.reason == "score 0.9 > 0.5 of the current production version 1.1 (full run)"
    again = promote(registry, "scored", "production", v5, score=0.95)
    assert not again.promoted and again.reason == "'production' already points at 1.5"

    # an evaluation outranks the score the version's own run recorded
    registry.add_evaluation(EvaluationRecord(package="scored", version=v5, score=0.2))
    assert version_score(registry, "scored", v5).score == 0.2
    assert promote(registry, "scored", "production", v2, score=0.4).promoted

    forced = promote(registry, "scored", "production", v4, score=None, promote_if="always")
    assert forced.promoted and forced.from_version == "1.2"
    history = registry.alias_history("scored", "production")
    assert [(h.version, h.previous) for h in history] == [("1.1", None), ("1.5", "1.1"), ("1.2", "1.5"), ("1.4", "1.2")]
    assert history[-1].reason == "promote_if=always, score none"
    # a current version without any score loses to any scored candidate
    assert promote(registry, "scored", "production", v3, score=0.01).reason.endswith("the current production version 1.4 has no score")

    with pytest.raises(VersionError, match="invalid alias name 'Prod!'"):
        promote(registry, "scored", "Prod!", v1, score=1.0)
    with pytest.raises(ConfigurationError, match="promote_if='sometimes' is not valid"):
        promote(registry, "scored", "production", v1, score=1.0, promote_if="sometimes")


def test_better_compares_scores_measured_on_the_same_data(store, tmp_path):
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    base = registry.get("scored", "1.0")
    split, holdout = "s3://b/churn#process_data", "s3://b/churn-holdout"

    def full(score: float, on: str) -> str:
        return registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full", score=score, evaluated_on=on).version

    v1 = full(0.9, split)
    assert promote(registry, "scored", "production", v1, score=0.9, evaluated_on=split).promoted
    registry.add_evaluation(EvaluationRecord(package="scored", version=v1, score=0.6, dataset=holdout))
    # 0.8 beats production's holdout score (0.6) but not its score on the same split (0.9): not promoted
    v2 = full(0.8, split)
    decision = promote(registry, "scored", "production", v2, score=0.8, evaluated_on=split)
    assert not decision.promoted
    assert decision.reason == "score 0.8 is not above 0.9 of the current production version 1.1 (full run on the same data)"
    # scored on the holdout: compared with production's holdout evaluation
    decision = promote(registry, "scored", "production", full(0.7, holdout), score=0.7, evaluated_on=holdout)
    assert decision.promoted and decision.reason.startswith("score 0.7 > 0.6 of the current production version 1.1 "
                                                            "(evaluation on the same data, ")
    # no comparable score: the latest evaluation is used, and the reason says it is on other data
    v4 = full(0.95, "file:///elsewhere#process_data")
    decision = promote(registry, "scored", "staging", v1, score=0.9, evaluated_on=split)
    decision = promote(registry, "scored", "staging", v4, score=0.95, evaluated_on="file:///elsewhere#process_data")
    assert decision.promoted and "(evaluation on other data of " in decision.reason
    assert version_score(registry, "scored", v1).on == holdout
    assert registry.get("scored", v2).evaluated_on == split


def _race(registry: Registry, versions: list[str], scores: list, promote_if: str) -> tuple[list, int]:
    """All threads promote at once; returns their decisions and how many alias writes lost a race."""
    barrier, lock, lost = threading.Barrier(len(versions)), threading.Lock(), [0]
    put = registry.store.put_bytes

    def slow_put(key: str, data: bytes, *, create: bool = False) -> None:
        if create and "/aliases/" in key:
            time.sleep(0.005)  # widen the window between "read the latest entry" and "create the next one"
        try:
            put(key, data, create=create)
        except AlreadyExistsError:
            with lock:
                lost[0] += 1
            raise

    registry.store.put_bytes = slow_put  # type: ignore[method-assign]

    def one(i: int):
        barrier.wait()
        return promote(registry, "scored", "production", versions[i], score=scores[i], promote_if=promote_if, set_by=f"t{i}")

    with ThreadPoolExecutor(len(versions)) as pool:
        return list(pool.map(one, range(len(versions)))), lost[0]


def _check_history(registry: Registry) -> list:
    history = registry.alias_history("scored", "production")
    assert [h.seq for h in history] == list(range(len(history))), "numbered without gaps"
    assert history[0].previous is None
    assert all(h.previous == before.version for before, h in zip(history, history[1:])), "each entry names its real predecessor"
    return history


def test_concurrent_better_promotions_end_on_the_best(store, tmp_path):
    registry = Registry(store)
    scores = [round(0.1 + 0.05 * i, 2) for i in range(12)]
    random.Random(3).shuffle(scores)
    versions = versions_with_scores(registry, tmp_path, scores)
    decisions, lost = _race(registry, versions, scores, "better")
    assert lost > 0, "the threads really raced"

    best = versions[scores.index(max(scores))]
    assert registry.alias("scored", "production").version == best
    history = _check_history(registry)
    judged = [dict(zip(versions, scores))[h.version] for h in history]
    assert judged == sorted(judged) and len(set(judged)) == len(judged), "every step was strictly better"
    assert {d.to_version for d in decisions if d.promoted} == {h.version for h in history}
    assert sum(d.promoted for d in decisions) == len(history)


def test_concurrent_always_promotions_lose_no_update(store, tmp_path):
    registry = Registry(store)
    versions = versions_with_scores(registry, tmp_path, [None] * 10)
    decisions, lost = _race(registry, versions, [None] * 10, "always")
    assert lost > 0, "the threads really raced"
    assert all(d.promoted for d in decisions)
    history = _check_history(registry)
    assert sorted(h.version for h in history) == sorted(versions), "all ten updates are in the history, once each"
    assert registry.alias("scored", "production").version == history[-1].version


def test_operator_arguments_are_checked_when_the_dag_is_parsed():
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator

    full = FullPipelineOperator(task_id="f", package="p", dataset="file:///d", promote_to="production")
    assert (full.promote_to, full.promote_if) == ("production", "better")
    assert EvaluatePipelineOperator(task_id="e", package="p", evaluation_dataset="file:///d", promote_to="staging",
                                    promote_if="always").promote_if == "always"
    with pytest.raises(ConfigurationError, match="promote_if='sometimes' is not valid; use 'better'"):
        FullPipelineOperator(task_id="f2", package="p", dataset="file:///d", promote_to="production", promote_if="sometimes")
    with pytest.raises(VersionError, match="alias name 'latest' is reserved"):
        EvaluatePipelineOperator(task_id="e2", package="p", evaluation_dataset="file:///d", promote_to="latest")
    with pytest.raises(ConfigurationError, match="a training run has none"):
        TrainPipelineOperator(task_id="t", package="p", dataset="file:///d", promote_to="production")


def promotion_tasks(data: str) -> list:
    """The chain of a promotion DAG, run one after the other: each task as Airflow would run it."""
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator

    def full(task_id, score, **kw):
        env = {"SCORE": score, **kw.pop("env", {})}
        return FullPipelineOperator(task_id=task_id, package="scored", version="1.0", dataset=data,
                                    env=env, promote_to="production", **kw)

    def evaluate(task_id, version, score):
        return EvaluatePipelineOperator(task_id=task_id, package="scored", version=version, env={"SCORE": score},
                                        evaluation_dataset=data, promote_to="production")

    return [
        full("first", "0.5"),                         # 1.1: no alias yet -> promoted
        full("worse", "0.4"),                         # 1.2: not promoted
        full("equal", "0.5"),                         # 1.3: not strictly better -> not promoted
        full("better", "0.9"),                        # 1.4: promoted over 1.1
        evaluate("evaluate_better", "1.2", "0.95"),   # 1.2 evaluated at 0.95 > 0.9 -> promoted
        evaluate("evaluate_worse", "1.4", "0.3"),     # 0.3 < 0.95 (1.2's evaluation) -> not promoted
        full("unscored", "0.99", env={"EVAL_SPLIT": "0"}),  # 1.5: empty evaluation split -> score null, not promoted
        full("forced", "0.1", promote_if="always"),   # 1.6: promoted although worse
    ]


EXPECTED = {  # task -> (promoted, from, to, reason fragment)
    "first": (True, None, "1.1", "alias 'production' did not exist yet"),
    "worse": (False, "1.1", "1.2", "score 0.4 is not above 0.5"),
    "equal": (False, "1.1", "1.3", "score 0.5 is not above 0.5"),
    "better": (True, "1.1", "1.4", "score 0.9 > 0.5 of the current production version 1.1 (full run on the same data)"),
    # 1.4 was never evaluated on this data: its full run's score (on its own split) is all there is, and the reason says so
    "evaluate_better": (True, "1.4", "1.2", "score 0.95 > 0.9 of the current production version 1.4 (full run on other data)"),
    "evaluate_worse": (False, "1.2", "1.4", "score 0.3 is not above 0.95 of the current production version 1.2 (evaluation on the same data, "),
    "unscored": (False, "1.2", "1.5", "has no score"),
    "forced": (True, "1.2", "1.6", "promote_if='always'"),
}


def test_promotion_through_the_operators(tmp_path, monkeypatch, capsys):
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)

    pushed = {op.task_id: {"return_value": op.execute(make_context("aicenter_test_promotion", op.task_id))}
              for op in promotion_tasks(small_dataset(tmp_path).as_uri())}
    captured = capsys.readouterr()
    output = captured.out + captured.err
    for task, (promoted, before, after, reason) in EXPECTED.items():
        value = pushed[task]["return_value"]
        assert value["promoted"] is promoted, (task, value["promotion"])
        assert (value["promotion"]["alias"], value["promotion"]["from"], value["promotion"]["to"]) == ("production", before, after)
        assert reason in value["promotion"]["reason"], (task, value["promotion"]["reason"])
        results = json.loads(registry.store.get_bytes(value["results_uri"].removeprefix(registry.store.uri + "/")))
        assert results["aicenter"]["promoted"] is promoted and results["aicenter"]["promotion"] == value["promotion"]
        assert "promoted" not in results["run_summary"]["outputs"] and "promotion" not in results["parameters"]
    assert pushed["unscored"]["return_value"]["score"] is None
    assert registry.get("scored", "1.5").score is None
    assert any("evaluation_data_directory is empty" in w for w in
               json.loads(registry.store.get_bytes(pushed["unscored"]["return_value"]["results_uri"]
                                                   .removeprefix(registry.store.uri + "/")))["aicenter"]["warnings"])
    assert "Promoted scored 'production': (none) -> 1.1" in output and "Not promoting scored 1.2 to 'production'" in output
    history = registry.alias_history("scored", "production")
    assert [(h.version, h.previous) for h in history] == [("1.1", None), ("1.4", "1.1"), ("1.2", "1.4"), ("1.6", "1.2")]
    assert history[1].set_by.startswith("run aicenter_test_promotion/manual__") and history[1].set_by.endswith("/better/1")
    assert registry.resolve("scored", "production").version == "1.6"
