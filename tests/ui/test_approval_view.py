"""The approval request as a person sees it (issue 22): Airflow's Required Actions view, in Chromium.

A full run with ``promote_if="approved"`` runs with ``airflow dags test`` against the UI tests'
AIRFLOW_HOME (the api-server reads the same metadata database) and waits for a person. The
signed-in admin finds the request in Browse -> Required Actions, reads the comparison and
approves it in the task's Required Actions view; the alias moves, with the admin as approver.
The run trains a package of its own (a copy of the UI tests' package): the version it makes and its
approval stay out of the seeded ``uipkg`` that the other page tests count versions and runs of.
Screenshots: test-output/ui/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from airflow_aicenter.registry import Registry
from tests.ui.conftest import off_loop

DAG_ID = "aicenter_ui_approval"
ALIAS = "ui-approved"
PACKAGE = "approvalpkg"  # not uipkg, nor a name containing it: the session's seed stays as test_pages reads it
BIN = Path(sys.executable).parent

DAG_SOURCE = f'''
import os
from datetime import datetime

from airflow.sdk import DAG

from airflow_aicenter.operators import FullPipelineOperator

with DAG(dag_id={DAG_ID!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    FullPipelineOperator(
        task_id="retrain", package={PACKAGE!r}, version="1.0", dataset=os.environ["UI_TEST_DATASET"],
        save_training_data=True, env={{"ROWS": "6"}}, promote_to={ALIAS!r}, promote_if="approved",
        approval_timeout=600,
    )
'''


def wait(what: str, check: Any, timeout: float, process: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"airflow dags test exited ({process.returncode}) before {what}:\n"
                                 f"{process.stdout.read()[-4000:] if process.stdout else ''}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_request_shows_in_required_actions_and_approving_moves_the_alias(
    ui_server: Any, admin_context: Any, shots: Any, tmp_path: Path
) -> None:
    registry = Registry(ui_server.store)
    off_loop(registry.upload, Path(__file__).parent / "package", PACKAGE, created_by="ui-tests")
    dag_file = ui_server.home / "dags" / "approval" / "approval_dag.py"  # dags test wants it in the dags folder
    dag_file.parent.mkdir(exist_ok=True)
    dag_file.write_text(DAG_SOURCE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(
        AIRFLOW_HOME=str(ui_server.home), AIRFLOW__CORE__DAGS_FOLDER=str(ui_server.home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False", UI_TEST_DATASET=(ui_server.home / "dataset").as_uri(),
        AIRFLOW_CONN_AICENTER_DEFAULT=json.dumps({"conn_type": "aicenter", "extra": {"storage": ui_server.store.uri}}),
        PYTHONUNBUFFERED="1",
    )
    process = subprocess.Popen([str(BIN / "airflow"), "dags", "test", DAG_ID, "--dagfile-path", str(dag_file)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    headers = {"Authorization": f"Bearer {ui_server.token('admin')}"}
    try:
        def request() -> dict[str, Any] | None:
            answer = httpx.get(f"{ui_server.url}/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails", headers=headers, timeout=30)
            details = answer.json().get("hitl_details", []) if answer.status_code == 200 else []
            return details[0] if details else None

        detail = wait("the approval request", request, 240, process)
        run_id, subject = detail["task_instance"]["dag_run_id"], detail["subject"]
        version = subject.split()[2]
        assert subject == f"Approve {PACKAGE} {version} for {ALIAS}?"
        assert registry.approval(PACKAGE, version).status == "pending"

        page = admin_context.new_page()
        page.goto("/required_actions")
        page.get_by_text(subject).first.wait_for(timeout=60_000)
        shots(page, "required-actions")
        page.goto(f"/dags/{DAG_ID}/runs/{run_id}/tasks/retrain/required_actions")
        page.get_by_text("Training data").first.wait_for(timeout=60_000)
        page.get_by_text(f"is a candidate for {ALIAS}").first.wait_for(timeout=10_000)
        screenshot = shots(page, "request")
        print(f"[approval] the request as a person sees it: {screenshot}")
        page.close()

        answer = httpx.patch(f"{ui_server.url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/retrain/-1/hitlDetails",
                             json={"chosen_options": ["Approve"], "params_input": {"comment": "seen in the UI"}},
                             headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        out, _ = process.communicate(timeout=240)
        assert process.returncode == 0, out[-4000:]
    finally:
        dag_file.unlink()
        if process.poll() is None:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)
    current = registry.alias(PACKAGE, ALIAS)
    assert current is not None and current.version == version and current.set_by == "admin"
    kept = registry.approval(PACKAGE, version)
    assert kept.status == "approved" and kept.by == "admin" and kept.comment == "seen in the UI"
