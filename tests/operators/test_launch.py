"""Starting a prepared run (airflow_aicenter/operators/launch.py) on a real store, with a real local launcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from airflow_aicenter import run_spec
from airflow_aicenter.completion import RunRequest
from airflow_aicenter.errors import RunError
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.operators.launch import resume, start
from airflow_aicenter.plans import TRAIN
from airflow_aicenter.records import Outcome, read, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from tests.aicenter_helpers import SCORED_TRAIN, upload_package


@dataclass
class TaskTry:
    dag_id: str = "dag"
    run_id: str = "manual__1"
    task_id: str = "train"
    try_number: int | None = 1
    map_index: int | None = None


def not_kpo() -> Any:
    raise AssertionError("KubernetesPodOperator's execute was called for a run that is not a pod's")


def test_an_earlier_tries_run_is_completed_as_it_ended_not_launched_again(store: Store, tmp_path: Path):
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    try1, try2 = (run_spec.run_ref(TaskTry(try_number=n), store) for n in (1, 2))
    finished = Outcome(status="succeeded", pipeline="train", package="scored", version="1.0", start_at=1.0, end_at=2.0,
                       blob=registry.get("scored", "1.0").blob)
    write(store, try1.key(OUTCOME), finished)
    launcher = LocalLauncher(store=store, env={})
    ready = run_spec.prepare(registry, RunRequest(plan=TRAIN, package="scored", dataset="s3://d/"), try2,
                             launcher=lambda: launcher, check_inputs=lambda: None, extra={}, log=logging.getLogger("t"))
    assert ready.recovered is not None
    launcher.python = str(tmp_path / "no-python")  # launching now would fail: the run is surely not started again
    done = start(cast(Any, {}), ready, not_kpo)
    assert (done.run, done.outcome, done.spec.run_prefix) == (try1, finished, try1.prefix)
    assert not store.exists(try2.key(OUTCOME)), "try 2 ran nothing"


def test_a_local_run_goes_through_its_launcher_and_its_failure_is_the_cause(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest
):
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    run, missing = run_spec.run_ref(TaskTry(), store), (tmp_path / "no-data").as_uri()
    # the runtime reaches the store as the hook lets it: the S3 server's credentials in its environment
    credentials = request.getfixturevalue("s3_server").env() if store.uri.startswith("s3://") else {}
    launcher = LocalLauncher(store=store, env=credentials)
    ready = run_spec.prepare(registry, RunRequest(plan=TRAIN, package="scored", dataset=missing), run,
                             launcher=lambda: launcher, check_inputs=lambda: None, extra={}, log=logging.getLogger("t"))
    # the real runtime, a child process: it records its failure to stage the missing data, and that is the cause
    with pytest.raises(RunError, match="no-data"):
        start(cast(Any, {}), ready, not_kpo)
    recorded = read(store, run.key(OUTCOME), Outcome)
    assert (recorded.status, recorded.phase) == ("failed", "stage_data")


def test_a_launcher_that_does_not_defer_says_so_on_resume(store: Store):
    with pytest.raises(RunError, match="the local launcher does not defer; clear the task to run it again"):
        resume(cast(Any, {}), LocalLauncher(store=store, env={}), {"status": "success"}, not_kpo)
