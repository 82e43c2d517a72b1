"""scripts/ui.sh, the README's UI command, run for real in a temp Airflow home (integration tier).

The real script and scripts/example.sh (whose set-up it sources) in a copy of the repository's
scripts/, with the repository's virtualenv, dags/ and examples/ linked in; only scripts/setup.sh
(pip install) is a no-op, as the virtualenv is this one. It must print the URL and the login,
serve the example DAGs (and none of Airflow's), run a DAG triggered through the REST API with
the trigger form's params and show its task log, answer the connection list's Test button as
docs/ui.md says, and stop every process it started on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_aicenter.records import Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

EXAMPLE_DAGS = {"aicenter_training", "aicenter_retraining", "aicenter_evaluate_new_version", "aicenter_closed_loop",
                "aicenter_distributed"}
BANNER = re.compile(r"Airflow UI:\s+(?P<url>http://127\.0\.0\.1:\d+).*?Login:\s+admin / (?P<password>\S+)", re.S)


def repo_copy(root: Path) -> Path:
    """The scripts as shipped, next to the repository's venv, DAGs and examples; setup.sh does nothing."""
    (root / "scripts").mkdir(parents=True)
    for name in ("ui.sh", "example.sh"):
        (root / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    (root / "scripts" / "setup.sh").write_text("exit 0\n")
    for name in (".venv", "dags", "examples"):
        (root / name).symlink_to(REPO / name)
    return root


def wait_for(predicate: Any, what: str, log: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(1)
    raise AssertionError(f"{what} within {timeout:.0f}s; ui.sh printed:\n{log.read_text()[-6000:]}")


#: Runs argv[1:] with SIGINT's default action restored (an exec keeps a signal ignored, not a handler).
DEFAULT_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"


def processes_of(home: Path) -> list[str]:
    """Processes still running with ``home`` as their AIRFLOW_HOME (ui.sh's Airflow, whatever its process group)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"AIRFLOW_HOME={home}".encode() in environ and (proc / "stat").read_text().split()[2] != "Z":
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command[:120]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_ui_script_serves_the_example_dags_with_logs_and_stops_cleanly(tmp_path):
    repo, home = repo_copy(tmp_path / "repo"), tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(AICENTER_EXAMPLE_HOME=str(home), AICENTER_UI_PORT=str(free_port()), AIRFLOW_HOME=str(tmp_path / "yours"),
               AICENTER_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", NO_COLOR="1")
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        # As from a terminal: SIGINT not ignored. Started from a background job (a CI runner's `cmd &`), this process
        # inherits SIGINT ignored, and a shell cannot trap a signal ignored when it starts, so Ctrl-C would do nothing.
        process = subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, "bash", str(repo / "scripts" / "ui.sh")], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        banner = wait_for(lambda: BANNER.search(log.read_text()), "ui.sh printed no URL and login", log, 300)
        url = banner["url"]
        token = httpx.post(f"{url}/auth/token", json={"username": "admin", "password": banner["password"]}, timeout=30)
        assert token.status_code == 201, token.text
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=60)

        # The example DAGs from the repository's dags/, none of Airflow's; the manual ones unpaused.
        dags = {d["dag_id"]: d for d in api.get("/api/v2/dags", params={"limit": 100}).json()["dags"]}
        assert set(dags) >= EXAMPLE_DAGS and all(d.startswith("aicenter_") for d in dags), sorted(dags)
        assert dags["aicenter_training"]["is_paused"] is False and dags["aicenter_retraining"]["is_paused"] is True
        assert not (tmp_path / "yours").exists(), "an exported AIRFLOW_HOME is left alone"
        assert api.get("/aicenter/").status_code == 200, "the ML Packages pages are served"

        # Runs as the trigger form makes them: the params reach the package, and the task log shows in the UI.
        # The distributed example uploads its package itself and runs the ranks its param asks for.
        run_id = trigger(api, "aicenter_training", {"epochs": 3, "learning_rate": 0.3})
        distributed_id = trigger(api, "aicenter_distributed", {"procs_per_node": 3, "epochs": 5})
        text = finished(api, log, "aicenter_training", run_id, "train")
        assert "Package churn version 1.0" in text, text[-4000:]  # the operator's own log line, in the UI's log view
        finished(api, log, "aicenter_distributed", distributed_id, "train_distributed")
        registry = Registry(open_store((home / "aicenter").as_uri()))
        churn = registry.get("churn", "1.1")
        assert churn.run.run_id == run_id
        assert read(registry.store, f"{churn.run.prefix}/_results.json", Results).parameters.env == {
            "EPOCHS": "3", "LEARNING_RATE": "0.3"}
        [uploaded, trained] = registry.versions("regression_ddp")
        assert uploaded.created_by == "aicenter_distributed.upload_package" and trained.run.run_id == distributed_id
        assert read(registry.store, f"{trained.run.prefix}/_results.json", Results).aicenter["distributed"] == {
            "nodes": 1, "procs_per_node": 3, "world_size": 3}

        check_connection_test_button(api, home)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        try:
            process.wait(timeout=100)  # ui.sh's own stop: SIGINT, then SIGTERM and SIGKILL 10 s apart
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            left = processes_of(home)
            for line in left:  # Airflow runs in a process group of its own: never leave it running after the test
                with contextlib.suppress(OSError):
                    os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
            stopping = [line for line in log.read_text().splitlines() if line.startswith(("ui.sh:", "standalone |"))]
            raise AssertionError("ui.sh did not stop on Ctrl-C within 100 s; its own lines:\n" + "\n".join(stopping[-10:])
                                 + "\nstill running:\n" + "\n".join(left)) from None
    assert process.returncode == 130, log.read_text()[-3000:]
    assert not processes_of(home), processes_of(home)
    assert "Shutting down components" in log.read_text()


def trigger(api: httpx.Client, dag_id: str, conf: dict[str, Any]) -> str:
    """A DAG run as the trigger form makes it (the REST call the form sends); its id."""
    run = api.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
    assert run.status_code == 200, run.text
    return str(run.json()["dag_run_id"])


def finished(api: httpx.Client, log: Path, dag_id: str, run_id: str, task_id: str) -> str:
    """Wait for a run to succeed; the task's log as the UI's log view shows it (one event a line)."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"
    state = wait_for(lambda: (s := api.get(path).json()["state"]) in ("success", "failed") and s,
                     f"{dag_id} {run_id} did not finish", log, 300)
    logs = api.get(f"{path}/taskInstances/{task_id}/logs/1")
    assert logs.status_code == 200, logs.text
    text = json.dumps(logs.json()["content"])
    ours = [line for line in log.read_text().splitlines() if dag_id in line and "request finished" not in line]
    assert state == "success", text[-3000:] + "\n".join(ours[-40:])[-6000:]
    return text


def check_connection_test_button(api: httpx.Client, home: Path) -> None:
    """The connection list's Test button sends the stored connection back with ``port: Number(port)``, 0 for
    none (Airflow 3.3.2's UI bundle); Airflow's test route takes 0 for another port than the stored NULL and
    refuses it (400). What docs/ui.md says to do instead works: ``airflow connections test``, or the same
    body without the port."""
    extra = {"storage": "file:///nonexistent/aicenter-store"}
    created = api.post("/api/v2/connections", json={"connection_id": "aicenter_form", "conn_type": "aicenter",
                                                   "extra": json.dumps(extra)})
    assert created.status_code == 201, created.text
    listed = {c["connection_id"]: c for c in api.get("/api/v2/connections").json()["connections"]}["aicenter_form"]
    assert listed["port"] is None
    as_the_ui_sends = {
        "conn_type": listed["conn_type"], "connection_id": listed["connection_id"], "description": listed["description"] or "",
        "extra": listed["extra"] or "{}", "host": listed["host"] or "", "login": listed["login"] or "",
        "password": listed["password"] or "", "port": 0, "schema": listed["schema"] or "",
    }
    button = api.post("/api/v2/connections/test", json=as_the_ui_sends)
    if button.status_code == 400:  # Airflow before apache/airflow#73298: documented in docs/ui.md
        assert "host or port to test differs from the stored connection" in button.text, button.text
    else:  # an Airflow with the fix: the button reaches our hook
        assert button.status_code == 200 and button.json()["status"] is False, button.text
    without_port = {k: v for k, v in as_the_ui_sends.items() if k != "port"}
    answer = api.post("/api/v2/connections/test", json=without_port)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] is False and "/nonexistent/aicenter-store" in answer.json()["message"], answer.text
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__TEST_CONNECTION="Enabled", NO_COLOR="1")
    cli = subprocess.run([str(REPO / ".venv" / "bin" / "airflow"), "connections", "test", "aicenter_form"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 1 and "/nonexistent/aicenter-store" in cli.stdout, cli.stdout + cli.stderr
