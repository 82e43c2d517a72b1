"""A person approves before a model goes to production: retrain weekly, approve, then batch-predict.

- ``retrain`` (Mondays 03:00): a full pipeline (process_data, train, evaluate on a fixed holdout,
  save) on the churn package's latest version. The new version is registered with approval
  ``pending``; the task then waits, without holding a worker slot, for a person to answer in
  Airflow's **Browse -> Required Actions** (or the task's Required Actions tab). The request
  shows the candidate against production's current version: scores on the same holdout, the
  ``env`` parameters that differ, the training files added, removed and changed, and both run
  pages. **Approve** moves ``production`` (its history names the approver, the time and the
  comment); **Reject** leaves it. Nobody answering within ``approval_timeout`` (3 days here)
  is a rejection.
- ``score_inbox``: batch prediction with whatever ``production`` is after the decision, over the
  customers in the inbox (JSON Lines, one customer a line).

Every decision is kept beside the version: ``aicenter package show churn:1.4`` prints it and
``aicenter package list`` shows the versions still waiting. See docs/approval.md.

Runs with ``airflow dags test aicenter_approval`` on the embedded default once the churn
package and its datasets exist (``bash scripts/example.sh`` makes them); the run then waits
until someone answers the request in the Airflow UI of the same metadata database.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_aicenter.operators import FullPipelineOperator, PredictPipelineOperator

AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DATASET = (AIRFLOW_HOME / "aicenter-datasets" / "churn").as_uri()
HOLDOUT = (AIRFLOW_HOME / "aicenter-datasets" / "churn-holdout").as_uri()
INBOX = AIRFLOW_HOME / "aicenter-datasets" / "churn-approval-inbox"
FEATURES = ("tenure_months", "monthly_charges", "support_calls", "contract_monthly", "age")

with DAG(
    dag_id="aicenter_approval",
    description="Weekly full pipeline on churn; a person approves before production moves; batch prediction after",
    schedule="0 3 * * 1",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "epochs": Param(150, type="integer", minimum=1, description="gradient-descent steps (EPOCHS)"),
        "learning_rate": Param(0.2, type="number", exclusiveMinimum=0, description="step size (LEARNING_RATE)"),
    },
    tags=["aicenter", "example"],
):
    retrain = FullPipelineOperator(
        task_id="retrain",
        package="churn",
        version="latest",
        dataset=DATASET,
        evaluation_dataset=HOLDOUT,
        env={"EPOCHS": "{{ params.epochs }}", "LEARNING_RATE": "{{ params.learning_rate }}"},
        save_training_data=True,
        promote_to="production",
        promote_if="approved",
        approval_timeout=timedelta(days=3),
    )

    @task
    def fill_inbox() -> str:
        """Customers to score: the first 200 rows of the dataset as JSON Lines, when the inbox is empty."""
        if not any(INBOX.glob("*.jsonl")):
            INBOX.mkdir(parents=True, exist_ok=True)
            source = next(Path(DATASET.removeprefix("file://")).glob("*.csv"))
            with source.open(newline="") as fh, (INBOX / "customers.jsonl").open("w") as out:
                for n, row in enumerate(csv.DictReader(fh)):
                    if n == 200:
                        break
                    out.write(json.dumps({"customer": n, **{k: float(row[k]) for k in FEATURES}}) + "\n")
        return INBOX.as_uri()

    score = PredictPipelineOperator(
        task_id="score_inbox",
        package="churn",
        version="production",  # resolved when the task runs: after the person's decision
        dataset=fill_inbox(),
        input_type="json",
    )
    retrain >> score
