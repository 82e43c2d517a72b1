"""The spec a run is given, built from the task's RunRequest without Airflow (airflow_aicenter/run_spec.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from airflow_aicenter import run_spec
from airflow_aicenter.completion import RunRequest
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.plans import EVALUATE, PREDICT, TRAIN
from airflow_aicenter.records import VersionRecord
from airflow_aicenter.registry import Registry
from airflow_aicenter.secrets import MASK, SECRET_KEYS_ENV
from airflow_aicenter.storage import Store
from tests.aicenter_helpers import SCORED_TRAIN, upload_package

SECRET, KNOWN = "pa55-w0rd-value", "postgres://u:dbpass@db/x"


@dataclass
class TaskTry:
    dag_id: str = "dag"
    run_id: str = "manual__1"
    task_id: str = "train"
    try_number: int | None = 2
    map_index: int | None = None


@pytest.fixture
def parent(store: Store, tmp_path: Path) -> VersionRecord:
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    return registry.get("scored", "1.0")


def test_the_spec_holds_the_arguments_and_no_secret(store: Store, parent: VersionRecord):
    request = RunRequest(
        plan=TRAIN, package="scored", dataset="s3://data/train/", env={"EPOCHS": "3", "API_TOKEN": SECRET, "DB": KNOWN},
        secret_keys=frozenset({"DB"}), gpu=1, nodes=2, procs_per_node=4, checkpoint_interval=60.0, allow_source_builds=True,
    )
    run = run_spec.run_ref(TaskTry(), store)
    assert (run.try_number, run.map_index, run.uri) == (2, -1, store.url(run.prefix))
    spec = run_spec.build_spec(
        request, parent, run, storage=store.uri, extra={"package_indexes": ["https://pypi.example/simple"]}
    )
    assert spec.env == {"EPOCHS": "3"} and spec.user_env_names == ["API_TOKEN", "DB"]
    assert SECRET not in spec.model_dump_json() and KNOWN not in spec.model_dump_json()
    assert (spec.pipeline, spec.package, spec.version, spec.blob) == ("train", "scored", "1.0", parent.blob)
    assert (spec.storage, spec.run_prefix, spec.dataset) == (store.uri, run.prefix, "s3://data/train/")
    assert (spec.gpu, spec.nodes, spec.procs_per_node, spec.checkpoint_interval) == (1, 2, 4, 60.0)
    assert spec.allow_source_builds and spec.install_requirements
    assert spec.checkpoint_prefix == run.path.task.checkpoints and spec.package_indexes == ["https://pypi.example/simple"]
    # What the process gets besides the spec: the secret values, and their names so it masks them.
    assert run_spec.secret_env(request) == {"API_TOKEN": SECRET, "DB": KNOWN, SECRET_KEYS_ENV: "API_TOKEN,DB"}
    assert request.masked_env() == {"EPOCHS": "3", "API_TOKEN": MASK, "DB": MASK}


def test_runs_without_a_version_have_no_checkpoints_and_a_type_adds_its_fields(store: Store, parent: VersionRecord):
    run = run_spec.run_ref(TaskTry(try_number=None, map_index=3), store)
    assert (run.try_number, run.map_index) == (1, 3)
    evaluate = RunRequest(plan=EVALUATE, package="scored", evaluation_dataset="s3://data/eval/", save_test_data=True)
    spec = run_spec.build_spec(evaluate, parent, run, storage=store.uri, extra={})
    assert spec.checkpoint_prefix is None and spec.save_test_data and not spec.save_training_data
    predict = RunRequest(plan=PREDICT, package="scored", dataset="s3://in/", spec_extra={"input_type": "file", "max_failed": 2})
    spec = run_spec.build_spec(predict, parent, run, storage=store.uri, extra={})
    assert (spec.input_type, spec.max_failed) == ("file", 2)


def test_an_incremental_run_needs_the_parents_snapshot(store: Store, parent: VersionRecord):
    request = RunRequest(plan=TRAIN, package="scored", dataset="s3://data/train/", incremental=True)
    run = run_spec.run_ref(TaskTry(), store)
    with pytest.raises(ConfigurationError, match="train it once with save_training_data=True"):
        run_spec.build_spec(request, parent, run, storage=store.uri, extra={})
    snapshotted = parent.model_copy(update={"snapshot": "s3://store/snap.json"})
    spec = run_spec.build_spec(request, snapshotted, run, storage=store.uri, extra={})
    assert spec.incremental_base == "s3://store/snap.json" and spec.save_training_data  # it snapshots its own data


def test_run_spec_imports_neither_airflow_nor_kubernetes():
    code = (
        "import sys, airflow_aicenter.run_spec\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'kubernetes'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
