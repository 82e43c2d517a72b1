"""The last lines of the user's output are kept in outcome.json when a run fails (the run page shows them).

Real runtime subprocesses over a file store: package code prints, then fails; the outcome
holds the last lines (stdout, stderr and the traceback), masked and capped, and nothing when it succeeds.
"""

from __future__ import annotations

import json
import sys

from airflow_aicenter.records import Outcome, read
from airflow_aicenter.runtime.supervisor import TAIL_LINE, TAIL_LINES, supervise
from airflow_aicenter.storage import open_store
from tests.runtime.test_run import run_runtime, setup_run

NOISY = (
    "import os, sys, time\n"
    "class Main:\n"
    "    def __init__(self):\n        pass\n"
    "    def train(self, d):\n"
    "        for i in range(80):\n"
    "            print(f'epoch {i} loss={1 / (i + 1):.3f}', flush=True)\n"
    "        print('x' * 5000, flush=True)\n"
    "        print('token is ' + os.environ['STRIPE_KEY'], flush=True)\n"
    "        time.sleep(0.5)\n"  # stdout and stderr are two pipes: let stdout drain before the traceback
    "        raise ValueError('column age is missing')\n"
    "    def save(self):\n        pass\n"
)


def test_a_failed_run_keeps_the_last_lines_of_its_output_masked_and_capped(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=NOISY)
    done = run_runtime(spec, tmp_path, env={"STRIPE_KEY": "sk-live-4242-very-secret"})
    assert done.returncode == 1, done.stderr[-2000:]
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    tail = outcome.output_tail
    assert tail is not None and len(tail) == TAIL_LINES, tail
    assert "epoch 79 loss=0.013" in tail  # the last lines, in order
    assert "epoch 0 loss=1.000" not in tail
    assert "token is ***" in tail and "sk-live-4242" not in json.dumps(tail)
    long = next(line for line in tail if line.startswith("xxx"))
    assert len(long) <= TAIL_LINE + 40 and "cut" in long
    assert any("ValueError: column age is missing" in line for line in tail)  # with the traceback
    assert any(line.startswith("Traceback") for line in tail)


def test_a_run_that_succeeds_keeps_no_output_tail(tmp_path):
    store = open_store((tmp_path / "s").as_uri())
    _, spec = setup_run(store, tmp_path)
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read(store, f"{spec.run_prefix}/outcome.json", Outcome).output_tail is None


def test_the_supervisors_exit_record_carries_the_tail(tmp_path):
    """In a pod the supervisor runs in the user container: its exit file is how the tail reaches the agent."""
    script = tmp_path / "fail.py"
    script.write_text("import sys\nfor i in range(3):\n    print('line', i)\nsys.exit(3)\n")
    exit_file = tmp_path / "exit.json"
    plan = {"processes": [{"label": "rank 0", "argv": [sys.executable, str(script)], "cwd": str(tmp_path), "env": {},
                           "result": str(tmp_path / "r.json")}], "exit_file": str(exit_file)}
    record = supervise(plan)
    assert record["status"] == "failed" and record["output_tail"] == ["line 0", "line 1", "line 2"]
    assert json.loads(exit_file.read_text())["output_tail"] == ["line 0", "line 1", "line 2"]
