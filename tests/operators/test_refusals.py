"""Refusals and failures, in process: the operator's ``execute`` with a task context, local launcher.

What these check was checked through ``airflow dags test`` before (one Airflow subprocess per
case); the messages are the exceptions the task fails with, which Airflow writes to the task
log. A configuration error is an ``AirflowFailException`` (the task fails without its retries); a
failure of user code is not (Airflow's retries are the user's to set). The real path is proved
by the ``airflow dags test`` smoke runs (test_train_dag.py, tests/dags, tests/security/test_secrets.py,
whose failing task Airflow retries).
"""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator
from airflow_aicenter.records import Outcome, read
from airflow_aicenter.storage import Store
from tests.aicenter_helpers import EXAMPLE_ENV, MAIN, SCORED_TRAIN, example_training, small_dataset, upload_package
from tests.conftest import EXAMPLE_PACKAGE, make_dataset, write_files
from tests.operators.kube_api import make_context
from tests.packages import FAILING_TRAIN


def fails(op: Any, task_id: str = "train") -> BaseException:
    """Run the task; it must fail. Returns the exception the task failed with."""
    with pytest.raises(Exception) as failed:
        op.execute(make_context(task_id=task_id))
    return failed.value


def outcomes(store: Store) -> dict[str, Outcome]:
    """``{task_id: outcome}`` of every run in the store."""
    return {i.key.split("/")[3]: read(store, i.key, Outcome) for i in store.list("runs") if i.key.endswith("outcome.json")}


def assert_refused_before_compute(store: Store, cause: str, env: dict | None = None) -> None:
    """No compute started (no runtime phase ran), and the run records still show the refused run and why."""
    [key] = [i.key for i in store.list("runs") if i.key.endswith("outcome.json")]
    outcome = read(store, key, Outcome)
    assert (outcome.status, outcome.phase, outcome.phases) == ("failed", "prepare", {}), outcome
    assert cause in (outcome.error or "") and outcome.env == (env if env is not None else EXAMPLE_ENV)
    assert not any(i.key.endswith(("_results.json", "registration.json")) for i in store.list("runs"))


@pytest.mark.parametrize("conf, expected", [
    ({"package": "nosuch"}, "package 'nosuch' has no versions"),
    ({"version": "7.3"}, "has no version 7.3"),
    ({"version": "1.2.3"}, 'use "M.m"'),
    ({"dataset": "{tmp}/typo/dataset"}, "is empty or does not exist"),
    ({"dataset": "{tmp}/empty"}, "is empty or does not exist"),
    ({"dataset": "{tmp}/data/churn.csv"}, "is a file, not a folder"),
    ({"dataset": "s3://no-such-bucket-here/data"}, "bucket 'no-such-bucket-here' does not exist"),
])
def test_bad_inputs_fail_before_compute(conf, expected, empty_registry, tmp_path, s3_env):
    empty_registry.upload(EXAMPLE_PACKAGE, "churn")
    data = make_dataset(tmp_path / "data", rows=50)
    (tmp_path / "empty").mkdir()
    dataset = (data.parent if data.is_file() else data).as_uri()
    conf = {"dataset": dataset, **{k: v.replace("{tmp}", tmp_path.as_uri()) for k, v in conf.items()}}
    error = fails(example_training(**conf))
    assert expected in str(error)
    assert_refused_before_compute(empty_registry.store, expected)
    assert not (tmp_path / "typo").exists(), "a dataset URI with a typo must not create a folder"


def test_gpu_on_a_worker_without_one_fails_before_compute(empty_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi here, as on a CPU worker
    empty_registry.upload(EXAMPLE_PACKAGE, "churn")
    data = make_dataset(tmp_path / "data", rows=50)
    op = TrainPipelineOperator(task_id="train", package="churn", version="latest",
                               dataset=(data.parent if data.is_file() else data).as_uri(), gpu=2)
    error = fails(op)
    assert "gpu=2 was asked for, but this worker has 0 visible GPU(s)" in str(error)
    assert "launcher='kubernetes'" in str(error)
    assert isinstance(error, AirflowFailException)
    assert_refused_before_compute(empty_registry.store, "0 visible GPU(s)", env={})


CRASHING_TRAIN = '''
import os, signal
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        open("model.txt", "w").write("half")
    def save(self):
        os.kill(os.getpid(), signal.SIGKILL)
'''



@pytest.mark.parametrize("train_py, expected", [
    (CRASHING_TRAIN, "the user process was killed by SIGKILL (out of memory?) before it reported"),
    (FAILING_TRAIN, "Main.train() raised ValueError: labels column 'churned' is missing (train.py:8)"),
])
def test_failed_run_leaves_no_version(train_py, expected, empty_registry, tmp_path):
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": train_py, "requirements.txt": ""})
    empty_registry.upload(pkg, "crashy")
    data = write_files(tmp_path / "data", {"rows.csv": "a,b\n1,2\n"})
    error = fails(example_training(data.as_uri(), package="crashy"))
    assert expected in str(error)
    assert not isinstance(error, AirflowFailException), "a failure of user code stays retryable"
    assert [r.version for r in empty_registry.versions("crashy")] == ["1.0"]
    [outcome] = outcomes(empty_registry.store).values()
    assert outcome.status == "failed" and expected in (outcome.error or "")
    assert not any(i.key.endswith("_results.json") for i in empty_registry.store.list("runs"))


def test_an_unknown_version_is_not_retried_a_user_error_is(empty_registry, tmp_path):
    """What test_boundaries_dag.py's retried task shows through Airflow, decided here: the exception's kind."""
    upload_package(empty_registry, tmp_path, "scored", SCORED_TRAIN)
    data = small_dataset(tmp_path).as_uri()
    unknown = fails(TrainPipelineOperator(task_id="train", package="scored", version="9.9", dataset=data, env={"SCORE": "1"}))
    assert "9.9" in str(unknown) and isinstance(unknown, AirflowFailException), "an unknown version is not retried"
    broken = fails(EvaluatePipelineOperator(task_id="evaluate", package="scored", version="1.0", evaluation_dataset=data,
                                            env={"SCORE": "high"}), "evaluate")
    assert "Main.evaluate() returned 'high'" in str(broken)
    assert not isinstance(broken, AirflowFailException), "a failure of user code uses the task's retries"
    assert [r.version for r in empty_registry.versions("scored")] == ["1.0"]


BAD_CAUSES = {
    "eval_string": "Main.evaluate() returned 'high' (str); it must return one number, the score",
    "eval_nan": "Main.evaluate() returned nan, which is not a finite number",
    "full_no_training_data": "Main.process_data() wrote nothing to training_data_directory",
}


def test_bad_scores_empty_training_split_and_unknown_alias_fail_clearly(empty_registry, tmp_path):
    upload_package(empty_registry, tmp_path, "scored", SCORED_TRAIN)
    data = small_dataset(tmp_path).as_uri()
    tasks = {
        "eval_string": EvaluatePipelineOperator(task_id="eval_string", package="scored", version="1.0",
                                                evaluation_dataset=data, env={"SCORE": "high"}),
        "eval_nan": EvaluatePipelineOperator(task_id="eval_nan", package="scored", version="1.0",
                                             evaluation_dataset=data, env={"SCORE": "nan"}),
        "full_no_training_data": FullPipelineOperator(task_id="full_no_training_data", package="scored", version="1.0",
                                                      dataset=data, env={"SCORE": "0.5", "TRAIN_SPLIT": "0"}),
        "eval_unknown_alias": EvaluatePipelineOperator(task_id="eval_unknown_alias", package="scored", version="champion",
                                                       evaluation_dataset=data, env={"SCORE": "0.5"}),
    }
    errors = {task: str(fails(op, task)) for task, op in tasks.items()}  # every task fails
    store = empty_registry.store
    recorded = outcomes(store)
    assert set(recorded) == set(BAD_CAUSES) | {"eval_unknown_alias"}
    for task, cause in BAD_CAUSES.items():
        assert recorded[task].status == "failed" and cause in (recorded[task].error or ""), (task, recorded[task].error)
        assert cause in errors[task]
    refused = recorded["eval_unknown_alias"]
    assert (refused.status, refused.phase, refused.phases) == ("failed", "prepare", {}), "refused before any compute"
    assert "package 'scored' has no alias 'champion'" in (refused.error or "")
    assert recorded["full_no_training_data"].phases.get("user_code") is None, "train() never ran"
    assert "package 'scored' has no alias 'champion'" in errors["eval_unknown_alias"]
    assert "aicenter package promote scored:VERSION --alias champion" in errors["eval_unknown_alias"]
    # nothing half-done is visible: no version, no evaluation, no results
    assert [r.version for r in empty_registry.versions("scored")] == ["1.0"]
    assert empty_registry.evaluations("scored", "1.0") == []
    assert not any(i.key.endswith("_results.json") for i in store.list("runs"))
