"""Closing the loop: new data lands -> full pipeline (promote only a better model) -> batch prediction.

- Scheduled on the churn dataset itself: an ``AssetWatcher`` with
  :class:`~airflow_aicenter.triggers.DatasetChangedTrigger` lists the dataset every minute (keys,
  sizes, mtimes or ETags; never content) and starts a run once per change.
- ``retrain``: a full pipeline (process_data, train, evaluate, save) on the newest churn version;
  the new version becomes ``production`` only when it scores better, like with like.
- ``score_inbox``: batch prediction with whatever ``production`` is now, over the customers in
  the inbox (JSON Lines, one customer a line), two processes sharing the inputs. Predictions land
  in the run folder's ``predictions/``.

Runs unchanged with ``airflow dags test aicenter_closed_loop`` on the embedded default once the
churn package and its dataset exist (``bash scripts/example.sh`` makes both); the first task
fills the inbox from the dataset when it is empty.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Asset, AssetWatcher, Param, task

from airflow_aicenter.operators import FullPipelineOperator, PredictPipelineOperator
from airflow_aicenter.triggers import DatasetChangedTrigger

AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DATASET = (AIRFLOW_HOME / "aicenter-datasets" / "churn").as_uri()
HOLDOUT = (AIRFLOW_HOME / "aicenter-datasets" / "churn-holdout").as_uri()
INBOX = AIRFLOW_HOME / "aicenter-datasets" / "churn-inbox"
FEATURES = ("tenure_months", "monthly_charges", "support_calls", "contract_monthly", "age")

churn_data = Asset(
    name="churn_training_data",
    uri=DATASET,
    watchers=[AssetWatcher(name="churn_data_changed", trigger=DatasetChangedTrigger(dataset=DATASET, poll_interval=60))],
)

with DAG(
    dag_id="aicenter_closed_loop",
    description="New churn data -> full pipeline promoting only a better model -> batch prediction with production",
    schedule=[churn_data],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "epochs": Param(150, type="integer", minimum=1, description="gradient-descent steps of the retraining (EPOCHS)"),
        "learning_rate": Param(0.2, type="number", exclusiveMinimum=0, description="step size (LEARNING_RATE)"),
    },
    tags=["aicenter", "example"],
) as dag:

    @task
    def fill_inbox() -> str:
        """Customers to score: the first 500 rows of the dataset as JSON Lines, when the inbox is empty."""
        if not any(INBOX.glob("*.jsonl")):
            INBOX.mkdir(parents=True, exist_ok=True)
            source = next(Path(DATASET.removeprefix("file://")).glob("*.csv"))
            with source.open(newline="") as fh, (INBOX / "customers.jsonl").open("w") as out:
                for n, row in enumerate(csv.DictReader(fh)):
                    if n == 500:
                        break
                    out.write(json.dumps({"customer": n, **{k: float(row[k]) for k in FEATURES}}) + "\n")
        return INBOX.as_uri()

    retrain = FullPipelineOperator(
        task_id="retrain",
        package="churn",
        version="latest",
        dataset=DATASET,
        evaluation_dataset=HOLDOUT,
        env={"EPOCHS": "{{ params.epochs }}", "LEARNING_RATE": "{{ params.learning_rate }}"},
        promote_to="production",
        promote_if="better",
    )
    inbox = fill_inbox()
    score = PredictPipelineOperator(
        task_id="score_inbox",
        package="churn",
        version="production",
        dataset=inbox,
        input_type="json",
        procs_per_node=2,
    )
    inbox >> retrain >> score
