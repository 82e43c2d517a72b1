"""``allowed_dataset_roots``: file:// datasets outside the folders a deployment allows are refused before compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import small_dataset, upload_package
from tests.operators.kube_api import make_context
from tests.packages import COUNTING_TRAIN as TRAIN


def test_allowed_dataset_roots_refuse_a_file_dataset_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.records import Outcome, read

    uri = (tmp_path / "aicenter").as_uri()
    allowed = tmp_path / "datasets"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": uri, "allowed_dataset_roots": str(allowed)}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "rows", TRAIN)
    outside = small_dataset(tmp_path, "elsewhere")
    (allowed).mkdir()
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    for dataset in (outside, allowed / "escape"):  # a link inside the root that leaves it is outside too
        with pytest.raises(ConfigurationError, match="outside the folders this deployment allows"):
            TrainPipelineOperator(task_id="train", package="rows", dataset=dataset.as_uri()).execute(make_context())
    outcome = read(registry.store, "runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/train/1/outcome.json", Outcome)
    assert outcome.phase == "prepare" and "allowed_dataset_roots" in (outcome.error or "")
    inside = small_dataset(allowed, "rows")
    result = TrainPipelineOperator(task_id="train", package="rows", dataset=inside.as_uri()).execute(make_context())
    assert result["version"] == "1.1"
