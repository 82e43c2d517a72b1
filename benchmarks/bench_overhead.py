"""Figure 3: overhead of a TrainPipelineOperator task over a bare @task, local launcher.

    .venv/bin/python benchmarks/bench_overhead.py [--tasks 5] [--repeat 3]

Method: a throw-away AIRFLOW_HOME (`airflow db migrate`) with two DAGs of --tasks chained
tasks each: `overhead_aicenter` (TrainPipelineOperator on a trivial package, 2-row dataset,
file store, local launcher: the embedded default) and `overhead_bare` (@task that returns
None). Each is run with `airflow dags test`, interleaved, --repeat times. Two measures:

- task time: the task instances' own durations from Airflow's database (end - start), i.e.
  the wall time each task holds a worker slot; per-task overhead = mean(train) - mean(bare).
- process time: the whole `airflow dags test` wall time; (aicenter - bare) / tasks. This adds
  what happens outside task instances (DAG parse, importing the provider).

The runtime's own phase times (outcome.json) show where a train task's time goes.
Target: < 1 s extra per task.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

from common import PYTHON, REPO, machine, save_json, table, verdict, work_dir

DAGS = '''
from __future__ import annotations
import pendulum
from airflow.sdk import dag, task, chain
from airflow_aicenter.operators import TrainPipelineOperator

N = {tasks}
START = pendulum.datetime(2024, 1, 1, tz="UTC")

@dag(schedule=None, start_date=START, catchup=False)
def overhead_aicenter():
    chain(*[TrainPipelineOperator(task_id=f"train_{{i}}", package="tiny", version="1.0", dataset="{dataset}",
                                  launcher="local") for i in range(N)])

@dag(schedule=None, start_date=START, catchup=False)
def overhead_bare():
    @task
    def nothing():
        return None
    chain(*[nothing.override(task_id=f"bare_{{i}}")() for i in range(N)])

overhead_aicenter()
overhead_bare()
'''
MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
TRAIN = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        pass\n"
         "    def save(self):\n        open('model.txt', 'w').write('m')\n")
TARGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store

    work = work_dir("overhead")
    try:
        home, store_dir, data = work / "airflow", work / "store", work / "data"
        (home / "dags").mkdir(parents=True)
        data.mkdir()
        (data / "rows.csv").write_text("x\n1\n2\n")
        pkg = work / "pkg"
        pkg.mkdir()
        (pkg / "main.py").write_text(MAIN)
        (pkg / "train.py").write_text(TRAIN)
        (pkg / "requirements.txt").write_text("")
        store = open_store(store_dir.as_uri())
        Registry(store).upload(pkg, "tiny")
        (home / "dags" / "overhead.py").write_text(DAGS.format(tasks=args.tasks, dataset=data.as_uri()))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
        env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
                   AIRFLOW_CONN_AICENTER_DEFAULT=json.dumps({"conn_type": "aicenter", "extra": {"storage": store.uri}}))
        airflow = str(PYTHON.parent / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
        print(f"machine: {machine()}; airflow db migrated", flush=True)

        wall: dict[str, list[float]] = {"overhead_aicenter": [], "overhead_bare": []}
        for _ in range(args.repeat):
            for dag_id, times in wall.items():
                began = time.perf_counter()
                done = subprocess.run([airflow, "dags", "test", dag_id], env=env, capture_output=True, text=True, timeout=600,
                                      check=False)
                took = time.perf_counter() - began
                if done.returncode != 0:
                    raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
                times.append(took)
                print(f"  dags test {dag_id}: {took:.2f} s", flush=True)

        db = sqlite3.connect(home / "airflow.db")
        durations: dict[str, list[float]] = {}
        for dag_id, duration, state in db.execute("select dag_id, duration, state from task_instance"):
            assert state == "success", (dag_id, state)
            durations.setdefault(dag_id, []).append(float(duration))
        db.close()
        train, bare = statistics.mean(durations["overhead_aicenter"]), statistics.mean(durations["overhead_bare"])
        per_task_ti = train - bare
        per_task_wall = (statistics.median(wall["overhead_aicenter"]) - statistics.median(wall["overhead_bare"])) / args.tasks

        from airflow_aicenter.records import Outcome, read

        phases: dict[str, list[float]] = {}
        runtime_total = []
        for info in store.list("runs/overhead_aicenter"):
            if info.key.endswith("outcome.json"):
                outcome = read(store, info.key, Outcome)
                runtime_total.append(outcome.execution_time)
                for name, seconds in outcome.phases.items():
                    phases.setdefault(name, []).append(seconds)
        rows = [
            ["bare @task", len(durations["overhead_bare"]), f"{bare:.3f}", "-",
             f"{statistics.median(wall['overhead_bare']):.1f}", "-"],
            ["TrainPipelineOperator", len(durations["overhead_aicenter"]), f"{train:.3f}", f"{per_task_ti:+.3f}",
             f"{statistics.median(wall['overhead_aicenter']):.1f}", f"{per_task_wall:+.3f}"],
        ]
        print()
        print(table(rows, ["task", "task instances", "mean task s", "extra per task s", "dags test wall s (median)",
                           "extra per task s (wall)"]))
        print("\nruntime (child process) per train task, from outcome.json: "
              f"{statistics.mean(runtime_total):.3f} s total; phases " +
              ", ".join(f"{k} {statistics.mean(v) * 1000:.0f} ms" for k, v in phases.items()))
        print(f"\nextra per task: {per_task_ti:.3f} s (task time), {per_task_wall:.3f} s (process wall) "
              f"-> target < {TARGET_S} s: {verdict(max(per_task_ti, per_task_wall) < TARGET_S)}")
        path = save_json("overhead", {"machine": machine(), "tasks": args.tasks, "repeat": args.repeat, "wall": wall,
                                      "durations": durations, "per_task_ti": per_task_ti, "per_task_wall": per_task_wall,
                                      "runtime_total": runtime_total, "phases": phases})
        print(f"raw results: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
