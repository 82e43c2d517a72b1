"""Batch prediction through the runtime (``python -m airflow_aicenter.runtime spec.json``): inputs
shared by user processes that each load ``Main()`` once, outputs in input order, failed inputs
counted, and the run failing only past ``max_failed`` after every output is uploaded."""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.package import write_zip
from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import put_blob, run, upload_tree
from tests.conftest import write_files
from tests.runtime.test_run import run_runtime

SERVING = '''
import json, os

class Main:
    def __init__(self):
        self.pid = os.getpid()
        with open(os.path.join(os.environ["artifacts_directory"], "loads.txt"), "a") as fh:
            fh.write("Main()\\n")
    def predict(self, input):
        if isinstance(input, bytes):
            return {"size": len(input), "head": input[1:4].decode()}
        if input == "boom":
            raise ValueError("boom input")
        if input == "set":
            return {1, 2}
        if input == "exit":
            raise SystemExit(3)
        return {"double": json.loads(input)["x"] * 2, "pid": self.pid}
'''
TRAIN = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        pass\n"
         "    def save(self):\n        pass\n")


def setup_predict(store: Store, tmp_path, files: dict[str, str | bytes], main_py: str = SERVING, **spec_kw) -> RunSpec:
    pkg = write_files(tmp_path / "pkg", {"main.py": main_py, "train.py": TRAIN, "requirements.txt": ""})
    base = Registry(store).upload(pkg, "scorer")
    run(upload_tree(write_files(tmp_path / "inbox", files), store, "datasets/inbox"))
    return RunSpec(pipeline="predict", storage=store.uri, run_prefix="runs/d/r/score/1", package="scorer",
                   version=base.version, blob=base.blob, dataset=store.url("datasets/inbox"), **spec_kw)


def env_for(store: Store, request: pytest.FixtureRequest) -> dict[str, str]:
    return request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}


def lines_of(store: Store, key: str) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines()]


def test_json_inputs_over_two_processes_keep_their_order(store, tmp_path, request):
    big = "".join(json.dumps({"x": i}) + "\n" for i in range(10_000))
    files = {"b/big.jsonl": big, "a.jsonl": '{"x": 1}\nboom\nnot json\n\n{"x": 2}', "skip.csv": "x\n1\n",
             "c.jsonl": "set\nexit\n"}
    spec = setup_predict(store, tmp_path, files, procs_per_node=2, max_failed=4)
    done = run_runtime(spec, tmp_path, env_for(store, request))
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and (outcome.predicted, outcome.failed) == (10_002, 4)
    assert "predicted 10002 inputs, 4 failed, over 2 processes, " in done.stderr and "inputs/s once loaded" in done.stderr
    out = f"{spec.run_prefix}/predictions"
    a = lines_of(store, f"{out}/a.jsonl")
    assert a[0] == {"line": 1, "output": {"double": 2, "pid": a[0]["output"]["pid"]}}
    assert a[1] == {"line": 2, "error": "Main.predict() raised ValueError: boom input (main.py:13)"}
    assert a[2]["line"] == 3 and a[2]["error"].startswith("Main.predict() raised JSONDecodeError")  # passed as the string
    assert [r["line"] for r in a] == [1, 2, 3, 5]  # a blank line is no input
    big_out = lines_of(store, f"{out}/b/big.jsonl")
    assert [r["line"] for r in big_out] == list(range(1, 10_001))
    assert [r["output"]["double"] for r in big_out] == [2 * i for i in range(10_000)]
    assert len({r["output"]["pid"] for r in big_out}) == 2, "the two processes share the inputs"
    c, exits = lines_of(store, f"{out}/c.jsonl")
    assert c["line"] == 1 and "returned set, which is not JSON-serialisable" in c["error"]
    assert exits == {"line": 2, "error": "Main.predict() raised SystemExit: 3 (main.py:17)"}
    assert not store.exists(f"{out}/skip.csv")
    # each process created Main() once
    assert store.get_bytes(f"{spec.run_prefix}/artifacts/loads.txt") == b"Main()\n"
    assert store.get_bytes(f"{spec.run_prefix}/artifacts/rank-1/loads.txt") == b"Main()\n"


def test_file_inputs_one_output_per_file(store, tmp_path, request):
    spec = setup_predict(store, tmp_path, {"img/one.png": b"\x89PNG...", "two.txt": b"hello"}, input_type="file")
    done = run_runtime(spec, tmp_path, env_for(store, request))
    assert done.returncode == 0, done.stderr
    out = f"{spec.run_prefix}/predictions"
    assert json.loads(store.get_bytes(f"{out}/img/one.png.json")) == {"file": "img/one.png", "output": {"size": 7, "head": "PNG"}}
    assert json.loads(store.get_bytes(f"{out}/two.txt.json")) == {"file": "two.txt", "output": {"size": 5, "head": "ell"}}
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert (outcome.predicted, outcome.failed) == (2, 0)


def test_more_failures_than_allowed_fail_the_run_after_every_output_is_written(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    spec = setup_predict(store, tmp_path, {"in.jsonl": '{"x": 1}\nboom\nboom\n{"x": 4}\n'}, max_failed=1)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed" and (outcome.predicted, outcome.failed) == (2, 2)
    assert outcome.error.startswith("2 of 4 inputs failed, more than max_failed=1; first: in.jsonl line 2: "
                                    "Main.predict() raised ValueError: boom input (main.py:13)")
    assert [r["line"] for r in lines_of(store, f"{spec.run_prefix}/predictions/in.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("files", [{"data.csv": "x\n1\n"}, {"empty.jsonl": "", "data.csv": "x\n"}])
def test_a_dataset_without_jsonl_inputs_is_an_error(tmp_path, files):
    store = open_store((tmp_path / "s").as_uri())
    spec = setup_predict(store, tmp_path, files)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert "has no input lines: input_type='json' reads every line of every *.jsonl file" in outcome.error
    assert "use input_type='file'" in outcome.error


def test_main_failing_to_load_fails_the_run(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    broken = ("class Main:\n    def __init__(self):\n        open('model.pkl', 'rb')\n"
              "    def predict(self, input):\n        return input\n")
    spec = setup_predict(store, tmp_path, {"in.jsonl": "1\n"}, main_py=broken, procs_per_node=2)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error.endswith("Main() raised FileNotFoundError: [Errno 2] No such file or directory: 'model.pkl' (main.py:3)")


def test_a_package_without_predict_is_refused_before_any_user_code(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    spec = setup_predict(store, tmp_path, {"in.jsonl": "1\n"})
    # a stored package whose main.py lost predict (uploads validate, so write the blob directly)
    pkg = write_files(tmp_path / "nopredict", {"main.py": "class Main:\n    def __init__(self):\n        pass\n",
                                               "train.py": TRAIN, "requirements.txt": ""})
    digest = write_zip(pkg, tmp_path / "nopredict.zip")
    put_blob(store, tmp_path / "nopredict.zip", digest.sha256)
    spec.blob = spec.blob.model_copy(update={"sha256": digest.sha256, "size": digest.size, "kind": "zip"})
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.phase == "stage_package" and "predict" in outcome.error and "main.py" in outcome.error
