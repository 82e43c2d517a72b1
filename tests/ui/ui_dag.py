"""The UI tests' DAG (copied into the test AIRFLOW_HOME's dags folder): one full run that succeeds, one that fails,
and a batch prediction with one failing input (allowed)."""

import os
from datetime import datetime

from airflow.sdk import DAG

from airflow_aicenter.operators import FullPipelineOperator, PredictPipelineOperator

DATASET = os.environ.get("UI_TEST_DATASET", "file:///nonexistent")
INBOX = os.environ.get("UI_TEST_INBOX", "file:///nonexistent")

with DAG(dag_id="aicenter_ui", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
    FullPipelineOperator(
        task_id="full", package="uipkg", version="1.0", dataset=DATASET, save_training_data=True,
        env={"ROWS": "6", "API_TOKEN": "not-for-the-page"},
    )
    FullPipelineOperator(task_id="broken", package="uipkg", version="1.0", dataset=DATASET, env={"FAIL_IN": "train"}, retries=0)
    PredictPipelineOperator(task_id="score", package="uipkg", version="1.0", dataset=INBOX, input_type="json", max_failed=1,
                            retries=0)
