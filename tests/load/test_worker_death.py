"""A worker SIGKILLed mid-training leaves nothing behind (issue 13 finding 17, seen in the load test).

Under the real scheduler an ``aicenter-launch-*`` folder was left in the temp dir: the local
launcher's TemporaryDirectory is removed by the launcher only, which a SIGKILL never lets run.
The runtime notices its parent's death (it watches it), records the run as ended and removes its
work folder; the launcher's folder must go with it. Here the worker is a real process running
``LocalLauncher.run`` and is SIGKILLed while user code trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from airflow_aicenter.records import Outcome, RunRef, RunSpec, read_optional
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import upload_package
from tests.conftest import write_files
from tests.load.support import TRAIN_PY, runtime_processes, user_processes, wait_for

WORKER = """
import sys
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.records import RunSpec
from airflow_aicenter.storage import open_store

spec = RunSpec.model_validate_json(open(sys.argv[1]).read())
LocalLauncher(store=open_store(spec.storage), env={}).run(spec)
"""


def test_a_worker_killed_mid_training_leaves_no_temp_folder_process_or_running_outcome(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(store)
    upload_package(registry, tmp_path, "killed", TRAIN_PY)
    base = registry.get("killed", "1.0")
    dataset = write_files(tmp_path / "data", {"rows.csv": "x\n1\n"}).as_uri()
    run = RunRef(dag_id="load", run_id="r1", task_id="train", try_number=1)
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=run.prefix, package="killed", version="1.0",
                   blob=base.blob, dataset=dataset, env={"TRAIN_SECONDS": "120", "SHARD": "0"})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()

    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(spec_file)], env={**os.environ, "TMPDIR": str(tmp_root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("user code to train", lambda: worker.poll() is None and user_processes(tmp_root) > 0, 120, interval=0.2)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)

    wait_for("the runtime and user process to stop after their worker died", lambda: not runtime_processes(tmp_root), 60)
    outcome = read_optional(store, run.key("outcome.json"), Outcome)
    assert outcome is not None and outcome.status != "running", outcome
    left = sorted(p.name for p in tmp_root.iterdir() if p.name.startswith(("aicenter-launch-", "aicenter-run-")))
    assert not left, f"temp folders left behind: {left}"
