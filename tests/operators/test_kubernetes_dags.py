"""launcher="kubernetes" against the test Kubernetes API server: one `airflow dags test` smoke run, the rest in process.

The example training DAG runs unchanged through real Airflow on Kubernetes (sync, S3 store,
credentials from a Secret); the same training deferrable (the operator deferred, its trigger
run, the task re-entered), failing pods and a worker restart run the operator's ``execute``
in this process with a task context. Each must give what the local launcher gives with the
runtime image's interpreter: the same new version, package content, results, artifacts and
data snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Manifest, Outcome, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.aicenter_helpers import FAST, example_training, run_trigger
from tests.conftest import EXAMPLE_PACKAGE, make_dataset, write_files
from tests.operators.kube_api import FakeKubernetes, make_context, seed_pod
from tests.packages import ECHO_MAIN, FAILING_TRAIN

IMAGE = "aicenter-runtime:test"
POD_KEY_ID, POD_SECRET = "AKIAPODONLY00000001", "pod-only-s3cr3t-never-in-a-manifest"
CONN_PASSWORD = "testing-secret"  # the worker's AWS connection (tests.conftest's moto credentials)

GATED_TRAIN = '''
import os, time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        deadline = time.time() + 120
        while not os.path.exists(os.environ["GATE"]) and time.time() < deadline:
            time.sleep(0.2)
        self.opened = os.path.exists(os.environ["GATE"])
    def save(self):
        open("model.txt", "w").write(str(self.opened))
'''
MAIN = ECHO_MAIN


def kube_env(kube: FakeKubernetes, aicenter_extra: dict[str, Any], **more: str) -> dict[str, str]:
    extra = {"launcher": "kubernetes", "image": IMAGE, **aicenter_extra}
    return {**kube.connection_env(), "AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": extra}), **more}


def use_kube(monkeypatch: pytest.MonkeyPatch, kube: FakeKubernetes, aicenter_extra: dict[str, Any]) -> None:
    """Point this process (the operator run in process) at the test API server, as ``kube_env`` points Airflow."""
    for key, value in kube_env(kube, aicenter_extra).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("KUBECONFIG", raising=False)


def churn_dataset(root: Path) -> Path:
    data = make_dataset(root / "dataset", rows=300)
    return data.parent if data.is_file() else data


def output(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


def summary(store: Store, registry: Registry, dataset: str) -> dict[str, Any]:
    """What a training run produced, with the store root, dataset URI and timings taken out."""
    record = registry.resolve("churn", "latest")
    assert record.run is not None
    prefix = record.run.prefix
    raw = store.get_bytes(f"{prefix}/_results.json").decode()
    results = json.loads(raw.replace(store.url(prefix), "<run>").replace(store.uri, "<store>").replace(dataset, "<dataset>"))
    for key in ("execution_time", "start_at", "end_at"):
        assert results["run_summary"].pop(key) is not None
    results["parameters"].pop("pipeline")  # <dag_id>.<task_id>
    for key in ("phases", "run_uri"):
        results["aicenter"].pop(key)
    for key in ("run", "run_url", "triggered_by", "resources"):  # the task instance, its DAG run, measured times
        results["aicenter"].pop(key, None)
    artifacts = {i.key.rsplit("/artifacts/", 1)[1]: hashlib.sha256(store.get_bytes(i.key)).hexdigest()
                 for i in store.list(f"{prefix}/artifacts")}
    manifest = read(store, f"{prefix}/data_directory.manifest.json", Manifest)
    outcome = read(store, f"{prefix}/outcome.json", Outcome)
    return {
        "version": record.version, "parent": record.parent, "package_sha256": record.blob.sha256,
        "results": results, "artifacts": artifacts, "snapshot": sorted((f.path, f.sha256) for f in manifest.files),
        "outcome": (outcome.status, outcome.blob, outcome.artifacts, outcome.artifacts_bytes),
    }


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in want:
        if key == "results":
            for part in want["results"]:
                assert json.dumps(got["results"][part], indent=1, sort_keys=True) == json.dumps(want["results"][part], indent=1, sort_keys=True)
        assert got[key] == want[key], key
    assert set(got) == set(want)


# -- the local launcher with the runtime image's interpreter: the reference --------------------
@dataclass
class Baseline:
    summary: dict[str, Any]
    output: str


def test_image_python_trains_through_the_local_launcher(image_python_baseline: Baseline, runtime_python: Path) -> None:
    """docker/requirements.txt and the image's code are enough to train: no Airflow in that interpreter."""
    for module in ("airflow", "kubernetes"):
        probe = subprocess.run([str(runtime_python), "-c", f"import {module}"], capture_output=True, text=True, check=False)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, f"{module} is importable in the image python"
    assert f"Starting the runtime: {runtime_python} -m airflow_aicenter.runtime" in image_python_baseline.output
    assert image_python_baseline.summary["version"] == "1.1"
    assert {"report.md", "loss.svg"} <= set(image_python_baseline.summary["artifacts"])


# -- the example DAG on Kubernetes ---------------------------------------------------------
@pytest.mark.airflow
def test_example_dag_sync_on_s3_with_secret_credentials(airflow_env, kube_api: FakeKubernetes, s3_server, tmp_path,
                                                        image_python_baseline: Baseline) -> None:
    bucket = s3_server.create_bucket()
    store = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    registry = Registry(store)
    registry.upload(EXAMPLE_PACKAGE, "churn")
    run(upload_tree(churn_dataset(tmp_path), open_store(f"s3://{bucket}/datasets/churn", s3_server.options), ""))
    dataset = f"s3://{bucket}/datasets/churn/"
    kube_api.add_secret("aicenter-s3", {"AWS_ACCESS_KEY_ID": POD_KEY_ID, "AWS_SECRET_ACCESS_KEY": POD_SECRET})
    env = kube_env(kube_api, {"storage": store.uri, "aws_conn_id": "aws_moto", "aws_secret_name": "aicenter-s3"},
                   AIRFLOW_CONN_AWS_MOTO=json.dumps({"conn_type": "aws", "login": "testing", "password": CONN_PASSWORD,
                                                     "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))

    done = airflow_env.dags_test("aicenter_training", {"dataset": dataset, "version": "1.0"}, extra_env=env)
    assert done.returncode == 0, output(done)[-5000:]
    log = output(done)
    assert "[sync] [aicenter] run succeeded" in log, "the pod's logs streamed into the task log"
    assert_same_run(summary(store, registry, dataset), image_python_baseline.summary)

    [pod] = kube_api.all_pods()
    assert pod.gone and pod.obj["status"]["phase"] == "Succeeded"
    containers = {c.name: c for c in [*pod.init, *pod.containers]}
    for name in ("stage", "sync"):
        container = containers[name]
        assert (container.env["AWS_ACCESS_KEY_ID"], container.env["AWS_SECRET_ACCESS_KEY"]) == (POD_KEY_ID, POD_SECRET), \
            "the runtime reached S3 with the Secret's keys (secretKeyRef)"
        assert container.env["AWS_ENDPOINT_URL"] == s3_server.endpoint and container.env["AWS_REGION"] == "us-east-1"
    assert not {k for k in containers["base"].env if k.startswith("AWS_")}, "no store credential in the user container"
    # no secret anywhere: manifest/spec, task log, run records, XCom
    sent = kube_api.everything_sent()
    stored = "".join(store.get_bytes(i.key).decode(errors="replace") for i in store.list("runs"))
    with sqlite3.connect(airflow_env.home / "airflow.db") as db:
        xcom = " ".join(str(v) for (v,) in db.execute("select value from xcom where dag_id = 'aicenter_training'"))
    assert '"version": "1.1"' in xcom.replace("'", '"') or "1.1" in xcom
    for where, text in {"manifest": sent, "log": log, "records": stored, "xcom": xcom}.items():
        for secret in (POD_KEY_ID, POD_SECRET, CONN_PASSWORD):
            assert secret not in text, f"{secret!r} leaked into the {where}"


def test_example_training_deferrable(kube_api: FakeKubernetes, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                     image_python_baseline: Baseline) -> None:
    """The example DAG's training with deferrable=True: it defers, its trigger follows the pod, the task re-enters."""
    store = open_store((tmp_path / "aicenter").as_uri())
    registry = Registry(store)
    registry.upload(EXAMPLE_PACKAGE, "churn")
    dataset = churn_dataset(tmp_path).as_uri()
    use_kube(monkeypatch, kube_api, {"storage": store.uri})

    context = make_context("aicenter_training", "train")
    with pytest.raises(TaskDeferred) as deferred:
        example_training(dataset, version="1.0", deferrable=True, **FAST).execute(context)
    assert deferred.value.method_name == "trigger_reentry", "the task deferred and resumes through trigger_reentry"
    event = run_trigger(deferred.value)
    result = example_training(dataset, version="1.0", deferrable=True, **FAST).trigger_reentry(context, event)
    assert result["version"] == "1.1" and context["ti"].xcom["return_value"] == result
    assert_same_run(summary(store, registry, dataset), image_python_baseline.summary)
    assert [p.obj["status"]["phase"] for p in kube_api.all_pods()] == ["Succeeded"]


def test_failed_pods_fail_the_task_with_the_runtime_cause(kube_api: FakeKubernetes, tmp_path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing training, sync and deferrable: the task fails with the runtime's one-line cause; no version."""
    store = open_store((tmp_path / "aicenter").as_uri())
    registry = Registry(store)
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": FAILING_TRAIN, "requirements.txt": ""}), "broken")
    data = write_files(tmp_path / "data", {"rows.csv": "a\n1\n"}).as_uri()
    use_kube(monkeypatch, kube_api, {"storage": store.uri})

    def task(task_id: str, **kwargs: Any) -> TrainPipelineOperator:
        return TrainPipelineOperator(task_id=task_id, package="broken", dataset=data, **FAST, **kwargs)

    sync_errors: list[BaseException] = []

    def run_sync() -> None:  # the two tasks run at once (two pods), as two tasks of a DAG run may
        try:
            task("sync").execute(make_context("aicenter_test_k8s_failures", "sync"))
        except Exception as exc:
            sync_errors.append(exc)

    sync = threading.Thread(target=run_sync, daemon=True)
    sync.start()
    context = make_context("aicenter_test_k8s_failures", "deferred")
    with pytest.raises(TaskDeferred) as deferred:
        task("deferred", deferrable=True).execute(context)
    event = run_trigger(deferred.value)
    with pytest.raises(Exception) as deferred_failed:
        task("deferred", deferrable=True).trigger_reentry(context, event)
    sync.join(120)
    assert not sync.is_alive() and len(sync_errors) == 1, "the sync task failed"
    cause = "train run of broken:1.0 failed: Main.train() raised ValueError: labels column 'churned' is missing (train.py:8)"
    for failed in (sync_errors[0], deferred_failed.value):  # the exception the task fails with is what Airflow logs
        assert cause in str(failed), str(failed)
    assert [r.version for r in registry.versions("broken")] == ["1.0"]
    outcomes = [read(store, i.key, Outcome) for i in store.list("runs") if i.key.endswith("outcome.json")]
    assert sorted(o.status for o in outcomes) == ["failed", "failed"] and all(o.phase == "user_code" for o in outcomes)
    pods = kube_api.all_pods()
    assert len(pods) == 2 and all(p.gone and p.obj["status"]["phase"] == "Failed" for p in pods)
    for pod in pods:
        [sync] = [c for c in pod.obj["status"]["containerStatuses"] if c["name"] == "sync"]  # it writes the run's message
        message = sync["state"]["terminated"]["message"]
        assert message == "Main.train() raised ValueError: labels column 'churned' is missing (train.py:8)"


def test_worker_restart_reattaches_to_the_running_pod(kube_api: FakeKubernetes, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """The worker died while the pod trained; the task runs again and follows that pod: no second pod or version.

    The pod the dead worker had started is created (by the operator's own pod builder) the
    moment the new worker first looks for pods of this task instance.
    """
    store = open_store((tmp_path / "aicenter").as_uri())
    registry = Registry(store)
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": GATED_TRAIN, "requirements.txt": ""}), "gated")
    dataset = write_files(tmp_path / "data", {"rows.csv": "a\n1\n"}).as_uri()
    use_kube(monkeypatch, kube_api, {"storage": store.uri})
    gate = tmp_path / "gate"
    context = make_context("aicenter_training", "train")
    seeded: dict[str, Any] = {}

    def example_task() -> TrainPipelineOperator:
        return example_training(dataset, package="gated", version="1.0", **FAST)

    def earlier_pod(selector: str | None) -> None:
        if seeded or "dag_id=aicenter_training" not in (selector or ""):
            return
        seeded.update(seed_pod(example_task(), registry, context, env={"GATE": str(gate)}))
        kube_api.create_pod("default", dict(seeded))
        kube_api.wait_for(lambda: kube_api.all_pods()[0].obj["status"]["phase"] == "Running", what="the earlier pod to run")

    kube_api.on_list_pods = earlier_pod
    outcome: dict[str, Any] = {}

    def worker() -> None:  # the task once more, on the restarted worker
        try:
            outcome["result"] = example_task().execute(context)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    kube_api.wait_for(lambda: (bool(seeded) and any(f"/pods/{seeded['metadata']['name']}/log" in path for _, path in kube_api.requests))
                      or not thread.is_alive(), timeout=150, what="the restarted worker to follow the running pod")
    gate.touch()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the task did not end"
    assert "error" not in outcome, outcome.get("error")
    captured = capfd.readouterr()
    name = seeded["metadata"]["name"]
    assert f"Reusing existing pod '{name}'" in captured.out + captured.err
    assert not any(method == "POST" for method, _ in kube_api.requests), "no second pod"
    assert [r.version for r in registry.versions("gated")] == ["1.0", "1.1"]
    assert outcome["result"]["version"] == "1.1"
    record = registry.get("gated", "1.1")
    assert record.run is not None and record.run.try_number == 1
    assert store.get_bytes(f"{record.run.prefix}/_results.json")
    assert kube_api.all_pods()[0].gone


@pytest.mark.cluster
def test_training_pod_on_a_real_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same training against a real cluster and S3 store, when one is configured."""
    needed = ("AICENTER_TEST_KUBECONFIG", "AICENTER_TEST_IMAGE", "AICENTER_TEST_STORAGE", "AICENTER_TEST_AWS_CONN")
    missing = [name for name in needed if not os.environ.get(name)]
    if missing:
        pytest.skip(f"needs a real Kubernetes cluster: set {', '.join(missing)} (kubeconfig path, runtime image pushed "
                    "to a registry the cluster pulls from, s3:// storage the pods reach, AIRFLOW_CONN_* JSON of its AWS connection)")
    from airflow_aicenter.operators import TrainPipelineOperator

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config_path": os.environ["AICENTER_TEST_KUBECONFIG"]}}))
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", os.environ["AICENTER_TEST_AWS_CONN"])
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {
        "storage": os.environ["AICENTER_TEST_STORAGE"], "aws_conn_id": "aws_test", "launcher": "kubernetes",
        "image": os.environ["AICENTER_TEST_IMAGE"], "aws_secret_name": os.environ.get("AICENTER_TEST_AWS_SECRET", "")}}))
    from airflow_aicenter.hooks.aicenter import AICenterHook

    registry = AICenterHook().get_registry()
    registry.upload(EXAMPLE_PACKAGE, "churn-cluster-test")
    hook = AICenterHook()
    datasets = open_store(registry.store.url("datasets/churn-cluster-test"), hook.s3_options)
    run(upload_tree(churn_dataset(tmp_path), datasets, ""))
    result = TrainPipelineOperator(task_id="train", package="churn-cluster-test", dataset=datasets.url() + "/",
                                   memory_gb=1, storage_gb=2).execute(make_context("aicenter_cluster_test"))
    assert registry.get("churn-cluster-test", result["version"]).run is not None
    shutil.rmtree(tmp_path, ignore_errors=True)
