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

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_aicenter.operators import TrainPipelineOperator
from tests.operators.kube_api import make_context


def train_task(dataset: str, fail: str = "") -> TrainPipelineOperator:
    return TrainPipelineOperator(task_id="train", package="envdump", version="latest", dataset=dataset,
                                 env={"EPOCHS": "3", "FAIL_TRAIN": fail, "API_TOKEN": "tok-sekrit-4711"}, retries=1)


def test_user_code_sees_no_worker_variables_credentials_or_spec(envdump_s3_deployment):
    registry, dataset = envdump_s3_deployment
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


def test_a_user_error_is_retryable(envdump_s3_deployment):
    """The task fails with the user's error, as an exception Airflow retries (not an AirflowFailException)."""
    registry, dataset = envdump_s3_deployment
    with pytest.raises(Exception) as failed:
        train_task(dataset, fail="yes").execute(make_context("aicenter_boundaries"))
    assert "train failed on purpose" in str(failed.value)
    assert not isinstance(failed.value, AirflowFailException), "a failure of user code uses the task's retries"
    assert [r.version for r in registry.versions("envdump")] == ["1.0"]
