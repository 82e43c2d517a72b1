"""Full then Evaluate, as one DAG run's two tasks: each operator's ``execute`` in process, real child processes, both stores.

The package records the calls it gets and the env it sees, so the call order and folders are
observed from inside user code, as AI Center packages would see them. The same two pipelines
run through real Airflow in the shipped retraining DAGs' smoke run (tests/dags/test_aicenter_retraining.py),
which also checks that Airflow stores the extra links.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from airflow.models.taskinstancekey import TaskInstanceKey

from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator
from airflow_aicenter.records import Manifest, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from tests.aicenter_helpers import RECORDING_TRAIN, upload_package
from tests.conftest import write_files
from tests.operators.kube_api import make_context

DAG_ID = "aicenter_test_full_evaluate"

RESULT_KEYS = {"package", "version", "package_uri", "results_uri", "artifacts_uri", "snapshot_uri", "score", "run_uri"}


def key(store: Store, uri: str) -> str:
    """The store key of a URI the product reported."""
    assert uri.startswith(store.uri + "/"), (uri, store.uri)
    return uri.removeprefix(store.uri + "/")


def calls(store: Store, prefix: str) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(f"{prefix}/artifacts/calls.jsonl").decode().splitlines()]


def test_full_then_evaluate_end_to_end(deployment, tmp_path, monkeypatch, capfd):
    store = deployment.store
    deployment.use(monkeypatch)
    registry = Registry(store)
    upload_package(registry, tmp_path, "rec", RECORDING_TRAIN)
    holdout = deployment.add_dataset("holdout", write_files(tmp_path / "holdout", {"e.csv": "x\n9\n", "more/f.csv": "x\n8\n"}))

    # the DAG run: full >> evaluate, the evaluation on the version the full run returned (its XCom)
    tasks = {"full": FullPipelineOperator(
        task_id="full", package="rec", version="1.0", dataset=deployment.dataset, evaluation_dataset=holdout,
        env={"EPOCHS": "3", "API_TOKEN": "tok-3e1f"}, save_training_data=True, save_test_data=True)}
    pushed = {"full": {"return_value": tasks["full"].execute(make_context(DAG_ID, "full"))}}
    tasks["evaluate"] = EvaluatePipelineOperator(
        task_id="evaluate", package="rec", version=pushed["full"]["return_value"]["version"],
        evaluation_dataset=holdout, save_test_data=True)
    pushed["evaluate"] = {"return_value": tasks["evaluate"].execute(make_context(DAG_ID, "evaluate"))}
    captured = capfd.readouterr()
    assert "tok-3e1f" not in captured.out + captured.err, "the secret env value never reaches the task log"
    assert "[aicenter] run succeeded" in captured.out + captured.err, "the runtime's output reached the task log"

    # -- full: process_data, train, evaluate, save -> new version 1.1 with its score
    full = pushed["full"]["return_value"]
    assert set(full) == RESULT_KEYS, "no promotion asked for: no promotion keys"
    assert full["version"] == "1.1" and full["score"] == 0.5, "full evaluates before save()"
    record = registry.get("rec", "1.1")
    assert (record.parent, record.pipeline, record.score, record.run.task_id) == ("1.0", "full", 0.5, "full")
    prefix = record.run.prefix
    seen = calls(store, prefix)
    assert [c["event"] for c in seen] == ["__init__", "process_data", "train", "evaluate", "save"]
    env = seen[0]["env"]
    assert seen[1]["arg"] == env["data_directory"] and seen[1]["files"] == ["churn.csv"]
    assert seen[2]["arg"] == env["training_data_directory"] and seen[2]["files"] == ["train.csv"]
    # the evaluation dataset is staged at test_data_directory; evaluation_data_directory starts as its copy
    assert seen[3]["arg"] == env["evaluation_data_directory"] != env["test_data_directory"]
    assert seen[3]["files"] == ["e.csv", "more"]
    assert env["EPOCHS"] == "3" and env["API_TOKEN"] == "tok-3e1f" and env["save_test_data"] == "True"
    assert all(c["cwd"] == seen[0]["cwd"] for c in seen) and seen[0]["cwd"].endswith("package")

    raw = json.loads(store.get_bytes(f"{prefix}/_results.json"))
    assert raw["parameters"] == {
        "pipeline": "aicenter_test_full_evaluate.full",
        "inputs": {"package": "rec", "version": "1.0", "train_data": deployment.dataset, "evaluation_data": holdout, "gpu": "False"},
        "env": {"EPOCHS": "3", "API_TOKEN": "***"},
    }
    outputs = raw["run_summary"]["outputs"]
    assert set(outputs) == {"train_data", "evaluation_data", "artifacts_data", "package", "version", "score"}
    assert (outputs["version"], outputs["score"]) == ("1.1", 0.5)
    assert read(store, key(store, outputs["evaluation_data"]), Manifest).file_count == 2
    assert outputs["train_data"] == record.snapshot
    assert raw["aicenter"]["pipeline_type"] == "full" and "promoted" not in raw["aicenter"]

    # -- evaluate: Main(), evaluate(test_data_directory) on the version the full run made; no new version
    evaluation = pushed["evaluate"]["return_value"]
    assert set(evaluation) == RESULT_KEYS
    assert evaluation["version"] == "1.1" and evaluation["score"] == 0.75, "evaluated 1.1, which holds model.txt"
    eval_prefix = key(store, evaluation["run_uri"])
    seen = calls(store, eval_prefix)
    assert [c["event"] for c in seen] == ["__init__", "evaluate"]
    assert seen[1]["arg"] == seen[0]["env"]["test_data_directory"] and seen[1]["files"] == ["e.csv", "more"]
    raw = json.loads(store.get_bytes(f"{eval_prefix}/_results.json"))
    assert raw["parameters"]["inputs"] == {"package": "rec", "version": "1.1", "evaluation_data": holdout, "gpu": "False"}
    assert set(raw["run_summary"]["outputs"]) == {"evaluation_data", "artifacts_data", "package", "version", "score"}
    assert raw["run_summary"]["outputs"]["version"] == "1.1" and raw["run_summary"]["outputs"]["score"] == 0.75
    snapshot = raw["run_summary"]["outputs"]["evaluation_data"]  # save_test_data=True: the holdout, as a manifest
    assert snapshot == evaluation["snapshot_uri"] and read(store, key(store, snapshot), Manifest).source == holdout
    assert [r.version for r in registry.versions("rec")] == ["1.0", "1.1"]
    [evaluated] = registry.evaluations("rec", "1.1")
    assert evaluated.score == 0.75 and evaluated.dataset == holdout and evaluated.run.task_id == "evaluate"

    # -- the extra links the UI shows (Airflow stores them from the operator's links) open the run's AI Center page
    for task, results_uri in (("full", full["results_uri"]), ("evaluate", evaluation["results_uri"])):
        run_id = key(store, results_uri).removeprefix("runs/").removesuffix("/_results.json")
        dag_id, dag_run_id, task_id, try_number = run_id.split("/")
        ti_key = TaskInstanceKey(dag_id=dag_id, task_id=task_id, run_id=dag_run_id, try_number=int(try_number))
        links = {type(link).__name__: link.get_link(tasks[task], ti_key=ti_key) for link in tasks[task].operator_extra_links}
        assert links["ResultsLink"] == "/plugin/ml-packages/aicenter/runs/" + "/".join(quote(p, safe="") for p in run_id.split("/"))
        assert links["ArtifactsLink"] == links["ResultsLink"] + "#artifacts"
