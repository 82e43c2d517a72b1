"""Issue 18, finding 7: every error a run records is capped, with its end kept.

``predict()`` or ``train()`` raising a 50 MB message must not become a 50 MB ``outcome.json``,
prediction line, log or worker exception: records keep a few KiB (the head, a marker saying how
much was cut, and the end, where the package ``file:line`` is).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.runtime.user import ERROR_CAP
from airflow_aicenter.runtime.user import cap as cap_error
from airflow_aicenter.storage import open_store
from tests.runtime.test_predict import setup_predict
from tests.runtime.test_run import run_runtime, setup_run

HUGE = 50 * 1024 * 1024

RAISING = f'''
class Main:
    def __init__(self):
        pass
    def predict(self, input):
        raise ValueError("x" * {HUGE} + " THE-END")
    def train(self, d):
        raise ValueError("y" * {HUGE} + " THE-END")
    def save(self):
        pass
'''


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_50_mb_prediction_error_is_capped_everywhere(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    spec = setup_predict(store, tmp_path, {"in.jsonl": "1\n2\n"}, main_py=RAISING)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    raw = store.get_bytes(f"{spec.run_prefix}/outcome.json")
    assert len(raw) < 16 * 1024, f"outcome.json is {len(raw)} bytes"
    outcome = Outcome.model_validate_json(raw)
    assert outcome.error is not None and len(outcome.error) <= ERROR_CAP
    assert outcome.error.startswith("2 of 2 inputs failed")
    assert "characters cut]" in outcome.error
    assert outcome.error.endswith(f"THE-END (main.py:{line_of(RAISING, 'x')}); every output and error is in "
                                  f"{store.url(spec.run_prefix + '/predictions')}")
    predictions = store.get_bytes(f"{spec.run_prefix}/predictions/in.jsonl").decode().splitlines()
    assert len(predictions) == 2
    for line in predictions:
        error = json.loads(line)["error"]
        assert len(error) <= ERROR_CAP and error.endswith(f"THE-END (main.py:{line_of(RAISING, 'x')})")
    assert len(done.stdout) + len(done.stderr) < 1024 * 1024, "the log holds the huge message"


def test_a_50_mb_training_error_is_capped(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=RAISING)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 1
    raw = store.get_bytes(f"{spec.run_prefix}/outcome.json")
    assert len(raw) < 16 * 1024, f"outcome.json is {len(raw)} bytes"
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.error is not None and len(outcome.error) <= ERROR_CAP
    assert outcome.error.startswith("Main.train() raised ValueError: yyy")
    assert outcome.error.endswith(f"THE-END (train.py:{line_of(RAISING, 'y')})")
    assert len(done.stdout) + len(done.stderr) < 1024 * 1024, "the log holds the huge message"


def test_outcome_error_fields_are_capped_however_they_are_set(tmp_path: Path) -> None:
    spec = RunSpec(pipeline="train", storage="file:///s", run_prefix="runs/d/r/t/1", package="p", version="1.0",
                   blob={"sha256": "0" * 64, "size": 1})
    long = "a" * 100_000 + "TAIL"
    outcome = Outcome.starting(spec, error=long, warnings=[long], skipped=long)
    assert len(outcome.error or "") <= ERROR_CAP and (outcome.error or "").endswith("TAIL")
    outcome.error = "b" * 100_000 + "END"  # assignment is capped too (the launchers join node causes)
    assert len(outcome.error) <= ERROR_CAP and outcome.error.endswith("END")
    outcome.warnings.append(long)  # appended in place: capped when written
    written = Outcome.model_validate_json(outcome.model_dump_json())
    assert all(len(w) <= ERROR_CAP and w.endswith("TAIL") for w in written.warnings)
    assert len(written.skipped or "") <= ERROR_CAP
    assert len(outcome.model_dump_json()) < 6 * ERROR_CAP
    assert cap_error("short") == "short"
    original = "h" * 50 + "m" * 10_000 + "t" * 50
    capped = cap_error(original)
    assert len(capped) <= ERROR_CAP and capped.startswith("h" * 50) and capped.endswith("t" * 50)
    head, cut, tail = re.fullmatch(r"(.*)…\[(\d+) characters cut\]…(.*)", capped, re.DOTALL).groups()
    assert len(head) + int(cut) + len(tail) == len(original) and original.endswith(tail) and original.startswith(head)
