"""promote_if="approved": the checks, the request a person reads, and how a decision is applied, on real stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from airflow_aicenter.approval import (
    APPROVE,
    REJECT,
    Candidate,
    Decision,
    apply_decision,
    approval_timeout,
    check_approval,
    check_hitl_version,
    decision_from_event,
    pending_request,
    request_body,
)
from airflow_aicenter.errors import ConfigurationError, VersionError
from airflow_aicenter.layout import OUTCOME, approval_key
from airflow_aicenter.plans import EVALUATE, FULL, TRAIN
from airflow_aicenter.promotion import promote
from airflow_aicenter.records import (
    EvaluationRecord,
    Manifest,
    ManifestEntry,
    Outcome,
    RunRef,
    VersionRecord,
    write,
)
from airflow_aicenter.registry import Registry


def run_ref(task: str) -> RunRef:
    return RunRef(dag_id="d", run_id="r", task_id=task, try_number=1)


def trained(registry: Registry, parent: VersionRecord, task: str, *, score: float, on: str, env: dict[str, str],
            files: dict[str, str]) -> VersionRecord:
    """A version made by a full run, with its run's outcome (env) and data snapshot manifest."""
    store, run = registry.store, run_ref(task)
    manifest_key = run.key("data_directory.manifest.json")
    entries = [ManifestEntry(path=p, sha256=d * 64, size=10) for p, d in files.items()]
    write(store, manifest_key, Manifest(source="file:///data", directory="data_directory", files=entries,
                                        file_count=len(entries), total_bytes=10 * len(entries)))
    write(store, run.key(OUTCOME), Outcome(status="succeeded", pipeline="full", package=parent.package,
                                           version=parent.version, start_at=0, env=env))
    return registry.commit(parent.package, parent=parent.version, blob=parent.blob, pipeline="full", run=run,
                           snapshot=store.url(manifest_key), score=score, evaluated_on=on)


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -5, timedelta(0), timedelta(seconds=-1), "7d", None, True, float("nan"),
                                   float("inf")])
def test_a_timeout_that_is_not_a_positive_duration_is_refused(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"not a positive duration.*timedelta"):
        approval_timeout(value)


def test_any_positive_timeout_works_seconds_included() -> None:
    assert approval_timeout(3) == timedelta(seconds=3)
    assert approval_timeout(0.5) == timedelta(seconds=0.5)
    assert approval_timeout(timedelta(days=7)) == timedelta(days=7)


def test_approved_without_promote_to_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"needs promote_to.*promote_to='production'"):
        check_approval(FULL, "FullPipelineOperator", None, "approved", timedelta(days=1))


def test_approved_on_a_training_run_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="FullPipelineOperator and EvaluatePipelineOperator"):
        check_approval(TRAIN, "TrainPipelineOperator", "production", "approved", 60)


def test_approved_on_full_and_evaluate_is_accepted() -> None:
    assert check_approval(FULL, "F", "production", "approved", 60) == timedelta(seconds=60)
    assert check_approval(EVALUATE, "E", "production", "approved", timedelta(hours=1)) == timedelta(hours=1)


@pytest.mark.parametrize("version", ["3.0.6", "2.10.5", "3.0", "nonsense"])
def test_airflow_older_than_the_hitl_support_is_refused_naming_the_version_needed(version: str) -> None:
    with pytest.raises(ConfigurationError, match=r"needs Airflow 3\.1 or later.*apache-airflow-providers-standard"):
        check_hitl_version(version)


@pytest.mark.parametrize("version", ["3.1.0", "3.3.2", "4.0.0"])
def test_airflow_with_hitl_is_accepted(version: str) -> None:
    check_hitl_version(version)


# -- the request ----------------------------------------------------------------------------
def test_the_request_compares_like_with_like_params_and_data(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    old = trained(registry, base, "old", score=0.80, on="s3://b/holdout/", env={"EPOCHS": "5", "LR": "0.1"},
                  files={"a.csv": "a", "b.csv": "b", "c.csv": "c"})
    registry.set_alias("churn", "production", old.version)
    new = trained(registry, base, "new", score=0.85, on="s3://b/holdout/", env={"EPOCHS": "9", "LR": "0.1", "SEED": "1"},
                  files={"a.csv": "a", "b.csv": "x", "d.csv": "d"})
    body = request_body(registry, Candidate(new, 0.85, "s3://b/holdout/", {"EPOCHS": "9", "LR": "0.1", "SEED": "1"},
                                            "/aicenter/runs/d/r/new/1"), "production", old, "/aicenter/runs/d/r/old/1")
    assert f"now points at **{old.version}**" in body
    assert "candidate 1.2: 0.85" in body and "current 1.1: 0.8" in body
    assert "scores higher (+0.05)" in body and "Not like with like" not in body
    assert "`EPOCHS`: `5` -> `9`" in body and "`SEED`: `(unset)` -> `1`" in body and "`LR`" not in body
    assert "added (1): `d.csv`" in body and "removed (1): `c.csv`" in body and "changed (1): `b.csv`" in body
    assert "[run page](/aicenter/runs/d/r/new/1)" in body and "[run page](/aicenter/runs/d/r/old/1)" in body


def test_the_request_says_plainly_when_scores_are_not_comparable(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    old = trained(registry, base, "old", score=0.9, on="s3://b/old-holdout/", env={}, files={"a.csv": "a"})
    registry.set_alias("churn", "production", old.version)
    new = trained(registry, base, "new", score=0.7, on="s3://b/new-holdout/", env={}, files={"a.csv": "a"})
    body = request_body(registry, Candidate(new, 0.7, "s3://b/new-holdout/", {}), "production", old, None)
    assert "**Not like with like**" in body and "not comparable" in body
    assert "The same parameters" in body and "The same 1 files" in body


def test_the_request_uses_an_evaluation_of_the_current_version_on_the_same_data(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    old = trained(registry, base, "old", score=0.9, on="s3://b/old-holdout/", env={}, files={"a.csv": "a"})
    registry.add_evaluation(EvaluationRecord(package="churn", version=old.version, score=0.6, dataset="s3://b/new/"))
    registry.set_alias("churn", "production", old.version)
    new = trained(registry, base, "new", score=0.7, on="s3://b/new/", env={}, files={"a.csv": "a"})
    body = request_body(registry, Candidate(new, 0.7, "s3://b/new/", {}), "production", old, None)
    assert "current 1.1: 0.6 (evaluation of " in body and "On the same evaluation data s3://b/new/" in body
    assert "Not like with like" not in body


def test_the_request_for_a_new_alias_and_an_uploaded_current_version(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    new = trained(registry, base, "new", score=0.7, on="s3://b/h/", env={"A": "1"}, files={"a.csv": "a"})
    body = request_body(registry, Candidate(new, 0.7, "s3://b/h/", {"A": "1"}), "production", None, None)
    assert "does not exist yet: approving creates it" in body
    registry.set_alias("churn", "production", "1.0")
    body = request_body(registry, Candidate(new, 0.7, "s3://b/h/", {"A": "1"}), "production", base, None)
    assert "no parameters to compare" in body and "No snapshot to compare for 1.0" in body


# -- the decision ---------------------------------------------------------------------------
def asked(registry: Registry, version: str) -> None:
    registry.request_approval(pending_request("churn", version, "production", run_ref("new")))


def test_approve_moves_the_alias_and_keeps_who_when_and_the_comment(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    registry.set_alias("churn", "production", "1.0")
    new = trained(registry, base, "new", score=0.7, on="x", env={}, files={})
    asked(registry, new.version)
    assert registry.approval("churn", new.version).status == "pending"
    assert [p.version for p in registry.pending_approvals("churn")] == [new.version]
    at = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    kept, promotion = apply_decision(registry, registry.approval("churn", new.version), Decision(True, "ada", at, "looks good"))
    assert kept.status == "approved" and kept.by == "ada" and kept.at == at and kept.comment == "looks good"
    assert promotion.promoted and promotion.from_version == "1.0"
    current = registry.alias("churn", "production")
    assert current.version == new.version and current.set_by == "ada"
    assert current.reason == "approved by ada at 2026-12-07 10:00:00 UTC: looks good"
    assert registry.pending_approvals("churn") == []
    # Applied again (a retried resume): nothing moves twice, the first decision stays.
    again, _ = apply_decision(registry, registry.approval("churn", new.version), Decision(False, "bob", at, "no"))
    assert again.status == "approved" and again.by == "ada"
    assert len(registry.alias_history("churn", "production")) == 2


def test_reject_leaves_the_alias_and_promote_never_moves_a_rejected_version(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    registry.set_alias("churn", "production", "1.0")
    new = trained(registry, base, "new", score=0.99, on="x", env={}, files={})
    asked(registry, new.version)
    kept, promotion = apply_decision(registry, registry.approval("churn", new.version),
                                     Decision(False, "ada", datetime.now(UTC), "leaks the label"))
    assert kept.status == "rejected" and not promotion.promoted
    assert registry.alias("churn", "production").version == "1.0"
    for promote_if in ("better", "always"):
        refused = promote(registry, "churn", "production", new.version, score=0.99, promote_if=promote_if)
        assert not refused.promoted and "was rejected" in refused.reason and "leaks the label" in refused.reason
    assert registry.alias("churn", "production").version == "1.0"
    forced = promote(registry, "churn", "production", new.version, score=0.99, promote_if="always", force=True)
    assert forced.promoted and registry.alias("churn", "production").version == new.version


def test_a_timeout_rejects(registry: Registry) -> None:
    base = registry.get("churn", "1.0")
    new = trained(registry, base, "new", score=0.7, on="x", env={}, files={})
    asked(registry, new.version)
    event = {"chosen_options": [REJECT], "params_input": {"comment": ""}, "responded_at": datetime.now(UTC),
             "responded_by_user": None, "timedout": True}
    decision = decision_from_event(event)
    assert decision.timed_out and not decision.approved and decision.by is None
    kept, promotion = apply_decision(registry, registry.approval("churn", new.version), decision, timedelta(seconds=5))
    assert kept.status == "rejected" and kept.reason == "no decision within 0:00:05 (the request timed out)"
    assert registry.alias("churn", "production") is None
    # The provider's timeout error event (no defaults) rejects too.
    assert decision_from_event({"error": "timeout passed", "error_type": "timeout"}).timed_out


def test_the_response_event_reads_the_person_and_the_comment() -> None:
    event = {"chosen_options": [APPROVE], "params_input": {"comment": "ship it"}, "responded_at": "2026-12-07T10:00:00+00:00",
             "responded_by_user": {"id": "1", "name": "ada"}, "timedout": False}
    decision = decision_from_event(event)
    assert decision.approved and decision.by == "ada" and decision.comment == "ship it"
    assert decision.at == datetime(2026, 12, 7, 10, tzinfo=UTC)


def test_promote_if_approved_never_moves_the_alias_by_itself(registry: Registry) -> None:
    decision = promote(registry, "churn", "production", "1.0", score=1.0, promote_if="approved")
    assert not decision.promoted and "waiting for a person's approval" in decision.reason
    assert registry.alias("churn", "production") is None


def test_an_approval_needs_its_version_and_is_kept_beside_it(registry: Registry) -> None:
    with pytest.raises(VersionError, match=r"1\.7"):
        registry.request_approval(pending_request("churn", "1.7", "production", None))
    asked(registry, "1.0")
    assert registry.store.exists(approval_key("churn", "1.0", "request"))
    assert not registry.store.exists(approval_key("churn", "1.0", "decision"))
    # A retried task's request keeps the first one.
    first = registry.approval("churn", "1.0")
    asked(registry, "1.0")
    assert registry.approval("churn", "1.0") == first


# -- the operators refuse bad input when the DAG is parsed ---------------------------------
def test_the_operators_refuse_bad_approval_arguments() -> None:
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator

    with pytest.raises(ConfigurationError, match="needs promote_to"):
        FullPipelineOperator(task_id="f", package="churn", dataset="file:///d", promote_if="approved")
    with pytest.raises(ConfigurationError, match="not a positive duration"):
        FullPipelineOperator(task_id="f", package="churn", dataset="file:///d", promote_to="production",
                             promote_if="approved", approval_timeout=-1)
    with pytest.raises(ConfigurationError, match="FullPipelineOperator and EvaluatePipelineOperator"):
        TrainPipelineOperator(task_id="t", package="churn", dataset="file:///d", promote_to="production",
                              promote_if="approved")
    task = EvaluatePipelineOperator(task_id="e", package="churn", evaluation_dataset="file:///d",
                                    promote_to="production", promote_if="approved", approval_timeout=5)
    assert task.approval_timeout == timedelta(seconds=5)


def test_the_example_dag_retrains_waits_for_a_person_then_predicts_with_production() -> None:
    from tests.aicenter_helpers import example_task

    retrain = example_task("aicenter_approval", "retrain")
    assert retrain.promote_if == "approved" and retrain.promote_to == "production"
    assert retrain.approval_timeout == timedelta(days=3)
    assert retrain.dag.timetable.expression == "0 3 * * 1"
    score = example_task("aicenter_approval", "score_inbox")
    assert score.version == "production" and "retrain" in score.upstream_task_ids


def test_verify_reads_the_approval_records_and_names_a_damaged_one(registry: Registry) -> None:
    from airflow_aicenter.verify import verify

    asked(registry, "1.0")
    report = verify(registry.store)
    assert report.records.get("approval") == 1 and not report.damage
    registry.store.put_bytes(approval_key("churn", "1.0", "decision"), b'{"status": "maybe"}')
    damaged = verify(registry.store).damage
    assert [(d.record, d.key) for d in damaged] == [("approval", approval_key("churn", "1.0", "decision"))]


def completion(registry: Registry, candidate: VersionRecord, *, made: bool, score: float) -> tuple[object, object]:
    """What PostRun.complete returned for a full run (``made``: the candidate is its new version) or an evaluation."""
    from typing import Any, cast

    from airflow_aicenter.completion import Completion, RunRequest

    plan = FULL if made else EVALUATE
    request = RunRequest(plan=plan, package="churn", dataset="s3://b/d/", evaluation_dataset="s3://b/h/",
                         env={"EPOCHS": "3", "API_TOKEN": "s3cret"}, promote_to="production", promote_if="approved")
    outcome = Outcome(status="succeeded", pipeline=plan.name, package="churn", version=candidate.version, start_at=0,
                      score=score)
    parent = registry.get("churn", candidate.parent or candidate.version) if made else candidate
    done = Completion({"version": candidate.version}, cast(Any, None), parent, candidate if made else None, outcome,
                      run_url="/aicenter/runs/x")
    return request, done


def test_open_request_for_an_evaluation_asks_about_the_evaluated_version_once(registry: Registry) -> None:
    from airflow_aicenter.approval import open_request

    base = registry.get("churn", "1.0")
    new = trained(registry, base, "new", score=0.7, on="s3://b/h/", env={"EPOCHS": "3"}, files={"a.csv": "a"})
    request, done = completion(registry, new, made=False, score=0.75)
    asking = open_request(registry, request, done, run_ref("eval"), lambda run: f"/aicenter/runs/{run.task_id}")
    assert asking is not None
    pending, body = asking
    assert pending.version == new.version and pending.status == "pending" and pending.run == run_ref("eval")
    assert "candidate 1.1: 0.75 (on `s3://b/h/`)" in body
    # decided: never asked again, and a rejected version stays rejected
    apply_decision(registry, pending, Decision(False, "ada", datetime.now(UTC), "no"))
    assert open_request(registry, request, done, run_ref("eval2"), str) is None
    assert registry.approval("churn", new.version).status == "rejected"


def test_open_request_for_a_full_run_masks_secrets_and_skips_an_alias_already_there(registry: Registry) -> None:
    from airflow_aicenter.approval import open_request

    base = registry.get("churn", "1.0")
    registry.set_alias("churn", "production", "1.0")
    new = registry.commit("churn", parent="1.0", blob=base.blob, pipeline="full", run=run_ref("new"), score=0.8)
    request, done = completion(registry, new, made=True, score=0.8)
    asking = open_request(registry, request, done, run_ref("new"), str)
    assert asking is not None
    body = asking[1]
    assert "s3cret" not in body and "`EPOCHS=3`" not in body  # current 1.0 was uploaded: nothing to compare
    assert "no parameters to compare" in body
    registry.set_alias("churn", "production", new.version)
    assert open_request(registry, request, done, run_ref("new"), str) is None
    # a new alias: the candidate's parameters are listed, secrets masked
    from dataclasses import replace

    asking = open_request(registry, replace(request, promote_to="staging"), done, run_ref("new"), str)
    assert asking is not None and "`EPOCHS=3`" in asking[1] and "API_TOKEN=***" in asking[1] and "s3cret" not in asking[1]


def test_the_answer_is_kept_noted_in_the_results_and_returned_with_the_value(registry: Registry) -> None:
    """What the task does when it resumes (approval.settle): the operator only publishes what it returns."""
    import logging

    from airflow_aicenter.approval import settle
    from airflow_aicenter.records import Results, read

    store, base = registry.store, registry.get("churn", "1.0")
    registry.set_alias("churn", "production", "1.0")
    new = trained(registry, base, "new", score=0.7, on="x", env={}, files={})
    asked(registry, new.version)
    results_key = run_ref("new").key("_results.json")
    write(store, results_key, Results.model_validate({
        "parameters": {"pipeline": "d.new", "inputs": {"package": "churn", "version": "1.0", "gpu": "False"}, "env": {}},
        "run_summary": {"execution_time": 1, "start_at": 0, "end_at": 1, "outputs": {"package": "churn", "version": new.version}},
        "aicenter": {"promoted": False},
    }))
    value = {"package": "churn", "version": new.version, "results_uri": store.url(results_key), "score": 0.7}
    event = {"chosen_options": [APPROVE], "params_input": {"comment": "ship it"}, "responded_at": "2026-12-07T10:00:00+00:00",
             "responded_by_user": {"id": "1", "name": "ada"}, "timedout": False}
    decided = settle(registry, value, "production", event, timedelta(days=7), logging.getLogger("test"))
    assert decided["score"] == 0.7 and decided["promoted"] is True
    assert (decided["promotion"]["from"], decided["promotion"]["to"]) == ("1.0", new.version)
    assert (decided["approval"]["status"], decided["approval"]["by"], decided["approval"]["comment"]) == ("approved", "ada",
                                                                                                          "ship it")
    assert registry.alias("churn", "production").version == new.version
    noted = read(store, results_key, Results).aicenter
    assert noted["approval"] == decided["approval"] and noted["promoted"] is True
    # a retried resume with another answer: the first decision stands, nothing moves twice
    again = settle(registry, value, "production", {**event, "chosen_options": [REJECT]}, None, logging.getLogger("test"))
    assert again["approval"]["by"] == "ada" and again["promoted"] is True
    assert len(registry.alias_history("churn", "production")) == 2


def test_the_required_actions_page_names_the_task_instance_quoted() -> None:
    from types import SimpleNamespace

    from airflow_aicenter.approval import required_actions_url

    ti = SimpleNamespace(dag_id="retrain", run_id="manual__2026-12-07T10:00:00+00:00", task_id="group.full")
    assert required_actions_url("https://airflow.example.com", ti) == (
        "https://airflow.example.com/dags/retrain/runs/manual__2026-12-07T10%3A00%3A00%2B00%3A00/tasks/group.full/"
        "required_actions"
    )
