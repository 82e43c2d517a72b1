#!/usr/bin/env bash
# The main job, end to end on the embedded default (file store + local launcher):
# install, migrate a fresh Airflow home, generate the churn dataset, upload the example
# package, run dags/aicenter_training.py with `airflow dags test`, then the retraining,
# evaluation and closed-loop (batch prediction) DAGs, and print the new version.
#
# It works in an Airflow home of its own, ./airflow-home, or the folder named by
# AICENTER_EXAMPLE_HOME. It never uses an AIRFLOW_HOME exported in your shell: it migrates
# the database of the home it works in and fills it with example runs, which has no place in
# the Airflow you run. Likewise an exported AICENTER_STORAGE or aicenter_default connection
# is not used: the example's store is <its home>/aicenter.
#
# `source scripts/example.sh --setup` (what scripts/ui.sh does) stops after the set-up (install,
# home, database, datasets, package upload), leaving the home's settings exported.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXAMPLE_HOME=$(realpath -m "${AICENTER_EXAMPLE_HOME:-$PWD/airflow-home}")
if [ -n "${AIRFLOW_HOME:-}" ] && [ "$(realpath -m "$AIRFLOW_HOME")" != "$EXAMPLE_HOME" ]; then
  echo "example.sh: leaving AIRFLOW_HOME=$AIRFLOW_HOME alone; the example works in its own home, $EXAMPLE_HOME" \
       "(set AICENTER_EXAMPLE_HOME to choose another)" >&2
fi
bash scripts/setup.sh
export AIRFLOW_HOME=$EXAMPLE_HOME
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
unset AICENTER_STORAGE AIRFLOW_CONN_AICENTER_DEFAULT
BIN=$PWD/.venv/bin
mkdir -p "$AIRFLOW_HOME"
"$BIN/airflow" db migrate >/dev/null
DATASET=$AIRFLOW_HOME/aicenter-datasets/churn
"$BIN/python" examples/make_dataset.py "$DATASET" --rows 2000
# The fixed holdout every retrained version is scored on (the DAGs' evaluation_dataset): another seed, so
# no customer of the training data is in it, and the same content on every run, so that versions trained
# in different weeks are scored on the same data and "better" can compare them.
"$BIN/python" examples/make_dataset.py "$AIRFLOW_HOME/aicenter-datasets/churn-holdout" --rows 600 --seed 8
"$BIN/aicenter" package upload examples/packages/churn --name churn
if [ "${1:-}" = "--setup" ]; then
  return 0 2>/dev/null || exit 0  # sourced: back to the caller, with this home's settings exported
fi
"$BIN/airflow" dags test aicenter_training -c "{\"dataset\": \"file://$DATASET\"}"
# Closing the loop: a full pipeline that promotes to production only when better, then an
# evaluation of the newest version on the holdout set (the DAG that new versions trigger).
"$BIN/airflow" dags test aicenter_retraining >/dev/null
"$BIN/airflow" dags test aicenter_evaluate_new_version >/dev/null
# New data -> full pipeline promoting only a better model -> batch prediction with production (2 processes).
"$BIN/airflow" dags test aicenter_closed_loop >/dev/null
"$BIN/aicenter" package list
"$BIN/aicenter" runs list
"$BIN/aicenter" runs compare $("$BIN/aicenter" runs list --json | "$BIN/python" -c 'import json,sys; print(" ".join(r["id"] for r in json.load(sys.stdin)[:3]))')
"$BIN/python" - <<'PY'
import os
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
registry = Registry(open_store(os.path.join(os.environ["AIRFLOW_HOME"], "aicenter")))
# the newest version a training run made (run this script again and it trains again)
record = max((r for r in registry.versions("churn") if r.pipeline == "train"), key=lambda r: r.created_at)
print(f"\nNew version from aicenter_training: churn {record.version} (parent {record.parent})")
print(f"_results.json: {registry.store.url(record.run.prefix + '/_results.json')}")
print(f"artifacts:     {registry.store.url(record.run.prefix + '/artifacts/')}")
PY
echo "The Airflow UI on this home, with these runs and the example DAGs: bash scripts/ui.sh"
