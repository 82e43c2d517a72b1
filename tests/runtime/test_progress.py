"""Progress, metrics and resources of a run: ``aicenter.report`` in package code, the agent's side of it.

Real runtime child processes (the ``spawn_runtime`` fixture) on a file store: a training that
reports shows its progress in the log and in ``progress.json`` while it runs, keeps a thinned
``metrics.jsonl``, survives whatever package code writes to the metrics file, and reports
what it used (``outcome.resources``, ``outcome.cost`` with prices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import aicenter
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.layout import METRICS, PROGRESS
from airflow_aicenter.records import Outcome, Progress, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime import report as report_module
from airflow_aicenter.runtime.progress import MAX_POINTS
from airflow_aicenter.runtime.resources import cost_of, prices_of
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.conftest import RuntimeSpawner, write_files
from tests.packages import MAIN

PREFIX = "runs/d/r/t/1"

#: Reports 5 steps of 5, then waits for the test to say "go" (the file GO_FILE): the test sees the
#: progress of a run that is still running, whatever the machine's speed.
WAITING_TRAIN = '''
import os, time
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        for step in range(1, 6):
            aicenter.report(step=step, total=5, loss=1.0 / step, accuracy=step / 10)
        deadline = time.time() + 100
        while not os.path.exists(os.environ["GO_FILE"]) and time.time() < deadline:
            time.sleep(0.05)
    def save(self):
        pass
'''


def make_run(tmp_path: Path, train_py: str, **spec_kw) -> tuple[Store, RunSpec]:
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(store)
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": train_py, "requirements.txt": ""})
    base = registry.upload(pkg, "rep")
    data = write_files(tmp_path / "data", {"a.csv": "x\n1\n"})
    run(upload_tree(data, store, "datasets/train"))
    kw = {"dataset": store.url("datasets/train"), "progress_interval": 0.2, **spec_kw}
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=PREFIX, package="rep", version=base.version,
                   blob=base.blob, **kw)
    return store, spec


def progress_of(store: Store) -> Progress | None:
    try:
        return read(store, f"{PREFIX}/{PROGRESS}", Progress)
    except Exception:
        return None


def history(store: Store) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(f"{PREFIX}/{METRICS}").decode().splitlines()]


def test_a_training_that_reports_shows_its_progress_while_it_runs_and_in_the_log(tmp_path, spawn_runtime: RuntimeSpawner):
    go = tmp_path / "go"
    store, spec = make_run(tmp_path, WAITING_TRAIN, env={"GO_FILE": str(go)})
    proc = spawn_runtime.start(spec)
    try:
        seen = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            seen = progress_of(store)
            if seen is not None and seen.step == 5:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the test saw its progress"
        assert seen is not None and seen.step == 5, seen
        # While it runs: step, total, percent, the latest metrics, not final yet.
        assert (seen.total, seen.percent, seen.final, seen.reports) == (5, 100.0, False, 5)
        assert seen.metrics == {"loss": 0.2, "accuracy": 0.5}
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        go.touch()
    assert proc.returncode == 0, err
    final = progress_of(store)
    assert final is not None and final.final and final.step == 5 and final.updated_at >= seen.updated_at
    points = history(store)
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5] and points[0]["metrics"] == {"loss": 1.0, "accuracy": 0.1}
    assert "[aicenter] progress 100% (step 5/5), loss=0.2, accuracy=0.5" in err, err


def test_metrics_history_is_thinned_and_progress_has_an_eta(tmp_path, spawn_runtime):
    train = '''
import time
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        for step in range(1, 10001):
            aicenter.report(step=step, total=20000, loss=1.0 / step)
        time.sleep(0.3)  # one more update sees the ETA of a run half done
    def save(self):
        pass
'''
    store, spec = make_run(tmp_path, train)
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    final = progress_of(store)
    assert final is not None and (final.step, final.total, final.percent, final.reports) == (10000, 20000, 50.0, 10000)
    points = history(store)
    assert 1000 <= len(points) <= MAX_POINTS, len(points)
    steps = [p["step"] for p in points]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] > 9000, "the history spans the whole run"
    assert "[aicenter] progress 50% (step 10000/20000)" in done.stderr


HOSTILE_TRAIN = '''
import json, os
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        path = os.environ["AICENTER_METRICS_FILE"]
        with open(path, "ab") as fh:
            fh.write(b"not json at all\\n")
            fh.write(b"[1, 2, 3]\\n")
            fh.write(b"\\xff\\xfe garbage bytes\\n")
            fh.write(b"x" * (5 << 20) + b"\\n")          # a 5 MB line
            fh.write(b'{"step": NaN, "total": Infinity, "metrics": {"loss": NaN, "name": "text"}}\\n')
            fh.write(json.dumps({"step": 1, "total": 4, "metrics": {"loss-" + os.environ["API_TOKEN"]: 0.5}}).encode() + b"\\n")
            fh.write(json.dumps({"step": 2, "total": 4, "metrics": {f"m{i}": i for i in range(1000)}}).encode() + b"\\n")
            fh.write(json.dumps({"step": 3, "total": 4, "rank": 1}).encode() + b"\\n")  # another rank's: not counted
        aicenter.report(step=2, total=4, loss=float("nan"), big=10**400 if False else 1e308 * 10)
        aicenter.report(step=3, total=4, **{"k" * 100: 1.0, **{f"n{i}": float(i) for i in range(2000)}})
        print("REPORTED", flush=True)
        import time
        deadline = time.time() + 100
        while not os.path.exists(os.environ["GO_FILE"]) and time.time() < deadline:  # the agent has read all that
            time.sleep(0.05)
        # Replace the file: by a link to a file the agent can read and package code should not see through
        # it, then by a FIFO (a read of it would block): the agent reads neither.
        os.unlink(path)
        os.symlink(os.environ["ELSEWHERE"], path)
        aicenter.report(step=4, total=4)   # through the link: the agent does not follow it
        time.sleep(0.5)
        os.unlink(path)
        os.mkfifo(path)
        aicenter.report(step=4, total=4)   # a FIFO without a reader: returns at once
        time.sleep(0.5)
        os.unlink(path)
        with open(path, "w") as fh:       # a new file: read from its start
            fh.write(json.dumps({"step": 4, "total": 4, "metrics": {"loss": 0.1}}) + "\\n")
        time.sleep(0.5)
    def save(self):
        pass
'''


def test_hostile_metrics_files_cost_bounded_memory_never_fail_the_run_and_mask_secrets(tmp_path, spawn_runtime):
    elsewhere = tmp_path / "elsewhere.jsonl"  # a file the link points at: the agent must not read through it
    elsewhere.write_text(json.dumps({"step": 99, "total": 99, "metrics": {"through_the_link": 1}}) + "\n")
    go = tmp_path / "go"
    store, spec = make_run(tmp_path, HOSTILE_TRAIN, user_env_names=["API_TOKEN"],
                           env={"ELSEWHERE": str(elsewhere), "GO_FILE": str(go)})
    proc = spawn_runtime.start(spec, {"API_TOKEN": "s3cr3t-v4lue"})
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            seen = progress_of(store)
            if seen is not None and seen.step == 3:
                break
            time.sleep(0.1)
        assert seen is not None and seen.step == 3 and seen.skipped >= 4, seen  # not JSON, an array, not UTF-8, 5 MB
    finally:
        go.touch()
    stdout, stderr = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr
    assert "REPORTED" in done.stdout + done.stderr
    outcome = read(store, f"{PREFIX}/outcome.json", Outcome)
    assert outcome.status == "succeeded"
    final = progress_of(store)
    assert final is not None and final.final
    assert final.step == 4 and final.total == 4 and final.metrics["loss"] == 0.1
    assert final.skipped >= 4, final  # not JSON, an array, not UTF-8, the 5 MB line
    assert len(final.metrics) <= 256 and all(len(name) <= 64 for name in final.metrics)
    raw = store.get_bytes(f"{PREFIX}/{PROGRESS}").decode() + store.get_bytes(f"{PREFIX}/{METRICS}").decode()
    assert "s3cr3t-v4lue" not in raw and "s3cr3t-v4lue" not in done.stderr and "s3cr3t-v4lue" not in done.stdout
    assert "loss-***" in raw
    assert "NaN" not in raw and "Infinity" not in raw
    assert all(len(line) < 64 * 1024 for line in raw.splitlines())
    assert "through_the_link" not in raw and final.step != 99


def test_report_writes_one_bounded_line_and_never_raises(tmp_path, monkeypatch):
    target = tmp_path / "m.jsonl"
    monkeypatch.delenv(aicenter.METRICS_FILE_ENV, raising=False)
    aicenter.report(step=1)  # no file named: nothing, no error
    monkeypatch.setenv(aicenter.METRICS_FILE_ENV, str(target))
    monkeypatch.setenv("RANK", "0")
    aicenter.report(step=1, total=10, loss=float("nan"), acc=float("inf"), flag=True, obj=object(), n=3)
    aicenter.report(7, 10, **{f"metric_{i}": i / 3 for i in range(5000)})
    lines = target.read_bytes().splitlines()
    assert len(lines) == 2 and all(len(line) < aicenter.MAX_LINE for line in lines)
    first, second = map(json.loads, lines)
    assert first["step"] == 1 and first["total"] == 10 and first["rank"] == 0
    assert first["metrics"] == {"loss": None, "acc": None, "flag": 1, "obj": None, "n": 3}
    assert second["step"] == 7 and 0 < len(second["metrics"]) < 5000
    # A directory, a FIFO without a reader, an unwritable place: returns, raises nothing, blocks on nothing.
    for bad in (tmp_path, tmp_path / "no" / "such" / "dir" / "m.jsonl"):
        monkeypatch.setenv(aicenter.METRICS_FILE_ENV, str(bad))
        aicenter.report(step=1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setenv(aicenter.METRICS_FILE_ENV, str(fifo))
    aicenter.report(step=1)


def test_the_aicenter_module_is_stdlib_only_and_shows_nothing_of_the_agent(tmp_path, spawn_runtime):
    """User code imports ``aicenter`` from a folder that holds it alone, in the package's interpreter (-I: no site)."""
    train = '''
import sys, os, json
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        folder = os.path.dirname(aicenter.__file__)
        info = {"file": aicenter.__file__, "beside": sorted(os.listdir(folder)),
                "agent": [m for m in sys.modules if m.startswith("airflow_aicenter")]}
        with open(os.path.join(os.environ["artifacts_directory"], "info.json"), "w") as fh:
            json.dump(info, fh)
    def save(self):
        pass
'''
    store, spec = make_run(tmp_path, train)
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    info = json.loads(store.get_bytes(f"{PREFIX}/artifacts/info.json"))
    assert [name for name in info["beside"] if name != "__pycache__"] == ["aicenter.py"] and info["agent"] == [], info
    # The copied module (runtime/report.py) imports only the standard library: no site-packages at all here.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "aicenter.py").write_bytes(Path(report_module.__file__).read_bytes())
    code = "import sys; sys.path.insert(0, sys.argv[1]); import aicenter; aicenter.report(step=1); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(lib)], capture_output=True, text=True, check=True)
    assert not [m for m in eval(out.stdout) if m.startswith("airflow")]


def test_ranks_of_a_confined_distributed_run_report_through_the_one_metrics_file(tmp_path, spawn_runtime):
    """Landlock confines each rank to its own folders; the metrics file is one of them (rank 0's reports count)."""
    train = '''
import os
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        rank = int(os.environ["RANK"])
        for step in range(1, 4):
            aicenter.report(step=step, total=3, rank_seen=rank)
    def save(self):
        pass
'''
    store, spec = make_run(tmp_path, train, procs_per_node=2)
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    final = progress_of(store)
    assert final is not None and (final.step, final.reports, final.metrics) == (3, 3, {"rank_seen": 0}), final


RESOURCE_TRAIN = '''
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        block = bytearray(80 << 20)   # 80 MiB resident
        for i in range(0, len(block), 4096):
            block[i] = 1
        total = 0
        for i in range(3_000_000):  # some CPU seconds
            total += i * i
        aicenter.report(step=1, total=1, total_value=float(total % 7))
    def save(self):
        with open("model.bin", "wb") as fh:
            fh.write(b"trained" * 1000)
'''


def test_resources_of_the_user_processes_and_the_cost_at_the_connection_prices(tmp_path, spawn_runtime):
    prices = {"cpu_hour": 0.04, "gpu_hour": 2.5, "gib_hour": 0.005}
    store, spec = make_run(tmp_path, RESOURCE_TRAIN, prices=prices)
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{PREFIX}/outcome.json", Outcome)
    used = outcome.resources
    assert used is not None
    assert used["wall_seconds"] > 0 and used["cpu_seconds"] > 0
    assert used["peak_memory_bytes"] >= 80 << 20
    assert used["gpu_seconds"] == 0 and used["gpu_utilization"] is None and used["gpu_memory_peak_bytes"] is None
    assert used["bytes_staged"] >= 4 and used["bytes_uploaded"] > 0  # the data, the package; the new package
    assert outcome.cost == cost_of(used, prices)
    expected = used["cpu_seconds"] * 0.04 / 3600 + used["peak_memory_bytes"] / 2**30 * used["wall_seconds"] / 3600 * 0.005
    assert outcome.cost["total"] == pytest.approx(expected, abs=1e-6)


def test_gpu_figures_come_from_nvidia_smi_where_it_is_there(tmp_path, spawn_runtime):
    """A stand-in ``nvidia-smi`` on PATH (two GPUs at 40 % and 60 %, 1000 and 2000 MiB): mean utilisation, peak memory."""
    tools = tmp_path / "tools"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '40, 1000\\n60, 2000\\n'\n")
    smi.chmod(0o755)
    train = "import time\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        time.sleep(1.5)\n    def save(self):\n        pass\n"
    store, spec = make_run(tmp_path, train, gpu=2)
    done = spawn_runtime.run(spec, {"PATH": f"{tools}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    used = read(store, f"{PREFIX}/outcome.json", Outcome).resources
    assert used is not None
    assert used["gpu_utilization"] == 50.0 and used["gpu_memory_peak_bytes"] == 3000 * 2**20
    assert used["gpu_seconds"] == pytest.approx(used["wall_seconds"] * 2, abs=0.01)


@pytest.mark.parametrize("value, problem", [
    ("not json", "is not a JSON object"),
    ([1, 2], "is not a JSON object"),
    ({"cpu": 1}, "'cpu', which is not a price"),
    ({"cpu_hour": -1}, "cpu_hour=-1"),
    ({"gpu_hour": "2.5"}, "gpu_hour='2.5'"),
    ({"gib_hour": float("nan")}, "gib_hour=nan"),
    ({"cpu_hour": True}, "cpu_hour=True"),
])
def test_bad_prices_are_a_configuration_error_that_names_the_fix(value, problem):
    with pytest.raises(ConfigurationError) as refused:
        prices_of(value)
    assert problem in str(refused.value) and "cpu_hour" in str(refused.value)
    assert refused.value.retryable is False


def test_prices_given_as_an_object_or_its_json_text():
    assert prices_of(None) is None and prices_of("") is None
    assert prices_of('{"cpu_hour": 0.04, "gpu_hour": 2}') == {"cpu_hour": 0.04, "gpu_hour": 2.0}
    cost = cost_of({"cpu_seconds": 3600, "gpu_seconds": 7200, "peak_memory_bytes": 2 * 2**30, "wall_seconds": 1800},
                   {"cpu_hour": 0.04, "gpu_hour": 2.5, "gib_hour": 0.005})
    assert (cost["cpu"], cost["gpu"], cost["memory"]) == (0.04, 5.0, 0.005) and cost["total"] == pytest.approx(5.045)


def test_the_example_package_reports_its_epochs_and_still_trains_where_aicenter_is_absent(tmp_path, spawn_runtime):
    from tests.conftest import EXAMPLE_PACKAGE, make_dataset

    data = make_dataset(tmp_path / "data", rows=60)
    folder = data.parent if data.is_file() else data
    store = open_store((tmp_path / "store").as_uri())
    base = Registry(store).upload(EXAMPLE_PACKAGE, "churn")
    run(upload_tree(folder, store, "datasets/churn"))
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=PREFIX, package="churn", version=base.version, blob=base.blob,
                   dataset=store.url("datasets/churn"), env={"EPOCHS": "20"}, progress_interval=0.2)
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    final = progress_of(store)
    assert final is not None and (final.step, final.total, final.percent) == (20, 20, 100.0) and "loss" in final.metrics
    assert "[aicenter] progress 100% (step 20/20)" in done.stderr
    # Without aicenter (AI Center itself, or a plain python -I -S): the same training, no report.
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); os.chdir(sys.argv[1]); import train; "
            "assert train.aicenter is None; m = train.Main(); m.train(sys.argv[2]); print('trained')")
    copy = tmp_path / "churn"
    import shutil

    shutil.copytree(EXAMPLE_PACKAGE, copy)
    alone = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(copy), str(folder)], capture_output=True, text=True,
                           env={"EPOCHS": "3", "PATH": os.environ["PATH"]}, timeout=120, check=False)
    assert alone.returncode == 0 and "trained" in alone.stdout, alone.stderr


def test_a_flood_of_reports_is_read_in_bounded_looks_and_the_latest_wins(tmp_path, spawn_runtime):
    """40 MB of reports written at once: the agent reads at most READ_LIMIT bytes a look, skipping the older part."""
    train = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        # the bytes json.dumps writes for each report, formatted 4x faster (json.dumps took 3.5 s of the test)
        lines = "".join('{"step": %d, "total": 1000000, "metrics": {"loss": %r}}\\n' % (i, 1 / i)
                        for i in range(1, 700_001)).encode()
        with open(os.environ["AICENTER_METRICS_FILE"], "ab") as fh:
            fh.write(lines)
    def save(self):
        pass
'''
    store, spec = make_run(tmp_path, train, progress_interval=3600)  # one look: the last one
    done = spawn_runtime.run(spec)
    assert done.returncode == 0, done.stderr
    final = progress_of(store)
    assert final is not None and final.step == 700_000 and final.total == 1_000_000 and final.percent == 70.0
    assert final.skipped >= 1 and final.reports < 700_000, final  # the older part was skipped, not parsed
    assert isinstance(final.step, int) and '"step":700000' in store.get_bytes(f"{PREFIX}/{PROGRESS}").decode().replace(" ", "")
    assert len(history(store)) <= MAX_POINTS
