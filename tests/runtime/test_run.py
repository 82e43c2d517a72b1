"""The runtime as the launchers run it: `python -m airflow_aicenter.runtime SPEC.json`, a real child process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from airflow_aicenter.records import Manifest, Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.conftest import RuntimeSpawner, write_files
from tests.packages import ECHO_MAIN

MAIN = ECHO_MAIN

# A package that records every call it gets and the environment it sees.
RECORDING_TRAIN = '''
import json, os

def _log(event, **kw):
    with open(os.path.join(os.environ["artifacts_directory"], "calls.jsonl"), "a") as fh:
        fh.write(json.dumps({"event": event, "cwd": os.getcwd(), **kw}) + "\\n")

class Main:
    def __init__(self):
        _log("__init__", env={k: os.environ.get(k) for k in (
            "data_directory", "test_data_directory", "training_data_directory",
            "evaluation_data_directory", "artifacts_directory", "save_training_data",
            "save_test_data", "EPOCHS", "API_TOKEN")})
    def process_data(self, input_directory):
        _log("process_data", arg=input_directory, files=sorted(os.listdir(input_directory)))
        with open(os.path.join(os.environ["training_data_directory"], "train.csv"), "w") as fh:
            fh.write("x\\n1\\n")
    def train(self, training_directory):
        _log("train", arg=training_directory, files=sorted(os.listdir(training_directory)))
    def evaluate(self, evaluation_directory):
        _log("evaluate", arg=evaluation_directory, files=sorted(os.listdir(evaluation_directory)))
        return 0.75
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("trained")
        os.makedirs("__pycache__", exist_ok=True)
        open("__pycache__/junk.pyc", "w").write("x")
        os.makedirs(os.path.join(os.environ["artifacts_directory"], "plots"), exist_ok=True)
        open(os.path.join(os.environ["artifacts_directory"], "plots", "roc.svg"), "w").write("<svg/>")
        _log("save")
'''


def setup_run(store, tmp_path, train_py=RECORDING_TRAIN, pipeline="train", **spec_kw):
    registry = Registry(store)
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": train_py, "requirements.txt": ""})
    base = registry.upload(pkg, "rec")
    data = write_files(tmp_path / "data", {"a.csv": "x\n1\n", "sub/b.csv": "x\n2\n"})
    run(upload_tree(data, store, "datasets/train"))
    kw = dict(dataset=store.url("datasets/train"))
    kw.update(spec_kw)
    spec = RunSpec(pipeline=pipeline, storage=store.uri, run_prefix="runs/d/r/t/1", package="rec", version=base.version,
                   blob=base.blob, env={"EPOCHS": "3"}, user_env_names=["API_TOKEN", "STRIPE_KEY"], **kw)
    return registry, spec


def run_runtime(spec: RunSpec, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The ``spawn_runtime`` fixture's :meth:`~tests.conftest.RuntimeSpawner.run`, for the helpers that have no fixture."""
    return RuntimeSpawner(tmp_path / "runtime-specs").run(spec, env)


def calls(store, spec):
    raw = store.get_bytes(f"{spec.run_prefix}/artifacts/calls.jsonl").decode()
    return [json.loads(line) for line in raw.splitlines()]


def test_train_call_order_env_and_outputs(store, tmp_path, request):
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    registry, spec = setup_run(store, tmp_path, save_training_data=True)
    done = run_runtime(spec, tmp_path, {**env, "API_TOKEN": "s3cr3t"})
    assert done.returncode == 0, done.stderr
    seen = calls(store, spec)
    assert [c["event"] for c in seen] == ["__init__", "train", "save"]
    init_env = seen[0]["env"]
    assert seen[1]["arg"] == init_env["data_directory"] and seen[1]["files"] == ["a.csv", "sub"]
    assert init_env["EPOCHS"] == "3" and init_env["save_training_data"] == "True" and init_env["API_TOKEN"] == "s3cr3t"
    assert all(os.path.isabs(init_env[k]) for k in ("data_directory", "artifacts_directory"))
    assert seen[0]["cwd"].endswith("package")  # the package root
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.blob is not None and outcome.artifacts == 2
    assert "s3cr3t" not in done.stderr and "s3cr3t" not in store.get_bytes(f"{spec.run_prefix}/outcome.json").decode()
    # the new content is the package folder after save(), minus __pycache__: a per-file version
    from airflow_aicenter.storage.transfer import read_package_contents
    assert outcome.blob.kind == "files"
    names = [f.path for f in read_package_contents(store, outcome.blob)[0].files]
    assert "model.txt" in names and not any("__pycache__" in n for n in names)
    manifest = read(store, f"{spec.run_prefix}/data_directory.manifest.json", Manifest)
    assert sorted(f.path for f in manifest.files) == ["a.csv", "sub/b.csv"] and manifest.total_bytes == 8
    assert not registry.store.exists("packages/rec/versions/1.1.json"), "the runtime never registers"


def test_full_pipeline_with_evaluation_dataset(store, tmp_path, request):
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    _, spec = setup_run(store, tmp_path, pipeline="full", save_test_data=True)
    evald = write_files(tmp_path / "eval", {"e.csv": "x\n9\n"})
    run(upload_tree(evald, store, "datasets/eval"))
    spec.evaluation_dataset = store.url("datasets/eval")
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 0, done.stderr
    seen = calls(store, spec)
    assert [c["event"] for c in seen] == ["__init__", "process_data", "train", "evaluate", "save"]
    e = seen[0]["env"]
    assert seen[1]["arg"] == e["data_directory"]
    assert seen[2]["arg"] == e["training_data_directory"] and seen[2]["files"] == ["train.csv"]
    assert seen[3]["arg"] == e["evaluation_data_directory"] and seen[3]["files"] == ["e.csv"]  # a copy of test_data
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.score == 0.75 and "test_data_directory" in outcome.snapshots


@pytest.mark.parametrize("returns, message", [
    ('"high"', "returned 'high' (str); it must return one number"),
    ('float("nan")', "returned nan, which is not a finite number"),
    ("None", "returned None (NoneType)"),
    ("True", "returned True (bool)"),
])
def test_evaluate_must_return_a_finite_number(store, tmp_path, request, returns, message):
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    train_py = f"class Main:\n    def __init__(self):\n        pass\n    def evaluate(self, d):\n        return {returns}\n"
    _, spec = setup_run(store, tmp_path, train_py=train_py, pipeline="evaluate", dataset=None)
    spec.evaluation_dataset = store.url("datasets/train")
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed" and message in outcome.error


def test_process_data_writing_nothing_is_an_error_before_train(store, tmp_path, request):
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    writes_split = ('with open(os.path.join(os.environ["training_data_directory"], "train.csv"), "w") as fh:\n'
                    '            fh.write("x\\n1\\n")')
    assert writes_split in RECORDING_TRAIN
    train_py = RECORDING_TRAIN.replace(writes_split, "pass")
    _, spec = setup_run(store, tmp_path, train_py=train_py, pipeline="full")
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 1
    assert "process_data() wrote nothing to training_data_directory" in done.stderr
    assert [c["event"] for c in calls(store, spec)] == ["__init__", "process_data"]  # train never called


def test_empty_evaluation_folder_warns_and_scores_null(store, tmp_path, request):
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    _, spec = setup_run(store, tmp_path, pipeline="full")
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.score is None and "evaluation_data_directory is empty" in outcome.warnings[0]


def test_user_error_is_one_line_with_location_and_full_traceback_in_log(tmp_path):
    from airflow_aicenter.storage import open_store
    store = open_store((tmp_path / "s").as_uri())
    train_py = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        1 / 0\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error == "Main.train() raised ZeroDivisionError: division by zero (train.py:5)"
    assert "Traceback (most recent call last)" in done.stderr


def test_a_secret_in_a_user_error_never_reaches_outcome_or_log(tmp_path):
    from airflow_aicenter.storage import open_store
    store = open_store((tmp_path / "s").as_uri())
    train_py = ("import os\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                "        raise RuntimeError('login refused for key ' + os.environ['STRIPE_KEY'])\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    done = run_runtime(spec, tmp_path, env={"STRIPE_KEY": "sk-live-4242-very-secret",
                                            "AICENTER_TERMINATION_LOG": str(tmp_path / "term")})
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error == "Main.train() raised RuntimeError: login refused for key *** (train.py:6)"
    assert "login refused for key ***" in done.stderr and "Traceback" in done.stderr
    assert "sk-live-4242" not in done.stdout + done.stderr
    assert (tmp_path / "term").read_text() == outcome.error


def test_sigterm_records_killed(tmp_path, spawn_runtime):
    import time
    import uuid

    from airflow_aicenter.storage import open_store
    store = open_store((tmp_path / "s").as_uri())
    # user code runs in a process of its own (not the runtime's pid): the marker is named by the test
    started = Path(f"/tmp/.aicenter-started-{uuid.uuid4().hex}")
    train_py = ("import time\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
                f"        open({str(started)!r}, 'w').close()\n        time.sleep(60)\n"
                "    def save(self):\n        pass\n")
    _, spec = setup_run(store, tmp_path, train_py=train_py)
    proc = spawn_runtime.start(spec, stdout=None)
    deadline = time.time() + 30
    while time.time() < deadline and not started.exists():
        time.sleep(0.1)
    assert started.exists(), "train() never started"
    proc.terminate()
    assert proc.wait(timeout=30) == 1
    started.unlink(missing_ok=True)
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "killed" and outcome.error == "killed during user_code"
