"""Lineage: the facets the OpenLineage listener would emit for a training run, and the operators' outlets.

The operator runs in this process (local launcher, real runtime child process); the facets are
read through the OpenLineage provider's own DefaultExtractor, as its listener does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pendulum
from airflow.dag_processing.collection import AssetModelOperation
from airflow.providers.openlineage.extractors.base import DefaultExtractor
from airflow.sdk import DAG, Asset, AssetAlias
from airflow.serialization.serialized_objects import DagSerialization, LazyDeserializedDAG

from airflow_aicenter.operators import (
    EvaluatePipelineOperator,
    FullPipelineOperator,
    PredictPipelineOperator,
    TrainPipelineOperator,
)
from airflow_aicenter.operators.package_asset import PACKAGE_ALIAS
from airflow_aicenter.registry import Registry
from tests.aicenter_helpers import example_task, small_dataset
from tests.operators.kube_api import make_context


def test_training_run_lineage_as_the_listener_sees_it(rows_registry: Registry, tmp_path: Path):
    data = small_dataset(tmp_path)
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=data.as_uri(), save_training_data=True)
    result = op.execute(make_context())
    lineage = DefaultExtractor(op).extract_on_complete(None)
    assert lineage is not None
    inputs = {(d.namespace, d.name) for d in lineage.inputs}
    assert ("file", str(data)) in inputs, "the dataset is an input"
    [parent] = [d for d in lineage.inputs if d.namespace == "aicenter"]
    assert parent.name == "rows" and parent.facets["version"].datasetVersion == "1.0"
    [new] = [d for d in lineage.outputs if d.namespace == "aicenter"]
    assert new.name == "rows" and new.facets["version"].datasetVersion == result["version"] == "1.1"
    snapshot = rows_registry.get("rows", "1.1").snapshot
    assert snapshot and any(snapshot.endswith(d.name) for d in lineage.outputs if d.namespace == "file"), "the snapshot is an output"


def test_evaluation_lineage_has_no_new_version(rows_registry: Registry, tmp_path: Path):
    op = EvaluatePipelineOperator(task_id="eval", package="rows", evaluation_dataset=small_dataset(tmp_path).as_uri())
    lineage = DefaultExtractor(op).extract_on_complete(None)  # before a run: the declared inputs only
    assert lineage is not None and not lineage.outputs and [d.namespace for d in lineage.inputs] == ["file"]


def test_a_plain_package_name_is_its_own_outlet_a_templated_one_goes_through_the_alias():
    plain = FullPipelineOperator(task_id="full", package="churn", dataset="s3://b/d/")
    templated = TrainPipelineOperator(task_id="train", package="{{ params.package }}", dataset="s3://b/d/")
    evaluate = EvaluatePipelineOperator(task_id="eval", package="churn", evaluation_dataset="s3://b/e/")
    assert plain.outlets == [Asset("aicenter://churn")]
    assert templated.outlets == [AssetAlias(PACKAGE_ALIAS)]
    assert evaluate.outlets == [], "an evaluation makes no version"



# -- inlets: the tasks that read a package version consume its asset (issue 21) -------------------
def test_a_plain_package_name_is_an_inlet_of_every_pipeline_a_templated_one_is_none():
    """Every pipeline runs a version of its package (train and full from a parent): the package's asset is its inlet.

    A name only known at run time cannot be declared; user inlets are kept, and the asset is declared once.
    """
    churn = Asset("aicenter://churn")
    tasks = [
        TrainPipelineOperator(task_id="train", package="churn", dataset="s3://b/d/"),
        FullPipelineOperator(task_id="full", package="churn", dataset="s3://b/d/"),
        EvaluatePipelineOperator(task_id="eval", package="churn", evaluation_dataset="s3://b/e/"),
        PredictPipelineOperator(task_id="predict", package="churn", dataset="s3://b/i/"),
    ]
    for task in tasks:
        assert task.inlets == [churn], task.task_id
    assert TrainPipelineOperator(task_id="t", package="{{ params.package }}", dataset="s3://b/d/").inlets == []
    mine = Asset("s3://b/features")
    kept = EvaluatePipelineOperator(task_id="e", package="churn", evaluation_dataset="s3://b/e/", inlets=[mine, churn])
    assert kept.inlets == [mine, churn]


def serialized_ports(dag: Any) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """``(task_id, asset uri)`` of the DAG's consuming and producing tasks, as the dag-processor records them.

    :class:`AssetModelOperation` is what the dag-processor runs on a serialized DAG: its inlet
    references become Airflow's ``TaskInletAssetReference`` rows, the asset's "consuming tasks".
    """
    lazy = LazyDeserializedDAG(data=DagSerialization.to_dict(dag))
    collected = AssetModelOperation.collect({dag.dag_id: lazy})
    inlets = {(task, asset.uri) for task, asset in collected.inlet_references[dag.dag_id]}
    outlets = {(task, asset.uri) for task, asset in collected.outlet_references[dag.dag_id]}
    return inlets, outlets


def test_the_shipped_dags_predict_and_evaluate_tasks_consume_the_package_asset():
    closed_loop = example_task("aicenter_closed_loop", "score_inbox").dag
    inlets, outlets = serialized_ports(closed_loop)
    assert ("score_inbox", "aicenter://churn/") in inlets, "batch prediction reads a version of churn"
    assert ("retrain", "aicenter://churn/") in inlets, "the full run trains from a version of churn"
    assert ("retrain", "aicenter://churn/") in outlets and ("score_inbox", "aicenter://churn/") not in outlets
    retraining = example_task("aicenter_evaluate_new_version", "evaluate", "aicenter_retraining").dag
    inlets, outlets = serialized_ports(retraining)
    assert ("evaluate", "aicenter://churn/") in inlets and not outlets


def test_a_mapped_task_declares_its_inlet_when_the_dag_is_parsed():
    with DAG("mapped_inlets", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
        PredictPipelineOperator.partial(task_id="predict", package="churn").expand(dataset=["file:///a", "file:///b"])
        EvaluatePipelineOperator.partial(task_id="eval", evaluation_dataset="file:///e").expand(package=["a", "b"])
    inlets, _ = serialized_ports(dag)
    assert inlets == {("predict", "aicenter://churn/")}, "a mapped package name is not known when the DAG is parsed"
