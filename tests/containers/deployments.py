"""The container tests' deployments (a store, a dataset, the test API server in podman mode), shared by
tests/containers/conftest.py's fixtures and the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.conftest import write_files
from tests.containers.podman import PodmanPods
from tests.operators.kube_api import FakeKubernetes

ROLE = "arn:aws:iam::123456789012:role/aicenter-runtime"
CONN_PASSWORD = "aws-conn-password-not-for-pods"

@dataclass
class Deployment:
    registry: Registry
    dataset: str
    kube: FakeKubernetes
    pods: PodmanPods
    #: The file store's folder on this host (None on S3).
    store_folder: Path | None = None
    #: Where datasets go on this deployment's backend.
    datasets: Store | None = None

    def add_dataset(self, name: str, files: dict[str, str | bytes], tmp_path: Path) -> str:
        folder = write_files(tmp_path / f"dataset-{name}", files)
        if self.datasets is None:
            self.pods.host_paths[str(folder)] = False
            return folder.as_uri()
        run(upload_tree(folder, self.datasets, name))
        return self.datasets.url(name) + "/"


def _connections(kube: FakeKubernetes, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]) -> None:
    for key, value in kube.connection_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"launcher": "kubernetes", "image": "aicenter-runtime:test", **extra}}))
