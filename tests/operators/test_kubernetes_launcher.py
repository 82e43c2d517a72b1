"""The Kubernetes launcher in-process against the test API server: reattach, retries, kill, failures, PVC, requirements.

The operator runs in this process with a hand-made task context (fast); the pods run as real
processes of the airflow-free runtime interpreter. End-to-end runs through ``airflow dags
test`` are in test_kubernetes_dags.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import TaskDeferred
from kubernetes.client import ApiClient

from airflow_aicenter.errors import RunError
from airflow_aicenter.launchers.pod import PodRun
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Manifest, Outcome, Results, read, read_optional
from airflow_aicenter.registry import Registry
from tests.aicenter_helpers import FAST, run_trigger
from tests.conftest import write_files
from tests.operators.kube_api import FakeKubernetes, make_context, run_in_thread, seed_pod
from tests.packages import ECHO_MAIN

MAIN = ECHO_MAIN
TRAIN = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.rows = sum(1 for _ in open(os.path.join(training_directory, "rows.csv")))
    def save(self):
        open("model.txt", "w").write(str(self.rows))
'''
SLOW_TRAIN = '''
import time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        time.sleep(60)
    def save(self):
        pass
'''


class WorkerDied(BaseException):
    """The worker process vanished here (not an exception Airflow code could handle)."""


def upload(registry: Registry, tmp_path: Path, name: str, train_py: str = TRAIN, **files: str | bytes) -> None:
    registry.upload(write_files(tmp_path / f"pkg-{name}", {"main.py": MAIN, "train.py": train_py, "requirements.txt": "", **files}), name)


def train_op(package: str, dataset: str | None, **kwargs: Any) -> TrainPipelineOperator:
    return TrainPipelineOperator(task_id="train", package=package, dataset=dataset, **FAST, **kwargs)


def posts(kube: FakeKubernetes) -> int:
    return sum(1 for method, _ in kube.requests if method == "POST")


# -- reattach and retries: one registration per run -----------------------------------------
@pytest.mark.parametrize("dies", ["before registering", "after registering"])
def test_worker_restart_completes_the_earlier_try_and_registers_once(dies: str, kube_deployment, kube_api, tmp_path, monkeypatch):
    """The worker dies after the pod succeeded: the next try completes try 1's run (its outcome.json), trains nothing."""
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "rows")
    original_commit = Registry.commit_once
    original_cleanup = KubernetesPodOperator.cleanup

    def commit_then_die(self, *args, **kwargs):
        original_commit(self, *args, **kwargs)
        raise WorkerDied

    def die(self, *args, **kwargs):
        raise WorkerDied

    with pytest.MonkeyPatch.context() as patch:
        if dies == "before registering":
            patch.setattr(TrainPipelineOperator, "complete", die)
        else:
            patch.setattr(Registry, "commit_once", commit_then_die)
        with pytest.raises(WorkerDied):
            train_op("rows", dataset).execute(make_context(try_number=1))
    assert KubernetesPodOperator.cleanup is original_cleanup, "nothing of ours is patched into KPO's cleanup"
    [pod] = kube_api.all_pods()
    assert pod.obj["status"]["phase"] == "Succeeded"
    assert [r.version for r in registry.versions("rows")] == (["1.0"] if dies == "before registering" else ["1.0", "1.1"])

    # the task's next attempt (try 2) finds the finished pod of try 1 and completes *its* run
    context = make_context(try_number=2)
    result = train_op("rows", dataset).execute(context)
    assert posts(kube_api) == 1, "no second pod: try 1's finished run was completed, nothing trained twice"
    assert [r.version for r in registry.versions("rows")] == ["1.0", "1.1"]
    record = registry.get("rows", "1.1")
    assert record.run is not None and record.run.try_number == 1
    assert result["version"] == "1.1" and result["run_uri"].endswith("/train/1")
    assert context["ti"].xcom["return_value"] == result
    read(registry.store, f"{record.run.prefix}/_results.json", Results)


def test_deferrable_reentry_repeated_registers_once(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "rows")
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        train_op("rows", dataset, deferrable=True).execute(context)
    assert deferred.value.method_name == "trigger_reentry"
    event = run_trigger(deferred.value)
    assert event["status"] == "success" and PodRun.from_event(event["aicenter"]) is not None
    # re-entry runs in a fresh operator (as after deserialisation), twice: the retried post-pod step
    first = train_op("rows", dataset, deferrable=True).trigger_reentry(context, event)
    assert kube_api.all_pods()[0].gone
    second = train_op("rows", dataset, deferrable=True).trigger_reentry(context, event)  # pod already deleted (404)
    assert first == second and first["version"] == "1.1"
    assert [r.version for r in registry.versions("rows")] == ["1.0", "1.1"]


RELEASED_TRAIN = """
import os, time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        deadline = time.time() + 90
        while not os.path.exists(os.environ["RELEASE"]) and time.time() < deadline:
            time.sleep(0.2)
    def save(self):
        open("model.txt", "w").write("trained")
"""


def test_a_killed_worker_s_next_try_reattaches_to_the_pod_named_in_the_task_state_store(kube_deployment, kube_api, tmp_path,
                                                                                         monkeypatch):
    """KubernetesPodOperator's ``durable`` (Airflow 3.3): try 1's worker is killed after creating the pod; the namespace
    of new runs changed meanwhile, so the label lookup finds nothing there. Try 2 reattaches to the pod the task state
    store names (our check that it runs this very task still applies): one pod created in all."""
    from airflow.sdk.execution_time import task_runner

    from tests.operators.kube_api import StateStoreComms, kill_worker_once_stored

    registry, dataset = kube_deployment
    upload(registry, tmp_path, "held", train_py=RELEASED_TRAIN)
    store, release = tmp_path / "task-state.json", tmp_path / "release"
    op_args: dict[str, Any] = {"package": "held", "dataset": dataset, "env": {"RELEASE": str(release)}}
    kill_worker_once_stored(store, "pod_identifier", **op_args)
    [(namespace, name)] = list(kube_api.pods)
    assert namespace == "default" and posts(kube_api) == 1
    [ti_id] = json.loads(store.read_text())["tis"]
    assert StateStoreComms(store).values(ti_id)["pod_identifier"] == {"name": name, "namespace": "default"}

    for key, value in kube_api.connection_env("team-b").items():  # new runs go to another namespace now
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", StateStoreComms(store), raising=False)
    seen = len(kube_api.requests)
    worker, out = run_in_thread(train_op(**op_args), make_context(try_number=2, state_store=store))
    kube_api.wait_for(lambda: any(m == "GET" and f"/namespaces/default/pods/{name}" in p for m, p in kube_api.requests[seen:])
                      or not worker.is_alive(), timeout=60, what="try 2 looking at try 1's pod")
    release.write_text("go")
    worker.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["version"] == "1.1" and out["result"]["run_uri"].endswith("/train/1"), "try 1's run, waited for by try 2"
    assert posts(kube_api) == 1, "try 2 reattached: no second pod"


# -- wrong pods, lying pods, pods that never ran ---------------------------------------------
@pytest.mark.parametrize("kind", ["not ours", "another package"])
def test_foreign_pod_with_this_tasks_labels_is_refused(kind: str, kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "rows")
    upload(registry, tmp_path, "other")
    context = make_context()
    seed = train_op("other" if kind == "another package" else "rows", dataset)
    if kind == "another package":
        hook_spec_pod = seed_pod(seed, registry, context, command=["python", "-c", "import time; time.sleep(30)"])
    else:
        seed.cmds = ["python", "-c", "import time; time.sleep(30)"]
        hook_spec_pod = ApiClient().sanitize_for_serialization(seed.build_pod_request_obj(context))
        hook_spec_pod["metadata"].pop("annotations", None)
        hook_spec_pod["spec"].pop("initContainers")  # someone else's pod: one container of theirs
        hook_spec_pod["spec"]["containers"] = [c for c in hook_spec_pod["spec"]["containers"] if c["name"] == "base"]
    kube_api.create_pod("default", hook_spec_pod)
    kube_api.wait_for(lambda: kube_api.all_pods()[0].obj["status"]["phase"] == "Running", what="seeded pod running")
    with pytest.raises(RunError, match=r"matches this task's labels but .*refusing to reattach.*kubectl delete pod"):
        train_op("rows", dataset).execute(context)
    assert posts(kube_api) == 0 and not kube_api.all_pods()[0].deleting, "the foreign pod is left alone"
    assert [r.version for r in registry.versions("rows")] == ["1.0"]


def test_a_pod_that_succeeds_without_an_outcome_fails_the_task(kube_deployment, kube_api, tmp_path):
    """#73006: phase Succeeded is not success; outcome.json is. A base command that replaced the
    user supervisor ends the run too: sync gives up waiting for its sign of life (after the image's setting)."""
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "rows")
    kube_api.image_env["AICENTER_SUPERVISOR_START_TIMEOUT"] = "3"  # 30 s without it
    op = train_op("rows", dataset, cmds=["python", "-c", "print('did something else')"])
    with pytest.raises(RunError, match=r"failed: the user container gave no sign of the user supervisor within 3 s"):
        op.execute(make_context())
    assert [r.version for r in registry.versions("rows")] == ["1.0"]
    [key] = [i.key for i in registry.store.list("runs") if i.key.endswith("outcome.json")]
    assert read(registry.store, key, Outcome).status == "failed"


def test_a_pod_that_never_starts_fails_with_the_launch_cause(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "rows")
    kube_api.unpullable.add("registry.example.com/missing:1")
    with pytest.raises(RunError, match=r"the training pod did not run: .*Image cannot be pulled.*ErrImagePull"):
        train_op("rows", dataset, image="registry.example.com/missing:1").execute(make_context())
    [key] = [i.key for i in registry.store.list("runs") if i.key.endswith("outcome.json")]
    assert "did not run" in read(registry.store, key, Outcome).error


def test_runtime_failure_surfaces_its_one_line_cause(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "broken", train_py=TRAIN.replace("sum(1 for _ in", "int(").replace('"rows.csv")))', '"rows.csv")).read())'))
    with pytest.raises(RunError) as failed:
        train_op("broken", dataset).execute(make_context())
    message = str(failed.value)
    assert message.startswith("train run of broken:1.0 failed: Main.train() raised ValueError: invalid literal for int()")
    assert "remote_pod" not in message and "\n" not in message
    [pod] = kube_api.all_pods()
    [sync] = [c for c in pod.obj["status"]["containerStatuses"] if c["name"] == "sync"]  # it writes the run's message
    terminated = sync["state"]["terminated"]
    assert terminated["exitCode"] == 1 and terminated["message"].startswith("Main.train() raised ValueError")


# -- kill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["running", "pending"])
def test_on_kill_deletes_the_pod_and_records_the_run_as_killed(when: str, kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "slow", train_py=SLOW_TRAIN)
    if when == "pending":
        kube_api.start_delay = 30.0
    op = train_op("slow", dataset)
    worker, _ = run_in_thread(op, make_context())
    key = "runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/train/1/outcome.json"
    if when == "running":
        kube_api.wait_for(lambda: (o := read_optional(registry.store, key, Outcome)) is not None and o.phase == "user_code",
                          timeout=60, what="training to start")
    else:
        kube_api.wait_for(lambda: op.pod is not None, what="the pod to be created")
    op.on_kill()
    kube_api.wait_for(lambda: all(p.gone for p in kube_api.all_pods()), timeout=30, what="the pod to be deleted")
    outcome = read(registry.store, key, Outcome)
    assert outcome.status == "killed"
    assert outcome.error == ("killed during user_code" if when == "running" else "killed by Airflow (task stopped) during start-up")
    worker.join(timeout=30)
    assert [r.version for r in registry.versions("slow")] == ["1.0"]


# -- datasets on a volume claim, requirements in the pod -------------------------------------
def test_pvc_dataset_is_mounted_read_only_not_staged(kube_deployment, kube_api, tmp_path):
    registry, _ = kube_deployment
    upload(registry, tmp_path, "rows")
    claim = write_files(tmp_path / "claim", {"2026/01/rows.csv": "a\n1\n2\n3\n", "other/rows.csv": "nope\n"})
    kube_api.add_claim("churn-data", claim)
    op = train_op("rows", None, dataset_volume_claim="churn-data", dataset_sub_path="2026/01", save_training_data=True)
    result = op.execute(make_context())
    record = registry.get("rows", result["version"])
    outcome = read(registry.store, f"{record.run.prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and "requirements" in outcome.phases
    manifest = read(registry.store, f"{record.run.prefix}/data_directory.manifest.json", Manifest)
    assert manifest.source == "pvc://churn-data/2026/01" and [f.path for f in manifest.files] == ["rows.csv"]
    results = json.loads(registry.store.get_bytes(f"{record.run.prefix}/_results.json"))
    assert results["parameters"]["inputs"]["train_data"] == "pvc://churn-data/2026/01"
    [pod] = kube_api.all_pods()
    # the package is staged ("package staged: ..."); the dataset is not ("staged N files (...) from URI")
    assert not [line for _, _, line in pod.log if re.search(r"\bstaged \d+ files\b", line)], "no dataset was downloaded"
    assert any("dataset mounted read-only" in line for _, _, line in pod.log)


def tiny_wheel() -> bytes:
    """A minimal wheel (aicenter-tiny 0.1) so pip installs offline from the package folder."""
    files = {"aicenter_tiny/__init__.py": b"VALUE = 42\n",
             "aicenter_tiny-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: aicenter-tiny\nVersion: 0.1\n",
             "aicenter_tiny-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()) + "aicenter_tiny-0.1.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in {**files, "aicenter_tiny-0.1.dist-info/RECORD": record.encode()}.items():
            wheel.writestr(name, data)
    return buffer.getvalue()


NEEDS_TINY = '''
import aicenter_tiny
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.value = aicenter_tiny.VALUE
    def save(self):
        open("model.txt", "w").write(str(self.value))
'''


def test_requirements_are_installed_in_the_pod(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "needs", train_py=NEEDS_TINY,
           **{"requirements.txt": "./wheels/aicenter_tiny-0.1-py3-none-any.whl\n",
              "wheels/aicenter_tiny-0.1-py3-none-any.whl": tiny_wheel()})
    result = train_op("needs", dataset).execute(make_context())
    record = registry.get("needs", result["version"])
    outcome = read(registry.store, f"{record.run.prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and list(outcome.phases)[:2] == ["stage_package", "requirements"]
    [pod] = kube_api.all_pods()
    assert any("+ aicenter-tiny==0.1" in line for _, _, line in pod.log)
    assert outcome.environment is not None and outcome.environment["source"] == "installed"
    # stage ends before user code: sync packs and stores the environment while base (read-only mount) runs
    assert not any("packed" in line for _, c, line in pod.log if c == "stage")
    assert any("while package code runs (its container has it read-only)" in line for _, c, line in pod.log if c == "sync")
    assert any("stored for the next run" in line for _, c, line in pod.log if c == "sync")


def test_failed_requirements_are_reported_as_such(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "badreq", **{"requirements.txt": "# deps\nthis is not a requirement ===\n"})
    with pytest.raises(RunError, match=r"failed: installing requirements failed: uv exited with code 2: error: Couldn't parse requirement"):
        train_op("badreq", dataset).execute(make_context())
    [key] = [i.key for i in registry.store.list("runs") if i.key.endswith("outcome.json")]
    outcome = read(registry.store, key, Outcome)
    assert outcome.status == "failed" and outcome.phase == "requirements" and "Main.train" not in outcome.error


def test_install_requirements_false_skips_the_phase(kube_deployment, kube_api, tmp_path):
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "badreq", **{"requirements.txt": "this is not a requirement ===\n"})
    result = train_op("badreq", dataset, install_requirements=False).execute(make_context())
    outcome = read(registry.store, result["run_uri"].removeprefix(registry.store.uri + "/") + "/outcome.json", Outcome)
    assert "requirements" not in outcome.phases and outcome.status == "succeeded"


def test_pod_only_refusals_come_before_any_pod_and_are_recorded(kube_deployment, kube_api, tmp_path):
    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.operators import EvaluatePipelineOperator
    from tests.aicenter_helpers import SCORED_TRAIN

    registry, dataset = kube_deployment
    upload(registry, tmp_path, "scored", SCORED_TRAIN)
    cases = {
        "eval_claim": (EvaluatePipelineOperator(task_id="eval_claim", package="scored", evaluation_dataset=dataset,
                                                dataset_volume_claim="c", **FAST), "evaluation runs read evaluation_dataset"),
        "secret_env": (TrainPipelineOperator(task_id="secret_env", package="scored", dataset=dataset,
                                             env={"API_TOKEN": "tok-0123456789"}, **FAST), "API_TOKEN look secret"),
        "pvc_uri": (TrainPipelineOperator(task_id="pvc_uri", package="scored", dataset="pvc://claim/data", **FAST),
                    "names a volume claim; mount it with dataset_volume_claim="),
    }
    for task_id, (op, message) in cases.items():
        with pytest.raises(ConfigurationError, match=message):
            op.execute(make_context(task_id=task_id))
    assert kube_api.all_pods() == [], "no pod was created"
    for task_id, (_, message) in cases.items():
        outcome = read(registry.store, f"runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/{task_id}/1/outcome.json", Outcome)
        assert (outcome.status, outcome.phase, outcome.phases) == ("failed", "prepare", {}) and message in outcome.error
        assert "tok-0123456789" not in outcome.model_dump_json()


ENV_TRAIN = '''
import json, os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        seen = {k: os.environ.get(k) for k in ("HOME", "NVIDIA_VISIBLE_DEVICES", "AICENTER_RUN_SPEC", "AWS_ENDPOINT_URL")}
        with open(os.path.join(os.environ["artifacts_directory"], "env.json"), "w") as fh:
            json.dump(seen, fh)
    def save(self):
        pass
'''


def test_user_code_gets_the_user_containers_system_variables_not_stages(kube_deployment, kube_api, tmp_path):
    """The supervisor's plan comes from stage, but the GPU device plugin sets NVIDIA_*/CUDA_* on ``base``
    (the container with the GPU limit), and the user's HOME is base's: those reach user code."""
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "envs", train_py=ENV_TRAIN)
    op = train_op("envs", dataset, install_requirements=False,
                  env_vars={"NVIDIA_VISIBLE_DEVICES": "0,1", "HOME": "/aicenter/work/custom-home"})
    result = op.execute(make_context())
    seen = json.loads(registry.store.get_bytes(f"{registry.get('envs', result['version']).run.prefix}/artifacts/env.json"))
    assert seen["NVIDIA_VISIBLE_DEVICES"] == "0,1"
    assert seen["HOME"].endswith("/custom-home")
    assert seen["AICENTER_RUN_SPEC"] is None and seen["AWS_ENDPOINT_URL"] is None


CHECKPOINT_TRAIN = '''
import json, os, time
class Main:
    def __init__(self):
        self.state = os.path.join(os.environ["checkpoint_directory"], "state.json")
    def train(self, training_directory):
        epoch = json.load(open(self.state))["epoch"] if os.path.exists(self.state) else 0
        with open(os.path.join(os.environ["artifacts_directory"], "resumed.txt"), "w") as fh:
            fh.write(str(epoch))
        json.dump({"epoch": epoch + 1}, open(self.state, "w"))
        time.sleep(2.5)
        if epoch == 0:
            raise RuntimeError("the first try fails after its checkpoint")
    def save(self):
        pass
'''


def test_checkpoints_restore_in_stage_and_sync_in_sync(kube_deployment, kube_api, tmp_path):
    """sync syncs checkpoint_directory while user code runs and at the end (a failed try too); the next
    try's stage restores the latest checkpoint before user code."""
    registry, dataset = kube_deployment
    upload(registry, tmp_path, "ckpt", train_py=CHECKPOINT_TRAIN)
    with pytest.raises(RunError, match="the first try fails after its checkpoint"):
        train_op("ckpt", dataset, install_requirements=False, checkpoint_interval=1).execute(make_context())
    [first] = [i.key for i in registry.store.list("runs") if i.key.endswith("outcome.json")]
    outcome = read(registry.store, first, Outcome)
    assert outcome.checkpoint == {"resumed_from_try": None, "files": 1, "bytes": len('{"epoch": 1}')}
    logs = "\n".join(line for p in kube_api.all_pods() for _, name, line in p.log if name == "sync")
    assert "periodic checkpoint" in logs and "restored checkpoint" not in logs, logs[-2000:]

    result = train_op("ckpt", dataset, install_requirements=False, checkpoint_interval=1).execute(make_context(try_number=2))
    run = registry.get("ckpt", result["version"]).run
    assert run.try_number == 2
    assert registry.store.get_bytes(f"{run.prefix}/artifacts/resumed.txt").decode() == "1", "resumed from try 1's checkpoint"
    second = read(registry.store, f"{run.prefix}/outcome.json", Outcome)
    assert second.checkpoint is not None and second.checkpoint["resumed_from_try"] == 1


SECRET_TRAIN = '''
import json, os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        print("token is", os.environ.get("API_TOKEN"), flush=True)
        with open(os.path.join(os.environ["artifacts_directory"], "seen.json"), "w") as fh:
            json.dump({"flag": os.environ.get("MY_FLAG"), "token": os.environ.get("API_TOKEN") == "tok-s3cr3t-value"}, fh)
    def save(self):
        pass
'''


def test_variables_given_to_the_user_container_reach_user_code_and_secrets_are_masked(kube_deployment, kube_api, tmp_path):
    """env_vars and secrets=[Secret('env', ...)] are the user container's: user code gets them (the
    refusal of secret-looking env= names points there); a Secret's value is masked in its output
    and never reaches stage or sync."""
    from airflow.providers.cncf.kubernetes.secret import Secret

    registry, dataset = kube_deployment
    kube_api.add_secret("team", {"API_TOKEN": "tok-s3cr3t-value"})
    upload(registry, tmp_path, "given", train_py=SECRET_TRAIN)
    op = train_op("given", dataset, install_requirements=False, env_vars={"MY_FLAG": "on"},
                  secrets=[Secret("env", "API_TOKEN", "team", "API_TOKEN")])
    result = op.execute(make_context())
    prefix = registry.get("given", result["version"]).run.prefix
    assert json.loads(registry.store.get_bytes(f"{prefix}/artifacts/seen.json")) == {"flag": "on", "token": True}
    [pod] = kube_api.all_pods()
    text = "\n".join(line for _, _, line in pod.log)
    assert "token is" in text and "tok-s3cr3t-value" not in text, "masked in the user output"
    containers = {c.name: c for c in [*pod.init, *pod.containers]}
    assert "API_TOKEN" not in containers["stage"].env and "API_TOKEN" not in containers["sync"].env
