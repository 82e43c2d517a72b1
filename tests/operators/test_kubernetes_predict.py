"""Batch prediction in a pod: PredictPipelineOperator on the Kubernetes launcher, against the test API server."""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.errors import RunError
from airflow_aicenter.operators import PredictPipelineOperator
from airflow_aicenter.records import Results, read
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.operators.test_kubernetes_launcher import FAST


def predict_op(dataset: str, **kwargs) -> PredictPipelineOperator:
    return PredictPipelineOperator(task_id="score", package="doubler", version="production", dataset=dataset,
                                   procs_per_node=2, install_requirements=False, **FAST, **kwargs)


def test_a_pod_scores_every_input_with_the_promoted_version(doubler_deployment, kube_api: FakeKubernetes):
    registry, inbox = doubler_deployment
    result = predict_op(inbox, max_failed=1).execute(make_context(task_id="score"))
    assert (result["version"], result["predicted"], result["failed"]) == ("1.0", 201, 1)
    prefix = result["run_uri"].removeprefix(registry.store.url("")).strip("/")
    lines = [json.loads(line) for line in registry.store.get_bytes(f"{prefix}/predictions/a/batch.jsonl").decode().splitlines()]
    assert [json.loads(line["output"])["y"] for line in lines] == [2 * n for n in range(1, 201)], "every output, in input order"
    other = [json.loads(line) for line in registry.store.get_bytes(f"{prefix}/predictions/b.jsonl").decode().splitlines()]
    assert "output" in other[0] and "negative input -1" in other[1]["error"]
    results = read(registry.store, f"{prefix}/_results.json", Results)
    assert results.parameters.inputs.inference_data == inbox
    assert (results.run_summary.outputs.predicted, results.run_summary.outputs.failed) == (201, 1)
    assert [r.version for r in registry.versions("doubler")] == ["1.0"], "prediction makes no version"
    [pod] = [p for p in kube_api.all_pods()]
    assert pod.obj["status"]["phase"] == "Succeeded"


def test_too_many_failed_inputs_fail_the_task_after_every_output(doubler_deployment, kube_api: FakeKubernetes):
    registry, inbox = doubler_deployment
    with pytest.raises(RunError, match=r"1 .*failed"):
        predict_op(inbox).execute(make_context(task_id="score"))
    [run] = [i.key for i in registry.store.list("runs/") if i.key.endswith("predictions/b.jsonl")]
    assert "negative input -1" in registry.store.get_bytes(run).decode(), "the outputs were written before the run failed"


@pytest.mark.parametrize("kwargs, message", [
    ({"input_type": "csv"}, r"input_type='csv' is not valid; use 'json'"),
    ({"max_failed": -1}, r"max_failed=-1 is not valid"),
    ({"nodes": 2}, r"batch prediction runs on one node"),
    ({"procs_per_node": 0}, r"procs_per_node=0 is not valid"),
])
def test_bad_prediction_arguments_are_refused_when_the_dag_is_parsed(kwargs, message):
    from airflow_aicenter.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        PredictPipelineOperator(task_id="score", package="doubler", dataset="s3://b/inbox/", **kwargs)
