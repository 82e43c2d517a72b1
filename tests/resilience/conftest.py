"""Fixtures of the resilience tests."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

import airflow_aicenter.storage.store as store_module
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.storage import open_store
from tests.resilience.support import TIMEOUT_S, FaultPlan, FaultProxy, QuickTimeouts, Setup, make_setup, setup_package


@pytest.fixture(params=["s3", "file"])
def concurrency_setup(request, tmp_path) -> tuple[Setup, object]:
    if request.param == "file":
        return setup_package(open_store((tmp_path / "store").as_uri()), tmp_path, {}, files=3), None
    server = request.getfixturevalue("s3_server")
    store = open_store(f"s3://{server.create_bucket()}/aicenter", server.options)
    return setup_package(store, tmp_path, server.env(), files=3), server.options



@pytest.fixture(params=["s3", "file"])
def gc_setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    if request.param == "file":
        return setup_package(open_store((tmp_path / "store").as_uri()), tmp_path, {"MODEL_MB": "16"}, files=30)
    server = request.getfixturevalue("s3_server")
    store = open_store(f"s3://{server.create_bucket()}/aicenter", server.options)
    return setup_package(store, tmp_path, {**server.env(), "MODEL_MB": "16"}, files=30)



@pytest.fixture(params=["s3", "file"])
def kill_setup(request, tmp_path) -> Setup:
    return make_setup(request, tmp_path, request.param)



@pytest.fixture(scope="module")
def operator() -> TrainPipelineOperator:
    return TrainPipelineOperator(task_id="train", package="res", dataset="file:///unused")



@pytest.fixture
def fast_retries(monkeypatch):
    """The production policy's shape (exponential backoff), with test-sized waits and budget."""
    config = {
        "max_retries": 6,
        "retry_timeout": timedelta(seconds=30),
        "backoff": {"init_backoff": timedelta(milliseconds=20), "max_backoff": timedelta(milliseconds=400), "base": 2},
    }
    monkeypatch.setattr(store_module, "RETRY_CONFIG", config)
    return config



@pytest.fixture
def faulty(s3_server, fast_retries):
    """(proxy, store through the proxy, store straight to the server) on a fresh bucket."""
    bucket = s3_server.create_bucket()
    plan = FaultPlan(hang_seconds=TIMEOUT_S + 2)
    with FaultProxy(s3_server.port, plan) as proxy:
        options = QuickTimeouts(endpoint_url=proxy.endpoint, region="us-east-1", access_key_id="testing",
                                secret_access_key="testing-secret")
        yield proxy, open_store(f"s3://{bucket}/aicenter", options), open_store(f"s3://{bucket}/aicenter", s3_server.options)



@pytest.fixture
def small_ranges(monkeypatch):
    """Ranged GETs from 4 MiB in 1 MiB parts, so a test object of a few MiB takes that path."""
    from airflow_aicenter.storage import transfer

    monkeypatch.setattr(transfer, "RANGED_MIN", 4 * 2**20)
    monkeypatch.setattr(transfer, "RANGE_PART", 2**20)
    monkeypatch.setattr(transfer, "RETRY_WAIT", 0.05)
    return transfer
