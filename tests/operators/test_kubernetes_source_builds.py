"""Source builds in a pod (DESIGN "★ Environments", issue 18): in the ``build`` container, never in ``stage``.

In-process against the test API server (pods as local processes) and moto: ``stage`` holds the
run's store credentials; a requirement published only as an sdist on a local index, whose build
backend records ``os.environ`` into the wheel it builds, must be built by the ``build`` init
container (no credentials, no run spec, no user ``env``), and the environment stored under the
key of this package alone, packed by ``sync`` from the volume user code had read-only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_aicenter.errors import RunError, StorageError
from airflow_aicenter.layout import env_key
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Outcome, read, read_optional
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.environment import EnvironmentRecord, build_planned, prepare_environment, store_built
from airflow_aicenter.storage import Store
from tests.conftest import write_files
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.operators.test_kubernetes_launcher import FAST, MAIN
from tests.runtime.test_environment import package
from tests.security.test_environments import evil_index

USER_SECRET = "user-param-secret-77c1"
TRAIN = '''
import evilproj
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        assert evilproj.VALUE == "built"
    def save(self):
        open("built.txt", "w").write(evilproj.VALUE)
'''


def test_a_source_build_runs_in_the_build_container_without_credentials_and_is_stored_for_the_package(
    srcpkg_deployment: tuple[Registry, str, str], kube_api: FakeKubernetes,
) -> None:
    registry, dataset, _ = srcpkg_deployment
    op = TrainPipelineOperator(task_id="train", package="srcpkg", dataset=dataset, allow_source_builds=True,
                               env={"USER_PARAM": USER_SECRET}, env_vars={"MY_FLAG": "on"}, **FAST)
    result = op.execute(make_context())
    assert result["version"] == "1.1"

    [pod] = kube_api.all_pods()
    assert [c.name for c in pod.init] == ["stage", "build"]
    outcome = read(registry.store, f"{registry.get('srcpkg', '1.1').run.prefix}/outcome.json", Outcome)
    key = outcome.environment["key"]
    env_folder = pod.folder / "volumes" / "aicenter-env" / "envs" / key
    [seen_file] = env_folder.glob("lib/python*/site-packages/evilproj/seen.json")
    seen = json.loads(seen_file.read_text())
    saw = seen["env"]
    assert not {k for k in saw if k.startswith(("AWS_", "AIRFLOW_", "AICENTER_RUN"))}, f"the build saw the run's secrets: {sorted(saw)}"
    assert "USER_PARAM" not in saw and "MY_FLAG" not in saw and USER_SECRET not in json.dumps(saw), "no user env in a build"

    said = {name: [line for _, c, line in pod.log if c == name] for name in ("stage", "build", "sync")}
    assert any("source builds allowed for package 'srcpkg'" in line for line in said["build"]), said["build"]
    assert not any(line.startswith("[uv]") for line in said["stage"]), "nothing is installed next to the credentials"
    stage_env = next(c for c in pod.init if c.name == "stage").env
    assert stage_env.get("AWS_SESSION_TOKEN"), "stage did hold the credentials the build must not see"

    record = read_optional(registry.store, env_key(key), EnvironmentRecord)
    assert record is not None and record.package == "srcpkg", "stored under the key of this package alone"
    assert any(f"environment {key[:12]} stored for the next run" in line for line in said["sync"]), said["sync"]

    # The next run restores it in stage (a fresh pod, an empty env volume): the build container has nothing to do.
    TrainPipelineOperator(task_id="train", package="srcpkg", dataset=dataset, allow_source_builds=True, **FAST).execute(
        make_context(run_id="manual__2026-03-02T00:00:00+00:00"))
    second = kube_api.all_pods()[-1]
    assert any("restored from the store" in line for _, c, line in second.log if c == "stage")
    assert not any(line.startswith("[uv]") for _, c, line in second.log if c == "build")


def test_sync_stores_nothing_when_the_built_environment_changed_after_its_build(store: Store, tmp_path: Path) -> None:
    """Stage plans, build builds (recording the tree's digest), sync packs only that very tree."""
    index = evil_index(tmp_path / "mirror", tmp_path / "spy")
    root = package(tmp_path / "pkg", "evilproj\n")
    cache = tmp_path / "cache"
    staged = prepare_environment(root, store, cache_dir=cache, indexes=[index], log=lambda m: None, allow_source_builds=True,
                                 package="srcpkg", defer_build=True)
    assert staged.source == "build" and staged.build_plan is not None and not staged.python.exists(), "stage installs nothing"
    said: list[str] = []
    assert "built for package 'srcpkg'" in build_planned(staged.build_plan, said.append, cache_dir=cache)
    assert staged.python.exists()
    assert "nothing to build" in build_planned(staged.build_plan, said.append, cache_dir=cache)
    [module] = staged.python.parent.parent.glob("lib/python*/site-packages/evilproj/__init__.py")
    module.chmod(0o644)
    module.write_text("VALUE = 'changed after the build'\n")
    with pytest.raises(StorageError, match="changed after its build"):
        store_built(store, staged.build_plan, said.append, cache_dir=cache)
    assert not store.exists(env_key(staged.key)), "nothing stored"


def test_a_failed_build_fails_the_run_with_its_cause_before_any_user_code(
    srcpkg_deployment: tuple[Registry, str, str], kube_api: FakeKubernetes, tmp_path: Path,
) -> None:
    registry, dataset, _ = srcpkg_deployment
    registry.upload(write_files(tmp_path / "bad", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": "nosuchproj\n"}), "badsrc")
    op = TrainPipelineOperator(task_id="train", package="badsrc", dataset=dataset, allow_source_builds=True, **FAST)
    with pytest.raises(RunError) as failed:
        op.execute(make_context())
    message = str(failed.value)
    assert "build container" in message and "installing requirements failed" in message, message
    assert message.endswith("during requirements before reporting an outcome"), message
    [pod] = kube_api.all_pods()
    assert not [line for _, c, line in pod.log if c == "base"], "no user code ran"
