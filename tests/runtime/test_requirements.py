"""The runtime's ``requirements`` phase: user code runs with the package's own cached environment.

The runtime as the launchers run it (``python -m airflow_aicenter.runtime SPEC.json``), on a file
store, with every default package index pointed at a closed port: nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from tests.conftest import write_files
from tests.packages import ECHO_MAIN
from tests.runtime.test_environment import tiny_wheel
from tests.runtime.test_run import run_runtime

MAIN = ECHO_MAIN
TRAIN = '''
import json, os, sys
import aicenter_tiny

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        with open(os.path.join(os.environ["artifacts_directory"], "seen.json"), "w") as fh:
            json.dump({"value": aicenter_tiny.VALUE, "python": sys.executable, "prefix": sys.prefix}, fh)
    def save(self):
        pass
'''


def spec_for(store: Store, tmp_path: Path, requirements: str) -> RunSpec:
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": requirements})
    tiny_wheel(pkg / "wheels")
    version = Registry(store).upload(pkg, "needs")
    return RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/t/1", package="needs", version=version.version,
                   blob=version.blob, install_requirements=True)


def run_once(spec: RunSpec, store: Store, tmp_path: Path, env: dict[str, str],
             prefix: str) -> tuple[Outcome, dict[str, Any], str]:
    spec = spec.model_copy(update={"run_prefix": prefix})
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{prefix}/outcome.json", Outcome)
    seen = json.loads(store.get_bytes(f"{prefix}/artifacts/seen.json"))
    return outcome, seen, done.stderr


def test_user_code_runs_with_the_packages_environment_installed_then_cached(tmp_path: Path, offline: dict[str, str]) -> None:
    store = open_store((tmp_path / "store").as_uri())
    spec = spec_for(store, tmp_path, "./wheels/aicenter_tiny-0.1-py3-none-any.whl\n")
    env = {**offline, "AICENTER_CACHE": str(tmp_path / "cache")}

    outcome, seen, log = run_once(spec, store, tmp_path, env, "runs/d/r/t/1")
    assert outcome.status == "succeeded" and list(outcome.phases)[:2] == ["stage_package", "requirements"]
    assert outcome.environment is not None and outcome.environment["source"] == "installed"
    key = outcome.environment["key"]
    assert seen["value"] == 42 and Path(seen["prefix"]) == tmp_path / "cache" / "envs" / key
    assert Path(seen["prefix"]) != Path(sys.prefix), "never the worker's (or the runtime's) own environment"
    assert "stored for the next run" in log and store.exists(f"envs/{key}.json")

    outcome, seen, _ = run_once(spec, store, tmp_path, env, "runs/d/r/t/2")
    assert outcome.environment is not None and outcome.environment["source"] == "local" and seen["value"] == 42

    env["AICENTER_CACHE"] = str(tmp_path / "other-machine")
    outcome, seen, _ = run_once(spec, store, tmp_path, env, "runs/d/r/t/3")
    assert outcome.environment is not None and outcome.environment["source"] == "store" and seen["value"] == 42
    assert outcome.environment["key"] == key


def test_a_failed_install_is_reported_as_a_requirements_problem(tmp_path: Path, offline: dict[str, str]) -> None:
    store = open_store((tmp_path / "store").as_uri())
    spec = spec_for(store, tmp_path, "aicenter-tiny-missing==9.9\n")
    done = run_runtime(spec, tmp_path, {**offline, "AICENTER_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed" and outcome.phase == "requirements"
    assert outcome.error is not None and outcome.error.startswith("installing requirements failed: uv exited with code")
    assert "aicenter-tiny-missing" in outcome.error and "Main.train" not in outcome.error
    assert "retries" not in outcome.error, "uv's UV_HTTP_RETRIES reaches the install as its UV_HTTP_TIMEOUT does"


def test_without_install_requirements_there_is_no_environment_phase(tmp_path: Path) -> None:
    store = open_store((tmp_path / "store").as_uri())
    spec = spec_for(store, tmp_path, "this is not a requirement ===\n").model_copy(update={"install_requirements": False})
    done = run_runtime(spec, tmp_path, {"AICENTER_CACHE": str(tmp_path / "cache")})
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert "requirements" not in outcome.phases and outcome.environment is None
    assert done.returncode == 1 and "aicenter_tiny" in (outcome.error or ""), "the runtime's interpreter lacks the package"
    assert not (tmp_path / "cache" / "envs").exists(), "no environment was made (the blob cache may be there)"
