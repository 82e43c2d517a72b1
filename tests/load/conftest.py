"""Fixtures of the tests under a real scheduler (tests/load/stack.py has the helpers)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.load.stack import Postgres, Stack, postgres_bin, run_checked


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    """A throw-away cluster on a free port, run as the ``postgres`` user when we are root (it refuses root)."""
    bindir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="aicenter-load-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    pg_ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        run_checked([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                     "--no-sync"])
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
        run_checked([*pg_ctl, "-l", str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"])
        run_checked([*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "airflow"])
        yield Postgres(port)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(postgres: Postgres, tmp_path: Path) -> Iterator[tuple[Stack, Postgres, Path]]:
    home = tmp_path / "airflow-home"
    (home / "dags").mkdir(parents=True)
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        TMPDIR=str(tmp_root),
        PYTHONUNBUFFERED="1",
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="8",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgres.sqlalchemy_url,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=postgres.sqlalchemy_url,
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(16),
        AIRFLOW__API__WORKERS="1",
        # On a loaded 2-core machine the api-server can take more than the default 5 s to answer a
        # worker's "start": the try then fails before it runs.
        AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="60",
        # A killed scheduler's running tasks stop heartbeating: found within seconds, not the default 5 minutes.
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="30",
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="5",
        AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="10",
        AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="15",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
    )
    airflow = Stack(home=home, env=env, api_port=api_port)
    started = time.monotonic()
    airflow.airflow("db", "migrate", timeout=300)
    print(f"[load] db migrate: {time.monotonic() - started:.1f} s")
    try:
        yield airflow, postgres, tmp_root
    finally:
        airflow.stop_all()
