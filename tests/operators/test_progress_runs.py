"""Progress, resources and cost through the operator: the local launcher and a pod (test API server).

The operator runs in this process with a hand-made task context; the runtime runs as a real
child process (local launcher) or as a pod's stage, base and sync containers run as local
processes by the test Kubernetes API server. What package code reports with ``aicenter.report``
reaches the task log and the run folder, and ``_results.json`` and the version record carry what
the run used, with its cost at the connection's prices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_aicenter.layout import METRICS, PROGRESS, RESULTS
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Progress, Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import FAST
from tests.conftest import write_files
from tests.operators.kube_api import make_context
from tests.packages import ECHO_MAIN

PRICES = {"cpu_hour": 0.04, "gpu_hour": 2.5, "gib_hour": 0.005}
REPORTING_TRAIN = '''
try:
    import aicenter
except ImportError:  # the package still runs where aicenter is absent
    aicenter = None

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        for epoch in range(1, 5):
            if aicenter is not None:
                aicenter.report(step=epoch, total=4, loss=1.0 / epoch)
    def save(self):
        open("model.txt", "w").write("trained")
'''


def upload(registry: Registry, tmp_path: Path) -> None:
    registry.upload(write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": REPORTING_TRAIN, "requirements.txt": ""}),
                    "rep")


def check_run(registry: Registry, result: dict[str, Any], *, priced: bool) -> None:
    """progress.json final at step 4 of 4, the history, resources (and cost) in _results.json and the version record."""
    version = registry.get("rep", result["version"])
    assert version.run is not None
    store, prefix = registry.store, version.run.prefix
    progress = read(store, f"{prefix}/{PROGRESS}", Progress)
    assert (progress.step, progress.total, progress.percent, progress.final, progress.metrics) == (4, 4, 100.0, True,
                                                                                                  {"loss": 0.25})
    assert [json.loads(line)["step"] for line in store.get_bytes(f"{prefix}/{METRICS}").decode().splitlines()] == [1, 2, 3, 4]
    results = read(store, f"{prefix}/{RESULTS}", Results)
    used = results.aicenter["resources"]
    assert used["wall_seconds"] > 0 and used["cpu_seconds"] >= 0 and used["peak_memory_bytes"] > 0
    assert used["gpu_seconds"] == 0 and used["bytes_staged"] > 0 and used["bytes_uploaded"] > 0
    assert version.resources == used
    if priced:
        assert results.aicenter["cost"]["prices"] == PRICES and results.aicenter["cost"]["total"] >= 0
        assert version.cost == results.aicenter["cost"]
    else:
        assert "cost" not in results.aicenter and version.cost is None


def test_a_local_run_logs_its_progress_and_records_resources_and_cost(local_registry, tmp_path, capfd):
    upload(local_registry, tmp_path)
    data = write_files(tmp_path / "data", {"rows.csv": "a\n1\n"})
    op = TrainPipelineOperator(task_id="train", package="rep", dataset=data.as_uri(), progress_interval=0.2)
    result = op.execute(make_context())
    log = "".join(capfd.readouterr())  # the task log, as the task's logger writes it
    assert "[aicenter] progress 100% (step 4/4), loss=0.25" in log
    check_run(local_registry, result, priced=True)


def test_bad_prices_fail_the_task_before_compute_without_retries(tmp_path, monkeypatch):
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter",
                                                                    "extra": {"storage": uri, "prices": {"cpu": 1}}}))
    registry = Registry(open_store(uri))
    upload(registry, tmp_path)
    data = write_files(tmp_path / "data", {"rows.csv": "a\n1\n"})
    with pytest.raises(AirflowFailException) as failed:
        TrainPipelineOperator(task_id="train", package="rep", dataset=data.as_uri()).execute(make_context())
    assert "'cpu', which is not a price" in str(failed.value) and "cpu_hour" in str(failed.value)


def test_bad_progress_interval_is_refused_when_the_dag_is_parsed():
    with pytest.raises(Exception, match=r"progress_interval=0 is not valid; give seconds > 0"):
        TrainPipelineOperator(task_id="train", package="rep", dataset="file:///data", progress_interval=0)


def test_a_pod_run_carries_progress_and_resources(kube_deployment, kube_api, tmp_path, capfd):
    registry, dataset = kube_deployment
    upload(registry, tmp_path)
    op = TrainPipelineOperator(task_id="train", package="rep", dataset=dataset, progress_interval=0.2, **FAST)
    result = op.execute(make_context())
    check_run(registry, result, priced=False)
    log = "".join(capfd.readouterr())  # the sync container's log, as the operator relays it to the task log
    assert "[aicenter] progress 100% (step 4/4), loss=0.25" in log
