"""Promotion (``promote_to`` / ``promote_if``): better promotes, worse does not, races lose nothing.

The scores are controlled: the package's evaluate() returns the run's ``SCORE`` env parameter.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from airflow_aicenter.errors import AlreadyExistsError, ConfigurationError, VersionError
from airflow_aicenter.promotion import promote, version_score
from airflow_aicenter.records import EvaluationRecord
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import SCORED_TRAIN, small_dataset, upload_package
from tests.conftest import write_files
from tests.operators.kube_api import make_context

HOLDOUT = "s3://b/churn-holdout"


def versions_with_scores(registry: Registry, tmp_path, scores: list[float | None]) -> list[str]:
    """1.1, 1.2, ... of package "scored", each with the given score of its full run on the same ``HOLDOUT``."""
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    base = registry.get("scored", "1.0")
    return [registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full", score=s,
                            evaluated_on=None if s is None else HOLDOUT).version for s in scores]


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
    assert better.reason == f"score 0.9 > 0.5 of the current production version 1.1 (on the same evaluation data {HOLDOUT})"
    again = promote(registry, "scored", "production", v5, score=0.95)
    assert not again.promoted and again.reason == "'production' already points at 1.5"

    # a later evaluation on the same data outranks the score the version's own run recorded
    registry.add_evaluation(EvaluationRecord(package="scored", version=v5, score=0.2, dataset=HOLDOUT))
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
    split = "s3://b/churn#process_data"

    def full(score: float, on: str) -> str:
        return registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full", score=score, evaluated_on=on).version

    v1 = full(0.9, split)
    assert promote(registry, "scored", "production", v1, score=0.9, evaluated_on=split).promoted
    registry.add_evaluation(EvaluationRecord(package="scored", version=v1, score=0.6, dataset=HOLDOUT))
    # 0.8 on its own split is compared with nothing: no common evaluation data, no training snapshots to match
    v2 = full(0.8, split)
    decision = promote(registry, "scored", "production", v2, score=0.8, evaluated_on=split)
    assert not decision.promoted
    assert decision.reason.startswith("1.2 and the current production version 1.1 were not scored on the same data "
                                      "(1.2: 0.8 on its own process_data split of s3://b/churn; 1.1: 0.6 on "
                                      f"{HOLDOUT}), so promote_if='better' cannot judge them; evaluate both on the same "
                                      "data: EvaluatePipelineOperator(task_id=..., package='scored', version='1.2', "
                                      f"evaluation_dataset='{HOLDOUT}')")
    # scored on the holdout: compared with production's holdout evaluation
    decision = promote(registry, "scored", "production", full(0.7, HOLDOUT), score=0.7, evaluated_on=HOLDOUT)
    assert decision.promoted
    assert decision.reason == f"score 0.7 > 0.6 of the current production version 1.1 (on the same evaluation data {HOLDOUT})"
    assert version_score(registry, "scored", v1).on == HOLDOUT
    assert registry.get("scored", v2).evaluated_on == split


def _race(registry: Registry, versions: list[str], scores: list, promote_if: str) -> tuple[list, int]:
    """All threads promote at once; returns their decisions and how many alias writes lost a race."""
    barrier, lock, lost = threading.Barrier(len(versions)), threading.Lock(), [0]
    put = registry.store.put_bytes
    writers: list[str] = []
    second_writer = threading.Event()

    def slow_put(key: str, data: bytes, *, create: bool = False) -> None:
        if create and "/aliases/" in key:
            with lock:
                writers.append(key)
                arrived = len(writers)
            if arrived == 1:  # the first writer waits for a second that read the same latest entry: a sure race
                second_writer.wait(timeout=10)
            elif arrived == 2:
                second_writer.set()
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
                                    env=env, promote_to="production", save_training_data=True, **kw)

    def evaluate(task_id, version, score):
        return EvaluatePipelineOperator(task_id=task_id, package="scored", version=version, env={"SCORE": score},
                                        evaluation_dataset=data, promote_to="production")

    return [
        full("first", "0.5"),                         # 1.1: no alias yet -> promoted
        full("worse", "0.4"),                         # 1.2: not promoted (the same training data, the same split)
        full("equal", "0.5"),                         # 1.3: not strictly better -> not promoted
        full("better", "0.9"),                        # 1.4: promoted over 1.1
        evaluate("evaluate_current", "1.4", "0.6"),   # production evaluated on the evaluation data
        evaluate("evaluate_better", "1.2", "0.95"),   # 1.2 on the same data: 0.95 > 0.6 -> promoted
        evaluate("evaluate_worse", "1.4", "0.3"),     # 0.3 < 0.95 (1.2's evaluation on the same data) -> not promoted
        full("unscored", "0.99", env={"EVAL_SPLIT": "0"}),  # 1.5: empty evaluation split -> score null, not promoted
        full("forced", "0.1", promote_if="always"),   # 1.6: promoted although worse
    ]


SAME_SPLIT = "(full-run scores on the same training data file://"
EXPECTED = {  # task -> (promoted, from, to, reason fragment)
    "first": (True, None, "1.1", "alias 'production' did not exist yet"),
    "worse": (False, "1.1", "1.2", "score 0.4 is not above 0.5"),
    "equal": (False, "1.1", "1.3", "score 0.5 is not above 0.5"),
    "better": (True, "1.1", "1.4", "score 0.9 > 0.5 of the current production version 1.1 " + SAME_SPLIT),
    "evaluate_current": (False, "1.4", "1.4", "'production' already points at 1.4"),
    # 1.4's full-run score (0.9, on its own split) is not what 1.2's evaluation is compared with: 1.4's evaluation is
    "evaluate_better": (True, "1.4", "1.2", "score 0.95 > 0.6 of the current production version 1.4 (on the same "
                                            "evaluation data file://"),
    "evaluate_worse": (False, "1.2", "1.4", "score 0.3 is not above 0.95 of the current production version 1.2 (on the "
                                            "same evaluation data file://"),
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


def test_operators_and_cli_give_the_same_answer_no_flip_flop(tmp_path, monkeypatch):
    """Issue 24 item 1: own full-run scores on different splits never decide; an evaluation on the same data does,
    the same way for the operators' promote_if='better' and `aicenter package promote`."""
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator

    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    week1 = small_dataset(tmp_path, "week1").as_uri()
    week2 = write_files(tmp_path / "week2", {"rows.csv": "x\n3\n4\n"}).as_uri()  # new data: another split
    holdout = small_dataset(tmp_path, "holdout").as_uri()

    def run(op):
        return op.execute(make_context("aicenter_test_flip_flop", op.task_id))

    def full(task_id, score, data):
        return run(FullPipelineOperator(task_id=task_id, package="scored", version="1.0", dataset=data,
                                        env={"SCORE": score}, promote_to="production", save_training_data=True))

    def evaluate(task_id, version, score):
        return run(EvaluatePipelineOperator(task_id=task_id, package="scored", version=version, env={"SCORE": score},
                                            evaluation_dataset=holdout, save_test_data=True, promote_to="production"))

    assert full("first", "0.8675", week1)["promoted"] is True  # 1.1: no alias yet
    second = full("second", "0.87", week2)  # 1.2: higher, but on its own split of other data
    assert second["promoted"] is False and "not scored on the same data" in second["promotion"]["reason"]
    assert "EvaluatePipelineOperator(" in second["promotion"]["reason"]
    assert registry.alias("scored", "production").version == "1.1"
    evaluate("evaluate_first", "1.1", "0.816667")
    last = evaluate("evaluate_second", "1.2", "0.813333")
    assert last["promoted"] is False
    reason = last["promotion"]["reason"]
    assert reason.startswith("score 0.813333 is not above 0.816667 of the current production version 1.1 "
                             f"(on the same evaluation data {holdout}, snapshot ")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    cli = [str(Path(sys.executable).parent / "aicenter"), "--storage", uri, "package", "promote"]
    refused = subprocess.run([*cli, "scored:1.2", "--alias", "production", "--json"], capture_output=True, text=True,
                             env=env, timeout=120, check=False)
    assert refused.returncode == 3, refused
    assert json.loads(refused.stdout)["reason"] == reason, "the CLI decides by the same rule, in the same words"
    assert registry.alias("scored", "production").version == "1.1"
    # the other way round both agree too: 1.1 is the better one on the same data
    registry.set_alias("scored", "production", "1.2", set_by="test")
    moved = subprocess.run([*cli, "scored:1.1", "--alias", "production"], capture_output=True, text=True, env=env,
                           timeout=120, check=False)
    assert moved.returncode == 0, moved
    assert "0.816667 > 0.813333" in moved.stdout and "same evaluation data" in moved.stdout
