"""dags/aicenter_retraining.py as shipped, on the embedded default (no connection: $AIRFLOW_HOME/aicenter).

The loop: the cron DAG retrains and promotes; its Asset event is recorded and queues the
asset-scheduled DAG; the scheduler's own asset-triggered run creation makes that DAG's run,
which evaluates exactly the version named in the event. Without an event (run by hand) the
asset-scheduled DAG falls back to its ``version`` param.

The cron DAG runs once through ``airflow dags test`` (the smoke run of the full pipeline, promotion,
the Asset event and the extra links), the triggered run through ``airflow tasks test``; the run by
hand and the later weeks' retraining runs run the DAGs' own tasks (parsed from dags/, templates
rendered) in process against the same store. Every week's version is scored on the same fixed
holdout, so the one rule of "better" (promotion.compare: the same evaluation data) decides: a worse
week is refused, a better one becomes production on its own.
"""

from __future__ import annotations

import csv
import json
import random
import shutil

import pytest

from airflow_aicenter.promotion import measurements
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import asset_events, dag_paused, example_task, queued_for, run_task, task_states, xcoms
from tests.conftest import EXAMPLE_PACKAGE, make_dataset

pytestmark = pytest.mark.airflow

CONSUMER = "aicenter_evaluate_new_version"

#: What the scheduler does for asset-triggered DAGs (SchedulerJobRunner._create_dag_runs_asset_triggered),
#: without starting a scheduler and an API server: find DAGs whose queued asset events are due, create their runs.
TRIGGER_ASSET_RUNS = '''
import json
from airflow.models.dag import DagModel
from airflow.jobs.job import Job
from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
from airflow.utils.session import create_session

with create_session() as session:
    query, triggered = DagModel.dags_needing_dagruns(session)
    due = [d for d in query.all() if d.dag_id in triggered]
    SchedulerJobRunner(job=Job())._create_dag_runs_asset_triggered(dag_models=due, session=session)
with create_session() as session:
    from sqlalchemy import select
    from airflow.models.dagrun import DagRun
    runs = session.scalars(select(DagRun).where(DagRun.run_type == "asset_triggered")).all()
    print("RUNS=" + json.dumps([{"dag_id": r.dag_id, "run_id": r.run_id, "events": [e.extra for e in r.consumed_asset_events]}
                               for r in runs]))
'''


def test_retraining_promotes_and_each_new_version_is_evaluated(airflow_env, monkeypatch):
    home = airflow_env.home
    shutil.rmtree(home / "aicenter", ignore_errors=True)  # the embedded default store, ours alone
    for name, seed in (("churn", 7), ("churn-holdout", 8)):  # where the DAGs' default params point
        shutil.rmtree(home / "aicenter-datasets" / name, ignore_errors=True)
        make_dataset(home / "aicenter-datasets" / name, rows=300, seed=seed)
    registry = Registry(open_store(airflow_env.default_store_uri))
    registry.upload(EXAMPLE_PACKAGE, "churn")
    # A paused DAG is not queued by asset events, and new DAGs start paused: unpause the consumer if an
    # earlier test already made it, else have `dags test` (which syncs the whole dags folder) create it unpaused.
    if dag_paused(home, CONSUMER):
        done = airflow_env.run("airflow", "dags", "unpause", CONSUMER)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    unpaused = {"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"}

    # 1. the cron DAG, unchanged: full pipeline, promoted (no production yet), Asset event. The first week is
    #    a small one (40 customers), scored on the DAG's default holdout
    first_week = make_dataset(home / "aicenter-datasets" / "churn-week-1", rows=40, seed=7).parent
    done = airflow_env.dags_test("aicenter_retraining", {"dataset": first_week.as_uri()}, extra_env=unpaused)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    retrain = xcoms(home, "aicenter_retraining")["retrain"]
    value = retrain["return_value"]
    assert value["version"] == "1.1" and 0.6 < value["score"] <= 1.0
    assert value["promoted"] is True and value["promotion"]["to"] == "1.1" and value["promotion"]["from"] is None
    assert registry.resolve("churn", "production").version == "1.1"
    # scored on the fixed holdout (the DAG's evaluation_dataset), snapshotted so that its content identifies it
    holdout_uri = (home / "aicenter-datasets" / "churn-holdout").as_uri()
    assert registry.get("churn", "1.1").evaluated_on == holdout_uri
    snapshot = next(m.digest for m in measurements(registry, "churn", "1.1") if m.data == holdout_uri)
    assert snapshot is not None
    results = json.loads(registry.store.get_bytes(value["results_uri"].removeprefix(registry.store.uri + "/")))
    assert results["aicenter"]["promotion"] == value["promotion"]
    # the extra links open the run's page in the Airflow UI (same origin), computed from the task instance alone
    assert retrain["_link_ResultsLink"].startswith("/plugin/ml-packages/aicenter/runs/aicenter_retraining/")
    assert retrain["_link_ResultsLink"].endswith("/retrain/1") and retrain["_link_ArtifactsLink"].endswith("/retrain/1#artifacts")
    events = asset_events(home, "aicenter://churn/")
    assert events[-1]["dag_id"] == "aicenter_retraining" and events[-1]["extra"]["version"] == "1.1"
    assert events[-1]["extra"]["score"] == value["score"]
    assert dag_paused(home, CONSUMER) is False
    assert queued_for(home, CONSUMER) == 1, "the event queued the asset-scheduled DAG"

    # 2. the asset-scheduled DAG by hand (its task in this process, on the same store): no event, so the
    #    version param ("latest") is evaluated
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": registry.store.uri}}))
    holdout = {"evaluation_dataset": holdout_uri}  # both DAGs' default in $AIRFLOW_HOME, which this process does not set
    manual, _ = run_task(example_task(CONSUMER, "evaluate", "aicenter_retraining"), holdout)
    assert manual["version"] == "1.1" and manual["promoted"] is True and manual["promotion"]["alias"] == "staging"

    # 3. a newer version without an event: "latest" would now be 2.0 (untrained; evaluating it fails)
    assert registry.upload(EXAMPLE_PACKAGE, "churn").version == "2.0"

    # 4. the scheduler turns the queued event into a run; that run evaluates the event's version
    done = airflow_env.run("python", "-c", TRIGGER_ASSET_RUNS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    created = json.loads(done.stdout.split("RUNS=", 1)[1])
    [run] = [r for r in created if r["dag_id"] == CONSUMER]
    assert run["events"][-1]["version"] == "1.1"
    done = airflow_env.run("airflow", "tasks", "test", CONSUMER, "evaluate", run["run_id"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert task_states(home, CONSUMER, run["run_id"]) == {"evaluate": "success"}
    triggered = xcoms(home, CONSUMER, run["run_id"])["evaluate"]["return_value"]
    assert triggered["version"] == "1.1", "the version came from the event, not from the param"
    assert triggered["promoted"] is False and triggered["promotion"]["reason"] == "'staging' already points at 1.1"
    assert [e.run.run_id for e in registry.evaluations("churn", "1.1")][-1] == run["run_id"]
    assert queued_for(home, CONSUMER) == 0

    # 5. a bad week of data (labels shuffled: nothing to learn): a new version, scored on the same fixed holdout
    #    as production's 1.1, worse there, so production stays (the one rule of "better": same evaluation data)
    bad = make_dataset(home / "aicenter-datasets" / "churn-shuffled", rows=300, seed=9)
    rows = list(csv.DictReader(bad.open()))
    labels = [r["churned"] for r in rows]
    random.Random(5).shuffle(labels)
    with bad.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "churned": label} for r, label in zip(rows, labels))
    worse, _ = run_task(example_task("aicenter_retraining", "retrain"), {**holdout, "dataset": bad.parent.as_uri()},
                        run_id="scheduled__2026-03-02T03:00:00+00:00")
    assert worse["version"] == "2.1" and worse["score"] < value["score"]
    assert registry.get("churn", "2.1").evaluated_on == holdout_uri
    assert worse["promoted"] is False and worse["promotion"]["from"] == "1.1"
    assert worse["promotion"]["reason"] == (
        f"score {worse['score']:.6g} is not above {value['score']:.6g} of the current production version 1.1 "
        f"(on the same evaluation data {holdout_uri}, snapshot {snapshot[:12]})"
    )
    assert registry.resolve("churn", "production").version == "1.1"

    # 6. a good week (30 times the first week's customers; the weights carried on from the latest version):
    #    better on the same holdout, so production moves on its own
    good = make_dataset(home / "aicenter-datasets" / "churn-week-10", rows=1200, seed=10).parent
    better, _ = run_task(example_task("aicenter_retraining", "retrain"), {**holdout, "dataset": good.as_uri(), "epochs": 300},
                         run_id="scheduled__2026-03-09T03:00:00+00:00")
    assert better["version"] == "2.2" and better["score"] > value["score"], (better["score"], value["score"])
    assert better["promoted"] is True and (better["promotion"]["from"], better["promotion"]["to"]) == ("1.1", "2.2")
    assert better["promotion"]["reason"] == (
        f"score {better['score']:.6g} > {value['score']:.6g} of the current production version 1.1 "
        f"(on the same evaluation data {holdout_uri}, snapshot {snapshot[:12]})"
    )
    assert registry.resolve("churn", "production").version == "2.2"
    assert [h.version for h in registry.alias_history("churn", "production")] == ["1.1", "2.2"]
