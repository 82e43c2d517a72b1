"""Fixtures for operator tests: a fresh deployment on each storage backend, and the test Kubernetes API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.launchers.pod import PodLauncher, PodRun
from airflow_aicenter.operators import FullPipelineOperator, TrainPipelineOperator
from airflow_aicenter.records import BlobRef, RunRef, RunSpec
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.aicenter_helpers import FAST, MAIN, SCORED_TRAIN, example_training, small_dataset, upload_package
from tests.conftest import EXAMPLE_PACKAGE, S3Server, built_once, make_dataset, write_files
from tests.operators.kube_api import FakeKubernetes, build_runtime_python, make_context
from tests.operators.test_kubernetes_credentials import CONN_PASSWORD, ROLE
from tests.operators.test_kubernetes_dags import Baseline, churn_dataset, summary
from tests.operators.test_kubernetes_launcher import TRAIN as LAUNCHER_TRAIN
from tests.operators.test_kubernetes_source_builds import TRAIN as SRCPKG_TRAIN
from tests.operators.test_progress_runs import PRICES
from tests.packages import COUNTING_TRAIN, DOUBLING_MAIN
from tests.runtime.test_distributed import RENDEZVOUS
from tests.security.test_environments import evil_index


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
    assert not kube.invalid, f"the test API server served objects the Kubernetes schema refuses: {kube.invalid[:3]}"


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


# -- test_kubernetes_predict.py ---
@pytest.fixture
def doubler_deployment(kube_deployment: tuple[Registry, str], tmp_path: Path) -> tuple[Registry, str]:
    registry, _ = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": DOUBLING_MAIN, "requirements.txt": ""}), "doubler")
    registry.set_alias("doubler", "production", "1.0", set_by="test")
    lines = "".join(json.dumps({"x": n}) + "\n" for n in range(1, 201))
    inbox = write_files(tmp_path / "inbox", {"a/batch.jsonl": lines, "b.jsonl": '{"x": 5}\n{"x": -1}\n'})
    return registry, inbox.as_uri()


# -- test_trigger.py ---
@pytest.fixture
def scored_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team")
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    return registry


# -- test_kubernetes_credentials.py ---
@pytest.fixture
def kube_s3_deployment(kube_api: FakeKubernetes, s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, str]:
    for key, value in kube_api.connection_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    bucket = s3_server.create_bucket()
    store = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {
        "storage": store.uri, "launcher": "kubernetes", "image": "aicenter-runtime:test", "aws_conn_id": "aws_moto",
        "runtime_role_arn": ROLE, "runtime_role_duration": 900}}))
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({"conn_type": "aws", "login": "testing", "password": CONN_PASSWORD,
                                                            "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    registry = Registry(store)
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": LAUNCHER_TRAIN, "requirements.txt": ""}), "rows")
    run(upload_tree(write_files(tmp_path / "data", {"rows.csv": "a\n1\n2\n"}), open_store(f"s3://{bucket}/datasets", s3_server.options), "rows"))
    return registry, f"s3://{bucket}/datasets/rows/"


# -- test_progress_runs.py ---
@pytest.fixture
def local_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter",
                                                                    "extra": {"storage": uri, "prices": PRICES}}))
    return Registry(open_store(uri))


# -- test_pod_endings.py ---
@pytest.fixture
def launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PodLauncher:
    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": uri, "launcher": "kubernetes", "image": "aicenter-runtime:test"}}))
    op = TrainPipelineOperator(task_id="train", package="p", dataset="s3://b/d/")
    launcher = op.make_launcher("kubernetes")
    assert isinstance(launcher, PodLauncher)
    run = RunRef(dag_id="d", run_id="r", task_id="train")
    spec = RunSpec(pipeline="train", storage=uri, run_prefix=run.prefix, package="p", version="1.0",
                   blob=BlobRef(sha256="ab" * 32, size=1))
    launcher.pod_run = PodRun(spec=spec, run=run)
    return launcher


# -- test_kubernetes_source_builds.py ---
@pytest.fixture
def srcpkg_deployment(kube_api: FakeKubernetes, s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, str, str]:
    """An S3 store (per-run STS credentials in stage and sync), a dataset, and a local index with an sdist only."""
    for key, value in kube_api.connection_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    bucket = s3_server.create_bucket()
    store = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    index = evil_index(tmp_path / "mirror", tmp_path / "spy")
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {
        "storage": store.uri, "launcher": "kubernetes", "image": "aicenter-runtime:test", "aws_conn_id": "aws_moto",
        "runtime_role_arn": ROLE, "runtime_role_duration": 900, "package_indexes": [index]}}))
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({"conn_type": "aws", "login": "testing", "password": CONN_PASSWORD,
                                                            "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    registry = Registry(store)
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": SRCPKG_TRAIN, "requirements.txt": "evilproj\n"}), "srcpkg")
    run(upload_tree(write_files(tmp_path / "data", {"rows.csv": "a\n1\n"}), open_store(f"s3://{bucket}/datasets", s3_server.options),
                    "rows"))
    return registry, f"s3://{bucket}/datasets/rows/", index


# -- test_kubernetes_pod.py ---
@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AIRFLOW_CONN_KUBERNETES_DEFAULT", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": (tmp_path / "store").as_uri(), "launcher": "kubernetes",
                                            "image": "registry.example.com/aicenter-runtime:0.1.0"}}))


# -- test_kubernetes_dags.py ---
@pytest.fixture(scope="module")
def image_python_baseline(runtime_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """The example DAG's training in process on the local launcher, with the runtime image's interpreter."""
    from structlog.testing import capture_logs

    root = tmp_path_factory.mktemp("image-python")
    store = open_store((root / "aicenter").as_uri())
    registry = Registry(store)
    registry.upload(EXAMPLE_PACKAGE, "churn")
    dataset = churn_dataset(root).as_uri()
    op = example_training(dataset, version="1.0", launcher="local", python=str(runtime_python))
    with pytest.MonkeyPatch.context() as patch, capture_logs() as logs:
        patch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": store.uri}}))
        op.execute(make_context("aicenter_test_image_python", "train"))
    return Baseline(summary=summary(store, registry, dataset), output="\n".join(str(entry["event"]) for entry in logs))


# -- test_lineage.py ---
@pytest.fixture
def rows_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "rows", COUNTING_TRAIN)
    return registry


# -- test_refusals.py ---
@pytest.fixture
def empty_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """An empty file store that the ``aicenter_default`` connection points at."""
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    return Registry(open_store(uri))


# -- test_boundaries_dag.py ---
ENV_DUMP_TRAIN = '''
import importlib.util, json, os, sys
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        with open(os.path.join(os.environ["artifacts_directory"], "environ.json"), "w") as fh:
            json.dump(dict(os.environ), fh)
        with open(os.path.join(os.environ["artifacts_directory"], "python.json"), "w") as fh:
            json.dump({"prefix": sys.prefix, "executable": sys.executable,
                       "importable": [m for m in ("airflow", "airflow_aicenter", "obstore")
                                      if importlib.util.find_spec(m) is not None]}, fh)
        if os.environ.get("FAIL_TRAIN"):
            raise RuntimeError("train failed on purpose")
    def save(self):
        pass
'''


@pytest.fixture
def envdump_s3_deployment(s3_server: S3Server, tmp_path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, str]:
    """The envdump package and a dataset on S3; this process is the worker: the connections and worker-only variables set."""
    bucket = s3_server.create_bucket()
    registry = Registry(open_store(f"s3://{bucket}/aicenter", s3_server.options))
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": ENV_DUMP_TRAIN, "requirements.txt": ""}), "envdump")
    data = open_store(f"s3://{bucket}/datasets", s3_server.options)
    run(upload_tree(small_dataset(tmp_path), data, "rows"))
    worker: dict[str, Any] = {**s3_connection_env(s3_server, bucket), "AIRFLOW_VAR_PROBE": "worker-only",
                              "AIRFLOW_HOME": str(tmp_path / "airflow-home"), **s3_server.env()}
    for key, value in worker.items():
        monkeypatch.setenv(key, value)
    return registry, f"s3://{bucket}/datasets/rows/"
