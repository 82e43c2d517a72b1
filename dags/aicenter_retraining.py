"""Closing the loop: retrain on a schedule, promote only a better model, evaluate every new version.

- ``aicenter_retraining`` (cron, Mondays 03:00): a full pipeline (process_data, train,
  evaluate, save) on the churn package's latest version with the week's data, scored on a
  fixed holdout set (``evaluation_dataset``) that every week's version is scored on too. The
  new version becomes ``production`` only when its score there is strictly above production's
  score on the same holdout, so a bad week of data never replaces a good model and a good
  week replaces it on its own. (Scored on its own split of each week's data instead, two
  versions would be measured on different data and never be compared.)
- ``aicenter_evaluate_new_version`` (scheduled on ``Asset("aicenter://churn")``): every new
  churn version, from this DAG or any other train/full run, is evaluated on a fixed holdout
  set and becomes ``staging`` when it beats staging's current version there. The version
  comes from the triggering asset event's ``extra``; run by hand (or with ``airflow dags
  test``) there is no event and the ``version`` param is used instead.

Both run unchanged with ``airflow dags test`` on the embedded default (no ``aicenter_default``
connection: file store ``$AIRFLOW_HOME/aicenter``, local launcher) once the package and the
data exist::

    aicenter package upload examples/packages/churn --name churn
    python examples/make_dataset.py $AIRFLOW_HOME/aicenter-datasets/churn --seed 7
    python examples/make_dataset.py $AIRFLOW_HOME/aicenter-datasets/churn-holdout --seed 8
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, Param

from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator

PACKAGE = "churn"
AIRFLOW_HOME = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
DEFAULT_DATASET = (AIRFLOW_HOME / "aicenter-datasets" / "churn").as_uri()
DEFAULT_HOLDOUT = (AIRFLOW_HOME / "aicenter-datasets" / "churn-holdout").as_uri()


def version_from_events(events: Mapping[Any, Iterable[Any]] | None, fallback: str) -> str:
    """The newest version announced by the triggering ``aicenter://churn`` events, else ``fallback``.

    One run may consume several events (versions made while it was queued): the newest one
    is evaluated, since it is the one that would be promoted.
    """
    found = [
        event
        for batch in (events or {}).values()
        for event in batch
        if (event.extra or {}).get("package") == PACKAGE and (event.extra or {}).get("version")
    ]
    if not found:
        return fallback
    return str(max(found, key=lambda e: e.timestamp).extra["version"])


with DAG(
    dag_id="aicenter_retraining",
    description="Weekly full pipeline on churn; promote the new version to production only if it scores better",
    schedule="0 3 * * 1",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "version": Param("latest", type="string", description='version to retrain: "M.m", "M", "latest" or an alias'),
        "dataset": Param(DEFAULT_DATASET, type="string", description="the week's data folder URI (s3://... or file:///...)"),
        "evaluation_dataset": Param(DEFAULT_HOLDOUT, type="string",
                                    description="the fixed holdout folder URI every version is scored on; keep it "
                                                "the same across weeks, or versions cannot be compared"),
        "epochs": Param(150, type="integer", minimum=1, description="gradient-descent steps (EPOCHS)"),
        "learning_rate": Param(0.2, type="number", exclusiveMinimum=0, description="step size (LEARNING_RATE)"),
    },
    tags=["aicenter", "example"],
):
    FullPipelineOperator(
        task_id="retrain",
        package=PACKAGE,
        version="{{ params.version }}",
        dataset="{{ params.dataset }}",
        evaluation_dataset="{{ params.evaluation_dataset }}",
        env={"EPOCHS": "{{ params.epochs }}", "LEARNING_RATE": "{{ params.learning_rate }}"},
        save_training_data=True,
        save_test_data=True,  # the holdout's snapshot: its content, not just its URI, shows it is the same data
        promote_to="production",
        promote_if="better",
    )

with DAG(
    dag_id="aicenter_evaluate_new_version",
    description="Evaluate each new churn version on a holdout set; promote it to staging if it scores better",
    schedule=[Asset(f"aicenter://{PACKAGE}")],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={
        "version": Param("latest", type="string", description="version to evaluate when no asset event triggered the run"),
        "evaluation_dataset": Param(DEFAULT_HOLDOUT, type="string", description="holdout data folder URI"),
    },
    user_defined_macros={"version_from_events": version_from_events},
    tags=["aicenter", "example"],
):
    EvaluatePipelineOperator(
        task_id="evaluate",
        package=PACKAGE,
        version="{{ version_from_events(triggering_asset_events, params.version) }}",
        evaluation_dataset="{{ params.evaluation_dataset }}",
        save_test_data=True,
        promote_to="staging",
        promote_if="better",
    )
