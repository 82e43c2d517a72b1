"""Train the example churn package on the embedded default (file store + local launcher).

Runs unchanged with ``airflow dags test aicenter_training``: with no ``aicenter_default``
connection the store is ``$AIRFLOW_HOME/aicenter`` and training runs in a child process.
Point ``dataset`` at ``s3://...`` and add the connection to train from S3 instead.

The hyperparameters are DAG params, so the UI's trigger form offers them; they reach the
package as its ``env`` (AI Center "parameters") through templating: ``{{ params.epochs }}``.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param

from airflow_aicenter.operators import TrainPipelineOperator

AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DEFAULT_DATASET = (AIRFLOW_HOME / "aicenter-datasets" / "churn").as_uri()

with DAG(
    dag_id="aicenter_training",
    description="Train the churn package and register a new minor version",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "package": Param("churn", type="string"),
        "version": Param("latest", type="string", description='"M.m", "M", "latest" or an alias'),
        "dataset": Param(DEFAULT_DATASET, type="string", description="data folder URI (s3://... or file:///...)"),
        "epochs": Param(150, type="integer", minimum=1, description="gradient-descent steps (EPOCHS)"),
        "learning_rate": Param(0.2, type="number", exclusiveMinimum=0, description="step size (LEARNING_RATE)"),
    },
    tags=["aicenter", "example"],
) as dag:
    TrainPipelineOperator(
        task_id="train",
        package="{{ params.package }}",
        version="{{ params.version }}",
        dataset="{{ params.dataset }}",
        env={"EPOCHS": "{{ params.epochs }}", "LEARNING_RATE": "{{ params.learning_rate }}"},
        save_training_data=True,
    )
