"""`aicenter runs ...` and `aicenter package show/promote/validate` against a store filled by real runs.

One real `airflow dags test` (train -> full -> evaluate, plus an evaluation that fails) fills
the store; the commands then read it in-process (``cli.main`` + capsys) and, for the exact
user experience, through the installed console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_aicenter import cli
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import MAIN, SCORED_TRAIN, small_dataset, upload_package
from tests.conftest import EXAMPLE_PACKAGE, write_files

AICENTER = str(Path(sys.executable).parent / "aicenter")

CLI_DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator

with DAG("aicenter_test_cli", schedule=None, start_date=datetime(2026, 1, 1), params={"data": ""}):
    train = TrainPipelineOperator(task_id="train", package="scored", version="1.0", dataset="{{ params.data }}",
                                  env={"SCORE": "0.1", "API_KEY": "k-9f8e7d"})
    full = FullPipelineOperator(task_id="full", package="scored", version="{{ ti.xcom_pull(task_ids='train')['version'] }}",
                                dataset="{{ params.data }}", env={"SCORE": "0.7", "EPOCHS": "4"}, promote_to="production")
    evaluate = EvaluatePipelineOperator(task_id="evaluate", package="scored", version="production",
                                        evaluation_dataset="{{ params.data }}", env={"SCORE": "0.8"}, promote_to="staging")
    evaluate_nan = EvaluatePipelineOperator(task_id="evaluate_nan", package="scored", version="production",
                                            evaluation_dataset="{{ params.data }}", env={"SCORE": "nan"})
    train >> full >> [evaluate, evaluate_nan]
'''


@pytest.fixture(scope="module")
def filled(airflow_env, tmp_path_factory) -> tuple[str, str]:
    """(store URI, dataset URI) after one real DAG run: 1.1 trained, 1.2 full (production), evaluated, one failure."""
    tmp = tmp_path_factory.mktemp("cli")
    uri = (tmp / "aicenter").as_uri()
    upload_package(Registry(open_store(uri)), tmp, "scored", SCORED_TRAIN)
    data = small_dataset(tmp).as_uri()
    airflow_env.add_dag("aicenter_test_cli.py", CLI_DAG)
    env = {"AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}})}
    done = airflow_env.dags_test("aicenter_test_cli", {"data": data}, extra_env=env)
    assert done.returncode != 0, "evaluate_nan fails the DAG run"
    assert "Main.evaluate() returned nan" in done.stdout + done.stderr
    return uri, data


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def read_json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def console_script(*args: str, columns: int = 250) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    return subprocess.run([AICENTER, *args], capture_output=True, text=True, env={**env, "COLUMNS": str(columns)},
                          timeout=120, check=False)


@pytest.mark.airflow
def test_runs_list_and_show(filled, capsys):
    uri, data = filled
    runs = read_json(capsys, "--storage", uri, "runs", "list")
    by_task = {r["id"].split("/")[2]: r for r in runs}
    assert set(by_task) == {"train", "full", "evaluate", "evaluate_nan"}
    assert all(r["id"].startswith("aicenter_test_cli/manual__") and r["id"].endswith("/1") for r in runs)
    assert {t: r["status"] for t, r in by_task.items()} == {
        "train": "succeeded", "full": "succeeded", "evaluate": "succeeded", "evaluate_nan": "failed"}
    assert "Main.evaluate() returned nan, which is not a finite number" in by_task["evaluate_nan"]["cause"]
    assert [(by_task[t]["version"], by_task[t]["new_version"]) for t in ("train", "full", "evaluate")] == [
        ("1.0", "1.1"), ("1.1", "1.2"), ("1.2", None)]
    assert [r["id"].split("/")[2] for r in read_json(capsys, "--storage", uri, "runs", "list", "--status", "failed")] == ["evaluate_nan"]
    assert read_json(capsys, "--storage", uri, "runs", "list", "--package", "other") == []
    assert len(read_json(capsys, "--storage", uri, "runs", "list", "--package", "scored")) == 4

    train = read_json(capsys, "--storage", uri, "runs", "show", "train")
    assert train["id"] == by_task["train"]["id"] and train["pipeline"] == "train" and train["dataset"] == data
    assert train["env"] == {"SCORE": "0.1", "API_KEY": "***"}, "masked as in _results.json"
    assert train["results_uri"].endswith("/train/1/_results.json") and train["snapshots"] == {}
    full = read_json(capsys, "--storage", uri, "runs", "show", by_task["full"]["uri"])
    assert full["score"] == 0.7 and full["new_version"] == "1.2"
    assert full["promotion"]["promoted"] is True and (full["promotion"]["alias"], full["promotion"]["to"]) == ("production", "1.2")

    # as a person sees it: the installed command, a rich table, nothing secret
    done = console_script("--storage", uri, "runs", "list")
    assert done.returncode == 0, done.stderr
    assert "evaluate_nan" in done.stdout and "failed" in done.stdout and "succeeded" in done.stdout
    assert "1.1 -> 1.2" in done.stdout and "not a finite number" in done.stdout
    shown = console_script("--storage", uri, "runs", "show", "full")
    assert "promoted to 'production'" in shown.stdout and "EPOCHS=4" in shown.stdout
    assert "k-9f8e7d" not in done.stdout + shown.stdout + console_script("--storage", uri, "runs", "show", "train").stdout


@pytest.mark.airflow
def test_runs_compare(filled, capsys):
    uri, _ = filled
    compared = read_json(capsys, "--storage", uri, "runs", "compare", "full", "evaluate", "evaluate_nan")
    fields = compared["fields"]
    assert [r.split("/")[2] for r in compared["runs"]] == ["full", "evaluate", "evaluate_nan"]
    assert fields["pipeline"] == ["full", "evaluate", "evaluate"] and fields["status"] == ["succeeded", "succeeded", "failed"]
    assert fields["score"] == [0.7, 0.8, None] and fields["version"] == ["1.1", "1.2", "1.2"]
    assert fields["new_version"] == ["1.2", None, None] and fields["env.EPOCHS"] == ["4", None, None]
    assert fields["env.SCORE"] == ["0.7", "0.8", "nan"], "a failed run wrote no results: its env comes from outcome.json"
    assert {"pipeline", "status", "score", "env.EPOCHS"} <= set(compared["differs"]) and "package" not in compared["differs"]
    assert fields["duration_s"][0] > 0 and len(fields["start"]) == 3

    code, out, err = run_cli(capsys, "--storage", uri, "runs", "compare", "full", "aicenter_test_cli/nosuch/full/1")
    assert code == 1 and out == ""
    assert "no run 'aicenter_test_cli/nosuch/full/1'" in err and "aicenter runs list" in err
    done = console_script("--storage", uri, "runs", "compare", "full", "nosuch")
    assert done.returncode == 1 and "error: no run 'nosuch'" in done.stderr
    table = console_script("--storage", uri, "runs", "compare", "full", "evaluate")
    assert table.returncode == 0 and "env.EPOCHS" in table.stdout and "new_version" in table.stdout


@pytest.mark.airflow
def test_package_show_versions_lineage_scores_aliases(filled, capsys):
    uri, _ = filled
    overview = read_json(capsys, "--storage", uri, "package", "show", "scored")
    versions = {v["version"]: v for v in overview["versions"]}
    assert list(versions) == ["1.0", "1.1", "1.2"]
    assert (versions["1.1"]["pipeline"], versions["1.1"]["parent"], versions["1.1"]["score"]) == ("train", "1.0", None)
    assert versions["1.2"]["score"] == 0.7 and [e["score"] for e in versions["1.2"]["evaluations"]] == [0.8]
    assert sorted(versions["1.2"]["aliases"]) == ["production", "staging"]
    production = overview["aliases"]["production"]
    assert production["version"] == "1.2" and [(h["version"], h["previous"]) for h in production["history"]] == [("1.2", None)]
    assert production["history"][0]["set_by"].endswith("/full/1")

    detail = read_json(capsys, "--storage", uri, "package", "show", "scored:production")
    assert detail["version"] == "1.2" and detail["requested"] == "production"
    assert [a["version"] for a in detail["lineage"]] == ["1.1", "1.0"], "back to the first version"
    assert (detail["score"], detail["judged_score"]) == (0.7, 0.8) and detail["judged_by"].startswith("evaluation of")
    assert detail["all_aliases"]["staging"]["points_here"] is True
    text = console_script("--storage", uri, "package", "show", "scored:1.2")
    assert text.returncode == 0 and "Lineage: 1.2 <- 1.1 <- 1.0" in text.stdout and "production" in text.stdout

    code, _, err = run_cli(capsys, "--storage", uri, "package", "show", "scored:champion")
    assert code == 1 and "package 'scored' has no alias 'champion'" in err
    assert "aicenter package promote scored:VERSION --alias champion" in err
    code, _, err = run_cli(capsys, "--storage", uri, "package", "show", "nosuch")
    assert code == 1 and "package 'nosuch' has no versions" in err


@pytest.mark.airflow
def test_package_promote(filled, capsys):
    uri, _ = filled
    first = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary")
    assert first == {"package": "scored", "promoted": True, "alias": "canary", "from": None, "to": "1.1",
                     "reason": "promote_if='always' (new alias 'canary')"}
    again = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary")
    assert again["promoted"] is False and again["reason"] == "'canary' already points at 1.1"
    better = read_json(capsys, "--storage", uri, "package", "promote", "scored:production", "--alias", "canary", "--if", "better")
    assert better["promoted"] is True and (better["from"], better["to"]) == ("1.1", "1.2")
    assert "has no score" in better["reason"]
    worse = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary", "--if", "better")
    assert worse["promoted"] is False and "has no score" in worse["reason"]
    history = Registry(open_store(uri)).alias_history("scored", "canary")
    assert [(h.version, h.previous) for h in history] == [("1.1", None), ("1.2", "1.1")]
    assert history[0].set_by.startswith("cli:")

    code, _, err = run_cli(capsys, "--storage", uri, "package", "promote", "scored:7.7", "--alias", "canary")
    assert code == 1 and "has no version 7.7" in err
    code, _, err = run_cli(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "v2")
    assert code == 1 and "alias name 'v2' looks like a version" in err
    code, _, err = run_cli(capsys, "--storage", uri, "package", "promote", "scored", "--alias", "canary")
    assert code == 1 and "names no version" in err


def test_package_validate_is_static_and_needs_no_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AICENTER_STORAGE", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "no-airflow-here"))
    valid = read_json(capsys, "package", "validate", str(EXAMPLE_PACKAGE), "--pipeline", "full")
    assert valid["valid"] is True and {"process_data", "train", "evaluate", "save"} <= set(valid["train_methods"])
    trains_only = write_files(tmp_path / "pkg", {
        "main.py": MAIN, "requirements.txt": "",
        "train.py": "class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        pass\n"
                    "    def save(self):\n        pass\n",
    })
    assert read_json(capsys, "package", "validate", str(trains_only), "--pipeline", "train")["valid"] is True
    code, out, err = run_cli(capsys, "package", "validate", str(trains_only), "--pipeline", "evaluate", "--json")
    assert code == 1 and json.loads(out)["valid"] is False
    assert "class Main has no method evaluate (needed by the evaluate pipeline)" in json.loads(out)["error"]
    assert "add `def evaluate(self, evaluation_directory):` to Main" in err
    code, out, err = run_cli(capsys, "package", "validate", str(tmp_path / "missing"), "--pipeline", "full")
    assert code == 1 and "does not exist" in err
    assert not (tmp_path / "no-airflow-here").exists(), "validate opened no store"
    text = console_script("package", "validate", str(EXAMPLE_PACKAGE), "--pipeline", "evaluate")
    assert text.returncode == 0 and "valid for the evaluate pipeline" in text.stdout
