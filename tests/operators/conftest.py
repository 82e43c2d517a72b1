"""Fixtures for operator tests: a fresh deployment on each storage backend, and the test Kubernetes API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.operators import FullPipelineOperator
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.aicenter_helpers import FAST, MAIN
from tests.conftest import S3Server, built_once, make_dataset, write_files
from tests.operators.kube_api import FakeKubernetes, build_runtime_python
from tests.runtime.test_distributed import RENDEZVOUS


def s3_connection_env(server: S3Server, bucket: str) -> dict[str, str]:
    """Connections (as env vars) that point the aicenter provider at a moto bucket."""
    return {
        "AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps(
            {"conn_type": "aicenter", "extra": {"storage": f"s3://{bucket}/aicenter", "aws_conn_id": "aws_moto"}}
        ),
        "AIRFLOW_CONN_AWS_MOTO": json.dumps(
            {"conn_type": "aws", "login": "testing", "password": "testing-secret",
             "extra": {"endpoint_url": server.endpoint, "region_name": "us-east-1"}}
        ),
    }


def file_connection_env(uri: str) -> dict[str, str]:
    return {"AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}})}


class Deployment:
    """A fresh storage root, the env that points Airflow at it, and the churn dataset's URI on the same backend.

    Unpacks as ``store, env, dataset``; :meth:`add_dataset` puts more data folders next to it.
    """

    def __init__(self, backend: str, store: Store, env: dict[str, str], dataset: str, datasets: Store | None) -> None:
        self.backend, self.store, self.env, self.dataset, self._datasets = backend, store, env, dataset, datasets

    def __iter__(self) -> Iterator[Any]:
        return iter((self.store, self.env, self.dataset))

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process at the deployment (a task run in process), as ``env`` points an Airflow subprocess."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def add_dataset(self, name: str, folder: Path) -> str:
        """The URI of ``folder`` as a dataset on this backend (uploaded for S3)."""
        if self._datasets is None:
            return folder.as_uri()
        run(upload_tree(folder, self._datasets, name))
        return self._datasets.url(name) + "/"


@pytest.fixture(params=["file", "s3"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Deployment:
    """A fresh deployment on each backend (file store; moto S3 through an aws connection).

    ``deployment.env`` for an Airflow subprocess, ``deployment.use(monkeypatch)`` for a task run in process.
    """
    data = make_dataset(tmp_path / "dataset", rows=300)
    folder = data.parent if data.is_file() else data
    if request.param == "file":
        uri = (tmp_path / "aicenter").as_uri()
        return Deployment("file", open_store(uri), file_connection_env(uri), folder.as_uri(), None)
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.create_bucket()
    store = open_store(f"s3://{bucket}/aicenter", server.options)
    datasets = open_store(f"s3://{bucket}/datasets", server.options)
    deployment = Deployment("s3", store, s3_connection_env(server, bucket), "", datasets)
    deployment.dataset = deployment.add_dataset("churn", folder)
    return deployment


# -- the test Kubernetes API server (tests/operators/kube_api.py) --------------------------
@pytest.fixture(scope="session")
def runtime_python() -> Path:
    """The runtime image's Python, minus Docker: no Airflow, no kubernetes client.

    Built once per session, by the first pytest worker that needs it (the others reuse it).
    """
    return built_once("runtime-python", build_runtime_python) / "bin" / "python"


@pytest.fixture
def kube_api(tmp_path_factory: pytest.TempPathFactory, runtime_python: Path) -> Iterator[FakeKubernetes]:
    kube = FakeKubernetes(tmp_path_factory.mktemp("kube"), python=str(runtime_python)).start()
    yield kube
    kube.stop()


@pytest.fixture
def kube_deployment(kube_api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, str]:
    """A file store, a dataset, and connections pointing Airflow at the test API server."""
    for key, value in kube_api.connection_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    # The API-fault tests' retries pause milliseconds, not the production 0.5..10 s (the documented settings).
    monkeypatch.setenv("AICENTER_KUBE_RETRY_FIRST_WAIT", "0.05")
    monkeypatch.setenv("AICENTER_KUBE_RETRY_MAX_WAIT", "0.2")
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": uri, "launcher": "kubernetes", "image": "aicenter-runtime:test"}}))
    registry = Registry(open_store(uri))
    data = write_files(tmp_path / "data", {"rows.csv": "a\n1\n2\n"})
    return registry, data.as_uri()


@pytest.fixture
def ddp_deployment(kube_deployment: tuple[Registry, str], tmp_path: Path) -> tuple[Registry, str]:
    """The fake cluster's deployment with package ``ddp`` (a rendezvous training) uploaded: the Job tests' package."""
    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": RENDEZVOUS, "requirements.txt": ""}), "ddp")
    return registry, dataset


def ddp_full_op(dataset: str, **kwargs: Any) -> FullPipelineOperator:
    """A full run of ``ddp`` as an Indexed Job of two nodes with two processes each."""
    return FullPipelineOperator(task_id="train", package="ddp", dataset=dataset, nodes=2, procs_per_node=2,
                                install_requirements=False, **FAST, **kwargs)
