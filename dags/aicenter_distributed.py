"""Distributed training on one machine: a full pipeline with ``procs_per_node`` ranks (default 2).

The ``regression_ddp`` example package trains a linear model data-parallel: each rank trains on
its shard and the gradients are averaged across ranks every step (PyTorch DDP when torch is
installed, plain Python over TCP otherwise); rank 0 evaluates and saves the new version. The
same DAG on Kubernetes with ``nodes=2`` runs an Indexed Job of two pods.

Runs unchanged with ``airflow dags test aicenter_distributed`` on the embedded default (file
store, local launcher), or from the UI's trigger form, whose params (ranks, epochs, learning
rate) reach the run through templating. Its first tasks make what it needs when it is missing:

- ``upload_package``: uploads ``examples/packages/regression_ddp`` (next to this folder) as
  ``regression_ddp`` when the store has no such package, as
  ``aicenter package upload examples/packages/regression_ddp --name regression_ddp`` does;
  a package already there (yours, or an earlier upload) is used as it is;
- ``make_dataset``: writes a synthetic dataset (y = 3 x1 - 2 x2 + 1 + noise) when there is none.
"""

from __future__ import annotations

import csv
import os
import random
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_aicenter.operators import FullPipelineOperator

PACKAGE = "regression_ddp"
PACKAGE_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "packages" / PACKAGE
AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DATASET = AIRFLOW_HOME / "aicenter-datasets" / "regression"

with DAG(
    dag_id="aicenter_distributed",
    description="Full pipeline with procs_per_node ranks training data-parallel; rank 0 evaluates and saves",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "procs_per_node": Param(2, type="integer", minimum=1, maximum=64, description="ranks on this machine"),
        "epochs": Param(60, type="integer", minimum=1, description="training steps (EPOCHS)"),
        "learning_rate": Param(0.1, type="number", exclusiveMinimum=0, description="step size (LEARNING_RATE)"),
    },
    tags=["aicenter", "example", "distributed"],
) as dag:

    @task
    def upload_package() -> str:
        """The example package, uploaded through the registry when the store has no ``regression_ddp``."""
        from airflow_aicenter.errors import ConfigurationError
        from airflow_aicenter.hooks.aicenter import AICenterHook

        registry = AICenterHook().registry
        if registry.versions(PACKAGE):
            return f"{PACKAGE} is in {registry.store.uri}"
        if not PACKAGE_SOURCE.is_dir():
            raise ConfigurationError(
                f"the store {registry.store.uri} has no package {PACKAGE!r} and this DAG file is not next to the "
                f"example packages ({PACKAGE_SOURCE} is missing); upload it once with `aicenter package upload "
                f"examples/packages/{PACKAGE} --name {PACKAGE}` from the repository"
            )
        upload = registry.upload_package(PACKAGE_SOURCE, PACKAGE, created_by="aicenter_distributed.upload_package")
        return f"uploaded {PACKAGE} {upload.record.version} from {PACKAGE_SOURCE}"

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

    train = FullPipelineOperator(
        task_id="train_distributed",
        package=PACKAGE,
        dataset=DATASET.as_uri(),
        procs_per_node="{{ params.procs_per_node }}",
        env={"EPOCHS": "{{ params.epochs }}", "LEARNING_RATE": "{{ params.learning_rate }}"},
        save_training_data=True,
    )
    [upload_package(), make_dataset()] >> train
