"""Who and what started a run (issue 21): the triggering user, schedule or asset, the DAG run and task try, the
resolved version, and the run page's URL in the Asset event, recorded on the version, in outcome.json and in
``_results.json``.

The operator runs in this process (local launcher, real runtime child process) with the DAG run Airflow's task
runner puts in the context (the Task SDK's own ``DagRun`` model), on a real file store.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk.api.datamodels._generated import (
    AssetEventDagRunReference,
    AssetReferenceAssetEventDagRun,
    DagRun,
    DagRunState,
    DagRunType,
)

from airflow_aicenter.layout import OUTCOME, RESULTS
from airflow_aicenter.operators import EvaluatePipelineOperator, TrainPipelineOperator
from airflow_aicenter.records import Outcome, RunRef, VersionRecord, read
from airflow_aicenter.run_spec import trigger_of
from airflow_aicenter.runs import find_run
from tests.aicenter_helpers import small_dataset
from tests.operators.kube_api import make_context

RUN_ID = "manual__2026-03-01T00:00:00+00:00"
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def dag_run(run_type: DagRunType, user: str | None = None, *, dag_id: str = "aicenter_training",
            events: list[AssetEventDagRunReference] | None = None) -> DagRun:
    """The DAG run as Airflow's task runner hands it to the task (``context["dag_run"]``)."""
    return DagRun(
        dag_id=dag_id, run_id=RUN_ID, logical_date=NOW, data_interval_start=NOW, data_interval_end=NOW, run_after=NOW,
        start_date=NOW, end_date=None, run_type=run_type, state=DagRunState.RUNNING, triggering_user_name=user,
        consumed_asset_events=events or [], partition_key=None,
    )


def new_version_event(version: str) -> AssetEventDagRunReference:
    return AssetEventDagRunReference(
        asset=AssetReferenceAssetEventDagRun(name="aicenter://scored", uri="aicenter://scored/", extra={}),
        extra={"package": "scored", "version": version}, source_task_id="train", source_dag_id="aicenter_training",
        source_run_id="scheduled__2026-02-28T00:00:00+00:00", source_map_index=-1, source_aliases=[], timestamp=NOW,
    )


def run_task(op: Any, run: DagRun, task_id: str) -> tuple[Any, dict[str, Any]]:
    context = make_context(run.dag_id, task_id, run_id=RUN_ID)
    context["dag_run"] = run
    return op.execute(context), context


def test_a_training_triggered_by_a_person_records_them_on_the_version_the_outcome_and_the_results(scored_registry, tmp_path):
    op = TrainPipelineOperator(task_id="train", package="scored", dataset=small_dataset(tmp_path).as_uri())
    value, context = run_task(op, dag_run(DagRunType.MANUAL, "alice"), "train")

    version = scored_registry.get("scored", value["version"])
    assert version.created_by == "alice", "the person, not the DAG and task"
    assert version.run is not None and version.run.trigger is not None
    assert (version.run.trigger.by, version.run.trigger.user, version.run.trigger.run_type) == ("alice", "alice", "manual")
    store, prefix = scored_registry.store, version.run.prefix
    outcome = read(store, f"{prefix}/{OUTCOME}", Outcome)
    assert outcome.trigger == version.run.trigger, "a failed run's outcome says who started it too"
    assert (outcome.version, outcome.requested_version) == ("1.0", "latest"), "the version it resolved, and what was asked"
    aicenter = json.loads(store.get_bytes(f"{prefix}/{RESULTS}"))["aicenter"]
    assert aicenter["triggered_by"] == {"by": "alice", "run_type": "manual", "user": "alice", "assets": []}
    assert aicenter["run"] == {"dag_id": "aicenter_training", "run_id": RUN_ID, "task_id": "train", "try_number": 1,
                               "map_index": -1}, "the DAG run and task try: the pages link to the DAG run and the log"
    page = "https://airflow.example.com/team/aicenter/runs/aicenter_training/manual__2026-03-01T00%3A00%3A00%2B00%3A00/train/1"
    assert aicenter["run_url"] == page
    [extra] = [accessor.extra for accessor in context["outlet_events"].values()]  # a plain package name: its own asset
    assert extra["run_url"] == page, "the Asset event links to the run's page"
    assert extra["run_uri"] == store.url(prefix), "the run folder is kept under its own key"


@pytest.mark.parametrize("run_type, user, events, by", [
    (DagRunType.SCHEDULED, None, [], "schedule"),
    (DagRunType.ASSET_TRIGGERED, None, [new_version_event("1.0")], "asset aicenter://scored/"),
    (DagRunType.BACKFILL, "bob", [], "bob"),
])
def test_a_schedule_or_an_asset_is_recorded_as_what_started_the_run(scored_registry, tmp_path, run_type, user, events, by):
    op = EvaluatePipelineOperator(task_id="evaluate", package="scored", evaluation_dataset=small_dataset(tmp_path).as_uri(),
                                  env={"SCORE": "0.9"})
    run_task(op, dag_run(run_type, user, dag_id="aicenter_evaluate", events=events), "evaluate")

    [evaluation] = scored_registry.evaluations("scored", "1.0")
    assert evaluation.run is not None and evaluation.run.trigger is not None
    trigger = evaluation.run.trigger
    assert (trigger.by, trigger.run_type, trigger.user) == (by, run_type.value, user)
    if events:
        [asset] = trigger.assets
        assert (asset.uri, asset.dag_id, asset.task_id, asset.version) == (
            "aicenter://scored/", "aicenter_training", "train", "1.0"), "the run page can link to the run that made it"
    outcome = read(scored_registry.store, f"{evaluation.run.prefix}/{OUTCOME}", Outcome)
    assert outcome.trigger == trigger


def test_a_run_refused_after_resolving_records_the_resolved_version_and_who_started_it(scored_registry, tmp_path):
    op = TrainPipelineOperator(task_id="train", package="scored", dataset=(tmp_path / "typo").as_uri())
    with pytest.raises(Exception, match="is empty or does not exist"):
        run_task(op, dag_run(DagRunType.MANUAL, "alice"), "train")
    [key] = [i.key for i in scored_registry.store.list("runs") if i.key.endswith(OUTCOME)]
    outcome = read(scored_registry.store, key, Outcome)
    assert (outcome.status, outcome.version, outcome.requested_version) == ("failed", "1.0", "latest")
    assert outcome.trigger is not None and outcome.trigger.by == "alice"


def test_records_written_before_triggers_were_recorded_stay_readable():
    old_run = {"dag_id": "d", "run_id": "r", "task_id": "t", "try_number": 1, "map_index": -1, "uri": "file:///x"}
    version = VersionRecord.model_validate({"package": "p", "version": "1.1", "blob": {"sha256": "0" * 64, "size": 1},
                                            "run": old_run, "created_by": "d.t"})
    assert version.run == RunRef(**old_run) and version.run.trigger is None
    outcome = Outcome.model_validate({"status": "failed", "pipeline": "train", "package": "p", "version": "latest",
                                      "start_at": 1.0})
    assert outcome.trigger is None and outcome.requested_version is None


def test_the_run_records_show_who_started_a_run_its_dag_run_and_the_version_it_resolved(scored_registry, tmp_path):
    """What ``aicenter runs show --json`` and the run pages read (``runs.RunRecord.summary``), a failed run included."""
    ok = TrainPipelineOperator(task_id="train", package="scored", dataset=small_dataset(tmp_path).as_uri())
    run_task(ok, dag_run(DagRunType.MANUAL, "alice"), "train")
    refused = TrainPipelineOperator(task_id="typo", package="scored", dataset=(tmp_path / "typo").as_uri())
    with pytest.raises(Exception, match="is empty or does not exist"):
        run_task(refused, dag_run(DagRunType.SCHEDULED), "typo")
    # the refused run came after the training: "latest" was 1.1 by then
    for task_id, by, status, version in (("train", "alice", "succeeded", "1.0"), ("typo", "schedule", "failed", "1.1")):
        summary = find_run(scored_registry.store, f"aicenter_training/{RUN_ID}/{task_id}/1").summary()
        assert (summary["status"], summary["triggered_by"]) == (status, by)
        assert (summary["version"], summary["requested_version"]) == (version, "latest")
        assert summary["trigger"]["run_type"] == ("manual" if by == "alice" else "scheduled")
        assert summary["dag_run"] == {"dag_id": "aicenter_training", "run_id": RUN_ID, "task_id": task_id,
                                      "try_number": 1, "map_index": -1}


def test_what_started_a_dag_run_of_every_type_reads_as_one_line():
    """``trigger_of`` on the Task SDK's DagRun: a person wins over the run type; assets are named once each."""
    twice = [new_version_event("1.0"), new_version_event("1.1")]
    other = AssetEventDagRunReference(
        asset=AssetReferenceAssetEventDagRun(name="features", uri="s3://bucket/features", extra={}),
        extra={"version": "7"}, source_task_id=None, source_dag_id=None, source_run_id=None, source_map_index=None,
        source_aliases=[], timestamp=NOW,
    )
    cases = [
        (dag_run(DagRunType.OPERATOR_TRIGGERED), "operator_triggered"),
        (dag_run(DagRunType.ASSET_MATERIALIZATION, "carol"), "carol"),
        (dag_run(DagRunType.ASSET_TRIGGERED, events=[*twice, other]), "asset aicenter://scored/, s3://bucket/features"),
    ]
    for run, by in cases:
        trigger = trigger_of(run)
        assert trigger is not None and trigger.by == by
    assert [a.version for a in trigger.assets] == ["1.0", "1.1", None], "a version only from an aicenter event"
    assert trigger_of(None) is None
