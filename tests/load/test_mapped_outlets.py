"""A mapped training declares its package's asset when the DAG is parsed (issue 13 finding 18, found by the load test).

``.partial().expand()`` builds a MappedOperator: the operator's ``__init__`` runs only in the worker,
after unmapping. Airflow registers the assets a DAG declares at parse time and drops events for
any other ("Task has inactive assets"), so the outlet ``__init__`` adds came too late: the load
test's 8 mapped trainings made 8 versions and 0 Asset events.
"""

from __future__ import annotations

from typing import Any

import pendulum
import pytest
from airflow.dag_processing.collection import _get_dag_assets
from airflow.sdk import DAG, Asset
from airflow.serialization.definitions.assets import SerializedAsset, SerializedAssetAlias
from airflow.serialization.serialized_objects import DagSerialization, LazyDeserializedDAG

from airflow_aicenter.operators import FullPipelineOperator, PredictPipelineOperator, TrainPipelineOperator
from airflow_aicenter.operators.package_asset import PACKAGE_ALIAS

pytestmark = pytest.mark.airflow


def parsed_outlets(build: Any) -> list[SerializedAsset | SerializedAssetAlias]:
    """The task's outlets as the dag-processor registers them (from the serialized DAG, as Airflow collects them)."""
    with DAG("mapped_outlets", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC")) as dag:
        build()
    lazy = LazyDeserializedDAG(data=DagSerialization.to_dict(dag))
    assets = [outlet for _, outlet in _get_dag_assets(lazy, SerializedAsset, inlets=False)]
    aliases = [outlet for _, outlet in _get_dag_assets(lazy, SerializedAssetAlias, inlets=False)]
    return [*assets, *aliases]


def test_a_mapped_training_declares_its_package_asset_at_parse_time() -> None:
    outlets = parsed_outlets(lambda: TrainPipelineOperator.partial(task_id="train", package="churn", dataset="file:///d")
                             .expand(env=[{"SHARD": "0"}, {"SHARD": "1"}]))
    assert [o.uri for o in outlets if isinstance(o, SerializedAsset)] == ["aicenter://churn/"]
    assert not [o for o in outlets if isinstance(o, SerializedAssetAlias)]


def test_a_mapped_package_or_a_templated_one_declares_the_alias() -> None:
    mapped = parsed_outlets(lambda: FullPipelineOperator.partial(task_id="train", dataset="file:///d")
                            .expand(package=["a", "b"]))
    templated = parsed_outlets(lambda: TrainPipelineOperator.partial(task_id="train", package="{{ params.p }}",
                                                                     dataset="file:///d").expand(env=[{}]))
    for outlets in (mapped, templated):
        assert [o.name for o in outlets if isinstance(o, SerializedAssetAlias)] == [PACKAGE_ALIAS]
        assert not [o for o in outlets if isinstance(o, SerializedAsset)]


def test_user_outlets_are_kept_and_a_prediction_declares_none() -> None:
    mine = Asset("s3://bucket/report")
    outlets = parsed_outlets(lambda: TrainPipelineOperator.partial(task_id="train", package="churn", dataset="file:///d",
                                                                   outlets=[mine]).expand(env=[{}]))
    assert sorted(o.uri for o in outlets if isinstance(o, SerializedAsset)) == ["aicenter://churn/", "s3://bucket/report"]
    assert not [o for o in outlets if isinstance(o, SerializedAssetAlias)]
    assert parsed_outlets(lambda: PredictPipelineOperator.partial(task_id="train", package="churn")
                          .expand(dataset=["file:///a", "file:///b"])) == []


def test_an_unmapped_training_holds_its_outlet_once() -> None:
    """``__init__`` after unmapping gets the outlet partial() declared: it must not add it twice (two events)."""
    task = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///d", outlets=[Asset("aicenter://churn")])
    assert [o.uri for o in task.outlets] == ["aicenter://churn/"]
