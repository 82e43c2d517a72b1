"""`aicenter runs ...` and `aicenter package show/promote/validate` against a store filled by real runs.

One DAG run's tasks, executed in process (train -> full -> evaluate, plus an evaluation that
fails; local launcher, real runtime processes), fill the store; the commands then read it
in-process (``cli.main`` + capsys) and, for the exact user experience, through the installed
console script.
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
from tests.aicenter_helpers import MAIN, SCORED_TRAIN, upload_package
from tests.conftest import EXAMPLE_PACKAGE, RUN_IDS, record_run, write_files

AICENTER = str(Path(sys.executable).parent / "aicenter")

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


def test_runs_list_and_show(filled, capsys):
    uri, data = filled
    runs = read_json(capsys, "--storage", uri, "runs", "list")
    by_task = {r["id"].split("/")[2]: r for r in runs}
    assert set(by_task) == {"train", "full", "evaluate", "evaluate_nan"}
    assert all(r["id"].startswith("aicenter_test_cli/manual__") and r["id"].endswith("/1") for r in runs)
    assert {t: r["status"] for t, r in by_task.items()} == {
        "train": "succeeded", "full": "succeeded", "evaluate": "succeeded", "evaluate_nan": "failed"}
    assert "Main.evaluate() returned nan, which is not a finite number" in by_task["evaluate_nan"]["cause"]
    versions = [(by_task[t]["version"], by_task[t]["new_version"]) for t in ("train", "full", "evaluate")]
    assert versions == [("1.0", "1.1"), ("1.1", "1.2"), ("1.2", None)]
    failed = read_json(capsys, "--storage", uri, "runs", "list", "--status", "failed")
    assert [r["id"].split("/")[2] for r in failed] == ["evaluate_nan"]
    assert read_json(capsys, "--storage", uri, "runs", "list", "--package", "other") == []
    assert len(read_json(capsys, "--storage", uri, "runs", "list", "--package", "scored")) == 4

    train = read_json(capsys, "--storage", uri, "runs", "show", "train")
    assert train["id"] == by_task["train"]["id"] and train["pipeline"] == "train" and train["dataset"] == data
    assert train["env"] == {"SCORE": "0.1", "API_KEY": "***"}, "masked as in _results.json"
    assert train["results_uri"].endswith("/train/1/_results.json") and train["snapshots"] == {}
    full = read_json(capsys, "--storage", uri, "runs", "show", by_task["full"]["uri"])
    assert full["score"] == 0.7 and full["new_version"] == "1.2"
    assert full["promotion"]["promoted"] is True
    assert (full["promotion"]["alias"], full["promotion"]["to"]) == ("production", "1.2")

    # as a person sees it: the installed command, a rich table, nothing secret
    done = console_script("--storage", uri, "runs", "list")
    assert done.returncode == 0, done.stderr
    assert "evaluate_nan" in done.stdout and "failed" in done.stdout and "succeeded" in done.stdout
    assert "1.1 -> 1.2" in done.stdout and "not a finite number" in done.stdout
    shown = console_script("--storage", uri, "runs", "show", "full")
    assert "promoted to 'production'" in shown.stdout and "EPOCHS=4" in shown.stdout
    assert "k-9f8e7d" not in done.stdout + shown.stdout + console_script("--storage", uri, "runs", "show", "train").stdout


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


def test_package_promote(filled, capsys):
    uri, _ = filled
    first = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary", "--if", "always")
    assert first == {"package": "scored", "promoted": True, "alias": "canary", "from": None, "to": "1.1",
                     "reason": "promote_if='always' (new alias 'canary')"}
    again = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary")
    assert again["promoted"] is False and again["reason"] == "'canary' already points at 1.1"
    better = read_json(capsys, "--storage", uri, "package", "promote", "scored:production", "--alias", "canary", "--if", "better")
    assert better["promoted"] is True and (better["from"], better["to"]) == ("1.1", "1.2")
    assert "has no score" in better["reason"]
    code, out, _ = run_cli(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "canary", "--if", "better",
                           "--json")
    worse = json.loads(out)
    assert code == 3 and worse["promoted"] is False and "has no score" in worse["reason"]
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


# -- the first hour -------------------------------------------------------------------------
# That the command and a DAG's task share the connection stored in Airflow's database is proved by the
# example training DAG's smoke run (tests/operators/test_train_dag.py).
def test_without_airflow_home_the_error_says_how_to_point_the_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_", "AIRFLOW"))}
    env.update(HOME=str(tmp_path), COLUMNS="250")
    done = subprocess.run([AICENTER, "package", "list"], capture_output=True, text=True, env=env, timeout=120, check=False)
    default = (tmp_path / "airflow" / "aicenter").as_uri()
    assert done.returncode == 1
    assert f"there is no store at {default} (the embedded default, $AIRFLOW_HOME/aicenter)" in done.stderr, done.stderr
    assert "AIRFLOW_HOME is not set, so ~/airflow was assumed" in done.stderr
    assert "set AIRFLOW_HOME to your Airflow home" in done.stderr and "--storage URI or AICENTER_STORAGE=URI" in done.stderr
    assert not (tmp_path / "airflow" / "airflow.db").exists(), "looking for a connection made no database"


def test_promote_defaults_to_better_and_keeps_a_scored_version_over_an_unscored_one(tmp_path, capsys):
    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    blob = registry.get("scored", "1.0").blob
    registry.commit("scored", parent="1.0", blob=blob, pipeline="full", score=0.8)
    registry.commit("scored", parent="1.1", blob=blob, pipeline="train")  # 1.2: trained, never evaluated

    first = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "production")
    assert first["promoted"] is True and first["reason"].startswith("score 0.8")
    code, out, _ = run_cli(capsys, "--storage", uri, "package", "promote", "scored:1.2", "--alias", "production", "--json")
    refused = json.loads(out)
    assert code == 3 and refused["promoted"] is False and "version 1.2 has no score" in refused["reason"]
    assert registry.alias("scored", "production").version == "1.1"

    done = console_script("--storage", uri, "package", "promote", "scored:1.2", "--alias", "production")
    assert done.returncode == 3, done.stderr  # refused: a script can tell (docs/cli.md)
    assert "Not promoted: version 1.2 has no score" in done.stdout and "--if better cannot judge it" in done.stdout
    assert "'production' stays at 1.1 (score 0.8" in done.stdout
    assert "aicenter package promote scored:1.2 --alias production --if always" in done.stdout
    forced = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.2", "--alias", "production", "--if", "always")
    assert forced["promoted"] is True and (forced["from"], forced["to"]) == ("1.1", "1.2")


# -- run records made by hand, to read at 80 columns ---------------------------------------
def whole_on_a_line(text: str, run_id: str) -> bool:
    return any(run_id in line for line in text.splitlines())


def test_run_ids_stay_whole_at_80_columns(recorded):
    listed = console_script("--storage", recorded, "runs", "list", columns=80)
    assert listed.returncode == 0, listed.stderr
    assert all(whole_on_a_line(listed.stdout, i) for i in RUN_IDS), listed.stdout
    assert "ValueError: bad rows" in listed.stdout and max(map(len, RUN_IDS)) > 80 - 20
    wide = console_script("--storage", recorded, "runs", "list", columns=250)
    assert all(whole_on_a_line(wide.stdout, i) for i in RUN_IDS) and "┃ run" in wide.stdout, "a table when it fits"

    shown = console_script("--storage", recorded, "runs", "show", RUN_IDS[2], columns=80)
    assert shown.returncode == 0 and whole_on_a_line(shown.stdout, RUN_IDS[2]), shown.stdout
    compared = console_script("--storage", recorded, "runs", "compare", *RUN_IDS, columns=80)
    assert compared.returncode == 0, compared.stderr
    assert all(whole_on_a_line(compared.stdout, f"#{n} {i}") for n, i in enumerate(RUN_IDS, 1)), compared.stdout


def test_the_runs_that_made_versions_stay_whole_at_80_columns(tmp_path):
    from airflow_aicenter.records import RunRef

    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "churn", SCORED_TRAIN)
    dag, run, task = RUN_IDS[0].split("/")[:3]
    registry.commit("churn", parent="1.0", blob=registry.get("churn", "1.0").blob, pipeline="train",
                    run=RunRef(dag_id=dag, run_id=run, task_id=task, try_number=1))
    for columns in (80, 250):
        shown = console_script("--storage", uri, "package", "show", "churn", columns=columns)
        assert shown.returncode == 0 and whole_on_a_line(shown.stdout, RUN_IDS[0]), (columns, shown.stdout)


def test_runs_compare_shows_the_data_snapshot_beside_the_dataset(recorded, capsys):
    compared = read_json(capsys, "--storage", recorded, "runs", "compare", *RUN_IDS)
    fields = compared["fields"]
    assert len(set(fields["dataset"])) == 1 and "dataset" not in compared["differs"], "the same URI each time"
    first, second, third = fields["dataset_snapshot"]
    assert first == second and first.startswith("content ") and first.endswith(", 1 file, 4 bytes"), first
    assert third.endswith(", 2 files, 8 bytes") and third.split(",")[0] != first.split(",")[0], "data changed, same URI"
    assert "dataset_snapshot" in compared["differs"]
    assert list(fields).index("dataset_snapshot") == list(fields).index("dataset") + 1
    assert fields["evaluation_snapshot"] == [None, None, None]
    text = console_script("--storage", recorded, "runs", "compare", *RUN_IDS, columns=200)
    assert "dataset_snapshot" in text.stdout and first in text.stdout and "2 files, 8 bytes" in text.stdout


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    uri = (tmp_path / "store").as_uri()
    store = open_store(uri)
    for n in range(300):  # about 300 KB of JSON: more than a pipe holds, so the writer meets the closed end
        record_run(store, f"big/manual__{n:04d}/train/1", dataset="file:///data", files={"a.csv": b"1"}, start=1_790_000_000 + n)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    for args in ("runs list --json", "runs list"):
        done = subprocess.run(["bash", "-c", f"'{AICENTER}' --storage '{uri}' {args} | head -1"], capture_output=True,
                              text=True, env={**env, "COLUMNS": "80"}, timeout=120, check=False)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
        assert done.stderr.strip() == "", done.stderr


# -- scripts/example.sh chooses its own Airflow home ----------------------------------------
STUB = '''#!/usr/bin/env bash
conn=${AIRFLOW_CONN_AICENTER_DEFAULT:-}
echo "$(basename "$0") home=$AIRFLOW_HOME storage=${AICENTER_STORAGE:-} conn=$conn args=$*" >> "$STUB_LOG"
'''


@pytest.mark.parametrize("example_home", [None, "chosen-home"])
def test_example_script_migrates_only_its_own_airflow_home(tmp_path, example_home):
    """The real script, with the tools it calls recording what they were given (setup, airflow, aicenter, python)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "example.sh").write_text((Path(__file__).parents[1] / "scripts" / "example.sh").read_text())
    (repo / "scripts" / "setup.sh").write_text("exit 0\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    for tool in ("airflow", "aicenter", "python"):
        (repo / ".venv" / "bin" / tool).write_text(STUB)
        (repo / ".venv" / "bin" / tool).chmod(0o755)
    unrelated = tmp_path / "my-real-airflow"
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AIRFLOW"))}
    env.update(STUB_LOG=str(log), AIRFLOW_HOME=str(unrelated), AICENTER_STORAGE="s3://prod/aicenter",
               AIRFLOW_CONN_AICENTER_DEFAULT='{"conn_type": "aicenter"}')
    if example_home:
        env["AICENTER_EXAMPLE_HOME"] = str(tmp_path / example_home)
    done = subprocess.run(["bash", str(repo / "scripts" / "example.sh")], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    home = tmp_path / example_home if example_home else repo / "airflow-home"
    calls = log.read_text().splitlines()
    assert f"airflow home={home} storage= conn= args=db migrate" in calls, calls
    assert all(f"home={home} " in call for call in calls), "every tool runs in the example's home, with no store of yours"
    assert not unrelated.exists(), "the exported AIRFLOW_HOME is left alone"
    assert f"leaving AIRFLOW_HOME={unrelated} alone" in done.stderr and "AICENTER_EXAMPLE_HOME" in done.stderr



def test_one_damaged_alias_record_does_not_hide_the_other_packages(tmp_path, capsys):
    """`aicenter package list` with a corrupt alias record: that package shows the problem, the others list (exit 1)."""
    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    registry.upload(EXAMPLE_PACKAGE, "churn")
    upload_package(registry, tmp_path, "other", SCORED_TRAIN)
    registry.set_alias("churn", "production", "1.0", set_by="test")
    [key] = [i.key for i in registry.store.list("packages/churn/aliases/") if i.key.endswith(".json")]
    registry.store.put_bytes(key, b"{not json")
    code = cli.main(["--storage", uri, "package", "list", "--json"])
    rows = {r["package"]: r for r in json.loads(capsys.readouterr().out)}
    assert code == 1 and set(rows) == {"churn", "other"}
    assert rows["other"]["problems"] == [] and rows["other"]["latest"] == "1.0"
    assert rows["churn"]["latest"] == "1.0" and any("production" in p for p in rows["churn"]["problems"])


def test_promote_says_the_scores_the_rule_compared(tmp_path, capsys):
    """The "stays at" line shows the current version's score on the data both were compared on, not its latest score elsewhere."""
    from airflow_aicenter.records import EvaluationRecord

    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    blob = registry.get("scored", "1.0").blob
    holdout, other = "file:///data/holdout/", "file:///data/other/"
    registry.commit("scored", parent="1.0", blob=blob, pipeline="full", score=0.7, evaluated_on=holdout)  # 1.1
    registry.commit("scored", parent="1.1", blob=blob, pipeline="full", score=0.65, evaluated_on=holdout)  # 1.2
    first = read_json(capsys, "--storage", uri, "package", "promote", "scored:1.1", "--alias", "production")
    assert first["promoted"] is True
    # production's latest score is on other data: the rule does not use it, and neither may the message
    registry.add_evaluation(EvaluationRecord(package="scored", version="1.1", score=0.95, dataset=other))

    code, out, _ = run_cli(capsys, "--storage", uri, "package", "promote", "scored:1.2", "--alias", "production")
    text = " ".join(out.split())
    assert code == 3, text
    assert f"Not promoted: score 0.65 is not above 0.7 of the current production version 1.1 (on the same evaluation data {holdout})" in text
    assert f"'production' stays at 1.1: its score 0.7 against 0.65 of 1.2, on the same evaluation data {holdout}" in text, text
    assert "0.95" not in text
