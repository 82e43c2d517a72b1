"""The post-run step without Airflow (airflow_aicenter/completion.py), on real stores (file and S3).

A run's ending is built with records.Outcome as the runtime would report it; PostRun registers,
promotes, writes ``_results.json`` and returns the one value the operator publishes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_aicenter.completion import Completion, LineageDataset, PostRun, Recovered, RunRequest, lineage
from airflow_aicenter.errors import ConfigurationError, RunError, StorageError
from airflow_aicenter.layout import OUTCOME, REGISTRATION, RESULTS, blob_key
from airflow_aicenter.plans import EVALUATE, FULL, PREDICT, TRAIN, PipelinePlan
from airflow_aicenter.promotion import promote
from airflow_aicenter.records import BlobRef, Outcome, Registration, RunRef, Trigger, read, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.secrets import MASK
from airflow_aicenter.storage import Store

DATA = "s3://data/train/"
EVAL = "s3://data/eval/"
SECRET = "pa55-w0rd-value"


def ref(store: Store, try_number: int = 1, task_id: str = "task") -> RunRef:
    run = RunRef(dag_id="dag", run_id="manual__1", task_id=task_id, try_number=try_number)
    run.uri = store.url(run.prefix)
    return run


def request(plan: PipelinePlan, **fields) -> RunRequest:
    datasets = {"dataset": DATA, "evaluation_dataset": EVAL}
    given = {attr: datasets[attr] for attr in plan.datasets}
    return RunRequest(plan=plan, package="scored", env={"EPOCHS": "3", "API_TOKEN": SECRET}, **{**given, **fields})


def outcome(scored_registry: Registry, plan: PipelinePlan, status: str = "succeeded", **fields) -> Outcome:
    """What the runtime reports: a version-making run uploads the new package content (here: 1.0's blob)."""
    blob = scored_registry.get("scored", "1.0").blob if plan.makes_version else None
    return Outcome(status=status, pipeline=plan.name, package="scored", version="1.0", start_at=100.0, end_at=160.0,
                   blob=blob, **fields)


def results_of(store: Store, run: RunRef) -> dict:
    return json.loads(store.get_bytes(run.key(RESULTS)))


def test_a_training_run_registers_one_version_and_publishes_it(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    ended = outcome(scored_registry, TRAIN, snapshots={"data_directory": "s3://store/snap.json"}, warnings=["few rows"])
    done = PostRun(scored_registry, request(TRAIN)).complete(run, ended, "1.0")

    assert isinstance(done, Completion) and done.parent.version == "1.0" and done.promotion is None
    new = scored_registry.get("scored", "1.1")
    assert done.new_version == new and (new.parent, new.pipeline, new.run) == ("1.0", "train", run)
    assert new.snapshot == "s3://store/snap.json" and new.score is None and new.evaluated_on is None
    assert new.created_by == "dag.task"
    assert read(store, run.key(REGISTRATION), Registration).version == "1.1"
    assert done.value == {
        "package": "scored",
        "version": "1.1",
        "package_uri": store.url(blob_key(new.blob.sha256)),
        "results_uri": store.url(run.key(RESULTS)),
        "artifacts_uri": store.url(run.key("artifacts/")),
        "snapshot_uri": "s3://store/snap.json",
        "score": None,
        "run_uri": run.uri,
    }
    assert done.event == {"package": "scored", "version": "1.1", "parent": "1.0", "score": None, "run_url": None,
                          "run_uri": run.uri}
    results = results_of(store, run)
    assert results == json.loads(done.results.model_dump_json(exclude_unset=True))
    assert results["parameters"] == {
        "pipeline": "dag.task",
        "inputs": {"package": "scored", "version": "1.0", "gpu": "False", "train_data": DATA},
        "env": {"EPOCHS": "3", "API_TOKEN": MASK},
    }
    assert results["run_summary"] == {
        "execution_time": 60.0,
        "start_at": 100,
        "end_at": 160,
        "outputs": {"artifacts_data": done.value["artifacts_uri"], "package": "scored", "version": "1.1",
                    "train_data": "s3://store/snap.json"},
    }
    assert results["aicenter"]["pipeline_type"] == "train" and results["aicenter"]["warnings"] == ["few rows"]
    assert results["aicenter"]["requested_version"] == "latest" and "promoted" not in results["aicenter"]

    # the same run completed again (a retried worker): the same version, no second one
    again = PostRun(scored_registry, request(TRAIN)).complete(run, ended, "1.0")
    assert again.new_version == new and [v.version for v in scored_registry.versions("scored")] == ["1.0", "1.1"]


def test_a_full_run_records_its_score_and_the_data_it_was_measured_on(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    own_split = PostRun(scored_registry, request(FULL)).complete(run, outcome(scored_registry, FULL, score=0.8), "1.0")
    assert own_split.new_version is not None
    assert (own_split.new_version.score, own_split.new_version.evaluated_on) == (0.8, f"{DATA}#process_data")
    outputs = results_of(store, run)["run_summary"]["outputs"]
    assert outputs["score"] == 0.8 and set(outputs) == {
        "artifacts_data", "package", "version", "train_data", "evaluation_data", "score"
    }
    assert results_of(store, run)["parameters"]["inputs"]["evaluation_data"] is None

    second = ref(store, task_id="with_eval")
    given = PostRun(scored_registry, request(FULL, evaluation_dataset=EVAL)).complete(second, outcome(scored_registry, FULL, score=0.7), "1.0")
    assert given.new_version is not None and given.new_version.evaluated_on == EVAL
    assert results_of(store, second)["parameters"]["inputs"]["evaluation_data"] == EVAL


def test_an_evaluation_makes_no_version_and_records_an_evaluation(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    done = PostRun(scored_registry, request(EVALUATE)).complete(run, outcome(scored_registry, EVALUATE, score=0.6), "1.0")
    assert done.new_version is None and done.event is None
    assert done.value["version"] == "1.0" and done.value["score"] == 0.6
    assert [v.version for v in scored_registry.versions("scored")] == ["1.0"]
    [evaluation] = scored_registry.evaluations("scored", "1.0")
    assert (evaluation.score, evaluation.dataset, evaluation.run) == (0.6, EVAL, run)
    results = results_of(store, run)
    assert results["parameters"]["inputs"] == {"package": "scored", "version": "1.0", "gpu": "False", "evaluation_data": EVAL}
    assert set(results["run_summary"]["outputs"]) == {"artifacts_data", "package", "version", "evaluation_data", "score"}
    assert results["aicenter"]["pipeline_type"] == "evaluate"


def test_a_prediction_publishes_its_counts(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    ended = outcome(scored_registry, PREDICT, predicted=7, failed=2, distributed={"nodes": 1, "procs_per_node": 2, "world_size": 2})
    done = PostRun(scored_registry, request(PREDICT, gpu=1)).complete(run, ended, "1.0")
    predictions = store.url(run.key("predictions/"))
    assert done.new_version is None and done.event is None and not scored_registry.evaluations("scored", "1.0")
    assert (done.value["predictions_uri"], done.value["predicted"], done.value["failed"]) == (predictions, 7, 2)
    results = results_of(store, run)
    assert results["parameters"]["inputs"] == {"package": "scored", "version": "1.0", "gpu": "True", "inference_data": DATA}
    assert results["run_summary"]["outputs"] == {
        "artifacts_data": store.url(run.key("artifacts/")), "package": "scored", "version": "1.0",
        "predictions_data": predictions, "predicted": 7, "failed": 2,
    }
    aicenter = results["aicenter"]
    assert (aicenter["predictions_uri"], aicenter["predicted"], aicenter["failed"]) == (predictions, 7, 2)
    assert aicenter["distributed"] == {"nodes": 1, "procs_per_node": 2, "world_size": 2}


def test_promotion_is_decided_and_reported_in_the_value_and_the_results(scored_registry: Registry):
    store = scored_registry.store
    first_run, worse_run = ref(store, task_id="first"), ref(store, task_id="worse")
    first = PostRun(scored_registry, request(FULL, promote_to="production")).complete(first_run, outcome(scored_registry, FULL, score=0.8), "1.0")
    assert first.promotion is not None and first.promotion.promoted
    assert first.value["promoted"] is True
    assert first.value["promotion"] == {"alias": "production", "from": None, "to": "1.1",
                                        "reason": "score 0.8; alias 'production' did not exist yet"}
    assert results_of(store, first_run)["aicenter"]["promotion"] == first.value["promotion"]
    assert scored_registry.resolve("scored", "production").version == "1.1"
    assert scored_registry.alias("scored", "production").set_by == f"run {first_run.path.id}"

    worse = PostRun(scored_registry, request(FULL, promote_to="production")).complete(worse_run, outcome(scored_registry, FULL, score=0.5), "1.0")
    assert worse.value["promoted"] is False and worse.value["promotion"]["from"] == "1.1"
    # each full run scored its own split of data no snapshot identifies: not comparable, so not promoted (promotion.compare)
    assert worse.value["promotion"]["reason"].startswith("1.2 and the current production version 1.1 were not scored on "
                                                         "the same data (1.2: 0.5 on its own process_data split of ")
    assert results_of(store, worse_run)["aicenter"]["promoted"] is False
    assert scored_registry.resolve("scored", "production").version == "1.1"

    # an evaluation promotes the version it evaluated, always
    always = PostRun(scored_registry, request(EVALUATE, promote_to="staging", promote_if="always"))
    done = always.complete(ref(store, task_id="eval"), outcome(scored_registry, EVALUATE, score=None), "1.0")
    assert done.value["promoted"] is True and scored_registry.resolve("scored", "staging").version == "1.0"


def test_a_retry_reports_the_promotion_its_earlier_attempt_made(scored_registry: Registry):
    """Try 1 promoted, then died before writing its results; try 2 must not report "not promoted"."""
    base = scored_registry.get("scored", "1.0")
    v1, v2 = (scored_registry.commit("scored", parent="1.0", blob=base.blob, pipeline="full", score=s,
                                   evaluated_on="s3://b/holdout").version for s in (0.5, 0.6))
    assert promote(scored_registry, "scored", "production", v1, score=0.5).promoted
    post = PostRun(scored_registry, request(EVALUATE, requested_version=v2, promote_to="production"))
    ended = Outcome(status="succeeded", pipeline="evaluate", package="scored", version=v2, start_at=0, score=0.9)
    tries = [RunRef(dag_id="d", run_id="r", task_id="evaluate", try_number=n) for n in (1, 2)]
    first = post.promote(tries[0], scored_registry.get("scored", v2), ended)
    assert first is not None and first.promoted and first.from_version == v1
    retried = post.promote(tries[1], scored_registry.get("scored", v2), ended)
    assert retried is not None and retried.promoted and (retried.from_version, retried.to_version) == (v1, v2)
    assert retried.reason.startswith("promoted by an earlier attempt of this task (run d/r/evaluate/1; ")
    assert [h.version for h in scored_registry.alias_history("scored", "production")] == [v1, v2], "no second alias entry"
    # another task finding the alias already at that version did not promote it
    other = RunRef(dag_id="d", run_id="r", task_id="evaluate_again")
    again = post.promote(other, scored_registry.get("scored", v2), ended)
    assert again is not None and not again.promoted
    assert PostRun(scored_registry, request(EVALUATE)).promote(other, scored_registry.get("scored", v2), ended) is None, "none asked"


def test_an_earlier_tries_finished_run_is_recovered_and_completed_once(scored_registry: Registry):
    store = scored_registry.store
    try1, try2, try3 = (ref(store, n) for n in (1, 2, 3))
    finished = outcome(scored_registry, TRAIN)
    write(store, try1.key(OUTCOME), finished)
    post = PostRun(scored_registry, request(TRAIN))
    recovered = post.recover(try3, outlives_worker=False)
    assert recovered == Recovered(try1, finished, scored_registry.get("scored", "1.0"))
    assert recovered.run.uri == store.url(try1.prefix)
    # the worker died after registering, before its results: completing it again makes no second version
    first = post.complete(recovered.run, recovered.outcome, recovered.parent.version)
    again = post.complete(post.recover(try2, outlives_worker=False).run, recovered.outcome, "1.0")  # type: ignore[union-attr]
    assert first.new_version == again.new_version and [v.version for v in scored_registry.versions("scored")] == ["1.0", "1.1"]
    assert again.new_version is not None and again.new_version.run == try1

    # not recovered: a first try, another package's or pipeline's run, a run without content, an evaluation
    assert post.recover(try1, outlives_worker=False) is None
    assert PostRun(scored_registry, request(FULL)).recover(try2, outlives_worker=False) is None
    assert PostRun(scored_registry, RunRequest(plan=TRAIN, package="other", dataset=DATA)).recover(try2, outlives_worker=False) is None
    write(store, try1.key(OUTCOME), outcome(scored_registry, TRAIN).model_copy(update={"blob": None}))
    assert post.recover(try2, outlives_worker=False) is None
    write(store, try1.key(OUTCOME), outcome(scored_registry, EVALUATE, score=0.5))
    assert PostRun(scored_registry, request(EVALUATE)).recover(try2, outlives_worker=False) is None


def test_a_running_outcome_of_a_dead_try_is_settled_killed(scored_registry: Registry):
    store = scored_registry.store
    try1, try2 = ref(store, 1), ref(store, 2)
    running = outcome(scored_registry, TRAIN, status="running", phase="user_code").model_copy(update={"end_at": None, "blob": None})
    write(store, try1.key(OUTCOME), running)
    # a pod or Job may still be running it: left alone, and not recovered
    assert PostRun(scored_registry, request(TRAIN)).recover(try2, outlives_worker=True) is None
    assert read(store, try1.key(OUTCOME), Outcome).status == "running"
    # a local run dies with its worker: settled as killed, so no record stays running
    assert PostRun(scored_registry, request(TRAIN)).recover(try2, outlives_worker=False) is None
    settled = read(store, try1.key(OUTCOME), Outcome)
    assert settled.status == "killed" and settled.end_at is not None
    assert settled.error == "abandoned: try 1 never reported an ending (its worker stopped during user_code)"


def test_a_registration_failure_is_recorded_as_a_failed_run(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    gone = outcome(scored_registry, TRAIN).model_copy(update={"blob": BlobRef(sha256="0" * 64, size=1)})
    with pytest.raises(StorageError, match=r"no longer in .*run the task again"):
        PostRun(scored_registry, request(TRAIN)).complete(run, gone, "1.0")
    recorded = read(store, run.key(OUTCOME), Outcome)
    assert (recorded.status, recorded.phase) == ("failed", "register")
    assert recorded.error and recorded.error.startswith("registering the new version failed: the package content sha256:000")
    assert not store.exists(run.key(RESULTS)) and [v.version for v in scored_registry.versions("scored")] == ["1.0"]

    without_content = outcome(scored_registry, TRAIN).model_copy(update={"blob": None})
    with pytest.raises(RunError, match="reported success without the new package content"):
        PostRun(scored_registry, request(TRAIN)).complete(run, without_content, "1.0")
    assert read(store, run.key(OUTCOME), Outcome).phase == "register"


def test_a_refused_run_is_recorded_with_secrets_masked(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    PostRun(scored_registry, request(TRAIN, requested_version="production")).record_refused(
        run, ConfigurationError(f"the token {SECRET} was refused")
    )
    refused = read(store, run.key(OUTCOME), Outcome)
    assert (refused.status, refused.phase, refused.version, refused.dataset) == ("failed", "prepare", "production", DATA)
    assert refused.error is not None and SECRET not in refused.error and refused.error.startswith("the token ")
    assert refused.env == {"EPOCHS": "3", "API_TOKEN": MASK}


def test_a_refused_run_records_the_version_it_resolved_and_what_was_asked(scored_registry: Registry):
    """A run page showed "Package churn latest" for a run refused after resolving 1.4: the resolved version is recorded."""
    store, run = scored_registry.store, ref(scored_registry.store)
    run.trigger = Trigger(by="alice", run_type="manual", user="alice")
    PostRun(scored_registry, request(TRAIN, requested_version="production")).record_refused(
        run, ConfigurationError("no such dataset"), resolved="1.0"
    )
    refused = read(store, run.key(OUTCOME), Outcome)
    assert (refused.version, refused.requested_version, refused.trigger) == ("1.0", "production", run.trigger)


def test_the_run_page_and_who_started_the_run_are_in_the_event_the_version_and_the_results(scored_registry: Registry):
    store, run = scored_registry.store, ref(scored_registry.store)
    run.trigger = Trigger(by="schedule", run_type="scheduled")
    page = "https://airflow.example.com/aicenter/runs/dag/manual__1/task/1"
    done = PostRun(scored_registry, request(TRAIN)).complete(run, outcome(scored_registry, TRAIN), "1.0", run_url=page)
    assert done.event is not None and done.event["run_url"] == page and done.event["run_uri"] == run.uri
    assert done.new_version is not None and done.new_version.created_by == "schedule"
    assert done.new_version.run is not None and done.new_version.run.trigger == run.trigger
    aicenter = results_of(store, run)["aicenter"]
    assert aicenter["run_url"] == page
    assert aicenter["triggered_by"] == {"by": "schedule", "run_type": "scheduled", "user": None, "assets": []}
    assert aicenter["run"] == {"dag_id": "dag", "run_id": "manual__1", "task_id": "task", "try_number": 1, "map_index": -1}


def test_lineage_names_the_datasets_and_the_versions(scored_registry: Registry):
    run = ref(scored_registry.store)
    req = RunRequest(plan=TRAIN, package="scored", dataset="s3://bucket/train/")
    assert lineage(req, None, "aicenter") == ([LineageDataset("s3://bucket", "train")], [])
    done = PostRun(scored_registry, req).complete(run, outcome(scored_registry, TRAIN, snapshots={"data_directory": "file:///s/snap.json"}), "1.0")
    inputs, outputs = lineage(req, done, "aicenter")
    assert inputs == [LineageDataset("s3://bucket", "train"), LineageDataset("aicenter", "scored", "1.0")]
    assert outputs == [LineageDataset("aicenter", "scored", "1.1"), LineageDataset("file", "/s/snap.json")]


def test_completion_imports_neither_airflow_nor_kubernetes():
    code = (
        "import sys, airflow_aicenter.completion\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'kubernetes'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
