"""The operators' argument checks (airflow_aicenter/operators/checks.py) as plain functions, without Airflow.

Each bad argument is refused with a ConfigurationError (non-retryable) that names the argument
and the fix; the operators call exactly these when a DAG is parsed.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_aicenter.errors import AICenterError, ConfigurationError
from airflow_aicenter.operators.checks import Checked, check_arguments, check_prediction, gpu_count, run_queue
from airflow_aicenter.plans import EVALUATE, FULL, PREDICT, TRAIN, PipelinePlan

GOOD: dict[str, Any] = {
    "dataset": "s3://data/train/",
    "gpu": False,
    "cpu": None,
    "memory_gb": None,
    "storage_gb": None,
    "dataset_volume_claim": None,
    "dataset_sub_path": None,
    "allow_source_builds": False,
    "nodes": 1,
    "procs_per_node": 1,
    "checkpoint_interval": 300,
    "progress_interval": 30,
    "incremental": False,
    "launcher": None,
    "promote_to": None,
    "promote_if": "better",
    "do_xcom_push": False,
}


def check(plan: PipelinePlan = TRAIN, **changed: Any) -> None:
    """The checks read the arguments as the operator holds them: attributes of the same names."""
    check_arguments(plan, "SomeOperator", SimpleNamespace(**{**GOOD, **changed}))


def test_good_arguments_pass():
    check()
    check(FULL, nodes=2, procs_per_node=4, incremental=True, promote_to="production", gpu=2, launcher="kubernetes")
    check(PREDICT, procs_per_node=3)
    check(dataset=None, dataset_volume_claim="claim", dataset_sub_path="2026/01", cpu="500m", memory_gb=4, storage_gb=10)
    check(dataset="pvc://claim/x", dataset_volume_claim="claim")


@pytest.mark.parametrize(
    ("plan", "changed", "says"),
    [
        (TRAIN, {"gpu": -1}, "gpu=-1 is not valid"),
        (TRAIN, {"gpu": "yes"}, "gpu='yes' is not valid"),
        (TRAIN, {"cpu": -2}, "cpu"),
        (TRAIN, {"memory_gb": 0}, "memory_gb"),
        (TRAIN, {"dataset_volume_claim": "c", "dataset": None, "dataset_sub_path": "../up"}, "dataset_sub_path='../up'"),
        (TRAIN, {"allow_source_builds": "yes"}, "allow_source_builds='yes' is not valid; give True or False"),
        (TRAIN, {"nodes": 0}, "nodes=0 is not valid; give a whole number of at least 1"),
        (TRAIN, {"procs_per_node": True}, "procs_per_node=True is not valid"),
        (TRAIN, {"checkpoint_interval": 0}, "checkpoint_interval=0 is not valid; give seconds > 0"),
        (TRAIN, {"checkpoint_interval": True}, "checkpoint_interval=True"),
        (TRAIN, {"progress_interval": 0}, "progress_interval=0 is not valid; give seconds > 0 (default 30)"),
        (TRAIN, {"progress_interval": "often"}, "progress_interval='often'"),
        (TRAIN, {"dataset_volume_claim": "claim"}, "give either dataset='s3://data/train/'"),
        (TRAIN, {"do_xcom_push": True}, "leave do_xcom_push unset"),
        (TRAIN, {"launcher": "slurm"}, "launcher='slurm' is not valid; use one of local, kubernetes or None"),
        (TRAIN, {"promote_if": "sometimes"}, "promote_if='sometimes' is not valid"),
        (TRAIN, {"promote_to": "production"}, "promote_if='better' needs a score"),
        (TRAIN, {"promote_to": "bad alias!", "promote_if": "always"}, "bad alias!"),
        (EVALUATE, {"nodes": 2}, "SomeOperator runs one process"),
        (PREDICT, {"nodes": 2}, "use procs_per_node=N to share the inputs"),
        (EVALUATE, {"incremental": True}, "incremental=True applies to training runs; SomeOperator does not train"),
    ],
)
def test_each_bad_argument_is_refused_with_its_fix(plan: PipelinePlan, changed: dict[str, Any], says: str):
    with pytest.raises(AICenterError) as raised:  # a bad alias name is a VersionError, the rest ConfigurationError
        check(plan, **changed)
    assert says in str(raised.value)
    assert raised.value.retryable is False


def test_the_checked_arguments_come_back_in_their_normal_form():
    """What the operator keeps: a GPU count, seconds as floats, the approval timeout as a timedelta."""
    checked = check_arguments(FULL, "SomeOperator", SimpleNamespace(**{**GOOD, "gpu": True, "checkpoint_interval": 60}),
                              approval_timeout=90, queue_name="", startup_timeout=timedelta(minutes=5))
    assert checked == Checked(gpu=1, checkpoint_interval=60.0, progress_interval=30.0,
                              approval_timeout=timedelta(seconds=90), queue_name=None, startup_timeout=300.0)
    defaults = check_arguments(TRAIN, "SomeOperator", SimpleNamespace(**GOOD))
    assert (defaults.approval_timeout, defaults.queue_name, defaults.startup_timeout) == (timedelta(days=7), None, 600.0)
    assert check_arguments(TRAIN, "SomeOperator", SimpleNamespace(**GOOD), queue_name="team-a").queue_name == "team-a"


@pytest.mark.parametrize(
    ("changed", "says"),
    [
        ({"queue_name": "no spaces"}, "queue_name='no spaces' is not a valid Kubernetes label value"),
        ({"startup_timeout": 0}, "startup_timeout=0 is not a positive duration"),
        ({"approval_timeout": "7d"}, "approval_timeout='7d' is not a positive duration"),
    ],
)
def test_bad_queue_startup_and_approval_arguments_are_refused(changed: dict[str, Any], says: str):
    with pytest.raises(ConfigurationError, match=says) as raised:
        check_arguments(TRAIN, "SomeOperator", SimpleNamespace(**GOOD), **changed)
    assert raised.value.retryable is False


def test_the_queue_is_the_operators_else_the_connections_and_only_kubernetes_queues():
    assert run_queue("kubernetes", "mine", "theirs") == "mine"
    assert run_queue("kubernetes", None, "theirs") == "theirs"
    assert run_queue("kubernetes", None, None) is None
    with pytest.raises(ConfigurationError, match="the connection's extra queue_name='bad queue' is not a valid"):
        run_queue("kubernetes", None, "bad queue")
    # the local launcher runs on the worker at once: a queue asked of it is refused, the connection's default is not
    assert run_queue("local", None, "theirs") is None
    with pytest.raises(ConfigurationError, match=r"queue_name='mine' is for the kubernetes launcher.*launcher='kubernetes'"):
        run_queue("local", "mine", None)


def test_gpu_count_is_a_whole_number():
    assert (gpu_count(True), gpu_count(False), gpu_count(3)) == (1, 0, 3)


@pytest.mark.parametrize(
    ("input_type", "max_failed", "says"),
    [("csv", 0, "input_type='csv' is not valid; use 'json'"), ("json", -1, "max_failed=-1"), ("file", True, "max_failed=True")],
)
def test_prediction_arguments(input_type: str, max_failed: Any, says: str):
    check_prediction("json", 0)
    check_prediction("file", 5)
    with pytest.raises(ConfigurationError) as raised:
        check_prediction(input_type, max_failed)
    assert says in str(raised.value)


def test_checks_need_no_airflow():
    """The module itself (loaded from its file: the operators package around it is the Airflow part) imports no Airflow."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('checks', 'airflow_aicenter/operators/checks.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'airflow')\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
