"""The example training DAG (dags/aicenter_training.py): in process on both stores, and one `airflow dags test` smoke run.

In process, the DAG's own task (parsed from the shipped file, its templates rendered from the
run's conf) runs ``execute`` with a task context: real child process, real store. The smoke
run proves the real path: a connection stored in Airflow's database (added with ``airflow
connections add``) is what both the ``aicenter`` command and the task use, the task runs in
``airflow dags test``, and Airflow records its XCom and Asset event.
"""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.operators.links import run_page_url
from airflow_aicenter.records import Manifest, Outcome, Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from tests.aicenter_helpers import EXAMPLE_ENV, asset_events, example_task, example_training, run_task, xcoms
from tests.conftest import EXAMPLE_PACKAGE, make_dataset
from tests.operators.kube_api import make_context


def result_value(store: Store, record, package: str) -> dict:
    """The XCom value a training that made ``record`` returns."""
    prefix = record.run.prefix
    return {
        "package": package, "version": record.version,
        "package_uri": store.url(f"blobs/sha256/{record.blob.sha256}"),
        "results_uri": store.url(f"{prefix}/_results.json"),
        "artifacts_uri": store.url(f"{prefix}/artifacts/"),
        "snapshot_uri": store.url(f"{prefix}/data_directory.manifest.json"),
        "score": None,
        "run_uri": store.url(prefix),
    }


def test_example_training_creates_a_version(deployment, monkeypatch):
    store, env, dataset = deployment
    deployment.use(monkeypatch)
    registry = Registry(store)
    registry.upload(EXAMPLE_PACKAGE, "churn", created_by="test")

    value, context = run_task(example_task("aicenter_training", "train"), {"dataset": dataset, "version": "1.0"})

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
    assert raw["parameters"]["env"] == EXAMPLE_ENV
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
    # what the task hands Airflow: the XCom value, and the Asset event (its extra)
    assert value == context["ti"].xcom["return_value"] == result_value(store, record, "churn")
    [(asset, extra)] = [added for accessor in context["outlet_events"].values() for added in accessor.added]
    assert asset.uri == "aicenter://churn/"
    assert extra == {"package": "churn", "version": "1.1", "parent": "1.0", "score": None,
                     "run_url": run_page_url(record.run), "run_uri": store.url(prefix)}

    # the same parent again (another DAG run): a second, distinct version; nothing lost
    again = example_training(dataset, version="1.0")
    assert again.execute(make_context("aicenter_training", run_id="manual__2026-03-02T00:00:00+00:00"))["version"] == "1.2"
    assert [r.version for r in registry.versions("churn")] == ["1.0", "1.1", "1.2"]
    assert registry.get("churn", "1.2").parent == "1.0"


@pytest.mark.airflow
def test_example_training_dag_and_the_cli_share_the_connection_in_airflows_database(airflow_env, tmp_path):
    """`airflow connections add aicenter_default ...` is what the command uses, as the example DAG's task does: one store
    for both. The smoke run of the training path through real Airflow (local launcher): version, XCom, Asset event."""
    uri = (tmp_path / "db-store").as_uri()
    added = airflow_env.run("airflow", "connections", "add", "aicenter_default", "--conn-type", "aicenter",
                            "--conn-extra", json.dumps({"storage": uri}))
    assert added.returncode == 0, added.stderr[-2000:]
    # airflow_env is the worker's session: the example DAGs' smoke runs (tests/dags) may already have put a
    # churn in the embedded default. What counts is that this upload leaves it as it was.
    embedded = airflow_env.home / "aicenter" / "packages" / "churn"

    def embedded_files() -> list[str]:
        return sorted(str(p.relative_to(embedded)) for p in embedded.rglob("*")) if embedded.exists() else []

    before = embedded_files()
    try:
        missing = airflow_env.aicenter("package", "show", "churn")
        assert missing.returncode == 1
        assert f"there is no store at {uri} (from the aicenter_default connection's storage extra)" in missing.stderr
        done = airflow_env.aicenter("package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn")
        assert done.returncode == 0 and "version 1.0" in done.stdout and uri in done.stdout, done.stderr
        assert Registry(open_store(uri)).resolve("churn", "latest").version == "1.0", "in the connection's store"
        assert embedded_files() == before, "not the embedded default"

        unknown = airflow_env.aicenter("package", "show", "churn:7.0")
        assert unknown.returncode == 1 and f"in {uri}" in unknown.stderr

        data = make_dataset(tmp_path / "data", rows=200)
        dataset = (data.parent if data.is_file() else data).as_uri()
        ran = airflow_env.dags_test("aicenter_training", {"dataset": dataset})
        assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
        registry = Registry(open_store(uri))
        record = registry.resolve("churn", "latest")
        assert (record.version, record.parent) == ("1.1", "1.0"), "the task trained what the command uploaded"
        # who started it, from the DAG run Airflow hands the task (`airflow dags test` names its user "dag_test")
        assert record.run is not None and record.run.trigger is not None
        assert (record.created_by, record.run.trigger.run_type) == ("dag_test", "manual")
        store = registry.store
        prefix = record.run.prefix
        assert store.exists(f"{prefix}/_results.json") and store.exists(f"blobs/sha256/{record.blob.sha256}")
        assert read(store, f"{prefix}/outcome.json", Outcome).status == "succeeded"
        # what Airflow recorded: the XCom value and the Asset event
        assert xcoms(airflow_env.home, "aicenter_training")["train"]["return_value"] == result_value(store, record, "churn")
        [event] = [e for e in asset_events(airflow_env.home, "aicenter://churn/")
                   if e["dag_id"] == "aicenter_training" and e["extra"]["run_uri"] == store.url(prefix)]
        assert event["extra"] == {"package": "churn", "version": "1.1", "parent": "1.0", "score": None,
                                  "run_url": run_page_url(record.run), "run_uri": store.url(prefix)}
        listed = airflow_env.aicenter("runs", "list", "--json")
        assert [r["id"].split("/")[0] for r in json.loads(listed.stdout)] == ["aicenter_training"], listed.stderr
    finally:
        airflow_env.run("airflow", "connections", "delete", "aicenter_default")
