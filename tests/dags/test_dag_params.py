"""The example DAGs as the UI's trigger form uses them: every DAG in dags/ parses, its hyperparameters are
DAG params that reach the operators' ``env`` rendered, and ``aicenter_distributed`` uploads its package
and runs as many ranks as its ``procs_per_node`` param says.

Fast tier: DAG files parsed by Airflow's DagBag in this process, templates rendered with a real
params object, the distributed task executed in process (local launcher, a file store in tmp_path).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.records import Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import run_task

#: Each example DAG's task that trains, with the params the trigger form offers for its hyperparameters.
TRAINING_TASKS = {
    "aicenter_training": "train",
    "aicenter_retraining": "retrain",
    "aicenter_closed_loop": "retrain",
    "aicenter_distributed": "train_distributed",
    "aicenter_approval": "retrain",
}


def rendered(task: Any, conf: dict[str, Any] | None = None) -> Any:
    """``task`` rendered as a DAG run with ``conf`` renders it (params validated, then the templates)."""
    from tests.operators.kube_api import make_context

    params = copy.deepcopy(task.dag.params)
    params.update(conf or {})
    ctx = make_context(task.dag.dag_id, task.task_id)
    ctx.update(params=params.validate(), triggering_asset_events={})
    copied = copy.copy(task)
    copied.render_template_fields(ctx)
    return copied


def test_every_example_dag_parses(dags):
    assert set(TRAINING_TASKS) | {"aicenter_evaluate_new_version"} <= set(dags)
    for dag_id in dags:
        assert dags[dag_id].tags and "example" in dags[dag_id].tags, dag_id


@pytest.mark.parametrize("dag_id", sorted(TRAINING_TASKS))
def test_hyperparameters_are_params_that_reach_env(dags, dag_id):
    dag = dags[dag_id]
    form = dag.params.dump()  # what the trigger form shows
    assert {"epochs", "learning_rate"} <= set(form), form
    assert dag.params.get_param("epochs").schema["type"] == "integer"
    task = dag.get_task(TRAINING_TASKS[dag_id])
    defaults = rendered(task).env
    assert defaults == {"EPOCHS": str(form["epochs"]), "LEARNING_RATE": str(form["learning_rate"])}
    assert rendered(task, {"epochs": 7, "learning_rate": 0.05}).env == {"EPOCHS": "7", "LEARNING_RATE": "0.05"}


def test_a_bad_param_is_refused_by_the_form_schema(dags):
    from airflow.sdk.exceptions import ParamValidationError

    task = dags["aicenter_training"].get_task("train")
    with pytest.raises(ParamValidationError, match="epochs"):
        rendered(task, {"epochs": 0})


def test_distributed_procs_per_node_follows_its_param(dags):
    task = dags["aicenter_distributed"].get_task("train_distributed")
    assert rendered(task).run_request().procs_per_node == 2  # the param's default
    three = rendered(task, {"procs_per_node": 3})
    assert three.procs_per_node == 3 and three.run_request().procs_per_node == 3


def test_distributed_uploads_its_package_once_and_runs_the_ranks_asked(dags, tmp_path):
    dag = dags["aicenter_distributed"]
    registry = Registry(open_store((tmp_path / "store").as_uri()))
    assert registry.packages() == []
    upload = dag.get_task("upload_package")
    assert "uploaded regression_ddp 1.0" in upload.python_callable()
    assert "is in" in upload.python_callable(), "a package already there is used as it is"
    assert [r.version for r in registry.versions("regression_ddp")] == ["1.0"]
    dataset = dag.get_task("make_dataset").python_callable()
    assert Path(dataset.removeprefix("file://"), "rows.csv").is_file()

    value, _ = run_task(dag.get_task("train_distributed"), {"procs_per_node": 3, "epochs": 5})
    assert value["version"] == "1.1", value
    results = read(registry.store, f"{registry.get('regression_ddp', '1.1').run.prefix}/_results.json", Results)
    assert results.aicenter["distributed"] == {"nodes": 1, "procs_per_node": 3, "world_size": 3}


def test_a_templated_count_is_checked_once_rendered(tmp_path, monkeypatch):
    """A count from a DAG param is known only when the task renders: the same refusals as a literal, then."""
    from airflow.sdk import DAG, Param

    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator

    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": (tmp_path / "s").as_uri()}}))
    with DAG("counts", schedule=None, params={"n": Param(2, type="integer"), "text": Param("two", type="string")}):
        full = FullPipelineOperator(task_id="full", package="p", dataset="file:///d", procs_per_node="{{ params.text }}")
        evaluate = EvaluatePipelineOperator(task_id="evaluate", package="p", evaluation_dataset="file:///d",
                                            procs_per_node="{{ params.n }}")
    with pytest.raises(ConfigurationError, match=r"procs_per_node='two' is not valid; give a whole number of at least 1"):
        rendered(full)
    with pytest.raises(ConfigurationError, match="runs one process"):
        rendered(evaluate)
    with pytest.raises(ConfigurationError, match="procs_per_node='3x' is not valid"):
        FullPipelineOperator(task_id="literal", package="p", dataset="file:///d", procs_per_node="3x")


def test_every_version_that_promotes_on_better_is_scored_on_the_one_fixed_holdout(dags, tmp_path):
    """The retraining DAGs and the evaluation DAG score on the same holdout folder, so "better" compares like with like.

    Scored on its own split of each week's data instead, a new version could never be compared with
    production (promotion.compare) and production would never move on its own.
    """
    holdout = (tmp_path / "home" / "aicenter-datasets" / "churn-holdout").as_uri()
    tasks = {
        "aicenter_retraining": "retrain", "aicenter_closed_loop": "retrain", "aicenter_evaluate_new_version": "evaluate",
    }
    for dag_id, task_id in tasks.items():
        task = rendered(dags[dag_id].get_task(task_id))
        assert task.evaluation_dataset == holdout, dag_id
        assert task.promote_if == "better", dag_id
    retrain = dags["aicenter_retraining"].get_task("retrain")
    assert retrain.save_test_data is True, "the holdout's snapshot shows that its content is the same week after week"
    assert rendered(retrain, {"evaluation_dataset": "s3://bucket/holdout/"}).evaluation_dataset == "s3://bucket/holdout/"
