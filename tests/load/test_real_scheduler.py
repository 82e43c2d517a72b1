"""A load test under a real scheduler (issue 13 findings 16, 17, 18).

PostgreSQL (a throw-away cluster from the system packages), Airflow for real: ``airflow db
migrate``, then ``api-server``, ``dag-processor`` and ``scheduler`` as processes, LocalExecutor.
A DAG of mapped trainings runs several at once on the embedded default file store; mid-training
the scheduler's whole process group is SIGKILLed (its LocalExecutor workers die with it) and a
new scheduler is started. Whatever happened to the interrupted tries, the end state must be
exact: every task instance succeeded with exactly one version, no version number lost or
duplicated, one Asset event per version, no outcome left ``running``, no temp folder and no
runtime or user process left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.records import Outcome
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import upload_package
from tests.conftest import free_port, write_files
from tests.load.support import TRAIN_PY, runtime_processes, user_processes, wait_for

pytestmark = pytest.mark.airflow

BIN = Path(sys.executable).parent
DAG_ID = "aicenter_load"
RUN_ID = "load-run"
PACKAGE = "loadpkg"
TRAININGS = 8
AT_ONCE = 4
TRAIN_SECONDS = 8
#: One retry is what the kill costs a running task; one more absorbs a try the loaded machine fails before it starts.
RETRIES = 2
#: Map indexes whose first try dies right after registering its version (a retry must report that version):
#: the last ones, which start after the scheduler's restart (the first wave is map indexes 0-3).
CRASHED = (6, 7)

DAG_SOURCE = '''
import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_aicenter.operators import TrainPipelineOperator


def die_after_registering(context):
    """Try 1 of map indexes {crashed} registers its version, then its worker is SIGKILLed (finding 16)."""
    if context["ti"].try_number == 1 and context["ti"].map_index in {crashed}:
        os.environ["AICENTER_TEST_CRASH_AT"] = "results"

with DAG({dag_id!r}, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         max_active_tasks={trainings}):
    TrainPipelineOperator.partial(
        task_id="train", package={package!r}, version="1.0", dataset={dataset!r},
        retries={retries}, retry_delay=timedelta(seconds=2), max_active_tis_per_dag={at_once},
        pre_execute=die_after_registering,
    ).expand(env=[{{"TRAIN_SECONDS": "{seconds}", "SHARD": str(i)}} for i in range({trainings})])
'''


def run_checked(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


# -- PostgreSQL ------------------------------------------------------------------------------
@dataclass
class Postgres:
    port: int
    database: str = "airflow"

    @property
    def sqlalchemy_url(self) -> str:
        # psycopg 3 serves both Airflow's engines: the sync one and the async one (create_async_engine)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=self.database) as db:
            rows: list[tuple[Any, ...]] = db.execute(sql, params).fetchall()
        return rows


def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL is not installed: apt-get install -y postgresql (see .ci/run)"
    return found[-1].parent


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


# -- the Airflow processes -------------------------------------------------------------------
@dataclass
class Stack:
    """Airflow's components as separate processes, each leading its own process group."""

    home: Path
    env: dict[str, str]
    api_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def airflow(self, *args: str, timeout: int = 240) -> str:
        return run_checked([str(BIN / "airflow"), *args], env=self.env, timeout=timeout)

    def up(self) -> None:
        """api-server, dag-processor, scheduler; the DAG files must be in place (they are listed once at start)."""
        started = time.monotonic()
        self.start("api-server", "api-server", "-H", "127.0.0.1", "-p", str(self.api_port), "-w", "1")
        self.start("dag-processor", "dag-processor")
        self.start("scheduler", "scheduler")
        wait_for("the api-server", lambda: self.check_alive() and api_ready(self.api_port), 180)
        print(f"[load] api-server up: {time.monotonic() - started:.1f} s")

    def start(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen([str(BIN / "airflow"), *args], env=self.env, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL the process group: the component and every worker it forked into it."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # what a component left in its group
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
        self.processes.clear()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> bool:
        """True, or the failure of a component that exited (with its log) instead of a timeout later."""
        for name, process in self.processes.items():
            assert process.poll() is None, f"airflow {name} exited ({process.returncode}):\n{self.log_tail(name)}"
        return True


def api_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def task_log_tails(home: Path, chars: int = 2500) -> str:
    logs = sorted((home / "logs").rglob("*.log"))
    return "\n".join(f"--- {p.relative_to(home)}\n{p.read_text(errors='replace')[-chars:]}" for p in logs[-6:])


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
        AIRFLOW__CORE__PARALLELISM=str(TRAININGS),
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


def test_scheduler_killed_mid_training_leaves_an_exact_store(stack: tuple[Stack, Postgres, Path], tmp_path: Path) -> None:
    airflow, db, tmp_root = stack
    t0 = time.monotonic()
    store = open_store((airflow.home / "aicenter").as_uri())
    registry = Registry(store)
    upload_package(registry, tmp_path, PACKAGE, TRAIN_PY)
    dataset = write_files(tmp_path / "data", {"rows.csv": "x\n1\n2\n"}).as_uri()
    (airflow.home / "dags" / "aicenter_load.py").write_text(DAG_SOURCE.format(
        dag_id=DAG_ID, package=PACKAGE, dataset=dataset, trainings=TRAININGS, at_once=AT_ONCE, seconds=TRAIN_SECONDS, retries=RETRIES,
        crashed=CRASHED))
    airflow.up()

    wait_for("the DAG to be parsed", lambda: airflow.check_alive() and db.query(
        "select 1 from serialized_dag where dag_id = %s", DAG_ID), 120)
    airflow.airflow("dags", "trigger", DAG_ID, "--run-id", RUN_ID)
    print(f"[load] triggered: {time.monotonic() - t0:.1f} s")

    def states() -> dict[int, tuple[str | None, int]]:
        rows = db.query("select map_index, state, try_number from task_instance where dag_id = %s and run_id = %s",
                        DAG_ID, RUN_ID)
        return {index: (state, tries) for index, state, tries in rows}

    try:
        in_flight = wait_for("trainings mid-flight (user processes running)",
                             lambda: airflow.check_alive() and (user_processes(tmp_root) >= 2 and user_processes(tmp_root)), 150,
                             interval=0.5)
        airflow.kill("scheduler")
        killed_at = time.monotonic()
        print(f"[load] scheduler SIGKILLed with {in_flight} trainings running: {killed_at - t0:.1f} s; task states {states()}")
        airflow.start("scheduler", "scheduler")

        def finished() -> str | None:
            airflow.check_alive()
            rows = db.query("select state from dag_run where dag_id = %s and run_id = %s", DAG_ID, RUN_ID)
            return rows[0][0] if rows and rows[0][0] in ("success", "failed") else None

        final = wait_for("the DAG run to finish after the restart", finished, 240, interval=2)
        print(f"[load] DAG run {final}: {time.monotonic() - t0:.1f} s ({time.monotonic() - killed_at:.1f} s after the kill)")
        # an interrupted try's processes stop within seconds (they watch their parent)
        wait_for("the runtime and user processes to end", lambda: not runtime_processes(tmp_root), 30)
    except AssertionError as exc:
        context = f"states {states()}\n{airflow.log_tail('scheduler')}\n{task_log_tails(airflow.home)}"
        raise AssertionError(f"{exc}\n{context}") from exc

    # every task instance succeeded
    final_states = states()
    assert sorted(final_states) == list(range(TRAININGS))
    assert {index: state for index, (state, _) in final_states.items()} == dict.fromkeys(range(TRAININGS), "success"), \
        f"{final_states}\n{task_log_tails(airflow.home)}"
    assert final == "success"
    retried = sorted(index for index, (_, tries) in final_states.items() if tries > 1)
    print(f"[load] task instances retried after the kill: {retried}")

    # exactly one version per task instance; no version number lost or duplicated
    versions = [r for r in registry.versions(PACKAGE) if r.version != "1.0"]
    assert sorted(r.version for r in versions) == sorted(f"1.{minor}" for minor in range(1, TRAININGS + 1)), \
        [(r.version, r.run.map_index if r.run else None) for r in versions]
    made_by = sorted((r.run.dag_id, r.run.run_id, r.run.task_id, r.run.map_index) for r in versions if r.run)
    assert made_by == [(DAG_ID, RUN_ID, "train", index) for index in range(TRAININGS)], made_by
    # the tries that died after registering: a later try finished the task instance with their version
    made_in = {r.run.map_index: r.run.try_number for r in versions if r.run}
    assert {i: (made_in[i], final_states[i][1] > 1) for i in CRASHED} == {i: (1, True) for i in CRASHED}, final_states

    # no outcome stays "running"
    outcomes = {info.key: Outcome.model_validate_json(store.get_bytes(info.key))
                for info in store.list("runs/") if info.key.endswith("/outcome.json")}
    assert outcomes
    running = sorted(key for key, outcome in outcomes.items() if outcome.status == "running")
    assert not running, running
    # a task instance trains once: a retry after a registered version completes that try, it does not train again
    succeeded: dict[int, list[str]] = {}
    for key, outcome in outcomes.items():
        if outcome.status == "succeeded":
            succeeded.setdefault(int(key.split("/")[3].rsplit("~", 1)[1]), []).append(key)
    assert sorted(succeeded) == list(range(TRAININGS)) and all(len(keys) == 1 for keys in succeeded.values()), succeeded

    # no temp folder and no process left
    left = sorted(p.name for p in tmp_root.iterdir() if p.name.startswith(("aicenter-launch-", "aicenter-run-")))
    assert not left, left
    assert not runtime_processes(tmp_root)

    # one Asset event per version, naming it
    events = db.query(
        "select e.extra from asset_event e join asset a on a.id = e.asset_id where a.uri = %s order by e.id",
        f"aicenter://{PACKAGE}/",
    )
    extras = [extra if isinstance(extra, dict) else json.loads(extra) for (extra,) in events]
    assert sorted(e["version"] for e in extras) == sorted(r.version for r in versions), extras
    print(f"[load] checked: {len(versions)} versions, {len(extras)} events, {len(outcomes)} outcomes; "
          f"total {time.monotonic() - t0:.1f} s")
