"""Fixtures for tests in real containers: the runtime image scripts/images.sh builds, and the test
Kubernetes API server in podman mode (tests/containers/podman.py).

These tests never skip: without podman or with an image older than the code they fail, naming
the command that fixes it (``bash scripts/images.sh``; .ci/run calls it before the tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.conftest import S3Server
from tests.containers.deployments import CONN_PASSWORD, ROLE, Deployment, _connections
from tests.containers.podman import RUNTIME_IMAGE, PodmanPods, image_problem
from tests.operators.kube_api import FakeKubernetes


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/containers/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.containers)


@pytest.fixture(scope="session")
def runtime_image() -> str:
    """The runtime image's local tag; fails (never skips) when it is missing or older than airflow_aicenter/."""
    problem = image_problem()
    if problem is not None:
        pytest.fail(f"the container tests need the runtime image: {problem}", pytrace=False)
    return RUNTIME_IMAGE


@pytest.fixture
def podman_pods(runtime_image: str) -> PodmanPods:
    return PodmanPods(runtime_image)


@pytest.fixture
def kube_podman(tmp_path_factory: pytest.TempPathFactory, podman_pods: PodmanPods) -> Iterator[FakeKubernetes]:
    """The test Kubernetes API server, running every pod it is sent in real containers."""
    kube = FakeKubernetes(tmp_path_factory.mktemp("kube"), podman=podman_pods).start()
    yield kube
    kube.stop()


def host_folder(path: Path) -> str:
    """A host folder as the pod sees it through a hostPath mount (the same path)."""
    return str(path.resolve())


@pytest.fixture
def file_deployment(kube_podman: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """A file store on this host, mounted (hostPath, same path) into stage and sync only: never into base."""
    store_folder = tmp_path / "aicenter"
    store_folder.mkdir()
    pods = kube_podman.podman
    assert pods is not None
    pods.host_paths[str(store_folder)] = True
    _connections(kube_podman, monkeypatch, {"storage": store_folder.as_uri()})
    deployment = Deployment(Registry(open_store(store_folder.as_uri())), "", kube_podman, pods, store_folder=store_folder)
    deployment.dataset = deployment.add_dataset("rows", {"rows.csv": "a\n1\n2\n"}, tmp_path)
    return deployment


@pytest.fixture
def s3_deployment(kube_podman: FakeKubernetes, s3_server: S3Server, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """moto S3 (reached over the host network); pods get per-run STS credentials through a Secret."""
    bucket = s3_server.create_bucket()
    store = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    _connections(kube_podman, monkeypatch, {"storage": store.uri, "aws_conn_id": "aws_moto", "runtime_role_arn": ROLE,
                                            "runtime_role_duration": 900})
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({
        "conn_type": "aws", "login": "testing", "password": CONN_PASSWORD,
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    pods = kube_podman.podman
    assert pods is not None
    deployment = Deployment(Registry(store), "", kube_podman, pods,
                            datasets=open_store(f"s3://{bucket}/datasets", s3_server.options))
    deployment.dataset = deployment.add_dataset("rows", {"rows.csv": "a\n1\n2\n"}, tmp_path)
    return deployment
