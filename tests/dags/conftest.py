"""Fixtures for the example-DAG tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


@pytest.fixture
def dags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every DAG of dags/, parsed with AIRFLOW_HOME and the ``aicenter_default`` store in tmp_path."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": store.as_uri()}}))
    bag = DagBag(dag_folder=str(REPO / "dags"), safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return bag.dags
