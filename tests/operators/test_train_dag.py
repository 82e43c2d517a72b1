"""TrainPipelineOperator end to end: real Airflow (`airflow dags test`), real child process, both stores."""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Manifest, Outcome, Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import asset_events, xcoms
from tests.conftest import EXAMPLE_PACKAGE, make_dataset, write_files
from tests.operators.kube_api import make_context
from tests.packages import ECHO_MAIN

pytestmark = pytest.mark.airflow


def test_example_training_dag_creates_a_version(deployment, airflow_env):
    store, env, dataset = deployment
    registry = Registry(store)
    registry.upload(EXAMPLE_PACKAGE, "churn", created_by="test")

    done = airflow_env.dags_test("aicenter_training", {"dataset": dataset, "version": "1.0"}, extra_env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    record = registry.resolve("churn", "latest")
    assert record.version == "1.1" and record.parent == "1.0" and record.pipeline == "train"
    assert record.run is not None and record.run.dag_id == "aicenter_training" and record.run.task_id == "train"
    assert record.created_by == "aicenter_training.train"
    prefix = record.run.prefix
    results = read(store, f"{prefix}/_results.json", Results)
    raw = json.loads(store.get_bytes(f"{prefix}/_results.json"))
    assert set(raw) == {"parameters", "run_summary", "aicenter"}
    assert set(raw["parameters"]) == {"pipeline", "inputs", "env"}
    assert raw["parameters"]["pipeline"] == "aicenter_training.train"
    assert raw["parameters"]["inputs"] == {"package": "churn", "version": "1.0", "train_data": dataset, "gpu": "False"}
    assert raw["parameters"]["env"] == {"EPOCHS": "150", "LEARNING_RATE": "0.2"}
    assert set(raw["run_summary"]) == {"execution_time", "start_at", "end_at", "outputs"}
    assert set(raw["run_summary"]["outputs"]) == {"train_data", "artifacts_data", "package", "version"}
    assert results.run_summary.outputs.version == "1.1"
    assert results.run_summary.end_at >= results.run_summary.start_at > 1_700_000_000
    # artifacts written by the package's save()
    artifacts = {i.key.rsplit("/", 1)[-1] for i in store.list(f"{prefix}/artifacts")}
    assert {"report.md", "loss.svg"} <= artifacts
    # the data snapshot: a manifest whose every blob exists
    manifest = read(store, f"{prefix}/data_directory.manifest.json", Manifest)
    assert manifest.file_count >= 1 and manifest.source == dataset
    assert all(store.exists(f"blobs/sha256/{f.sha256}") for f in manifest.files)
    assert record.snapshot == store.url(f"{prefix}/data_directory.manifest.json")
    # the new version's content holds the trained model
    outcome = read(store, f"{prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and set(outcome.phases) >= {"stage_package", "stage_data", "user_code"}
    assert outcome.blob.sha256 == record.blob.sha256 != registry.get("churn", "1.0").blob.sha256

    # the same parent again (the task once more, in process): a second, distinct version; nothing lost
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**env, "AICENTER_CACHE": airflow_env.env["AICENTER_CACHE"]}.items():
            patch.setenv(name, value)
        again = TrainPipelineOperator(task_id="train", package="churn", version="1.0", dataset=dataset,
                                      env={"EPOCHS": "150", "LEARNING_RATE": "0.2"}, save_training_data=True)
        assert again.execute(make_context("aicenter_training"))["version"] == "1.2"
    assert [r.version for r in registry.versions("churn")] == ["1.0", "1.1", "1.2"]
    assert registry.get("churn", "1.2").parent == "1.0"


def test_example_training_dag_on_the_embedded_default(airflow_env, tmp_path):
    """No connection at all: file store under $AIRFLOW_HOME/aicenter, local launcher; XCom and Asset event."""
    registry = Registry(open_store(airflow_env.default_store_uri))
    registry.upload(EXAMPLE_PACKAGE, "churnlocal")
    data = make_dataset(tmp_path / "data", rows=200)
    dataset = (data.parent if data.is_file() else data).as_uri()
    done = airflow_env.dags_test("aicenter_training", {"package": "churnlocal", "dataset": dataset})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    record = registry.resolve("churnlocal", "latest")
    assert (record.version, record.parent) == ("1.1", "1.0")
    store = registry.store
    assert store.uri == airflow_env.default_store_uri
    prefix = record.run.prefix
    value = xcoms(airflow_env.home, "aicenter_training")["train"]["return_value"]
    assert value == {
        "package": "churnlocal", "version": "1.1",
        "package_uri": store.url(f"blobs/sha256/{record.blob.sha256}"),
        "results_uri": store.url(f"{prefix}/_results.json"),
        "artifacts_uri": store.url(f"{prefix}/artifacts/"),
        "snapshot_uri": store.url(f"{prefix}/data_directory.manifest.json"),
        "score": None,
        "run_uri": store.url(prefix),
    }
    assert store.exists(f"{prefix}/_results.json") and store.exists(f"blobs/sha256/{record.blob.sha256}")
    [event] = [e for e in asset_events(airflow_env.home, "aicenter://churnlocal/") if e["dag_id"] == "aicenter_training"]
    assert event["extra"] == {"package": "churnlocal", "version": "1.1", "parent": "1.0", "score": None, "run_uri": store.url(prefix)}


SECRET_DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from airflow_aicenter.operators import TrainPipelineOperator

with DAG("aicenter_test_secrets", schedule=None, start_date=datetime(2026, 1, 1), params={"dataset": ""}):
    TrainPipelineOperator(task_id="train", package="leaky", version="latest", dataset="{{ params.dataset }}",
                          env={"API_TOKEN": "hunter2-s3cr3t-value", "db_password": "pw-0f-the-db",
                               "STRIPE_KEY": "sk-live-0f-stripe", "EPOCHS": "2"})
'''

LEAKY_TRAIN = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        print("token is", os.environ["API_TOKEN"], "and", os.environ["db_password"], os.environ["STRIPE_KEY"], flush=True)
    def save(self):
        open(os.path.join(os.environ["artifacts_directory"], "seen.txt"), "w").write(os.environ["API_TOKEN"])
'''


def test_secret_env_never_reaches_log_results_or_xcom(airflow_env, tmp_path):
    uri = (tmp_path / "aicenter").as_uri()
    env = {"AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}})}
    registry = Registry(open_store(uri))
    registry.upload(write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": LEAKY_TRAIN, "requirements.txt": ""}), "leaky")
    data = write_files(tmp_path / "data", {"rows.csv": "a\n1\n"})
    airflow_env.add_dag("aicenter_test_secrets.py", SECRET_DAG)
    done = airflow_env.dags_test("aicenter_test_secrets", {"dataset": data.as_uri()}, extra_env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "token is" in output, "the package's print reached the task log"
    secrets = ("hunter2-s3cr3t-value", "pw-0f-the-db", "sk-live-0f-stripe")
    assert not any(secret in output for secret in secrets)
    record = registry.resolve("leaky", "latest")
    results = json.loads(registry.store.get_bytes(f"{record.run.prefix}/_results.json"))
    assert results["parameters"]["env"] == {"API_TOKEN": "***", "db_password": "***", "STRIPE_KEY": "***", "EPOCHS": "2"}
    everything = "".join(registry.store.get_bytes(i.key).decode(errors="replace") for i in registry.store.list("runs")
                         if not i.key.endswith("seen.txt"))
    assert not any(secret in everything for secret in secrets)
    # the package code itself did get the value (only the records and logs must not)
    assert registry.store.get_bytes(f"{record.run.prefix}/artifacts/seen.txt") == b"hunter2-s3cr3t-value"
    import sqlite3
    db = sqlite3.connect(airflow_env.home / "airflow.db")
    xcoms = " ".join(str(v) for (v,) in db.execute("select value from xcom where dag_id='aicenter_test_secrets'"))
    assert xcoms and not any(secret in xcoms for secret in secrets)
    # the UI's Rendered Template view: Airflow's masker alone does not know *_KEY names
    rendered = " ".join(str(v) for (v,) in db.execute(
        "select rendered_fields from rendered_task_instance_fields where dag_id='aicenter_test_secrets'"))
    assert "EPOCHS" in rendered and not any(secret in rendered for secret in secrets)
    # a local run shows our fields only (no empty Kubernetes ones), and the version that ran, not "latest"
    [fields] = [json.loads(v) for (v,) in db.execute(
        "select rendered_fields from rendered_task_instance_fields where dag_id='aicenter_test_secrets'")]
    assert fields["version"] == "1.0", "the version the run trained from, resolved from \"latest\""
    assert "image" not in fields and "cmds" not in fields and "labels" not in fields
