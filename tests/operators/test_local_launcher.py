"""The local launcher's kill: what the operator's on_kill does when Airflow stops a task."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import small_dataset, upload_package

# train() starts a grandchild (as real training code does: data loaders, torchrun) and waits.
SLEEPY_TRAIN = '''
import os, subprocess, sys, time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(os.environ["PIDS_FILE"], "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(120)
    def save(self):
        pass
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_stops_the_runtime_and_what_user_code_started_and_records_killed(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(store)
    upload_package(registry, tmp_path, "sleepy", SLEEPY_TRAIN)
    base = registry.get("sleepy", "1.0")
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/train/1", package="sleepy", version="1.0",
                   blob=base.blob, dataset=small_dataset(tmp_path).as_uri())
    pids_file = tmp_path / "pids"
    launcher = LocalLauncher(store=store, env={"PIDS_FILE": str(pids_file)})
    spec = spec.model_copy(update={"user_env_names": ["PIDS_FILE"]})
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(launcher.run(spec)))
    thread.start()
    deadline = time.monotonic() + 60
    while not pids_file.exists() or not pids_file.read_text():
        assert time.monotonic() < deadline, "the package's train() never started"
        time.sleep(0.1)
    runtime_pid, grandchild_pid = map(int, pids_file.read_text().split())

    launcher.kill()
    thread.join(timeout=30)
    assert not thread.is_alive() and codes == [1]
    assert not alive(runtime_pid) and not alive(grandchild_pid), "the whole process group is stopped"
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "killed" and outcome.error == "killed during user_code"
    assert registry.versions("sleepy")[-1].version == "1.0", "a killed run makes no version"
    launcher.kill()  # a second kill (the process is gone) is harmless
