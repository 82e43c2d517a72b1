"""Distributed runs on a shared cluster (issue 23): a flaky API server, Kueue queues, all-or-nothing starts.

The operator runs in this process against the test API server (tests/operators/kube_api.py),
which validates every manifest against the Kubernetes schemas and learns here what a shared
cluster does: injected 5xx answers and connection resets, Jobs suspended until admitted (as
Kueue does), pods that stay Pending.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.operators import FullPipelineOperator
from airflow_aicenter.registry import Registry
from tests.aicenter_helpers import FAST, MAIN
from tests.conftest import write_files
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.runtime.test_distributed import RENDEZVOUS

JOB_PATH = r"^/apis/batch/v1/namespaces/[^/]+/jobs/[^/]+$"


@pytest.fixture
def deployment(kube_deployment: tuple[Registry, str], tmp_path: Path) -> tuple[Registry, str]:
    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": RENDEZVOUS, "requirements.txt": ""}), "ddp")
    return registry, dataset


def full_op(dataset: str, **kwargs: Any) -> FullPipelineOperator:
    return FullPipelineOperator(task_id="train", package="ddp", dataset=dataset, nodes=2, procs_per_node=2,
                                install_requirements=False, **FAST, **kwargs)


def when_job_exists(kube: FakeKubernetes, then: Any) -> threading.Thread:
    """Run ``then()`` once the Job is created (faults injected while the run is going, not before)."""
    def watch() -> None:
        kube.wait_for(lambda: bool(kube.jobs), timeout=60, what="the Job")
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_api_errors_during_the_job_wait_are_retried_and_the_run_succeeds(deployment, kube_api: FakeKubernetes):
    """503s, a 500 and dropped connections while the Job runs: the run goes on, the Job is never deleted early."""
    registry, dataset = deployment

    def inject() -> None:
        kube_api.fail_next(JOB_PATH, 3, 503)
        kube_api.fail_next(JOB_PATH, 1, 500)
        kube_api.fail_next(JOB_PATH, 5, "reset")  # more than urllib3's own retries of a GET
        kube_api.fail_next(r"/pods$", 2, 503)  # the pod list read when the Job ended

    watcher = when_job_exists(kube_api, inject)
    result = full_op(dataset).execute(make_context())
    watcher.join(5)
    assert result["version"] == "1.1" and result["score"] == 6.0
    served = [status for _, _, status in kube_api.faults_served]
    assert served.count(503) >= 3 and 500 in served and "reset" in served, served
    deletes = [path for method, path in kube_api.requests if method == "DELETE" and "/jobs/" in path]
    assert len(deletes) == 1, f"the Job is deleted once, at its end: {deletes}"
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_api_errors_when_creating_the_job_are_retried(deployment, kube_api: FakeKubernetes):
    """The create answered 503 twice, the Service create once: created on a later try, one Job only."""
    registry, dataset = deployment
    kube_api.fail_next(r"/jobs$", 2, 503, method="POST")
    kube_api.fail_next(r"/services$", 1, 503, method="POST")
    kube_api.fail_next(JOB_PATH, 1, 502)  # the first look for an earlier attempt's Job
    result = full_op(dataset).execute(make_context())
    assert result["version"] == "1.1"
    assert len(kube_api.faults_served) == 4
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")
