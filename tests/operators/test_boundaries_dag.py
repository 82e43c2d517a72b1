"""What user code can see, and which errors Airflow may retry: the operator's ``execute`` in process, on an S3 store.

- User code runs in its own process with the AI Center variables and the user's ``env`` only:
  none of the worker's ``AIRFLOW_*`` variables, no store credentials (here an S3 store on the moto
  server, whose keys the runtime itself does hold), no run spec. The operator runs in this
  process as it runs in a worker's task process; the worker's variables are set around it.
- A failure of user code stays retryable (Airflow's retries are the user's to set): the task
  fails with an exception that is not an ``AirflowFailException``. That Airflow then runs the
  next try is seen in the secrets smoke run (tests/security/test_secrets.py, its ``fails`` task
  has ``retries=1``); that a configuration error fails without its retries is checked in
  test_refusals.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.aicenter_helpers import MAIN, small_dataset
from tests.conftest import S3Server, write_files
from tests.operators.conftest import s3_connection_env
from tests.operators.kube_api import make_context

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

def train_task(dataset: str, fail: str = "") -> TrainPipelineOperator:
    return TrainPipelineOperator(task_id="train", package="envdump", version="latest", dataset=dataset,
                                 env={"EPOCHS": "3", "FAIL_TRAIN": fail, "API_TOKEN": "tok-sekrit-4711"}, retries=1)


@pytest.fixture
def s3_deployment(s3_server: S3Server, tmp_path, monkeypatch: pytest.MonkeyPatch) -> tuple[Registry, str]:
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


def test_user_code_sees_no_worker_variables_credentials_or_spec(s3_deployment):
    registry, dataset = s3_deployment
    assert train_task(dataset).execute(make_context("aicenter_boundaries"))["version"] == "1.1"
    record = registry.get("envdump", "1.1")
    seen = json.loads(registry.store.get_bytes(f"{record.run.prefix}/artifacts/environ.json"))
    assert not [k for k in seen if k.startswith("AIRFLOW")], "no AIRFLOW_* variable reaches user code"
    assert not [k for k in seen if k.startswith("AWS_")], "no store credentials reach user code"
    assert "AICENTER_RUN_SPEC" not in seen and not any("run_prefix" in v for v in seen.values()), "no run spec"
    assert "testing-secret" not in json.dumps(seen), "the store's secret key appears nowhere"
    assert seen["EPOCHS"] == "3" and seen["API_TOKEN"] == "tok-sekrit-4711", "the user's env, secret ones included, is theirs"
    assert seen["data_directory"].startswith("/") and seen["artifacts_directory"].startswith("/")
    # By default user code runs in the package's own environment (an empty requirements.txt: a
    # bare one), not the worker's: Airflow, this provider and the store client are not importable.
    python = json.loads(registry.store.get_bytes(f"{record.run.prefix}/artifacts/python.json"))
    assert python["importable"] == [], python
    assert python["prefix"] != sys.prefix and "/envs/" in python["prefix"], python


def test_a_user_error_is_retryable(s3_deployment):
    """The task fails with the user's error, as an exception Airflow retries (not an AirflowFailException)."""
    registry, dataset = s3_deployment
    with pytest.raises(Exception) as failed:
        train_task(dataset, fail="yes").execute(make_context("aicenter_boundaries"))
    assert "train failed on purpose" in str(failed.value)
    assert not isinstance(failed.value, AirflowFailException), "a failure of user code uses the task's retries"
    assert [r.version for r in registry.versions("envdump")] == ["1.0"]
