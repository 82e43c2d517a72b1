"""Tiny ML packages with controllable behaviour, tasks run in process, and readers for a test AIRFLOW_HOME's metadata DB."""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
from functools import cache
from pathlib import Path
from typing import Any

from airflow_aicenter.registry import Registry
from tests.conftest import REPO, write_files
from tests.packages import ECHO_MAIN

MAIN = ECHO_MAIN

#: A package that records every call it gets (and the env it sees) in artifacts/calls.jsonl.
#: evaluate() returns 0.75 when the version holds the model.txt save() wrote, else 0.5 (before save in a full run).
RECORDING_TRAIN = '''
import json, os

def _log(event, **kw):
    with open(os.path.join(os.environ["artifacts_directory"], "calls.jsonl"), "a") as fh:
        fh.write(json.dumps({"event": event, "cwd": os.getcwd(), **kw}) + "\\n")

class Main:
    def __init__(self):
        _log("__init__", env={k: os.environ.get(k) for k in (
            "data_directory", "test_data_directory", "training_data_directory", "evaluation_data_directory",
            "artifacts_directory", "save_training_data", "save_test_data", "EPOCHS", "API_TOKEN")})
    def process_data(self, input_directory):
        _log("process_data", arg=input_directory, files=sorted(os.listdir(input_directory)))
        with open(os.path.join(os.environ["training_data_directory"], "train.csv"), "w") as fh:
            fh.write("x\\n1\\n")
    def train(self, training_directory):
        _log("train", arg=training_directory, files=sorted(os.listdir(training_directory)))
    def evaluate(self, evaluation_directory):
        _log("evaluate", arg=evaluation_directory, files=sorted(os.listdir(evaluation_directory)))
        return 0.75 if os.path.exists("model.txt") else 0.5
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("trained")
        _log("save")
'''

#: evaluate() returns float(env SCORE), or SCORE itself when it is not a number (a bad score).
#: process_data writes the training split unless TRAIN_SPLIT=0, the evaluation split unless EVAL_SPLIT=0.
SCORED_TRAIN = '''
import os

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        if os.environ.get("TRAIN_SPLIT", "1") == "1":
            open(os.path.join(os.environ["training_data_directory"], "train.csv"), "w").write("x\\n1\\n")
        if os.environ.get("EVAL_SPLIT", "1") == "1":
            open(os.path.join(os.environ["evaluation_data_directory"], "eval.csv"), "w").write("x\\n2\\n")
    def train(self, training_directory):
        pass
    def evaluate(self, evaluation_directory):
        raw = os.environ["SCORE"]
        try:
            return float(raw)
        except ValueError:
            return raw
    def save(self):
        open("model.txt", "w").write(os.environ.get("SCORE", ""))
'''


def upload_package(registry: Registry, tmp_path: Path, name: str, train_py: str) -> None:
    registry.upload(write_files(tmp_path / f"pkg-{name}", {"main.py": MAIN, "train.py": train_py, "requirements.txt": ""}), name)


def small_dataset(tmp_path: Path, name: str = "data") -> Path:
    return write_files(tmp_path / name, {"rows.csv": "x\n1\n2\n"})


# -- tasks run in process (the operator's execute with a task context; no Airflow subprocess) ----------
#: Pod polling for the test Kubernetes API server, whose pods start and end in seconds.
FAST = {"startup_check_interval_seconds": 1, "poll_interval": 0.5, "base_container_status_polling_interval": 0.2}

#: The example DAG's training env (dags/aicenter_training.py).
EXAMPLE_ENV = {"EPOCHS": "150", "LEARNING_RATE": "0.2"}


def example_training(dataset: str, package: str = "churn", version: str = "latest", **kwargs: Any) -> Any:
    """The example DAG's training task (dags/aicenter_training.py) with its params given as values."""
    from airflow_aicenter.operators import TrainPipelineOperator

    return TrainPipelineOperator(task_id="train", package=package, version=version, dataset=dataset, env=dict(EXAMPLE_ENV),
                                 save_training_data=True, **kwargs)


def run_trigger(deferred: Any) -> dict[str, Any]:
    """Run a deferred task's trigger (``TaskDeferred.trigger``) to its first event, as the triggerer does; its payload."""
    async def first_event() -> dict[str, Any]:
        async for event in deferred.trigger.run():
            return dict(event.payload)
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first_event())


@cache
def _dag_bag(dag_file: Path) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dag_file), safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return bag


def example_task(dag_id: str, task_id: str, dag_file: str | None = None) -> Any:
    """A task of a shipped DAG (``dags/<dag_file or dag_id>.py``), parsed as Airflow parses it."""
    bag = _dag_bag(REPO / "dags" / f"{dag_file or dag_id}.py")
    return bag.dags[dag_id].get_task(task_id)


def run_task(task: Any, conf: dict[str, Any] | None = None, *, run_id: str = "manual__2026-03-01T00:00:00+00:00",
             try_number: int = 1, **context: Any) -> tuple[Any, dict[str, Any]]:
    """Run a DAG's task in process as a DAG run with ``conf`` would: params resolved, templates rendered, ``execute``.

    Returns the task's value and the context (its ``ti.xcom`` holds what the task pushed). ``context``
    adds to the task context (``triggering_asset_events``, say).
    """
    from tests.operators.kube_api import make_context

    dag = task.dag
    ctx = make_context(dag.dag_id, task.task_id, run_id=run_id, try_number=try_number)
    params = copy.deepcopy(dag.params)
    params.update(conf or {})  # what a DAG run's conf does to the DAG's params (each still validated)
    ctx.update(params=params.validate(), triggering_asset_events={}, **context)
    rendered = copy.copy(task)  # rendering sets the templated fields: the parsed task stays as it was
    rendered.render_template_fields(ctx)
    return rendered.execute(ctx), ctx


# -- the metadata DB of a test AIRFLOW_HOME ------------------------------------------------
def _db(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(home / "airflow.db")


def latest_run_id(home: Path, dag_id: str) -> str:
    with _db(home) as db:
        row = db.execute("select run_id from dag_run where dag_id = ? order by id desc limit 1", (dag_id,)).fetchone()
    assert row, f"no run of {dag_id} in the metadata DB"
    return row[0]


def xcoms(home: Path, dag_id: str, run_id: str | None = None) -> dict[str, dict[str, Any]]:
    """``{task_id: {key: value}}`` of one run (default: the DAG's latest)."""
    run_id = run_id or latest_run_id(home, dag_id)
    out: dict[str, dict[str, Any]] = {}
    with _db(home) as db:
        for task_id, key, value in db.execute(
            'select task_id, "key", value from xcom where dag_id = ? and run_id = ?', (dag_id, run_id)
        ):
            out.setdefault(task_id, {})[key] = json.loads(value)
    return out


def task_states(home: Path, dag_id: str, run_id: str | None = None) -> dict[str, str]:
    run_id = run_id or latest_run_id(home, dag_id)
    with _db(home) as db:
        return dict(db.execute("select task_id, state from task_instance where dag_id = ? and run_id = ?", (dag_id, run_id)))


def asset_events(home: Path, uri: str) -> list[dict[str, Any]]:
    """Events recorded for the asset with this (normalised) URI, oldest first, with their source."""
    with _db(home) as db:
        rows = db.execute(
            "select e.extra, e.source_dag_id, e.source_task_id from asset_event e join asset a on a.id = e.asset_id "
            "where a.uri = ? order by e.id", (uri,),
        ).fetchall()
    return [{"extra": json.loads(extra), "dag_id": dag, "task_id": task} for extra, dag, task in rows]


def queued_for(home: Path, dag_id: str) -> int:
    """Asset events waiting to trigger ``dag_id`` (the scheduler turns them into a run)."""
    with _db(home) as db:
        return db.execute("select count(*) from asset_dag_run_queue where target_dag_id = ?", (dag_id,)).fetchone()[0]


def dag_paused(home: Path, dag_id: str) -> bool | None:
    """Whether the DAG is paused; None when it is not in the metadata DB yet."""
    with _db(home) as db:
        row = db.execute("select is_paused from dag where dag_id = ?", (dag_id,)).fetchone()
    return None if row is None else bool(row[0])
