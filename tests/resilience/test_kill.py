"""SIGKILL at every phase: the runtime (a real child process) and the operator.

After each kill the store must show no half-written version and no partial blob, the run
records must say where it died, and a retry of the task (the next try) must produce exactly
one new version. Kills come from the one test hook, ``AICENTER_TEST_CRASH_AT`` (see
airflow_aicenter/crashpoints.py): at a phase's start, or ``<phase>+<s>`` to land inside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from airflow_aicenter.completion import PostRun
from airflow_aicenter.errors import RunError
from airflow_aicenter.launchers import settle_outcome
from airflow_aicenter.records import Manifest, Outcome, Registration, RunRef, read, read_optional
from airflow_aicenter.storage import open_store
from tests.conftest import REPO
from tests.resilience.support import Setup, check_store, make_setup, run_runtime, setup_package

#: Where the runtime is killed. A bare phase dies as it starts; "+s" lands inside it
#: (MODEL_MB makes save() write a model big enough that the zip and its upload take a while).
RUNTIME_POINTS = [
    "stage_package",
    "stage_data",
    "user_code",
    "package_upload",
    "package_upload+0.15",  # inside the zip / multipart upload of the new package
    "artifacts_upload",
    "snapshot",
    "snapshot+0.05",  # inside the snapshot's blob uploads, before the manifest
    "outcome",  # everything uploaded, the final outcome.json not yet written
]


PHASES = ["stage_package", "stage_data", "user_code", "package_upload", "artifacts_upload", "snapshot", "outcome"]

#: Every point on S3 (the production store); on the file store the points inside uploads.
CASES = [("s3", p) for p in RUNTIME_POINTS] + [("file", p) for p in ("package_upload+0.15", "snapshot+0.05", "outcome")]


def _commit(operator, kill_setup: Setup, ref: RunRef, outcome: Outcome):
    """What the operator's post-run step does once the runtime succeeded: register the version once per task instance."""
    return PostRun(kill_setup.registry, operator.run_request()).register(kill_setup.base, outcome, ref)


def _settle(kill_setup: Setup, spec, ref: RunRef, code: int) -> Outcome:
    """What every launcher does when the runtime has exited: outcome.json decides (the one place)."""
    return settle_outcome(kill_setup.store, spec, ref, ended=f"the runtime exited with code {code}")


@pytest.mark.parametrize("backend, point", CASES, ids=[f"{b}-{p}" for b, p in CASES])
def test_runtime_killed_at_every_phase(request, operator, tmp_path, backend, point):
    kill_setup = make_setup(request, tmp_path, backend, point)
    phase = point.split("+")[0]
    ref, spec = kill_setup.spec(try_number=1)
    done = run_runtime(spec, tmp_path, {**kill_setup.env, "AICENTER_TEST_CRASH_AT": point})
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]

    # the run record says where it died: live progress first, then the operator's verdict
    live = read(kill_setup.store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert live.status == "running"
    if phase == "outcome":
        assert live.phase == "snapshot"
    elif point.endswith(tuple("0123456789")) and "+" in point:  # timed: inside the phase, or at the next one's start
        assert live.phase in (phase, PHASES[PHASES.index(phase) + 1]), live.phase
    else:
        assert live.phase == phase
    with pytest.raises(RunError, match=f"exited with code -9 during {live.phase}"):
        _settle(kill_setup, spec, ref, done.returncode)
    final = read(kill_setup.store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert final.status == "failed" and f"during {live.phase}" in final.error and final.end_at is not None

    # nothing half-written: no new version, every blob whole, no registration
    assert check_store(kill_setup.store) == ["res:1.0"]
    assert read_optional(kill_setup.store, f"{spec.run_prefix}/registration.json", Registration) is None
    manifest = read_optional(kill_setup.store, f"{spec.run_prefix}/data_directory.manifest.json", Manifest)
    if manifest is not None:  # a manifest is only written once all its blobs are there
        assert all(kill_setup.store.exists(f"blobs/sha256/{f.sha256}") for f in manifest.files)

    # the retry (next try) makes exactly one new version, and registering it again is a no-op
    ref2, spec2 = kill_setup.spec(try_number=2)
    again = run_runtime(spec2, tmp_path, kill_setup.env)
    assert again.returncode == 0, again.stderr[-3000:]
    outcome = _settle(kill_setup, spec2, ref2, 0)
    first = _commit(operator, kill_setup, ref2, outcome)
    second = _commit(operator, kill_setup, ref2, outcome)
    assert first.version == second.version == "1.1"
    assert check_store(kill_setup.store) == ["res:1.0", "res:1.1"]
    assert first.run.prefix == ref2.prefix and first.snapshot == kill_setup.store.url(f"{spec2.run_prefix}/data_directory.manifest.json")


class Crash(BaseException):
    """Stands for SIGKILL inside the registry (the operator process dies there)."""


def test_operator_killed_between_version_record_and_marker_does_not_register_twice(kill_setup, operator, tmp_path, monkeypatch):
    """A crash inside commit_once, after the version record and before registration.json is
    completed: the same try registering again finds its version instead of taking the next one."""
    ref, spec = kill_setup.spec(try_number=1)
    assert run_runtime(spec, tmp_path, kill_setup.env).returncode == 0
    outcome = _settle(kill_setup, spec, ref, 0)
    commit = type(kill_setup.registry).commit

    def commit_then_die(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        raise Crash

    monkeypatch.setattr(type(kill_setup.registry), "commit", commit_then_die)
    with pytest.raises(Crash):
        _commit(operator, kill_setup, ref, outcome)
    monkeypatch.undo()
    orphan = kill_setup.registry.get("res", "1.1")  # committed, but the marker does not say so
    assert orphan.run.prefix == ref.prefix
    assert read(kill_setup.store, f"{ref.prefix}/registration.json", Registration).version is None
    again = _commit(operator, kill_setup, ref, outcome)
    assert again.version == orphan.version == "1.1"
    assert check_store(kill_setup.store) == ["res:1.0", "res:1.1"]
    assert read(kill_setup.store, f"{ref.prefix}/registration.json", Registration).version == "1.1"


KILL_DAG = '''
from __future__ import annotations
import pendulum
from airflow.sdk import dag
from airflow_aicenter.operators import TrainPipelineOperator

@dag(schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
     params={"dataset": ""})
def aicenter_resilience_kill():
    TrainPipelineOperator(task_id="train", package="res", version="1.0", dataset="{{ params.dataset }}",
                          save_training_data=True, launcher="local")

aicenter_resilience_kill()
'''


#: The DAG's task run by a plain Python process (the operator's execute with a task context): the worker
#: process killed by the ``results`` crash point is this process, not pytest.
KILLED_TASK = """
import json, sys
from airflow_aicenter.operators import TrainPipelineOperator
from tests.operators.kube_api import make_context

conf = json.loads(sys.argv[1])
TrainPipelineOperator(task_id="train", package="res", version="1.0", dataset=conf["dataset"], save_training_data=True,
                      launcher="local").execute(make_context("aicenter_resilience_kill", "train", run_id=conf["run_id"]))
"""


@pytest.mark.airflow
def test_operator_killed_in_airflow_dags_test(airflow_env, tmp_path):
    """Real Airflow: SIGKILL the worker process between outcome and registration, then (the next run, a task
    process of its own) during _results.json; each time the store stays whole and the next run makes exactly
    one version. (The same try registering again is a no-op: see the operator-level tests above.)"""
    airflow_env.add_dag("aicenter_resilience_kill.py", KILL_DAG)
    uri = (tmp_path / "store").as_uri()
    kill_setup = setup_package(open_store(uri), tmp_path, {})
    env = {"AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}), "MODEL_MB": "1"}
    conf = {"dataset": kill_setup.dataset}

    killed = airflow_env.dags_test("aicenter_resilience_kill", conf, extra_env={**env, "AICENTER_TEST_CRASH_AT": "register"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert check_store(kill_setup.store) == ["res:1.0"]  # the runtime finished; nothing was registered
    (run_dir,) = {o.key.rsplit("/", 1)[0] for o in kill_setup.store.list("runs/aicenter_resilience_kill/") if o.key.endswith("outcome.json")}
    assert read(kill_setup.store, f"{run_dir}/outcome.json", Outcome).status == "succeeded"
    assert not kill_setup.store.exists(f"{run_dir}/registration.json") and not kill_setup.store.exists(f"{run_dir}/_results.json")

    # the next run of the task: exactly one new version, registered whole; killed while writing _results.json
    next_run = {**conf, "run_id": "manual__2026-03-02T00:00:00+00:00"}
    killed = subprocess.run([sys.executable, "-c", KILLED_TASK, json.dumps(next_run)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **env, "AICENTER_TEST_CRASH_AT": "results"}, timeout=240, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert check_store(kill_setup.store) == ["res:1.0", "res:1.1"]
    record = kill_setup.registry.get("res", "1.1")
    assert record.run.prefix != run_dir and record.run.run_id == next_run["run_id"]
    assert read(kill_setup.store, f"{record.run.prefix}/registration.json", Registration).version == "1.1"
    assert not kill_setup.store.exists(f"{record.run.prefix}/_results.json")  # the record says the task did not finish
