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
import time
from pathlib import Path

import pytest

from airflow_aicenter.records import Outcome
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import upload_package
from tests.conftest import write_files
from tests.load.stack import Postgres, Stack, task_log_tails
from tests.load.support import TRAIN_PY, runtime_processes, user_processes, wait_for

pytestmark = pytest.mark.airflow

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
