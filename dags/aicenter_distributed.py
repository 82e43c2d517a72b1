"""Distributed training on one machine: a full pipeline with two ranks (``procs_per_node=2``).

The ``regression_ddp`` example package trains a linear model data-parallel: each rank trains on
its shard and the gradients are averaged across ranks every step (PyTorch DDP when torch is
installed, plain Python over TCP otherwise); rank 0 evaluates and saves the new version. The
same DAG on Kubernetes with ``nodes=2`` runs an Indexed Job of two pods.

Runs unchanged with ``airflow dags test aicenter_distributed`` on the embedded default (file
store, local launcher) once the package is uploaded::

    aicenter package upload examples/packages/regression_ddp --name regression_ddp

The first task writes a synthetic dataset (y = 3 x1 - 2 x2 + 1 + noise) when there is none.
"""

from __future__ import annotations

import csv
import os
import random
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_aicenter.operators import FullPipelineOperator

AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DATASET = AIRFLOW_HOME / "aicenter-datasets" / "regression"

with DAG(
    dag_id="aicenter_distributed",
    description="Full pipeline with two ranks training data-parallel; rank 0 evaluates and saves",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={"procs_per_node": Param(2, type="integer", minimum=1)},
    tags=["aicenter", "example", "distributed"],
) as dag:

    @task
    def make_dataset() -> str:
        """A synthetic regression dataset, written once (the same data on every later run)."""
        path = DATASET / "rows.csv"
        if not path.exists():
            DATASET.mkdir(parents=True, exist_ok=True)
            rng = random.Random(7)
            with path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["x1", "x2", "y"])
                for _ in range(2000):
                    x1, x2 = rng.uniform(-1, 1), rng.uniform(-1, 1)
                    writer.writerow([round(x1, 6), round(x2, 6), round(3 * x1 - 2 * x2 + 1 + rng.gauss(0, 0.05), 6)])
        return DATASET.as_uri()

    FullPipelineOperator(
        task_id="train_distributed",
        package="regression_ddp",
        dataset=make_dataset(),
        procs_per_node=2,
        env={"EPOCHS": "60", "LEARNING_RATE": "0.1"},
        save_training_data=True,
    )
