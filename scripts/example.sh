#!/usr/bin/env bash
# The main job, end to end on the embedded default (file store + local launcher):
# install, migrate a fresh Airflow home, generate the churn dataset, upload the example
# package, run dags/aicenter_training.py with `airflow dags test`, print the new version.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AIRFLOW_HOME=${AIRFLOW_HOME:-$PWD/airflow-home}
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
unset AICENTER_STORAGE
BIN=$PWD/.venv/bin
mkdir -p "$AIRFLOW_HOME"
"$BIN/airflow" db migrate >/dev/null
DATASET=$AIRFLOW_HOME/aicenter-datasets/churn
"$BIN/python" examples/make_dataset.py "$DATASET" --rows 2000
"$BIN/aicenter" package upload examples/packages/churn --name churn
"$BIN/airflow" dags test aicenter_training -c "{\"dataset\": \"file://$DATASET\"}"
"$BIN/aicenter" package list
"$BIN/python" - <<'PY'
import os
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
registry = Registry(open_store(os.path.join(os.environ["AIRFLOW_HOME"], "aicenter")))
record = registry.resolve("churn", "latest")
print(f"\nNew version: churn {record.version} (parent {record.parent})")
print(f"_results.json: {registry.store.url(record.run.prefix + '/_results.json')}")
print(f"artifacts:     {registry.store.url(record.run.prefix + '/artifacts/')}")
PY
