"""dags/aicenter_distributed.py and dags/aicenter_closed_loop.py as shipped, on the embedded default.

No connection: the store is $AIRFLOW_HOME/aicenter and runs use the local launcher.
"""

from __future__ import annotations

import json
import shutil

import pytest

from airflow_aicenter.records import Results, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import task_states, xcoms
from tests.conftest import EXAMPLE_PACKAGE, REPO, make_dataset

pytestmark = pytest.mark.airflow


def fresh_store(airflow_env) -> Registry:
    shutil.rmtree(airflow_env.home / "aicenter", ignore_errors=True)  # the embedded default store, ours alone
    return Registry(open_store(airflow_env.default_store_uri))


def test_distributed_example_trains_with_two_ranks(airflow_env):
    registry = fresh_store(airflow_env)
    registry.upload(REPO / "examples" / "packages" / "regression_ddp", "regression_ddp")
    done = airflow_env.dags_test("aicenter_distributed")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = xcoms(airflow_env.home, "aicenter_distributed")["train_distributed"]["return_value"]
    assert result["version"] == "1.1" and result["score"] > 0.9, result  # R² of a nearly linear target
    record = registry.get("regression_ddp", "1.1")
    results = read(registry.store, f"{record.run.prefix}/_results.json", Results)
    assert results.aicenter["distributed"] == {"nodes": 1, "procs_per_node": 2, "world_size": 2}
    assert registry.store.exists(f"{record.run.prefix}/artifacts/rank-1/") or any(
        info.key.startswith(f"{record.run.prefix}/artifacts/rank-1/") for info in registry.store.list(f"{record.run.prefix}/artifacts/"))


def test_closed_loop_example_retrains_promotes_and_scores_the_inbox(airflow_env):
    home = airflow_env.home
    registry = fresh_store(airflow_env)
    for name, seed in (("churn", 7), ("churn-holdout", 8)):
        shutil.rmtree(home / "aicenter-datasets" / name, ignore_errors=True)
        make_dataset(home / "aicenter-datasets" / name, rows=300, seed=seed)
    shutil.rmtree(home / "aicenter-datasets" / "churn-inbox", ignore_errors=True)
    registry.upload(EXAMPLE_PACKAGE, "churn")

    done = airflow_env.dags_test("aicenter_closed_loop")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert set(task_states(home, "aicenter_closed_loop").values()) == {"success"}
    values = xcoms(home, "aicenter_closed_loop")
    retrain, score = values["retrain"]["return_value"], values["score_inbox"]["return_value"]
    assert retrain["version"] == "1.1" and retrain["promoted"] is True
    assert registry.alias("churn", "production").version == "1.1"
    assert score["version"] == "1.1", "batch prediction used production"
    assert (score["predicted"], score["failed"]) == (300, 0)
    run = score["run_uri"].removeprefix(registry.store.url("")).strip("/")
    lines = registry.store.get_bytes(f"{run}/predictions/customers.jsonl").decode().splitlines()
    assert [json.loads(line)["line"] for line in lines] == list(range(1, 301)) or [json.loads(line)["line"] for line in lines] == list(range(300))
    assert all("churn_probability" in json.loads(json.loads(line)["output"]) for line in lines)
