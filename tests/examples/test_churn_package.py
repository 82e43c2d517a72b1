"""The example ``churn`` ML package, run for real as the runtime runs it: a child process whose
working directory is (a copy of) the package root, with the AI Center environment variables set.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tests.examples.paths import PACKAGE, REPO

FEATURES = ["tenure_months", "monthly_charges", "support_calls", "contract_monthly", "age"]
AICENTER_VARS = ("data_directory", "test_data_directory", "training_data_directory", "evaluation_data_directory",
                 "artifacts_directory", "save_training_data", "save_test_data", "EPOCHS", "LEARNING_RATE")

_spec = importlib.util.spec_from_file_location("example_make_dataset", REPO / "examples" / "make_dataset.py")
assert _spec is not None and _spec.loader is not None
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)

# What the runtime does in a full pipeline, plus a JSON summary on the last stdout line.
FULL_PIPELINE = """
import json, os
from train import Main
m = Main()
m.process_data(os.environ["data_directory"])
m.train(os.environ["training_data_directory"])
score = m.evaluate(os.environ["evaluation_data_directory"])
m.save()
print(json.dumps({"score": score, "loss": m.loss_curve}))
"""

PREDICT = """
import sys
from main import Main
print(Main().predict(sys.argv[1]))
"""


def run_in_package(pkg: Path, code: str, *args: str, env: dict[str, str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in AICENTER_VARS}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=pkg, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def last_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout.strip().splitlines()[-1])


def aicenter_env(root: Path, data: Path) -> dict[str, str]:
    """Absolute folders, as the runtime sets them; the test data folder is empty unless filled."""
    env = {"data_directory": str(data)}
    for name in ("test_data_directory", "training_data_directory", "evaluation_data_directory", "artifacts_directory"):
        (root / name).mkdir(parents=True)
        env[name] = str(root / name)
    return env


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_package_layout() -> None:
    assert {p.name for p in PACKAGE.iterdir()} >= {"main.py", "train.py", "requirements.txt", "aicenter.json", "churn_model.py"}
    meta = json.loads((PACKAGE / "aicenter.json").read_text())
    assert meta["gpu"] is False and meta["retrainable"] is True and meta["input_type"] == "json" and meta["description"]
    requirements = [line for line in (PACKAGE / "requirements.txt").read_text().splitlines() if line.strip()]
    assert all(line.lstrip().startswith("#") for line in requirements), "the package needs no dependencies"
    assert not (PACKAGE / "model.json").exists(), "the uploaded package (version N.0) is untrained"


def test_dataset_is_deterministic_and_learnable_shaped(tmp_path: Path) -> None:
    a = make_dataset.make_churn_dataset(tmp_path / "a", rows=300, seed=7)
    b = make_dataset.make_churn_dataset(tmp_path / "b", rows=300, seed=7)
    c = make_dataset.make_churn_dataset(tmp_path / "c", rows=300, seed=8, split="eval")
    assert a == tmp_path / "a" / "churn.csv" and c.name == "churn_eval.csv"
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    rows = csv_rows(a)
    assert len(rows) == 300 and list(rows[0]) == [*FEATURES, "churned"]
    assert {r["churned"] for r in rows} == {"0", "1"} and {r["contract_monthly"] for r in rows} == {"0", "1"}
    assert 0.25 < sum(r["churned"] == "1" for r in rows) / len(rows) < 0.75
    # the command line writes the same file
    done = subprocess.run([sys.executable, str(REPO / "examples" / "make_dataset.py"), str(tmp_path / "cli"),
                           "--rows", "300", "--seed", "7"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "churn.csv").read_bytes() == a.read_bytes()


def test_full_pipeline_then_predict_then_incremental_training(pkg: Path, tmp_path: Path) -> None:
    data = make_dataset.make_churn_dataset(tmp_path / "data", rows=1000, seed=7).parent
    # Run 1: full pipeline with an evaluation dataset drawn with another seed. As the runtime
    # does, evaluation_data_directory starts as a copy of it, so all of data is for training.
    env1 = aicenter_env(tmp_path / "run1", data)
    make_dataset.make_churn_dataset(Path(env1["test_data_directory"]), rows=600, seed=8)
    shutil.copytree(env1["test_data_directory"], env1["evaluation_data_directory"], dirs_exist_ok=True)
    out1 = last_json(run_in_package(pkg, FULL_PIPELINE, env=env1))  # default EPOCHS / LEARNING_RATE

    assert len(csv_rows(Path(env1["training_data_directory"]) / "train.csv")) == 1000
    assert not (Path(env1["evaluation_data_directory"]) / "eval.csv").exists()
    assert out1["score"] > 0.7, out1["score"]
    loss1 = out1["loss"]
    assert len(loss1) == 201 and abs(loss1[0] - 0.6931) < 1e-3 and loss1[-1] < loss1[0] - 0.15

    model = json.loads((pkg / "model.json").read_text())
    assert model["features"] == FEATURES and model["epochs_trained"] == 200
    assert len(model["weights"]) == len(model["means"]) == len(model["stds"]) == 5
    weights = dict(zip(model["features"], model["weights"]))
    assert weights["tenure_months"] < 0 < weights["support_calls"] and weights["contract_monthly"] > 0

    artifacts = Path(env1["artifacts_directory"])
    assert sorted(p.name for p in artifacts.iterdir()) == ["loss.svg", "report.md"]
    report = (artifacts / "report.md").read_text()
    assert "Accuracy on training data" in report and "Confusion matrix" in report and "scratch" in report
    svg = ET.parse(artifacts / "loss.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(svg.find("{http://www.w3.org/2000/svg}polyline").get("points").split()) == 201

    # Serving: main.py loads ./model.json; one record in, one object out; a list in, a list out.
    risky = {"customer_id": "c-1", "tenure_months": 2, "monthly_charges": 110.0, "support_calls": 5, "contract_monthly": 1, "age": 25}
    loyal = {"tenure_months": 60, "monthly_charges": "30.5", "support_calls": 0, "contract_monthly": 0, "age": 60}
    one = json.loads(run_in_package(pkg, PREDICT, json.dumps(risky)).stdout)
    assert set(one) == {"churn_probability", "churned"} and 0.0 <= one["churn_probability"] <= 1.0 and one["churned"] == 1
    both = json.loads(run_in_package(pkg, PREDICT, json.dumps([risky, loyal])).stdout)
    assert [r["churned"] for r in both] == [1, 0] and both[0]["churn_probability"] > both[1]["churn_probability"]
    bad = run_in_package(pkg, PREDICT, json.dumps({"tenure_months": 3}), check=False)
    assert bad.returncode != 0 and "lacks the features" in bad.stderr

    # Run 2: incremental training of the new version (model.json present), no evaluation
    # dataset this time, so process_data splits 80/20.
    env2 = aicenter_env(tmp_path / "run2", data)
    out2 = last_json(run_in_package(pkg, FULL_PIPELINE, env={**env2, "EPOCHS": "50", "LEARNING_RATE": "0.2"}))
    assert len(csv_rows(Path(env2["training_data_directory"]) / "train.csv")) == 800
    assert len(csv_rows(Path(env2["evaluation_data_directory"]) / "eval.csv")) == 200
    assert out2["loss"][0] < 0.5 < loss1[0], "training continued from the saved weights"
    assert out2["score"] > 0.7
    assert json.loads((pkg / "model.json").read_text())["epochs_trained"] == 250
    assert "incremental" in (Path(env2["artifacts_directory"]) / "report.md").read_text()
    ET.parse(Path(env2["artifacts_directory"]) / "loss.svg")


def test_clear_errors(pkg: Path, tmp_path: Path) -> None:
    # Serving an untrained version.
    done = run_in_package(pkg, PREDICT, "{}", check=False)
    assert done.returncode != 0 and "has not been trained yet" in done.stderr
    # Evaluating a folder without rows.
    data = make_dataset.make_churn_dataset(tmp_path / "data", rows=50, seed=1).parent
    env = aicenter_env(tmp_path / "run", data)
    code = ("import os\nfrom train import Main\nm = Main()\nm.train(os.environ['data_directory'])\n"
            "m.evaluate(os.environ['evaluation_data_directory'])\n")
    done = run_in_package(pkg, code, env={**env, "EPOCHS": "3"}, check=False)
    assert done.returncode != 0 and "ValueError: no evaluation rows in" in done.stderr
    # A bad hyperparameter.
    done = run_in_package(pkg, "from train import Main\nMain()\n", env={**env, "EPOCHS": "many"}, check=False)
    assert done.returncode != 0 and "EPOCHS='many' is not a valid int" in done.stderr
