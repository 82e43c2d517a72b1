"""Through `airflow dags test`: what user code can see, and which errors Airflow may retry.

- User code runs in its own process with the AI Center variables and the user's ``env`` only:
  none of the worker's ``AIRFLOW_*`` variables, no store credentials (here an S3 store on the moto
  server, whose keys the runtime itself does hold), no run spec.
- A failure of user code stays retryable (Airflow's retries are the user's to set); that a
  configuration error (an unknown version) fails without its retries is checked in process
  (test_refusals.py: the exception is an ``AirflowFailException``).
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.aicenter_helpers import MAIN, _db, latest_run_id, small_dataset
from tests.conftest import write_files
from tests.operators.conftest import s3_connection_env

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

DAG = '''
from datetime import datetime, timedelta
from airflow.sdk import DAG
from airflow_aicenter.operators import TrainPipelineOperator

with DAG(dag_id="aicenter_boundaries", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         params={"dataset": "", "version": "latest", "fail": ""}):
    TrainPipelineOperator(task_id="train", package="envdump", version="{{ params.version }}", dataset="{{ params.dataset }}",
                          env={"EPOCHS": "3", "FAIL_TRAIN": "{{ params.fail }}", "API_TOKEN": "tok-sekrit-4711"},
                          retries=1, retry_delay=timedelta(seconds=0))
'''


def tries(home, dag_id: str) -> tuple[str, int]:
    run_id = latest_run_id(home, dag_id)
    with _db(home) as db:
        state, try_number = db.execute("select state, try_number from task_instance where dag_id = ? and run_id = ? and task_id = 'train'",
                                       (dag_id, run_id)).fetchone()
    return state, try_number


@pytest.fixture
def s3_deployment(airflow_env, s3_server, tmp_path):
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.transfer import run, upload_tree

    bucket = s3_server.create_bucket()
    registry = Registry(open_store(f"s3://{bucket}/aicenter", s3_server.options))
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": ENV_DUMP_TRAIN, "requirements.txt": ""}), "envdump")
    data = open_store(f"s3://{bucket}/datasets", s3_server.options)
    run(upload_tree(small_dataset(tmp_path), data, "rows"))
    airflow_env.add_dag("aicenter_boundaries.py", DAG)
    return registry, f"s3://{bucket}/datasets/rows/", s3_connection_env(s3_server, bucket)


def test_user_code_sees_no_worker_variables_credentials_or_spec(airflow_env, s3_deployment):
    registry, dataset, env = s3_deployment
    done = airflow_env.dags_test("aicenter_boundaries", {"dataset": dataset}, extra_env={**env, "AIRFLOW_VAR_PROBE": "worker-only"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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


def test_a_user_error_is_retried(airflow_env, s3_deployment):
    """Airflow's retries apply to a failure of user code (that a configuration error is not retried is
    decided by the exception's kind: test_refusals.py)."""
    registry, dataset, env = s3_deployment
    done = airflow_env.dags_test("aicenter_boundaries", {"dataset": dataset, "fail": "yes"}, extra_env=env)
    assert done.returncode != 0
    state, try_number = tries(airflow_env.home, "aicenter_boundaries")
    assert state == "failed" and try_number == 2, "a failure of user code uses the task's retries"
    assert "train failed on purpose" in done.stdout + done.stderr
    assert [r.version for r in registry.versions("envdump")] == ["1.0"]
