"""promote_if="approved" under the real scheduler (issue 22): approved, rejected and timed out.

PostgreSQL, LocalExecutor, scheduler, dag-processor and api-server (tests/load/conftest.py).
A full run registers its candidate, asks for approval and waits in Airflow's human in the
loop without a worker; a person answers through the public REST API as the Required Actions
view does (logged in as themselves); the alias, the approval kept beside the version, the
alias history and ``_results.json`` must agree. A third run nobody answers times out, which
rejects.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.layout import RESULTS
from airflow_aicenter.records import Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import upload_package
from tests.conftest import write_files
from tests.load.stack import Postgres, Stack, task_log_tails
from tests.load.support import wait_for

pytestmark = pytest.mark.airflow

PACKAGE = "approvalpkg"
WAITS, TIMES_OUT = "aicenter_approval_waits", "aicenter_approval_times_out"
TIMEOUT_SECONDS = 8

TRAIN_PY = '''
import os
import shutil

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        shutil.copytree(input_directory, os.environ["training_data_directory"], dirs_exist_ok=True)
    def train(self, training_directory):
        pass
    def evaluate(self, evaluation_directory):
        return float(os.environ["SCORE"])
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write(os.environ["SCORE"])
'''

DAG_SOURCE = '''
import pendulum
from airflow.sdk import DAG

from airflow_aicenter.operators import FullPipelineOperator

for dag_id, timeout in (({waits!r}, 600), ({times_out!r}, {timeout})):
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False):
        FullPipelineOperator(
            task_id="retrain", package={package!r}, version="1.0", dataset={dataset!r},
            evaluation_dataset={holdout!r}, env={{"SCORE": "{{{{ dag_run.conf['score'] }}}}"}},
            save_training_data=True, install_requirements=False,
            promote_to="production", promote_if="approved", approval_timeout=timeout,
        )
'''


class Api:
    """The public REST API as a person's browser session uses it: logged in as that person."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        login = urllib.request.Request(f"{self.base}/auth/token", method="POST",
                                       data=json.dumps({"username": user, "password": password}).encode(),
                                       headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(login, timeout=30) as answer:
            self.token = json.loads(answer.read())["access_token"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(f"{self.base}/api/v2{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def hitl(self, dag_id: str, run_id: str) -> str:
        return f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/retrain/-1/hitlDetails"

    def respond(self, dag_id: str, run_id: str, option: str, comment: str) -> Any:
        return self.call("PATCH", self.hitl(dag_id, run_id), {"chosen_options": [option],
                                                              "params_input": {"comment": comment}})


def test_a_person_approves_rejects_or_lets_it_time_out(stack: tuple[Stack, Postgres, Path], tmp_path: Path) -> None:
    airflow, db, _ = stack
    t0 = time.monotonic()
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"ada": "ada-pw", "bob": "bob-pw"}))
    airflow.env.update(
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="ada:admin,bob:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        # the scheduler's sweep of requests past their timeout (default every 15 s)
        AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL="2",
    )
    store = open_store((airflow.home / "aicenter").as_uri())
    registry = Registry(store)
    upload_package(registry, tmp_path, PACKAGE, TRAIN_PY)
    dataset = write_files(tmp_path / "data", {"rows.csv": "x\n1\n2\n"}).as_uri()
    holdout = write_files(tmp_path / "holdout", {"rows.csv": "x\n3\n"}).as_uri()
    (airflow.home / "dags" / "aicenter_approval_test.py").write_text(DAG_SOURCE.format(
        waits=WAITS, times_out=TIMES_OUT, timeout=TIMEOUT_SECONDS, package=PACKAGE, dataset=dataset, holdout=holdout))
    airflow.up()
    wait_for("the DAGs to be parsed", lambda: airflow.check_alive() and len(db.query(
        "select 1 from serialized_dag where dag_id in (%s, %s)", WAITS, TIMES_OUT)) == 2, 120)
    ada, bob = Api(airflow.api_port, "ada", "ada-pw"), Api(airflow.api_port, "bob", "bob-pw")

    def state(dag_id: str, run_id: str) -> str | None:
        rows = db.query("select state from task_instance where dag_id = %s and run_id = %s", dag_id, run_id)
        return rows[0][0] if rows else None

    def run(dag_id: str, run_id: str, score: float) -> None:
        airflow.airflow("dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps({"score": score}))

    def waiting(dag_id: str, run_id: str) -> dict[str, Any]:
        """The request, once the task waits for it (no worker slot: awaiting_input)."""
        def parked() -> bool:
            airflow.check_alive()
            assert state(dag_id, run_id) not in ("failed", "upstream_failed"), task_log_tails(airflow.home)
            return state(dag_id, run_id) == "awaiting_input"

        wait_for(f"{run_id} to wait for a person", parked, 240, interval=1)
        # A person answers after reading, not within the second: Airflow 3.3's scheduler fails a task
        # whose answer resumed it before it handled the exit of the worker that parked it (the
        # executor's "success" then finds the task queued again). Answer once that exit is handled.
        parked_exit = f"task_id=retrain, run_id={run_id}, map_index=-1"
        wait_for(f"the scheduler to see {run_id}'s worker exit", lambda: any(
            parked_exit in line and "state=awaiting_input" in line
            for line in airflow.log_tail("scheduler", 200_000).splitlines() if "TaskInstance Finished" in line), 60)
        detail: dict[str, Any] = ada.call("GET", ada.hitl(dag_id, run_id))
        return detail

    def finished(dag_id: str, run_id: str) -> str:
        def done() -> str | None:
            airflow.check_alive()
            rows = db.query("select state from dag_run where dag_id = %s and run_id = %s", dag_id, run_id)
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        final: str = wait_for(f"{run_id} to finish", done, 180, interval=1)
        return final

    try:
        # 1. approved: the alias moves, with the approver, the time and the comment
        run(WAITS, "approve", 0.8)
        detail = waiting(WAITS, "approve")
        assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
        assert detail["subject"] == f"Approve {PACKAGE} 1.1 for production?"
        assert "`production` does not exist yet" in detail["body"]
        assert registry.approval(PACKAGE, "1.1").status == "pending"
        assert [p.version for p in registry.pending_approvals(PACKAGE)] == ["1.1"]
        assert registry.alias(PACKAGE, "production") is None
        answer = ada.respond(WAITS, "approve", "Approve", "first model, checked by hand")
        assert answer["responded_by"]["name"] == "ada"
        assert finished(WAITS, "approve") == "success"
        current = registry.alias(PACKAGE, "production")
        assert current is not None and current.version == "1.1" and current.set_by == "ada"
        assert current.reason.startswith("approved by ada at ") and current.reason.endswith(": first model, checked by hand")
        kept = registry.approval(PACKAGE, "1.1")
        assert kept.status == "approved" and kept.by == "ada" and kept.comment == "first model, checked by hand"
        results = read(store, current_results(registry, "1.1"), Results)
        assert results.aicenter["approval"]["status"] == "approved" and results.aicenter["promoted"] is True
        print(f"[approval] approved: {time.monotonic() - t0:.1f} s")

        # 2. rejected: the alias stays; the request compared the candidate with 1.1 like with like
        run(WAITS, "reject", 0.9)
        detail = waiting(WAITS, "reject")
        body = detail["body"]
        assert "now points at **1.1**" in body and "candidate 1.2: 0.9" in body and "current 1.1: 0.8" in body
        assert "scores higher (+0.1)" in body and "`SCORE`: `0.8` -> `0.9`" in body
        assert "The same 1 files as the current version" in body and "[run page](" in body
        bob.respond(WAITS, "reject", "Reject", "score jump looks like leakage")
        assert finished(WAITS, "reject") == "success"
        assert registry.alias(PACKAGE, "production").version == "1.1"
        kept = registry.approval(PACKAGE, "1.2")
        assert kept.status == "rejected" and kept.by == "bob" and kept.comment == "score jump looks like leakage"
        assert len(registry.alias_history(PACKAGE, "production")) == 1
        print(f"[approval] rejected: {time.monotonic() - t0:.1f} s")

        # 3. nobody answers: the timeout rejects
        run(TIMES_OUT, "nobody", 0.95)
        waiting(TIMES_OUT, "nobody")
        assert finished(TIMES_OUT, "nobody") == "success"
        kept = registry.approval(PACKAGE, "1.3")
        assert kept.status == "rejected" and kept.by is None and "timed out" in kept.reason
        assert registry.alias(PACKAGE, "production").version == "1.1"
        assert registry.pending_approvals(PACKAGE) == []
        print(f"[approval] timed out: {time.monotonic() - t0:.1f} s")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{airflow.log_tail('scheduler')}\n{task_log_tails(airflow.home)}") from exc


def current_results(registry: Registry, version: str) -> str:
    """The ``_results.json`` key of the run that made ``version``."""
    record = registry.get(PACKAGE, version)
    assert record.run is not None
    return record.run.key(RESULTS)
