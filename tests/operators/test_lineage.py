"""Lineage: the facets the OpenLineage listener would emit for a training run, and the operators' outlets.

The operator runs in this process (local launcher, real runtime child process); the facets are
read through the OpenLineage provider's own DefaultExtractor, as its listener does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.providers.openlineage.extractors.base import DefaultExtractor
from airflow.sdk import Asset, AssetAlias

from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator
from airflow_aicenter.operators.base import PACKAGE_ALIAS
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import small_dataset, upload_package
from tests.operators.kube_api import make_context

TRAIN = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.n = len(os.listdir(training_directory))
    def save(self):
        open("model.txt", "w").write(str(self.n))
'''


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "rows", TRAIN)
    return registry


def test_training_run_lineage_as_the_listener_sees_it(registry: Registry, tmp_path: Path):
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
    snapshot = registry.get("rows", "1.1").snapshot
    assert snapshot and any(snapshot.endswith(d.name) for d in lineage.outputs if d.namespace == "file"), "the snapshot is an output"


def test_evaluation_lineage_has_no_new_version(registry: Registry, tmp_path: Path):
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

