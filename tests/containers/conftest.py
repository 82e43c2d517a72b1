"""Fixtures for tests in real containers: the runtime image scripts/images.sh builds, and the test
Kubernetes API server in podman mode (tests/containers/podman.py).

These tests never skip: without podman or with an image older than the code they fail, naming
the command that fixes it (``bash scripts/images.sh``; .ci/run calls it before the tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
