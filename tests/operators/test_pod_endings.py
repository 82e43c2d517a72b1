"""How a pod's ending becomes the run's: branches a cluster reaches but the test API server rarely does.

The launcher reads the run's outcome.json and the finished pod's status (a real kubernetes
model, as KPO's ``on_pod_completion`` callback hands it over); no API server is involved, except
for the race of on_kill with the launch path, ordered by the test API server holding one request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import models as k8s

from airflow_aicenter.errors import RunError
from airflow_aicenter.launchers.pod import PodLauncher
from airflow_aicenter.records import BlobRef, Outcome, RunSpec, read, write
from airflow_aicenter.storage import open_store
from tests.operators.kube_api import FakeKubernetes


def terminated(reason: str, code: int, message: str | None = None) -> k8s.V1Pod:
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code, reason=reason, message=message))
    status = k8s.V1PodStatus(phase="Failed", container_statuses=[
        k8s.V1ContainerStatus(name="base", image="aicenter-runtime:test", image_id="", ready=False, restart_count=0, state=state)])
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p", namespace="default"), status=status)


def test_an_oom_killed_pod_says_so_and_how_to_fix_it(launcher: PodLauncher):
    store = open_store(launcher.pod_run.spec.storage)
    live = Outcome.starting(launcher.pod_run.spec)
    live.phase = "user_code"
    write(store, launcher.pod_run.run.key("outcome.json"), live)  # the runtime's live progress, then SIGKILL
    launcher.final_pod = terminated("OOMKilled", 137)
    with pytest.raises(RunError) as failed:
        launcher.ending(None)
    message = str(failed.value)
    assert "exit code 137, OOMKilled" in message and "during user_code" in message
    assert "ran out of memory: give it more with memory_gb=" in message
    recorded = read(store, launcher.pod_run.run.key("outcome.json"), Outcome)
    assert recorded.status == "failed" and recorded.error and "OOMKilled" in recorded.error


def test_a_pod_whose_outcome_says_succeeded_succeeds_whatever_the_pod_says(launcher: PodLauncher):
    store = open_store(launcher.pod_run.spec.storage)
    done = Outcome.starting(launcher.pod_run.spec, "succeeded", blob=BlobRef(sha256="cd" * 32, size=2))
    write(store, launcher.pod_run.run.key("outcome.json"), done)
    launcher.final_pod = terminated("Error", 2, "sidecar trouble")
    finished = launcher.ending(RuntimeError("the pod manager lost the log stream"))
    assert finished.outcome.status == "succeeded" and finished.run == launcher.pod_run.run


def test_a_pod_that_never_ran_names_the_launch_cause_from_the_exception_chain(launcher: PodLauncher):
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchFailedException

    try:
        try:
            raise PodLaunchFailedException("Pod took too long to start: ErrImagePull\nremote_pod: {huge dump}")
        finally:
            raise Exception("Pod p returned a failure.")
    except Exception as exc:
        failure = exc
    with pytest.raises(RunError, match=r"did not run: PodLaunchFailedException: Pod took too long to start: ErrImagePull$"):
        launcher.ending(failure)


def test_a_failed_stage_container_is_the_cause(launcher: PodLauncher):
    """Stage failed before any user code (its outcome says so); the task error is the runtime's cause."""
    store = open_store(launcher.pod_run.spec.storage)
    failed = Outcome.starting(launcher.pod_run.spec, "failed", error="requirements: no matching distribution for nope==9")
    write(store, launcher.pod_run.run.key("outcome.json"), failed)
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=1, reason="Error", message="requirements"))
    launcher.final_pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p", namespace="default"), status=k8s.V1PodStatus(
        phase="Failed", init_container_statuses=[k8s.V1ContainerStatus(name="stage", image="i", image_id="", ready=False,
                                                                        restart_count=0, state=state)]))
    with pytest.raises(RunError, match=r"failed: requirements: no matching distribution for nope==9$"):
        launcher.ending(RuntimeError("Pod p returned a failure"))


def test_a_stage_container_killed_before_reporting_is_named(launcher: PodLauncher):
    store = open_store(launcher.pod_run.spec.storage)
    live = Outcome.starting(launcher.pod_run.spec)
    live.phase = "stage_data"
    write(store, launcher.pod_run.run.key("outcome.json"), live)
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=137, reason="OOMKilled"))
    launcher.final_pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p", namespace="default"), status=k8s.V1PodStatus(
        phase="Failed", init_container_statuses=[k8s.V1ContainerStatus(name="stage", image="i", image_id="", ready=False,
                                                                        restart_count=0, state=state)]))
    with pytest.raises(RunError, match=r"the pod's stage container ended \(exit code 137, OOMKilled\).*during stage_data"):
        launcher.ending(None)


# -- the user container's handover to sync: it always ends, with a cause ----------------------
def _control(tmp_path: Path) -> tuple[str, Path]:
    """The base container's shell command with the work volume at ``tmp_path``."""
    from airflow_aicenter.launchers.pod_spec import SUPERVISOR_COMMAND, WORK_MOUNT

    (tmp_path / "control").mkdir()
    return SUPERVISOR_COMMAND[2].replace(WORK_MOUNT, str(tmp_path)), tmp_path / "control"


def _agent(tmp_path: Path) -> Any:
    from airflow_aicenter.runtime.agent import Agent

    spec = RunSpec(pipeline="train", storage=(tmp_path / "store").as_uri(), run_prefix="runs/d/r/t/1", package="p",
                   version="1.0", blob=BlobRef(sha256="ab" * 32, size=1))
    return Agent(spec, open_store(spec.storage), tmp_path, phase="sync", state=tmp_path / "state")


def test_a_supervisor_that_cannot_start_still_gives_sync_an_exit_file(tmp_path: Path):
    import os
    import signal
    import subprocess

    script, control = _control(tmp_path)
    # No captured pipes: the heartbeat loop's ``sleep`` outlives the shell (the shell kills the loop, not the
    # sleep running in it) and held them open for a whole heartbeat (5 s). Its own session, ended after.
    done = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        code = done.wait(timeout=30)
    finally:
        try:
            os.killpg(done.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code != 0 and (control / "alive").exists()
    ended = json.loads((control / "exit.json").read_text())
    assert ended["status"] == "failed" and f"exited with code {code} before it reported" in ended["cause"]
    with pytest.raises(RunError, match="the user supervisor exited with code"):
        _agent(tmp_path)._wait_for_supervisor()


def test_a_stop_sent_to_the_user_containers_shell_reaches_the_supervisor(tmp_path: Path):
    """The kubelet sends SIGTERM to a container's first process only, here the shell: it must pass it on.

    Otherwise the supervisor, and the user code under it, hear nothing until the SIGKILL at the end
    of the grace period: no checkpoint, no stopped record (a shell that is PID 1 ignores SIGTERM).
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from airflow_aicenter.launchers.pod_spec import BIN_MOUNT, WORK_MOUNT

    script, control = _control(tmp_path)
    bin_dir = Path(BIN_MOUNT.replace(WORK_MOUNT, str(tmp_path)))
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "supervisor.py").write_text(
        "import pathlib, signal, sys, time\n"
        "control = pathlib.Path(sys.argv[1]).parent\n"
        "def stop(*_):\n"
        "    (control / 'stopped').write_text('SIGTERM')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "(control / 'started').write_text('')\n"
        "time.sleep(60)\n")
    python = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{python}:{os.environ['PATH']}"}
    shell = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (control / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (control / "started").exists(), "the supervisor started"
        shell.send_signal(signal.SIGTERM)  # to the shell alone, as the kubelet does
        code = shell.wait(timeout=30)
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert (control / "stopped").read_text() == "SIGTERM", "the supervisor heard the stop"
    assert code == 143, "the shell ends with the supervisor's own code"
    assert "exited with code 143" in json.loads((control / "exit.json").read_text())["cause"]


def test_a_user_container_killed_whole_is_noticed_by_its_silence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import os
    import time

    from airflow_aicenter.runtime import agent

    control = tmp_path / "control"
    control.mkdir()
    (control / "alive").touch()
    stale = time.time() - 120
    os.utime(control / "alive", (stale, stale))
    monkeypatch.setattr(agent, "EXIT_POLL", 0.01)
    with pytest.raises(RunError, match=r"the user container stopped 1\d\d s ago without reporting \(killed whole"):
        _agent(tmp_path)._wait_for_supervisor()


def test_sync_never_follows_a_link_planted_as_the_exit_file(tmp_path: Path):
    """Package code in ``base`` can write ``control/``: a link there must not make sync read its other volumes.

    ``state/`` is mounted in stage and sync only; a link ``control/exit.json -> state/...`` was
    followed, and its content became the run's results (or its cause).
    """
    control = tmp_path / "control"
    control.mkdir()
    (tmp_path / "state").mkdir()
    planted = tmp_path / "state" / "visible-only-to-sync.json"
    planted.write_text(json.dumps({"status": "succeeded", "results": [{"score": 99.0}]}))
    (control / "exit.json").symlink_to(planted)
    (control / "alive").touch()
    with pytest.raises(RunError, match="not a JSON object in a regular file"):
        _agent(tmp_path)._wait_for_supervisor()


def test_a_user_container_stopped_with_the_pod_makes_sync_record_killed_not_failed(tmp_path: Path):
    """Deleting the pod sends SIGTERM to every container at once; when the user supervisor's exit record ("killed",
    "the run was stopped") reaches sync before sync's own SIGTERM does, the run was still stopped, not failed (seen
    in real containers under load: the run recorded ``failed: the run was stopped`` after on_kill)."""
    from airflow_aicenter.runtime import agent

    control = tmp_path / "control"
    control.mkdir()
    (control / "exit.json").write_text(json.dumps({"status": "killed", "results": [None], "failed": None,
                                                   "cause": "the run was stopped"}))
    (control / "alive").touch()
    with pytest.raises(agent.Killed):
        _agent(tmp_path)._wait_for_supervisor()


def test_sync_refuses_an_exit_file_without_a_list_of_results(tmp_path: Path):
    control = tmp_path / "control"
    control.mkdir()
    (control / "exit.json").write_text(json.dumps({"status": "succeeded", "results": "rm -rf"}))
    (control / "alive").touch()
    with pytest.raises(RunError, match="holds no list of results"):
        _agent(tmp_path)._wait_for_supervisor()


def test_how_long_sync_waits_for_the_first_sign_of_life_is_the_images_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """AICENTER_SUPERVISOR_START_TIMEOUT in the runtime image's environment (30 s without it); a bad value is named."""
    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.runtime import agent

    (tmp_path / "control").mkdir()
    monkeypatch.setattr(agent, "EXIT_POLL", 0.01)
    monkeypatch.setenv("AICENTER_SUPERVISOR_START_TIMEOUT", "0.2")
    with pytest.raises(RunError, match=r"gave no sign of the user supervisor within 0\.2 s"):
        _agent(tmp_path)._wait_for_supervisor()
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("AICENTER_SUPERVISOR_START_TIMEOUT", bad)
        with pytest.raises(ConfigurationError, match=rf"AICENTER_SUPERVISOR_START_TIMEOUT={bad!r} is not .*seconds.*unset it"):
            _agent(tmp_path)._wait_for_supervisor()


# -- on_kill of a pod that is still Pending: the run says killed, whoever notices first ----------
@pytest.mark.parametrize("first", ["on_kill", "the wait"])
def test_on_kill_of_a_pending_pod_records_killed_whichever_of_on_kill_and_the_failing_wait_comes_first(
        first: str, kube_s3_deployment, kube_api: FakeKubernetes):
    """The pod never leaves Pending; on_kill deletes it while KubernetesPodOperator polls its start (every 0.1 s).

    Two paths then record the run: on_kill's, and the launch path's, whose wait fails on the deleted
    pod. The test API server holds one request to choose which records first: ``on_kill`` (the
    wait's pod reads are held until on_kill returned) or ``the wait`` (on_kill's revocation of the run's
    credentials is held until the launch path has recorded its ending). Either way the run says
    ``killed``, the pod is gone and the per-run credentials Secret is deleted.
    """
    import threading

    from airflow_aicenter.layout import OUTCOME
    from airflow_aicenter.operators import TrainPipelineOperator
    from airflow_aicenter.records import read_optional
    from tests.operators.kube_api import make_context, run_in_thread

    registry, dataset = kube_s3_deployment
    kube_api.start_delay = 60.0  # Pending until deleted
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False,
                               startup_check_interval_seconds=0.1, poll_interval=0.5)
    worker, out = run_in_thread(op, make_context())
    kube_api.wait_for(lambda: (op.pod is not None and bool(kube_api.secrets)) or not worker.is_alive(), timeout=60,
                      what="the pod and its credentials Secret")
    assert worker.is_alive(), out
    [secret_key] = list(kube_api.secrets)
    run = op.launcher_in_use.pod_run.run  # type: ignore[union-attr]
    if first == "on_kill":
        held = kube_api.hold_next(rf"/pods/{op.pod.metadata.name}$")  # the wait's next look at the pod
        held.reached.wait(10)
        op.on_kill()
        held.release.set()
        worker.join(60)
    else:
        held = kube_api.hold_next(r"/secrets/[^/]+$", method="DELETE")  # on_kill's revocation, after the pod's deletion
        killer = threading.Thread(target=op.on_kill, daemon=True)
        killer.start()
        worker.join(60)  # the launch path saw the pod go and recorded its ending first
        assert held.reached.is_set(), "on_kill was still revoking when the launch path ended"
        held.release.set()
        killer.join(60)
    assert not worker.is_alive()
    outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    assert outcome is not None and outcome.status == "killed", outcome
    assert outcome.error == "killed by Airflow (task stopped) during start-up"
    failure = out.get("error")
    assert isinstance(failure, RunError) and " killed: killed by Airflow" in str(failure), failure
    kube_api.wait_for(lambda: all(p.gone for p in kube_api.all_pods()), timeout=30, what="the pod to be deleted")
    assert secret_key not in kube_api.secrets, "the run's credentials are revoked"


def test_on_kill_while_the_pod_is_being_created_removes_the_pod_it_could_not_see(kube_s3_deployment,
                                                                                 kube_api: FakeKubernetes):
    """on_kill comes while the pod's create is in flight (the test API server holds it): KubernetesPodOperator has no
    pod to delete yet. Once created, the pod is deleted at once instead of running on, and the run says killed."""

    from airflow_aicenter.layout import OUTCOME
    from airflow_aicenter.operators import TrainPipelineOperator
    from airflow_aicenter.records import read_optional
    from tests.operators.kube_api import make_context, run_in_thread

    registry, dataset = kube_s3_deployment
    held = kube_api.hold_next(r"/pods$", method="POST")
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False,
                               startup_check_interval_seconds=0.1, poll_interval=0.5)
    worker, out = run_in_thread(op, make_context())
    assert held.reached.wait(60), out
    [secret_key] = list(kube_api.secrets)
    run = op.launcher_in_use.pod_run.run  # type: ignore[union-attr]
    op.on_kill()
    held.release.set()
    worker.join(60)
    assert not worker.is_alive()
    failure = out.get("error")
    assert isinstance(failure, RunError) and " killed: killed by Airflow" in str(failure), failure
    outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    assert outcome is not None and outcome.status == "killed", outcome
    kube_api.wait_for(lambda: all(p.gone for p in kube_api.all_pods()), timeout=30, what="the pod to be deleted")
    assert secret_key not in kube_api.secrets, "the run's credentials are revoked"
    assert [r.version for r in registry.versions("rows")] == ["1.0"], "no version"


def test_a_deferred_pod_run_stopped_while_pending_is_recorded_killed_by_its_trigger(kube_s3_deployment,
                                                                                   kube_api: FakeKubernetes):
    """A deferred one-pod run stopped from the UI (mark failed, clear) while its pod is Pending: no worker holds the
    task, so Airflow 3.3 calls the trigger's on_kill, which deletes the pod. No runtime started to record the ending:
    the trigger (rebuilt from what it serialized, as the triggerer does) records the run ``killed``, and its
    credentials are revoked, as the operator's on_kill does for a running task."""
    import asyncio

    from airflow.sdk.exceptions import TaskDeferred

    from airflow_aicenter.layout import OUTCOME
    from airflow_aicenter.operators import TrainPipelineOperator
    from airflow_aicenter.records import read_optional
    from tests.operators.kube_api import make_context, rebuilt

    registry, dataset = kube_s3_deployment
    kube_api.start_delay = 60.0  # Pending until deleted
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False,
                               deferrable=True, startup_check_interval_seconds=0.1, poll_interval=0.5)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context())
    [secret_key] = list(kube_api.secrets)
    run = op.launcher_in_use.pod_run.run  # type: ignore[union-attr]
    assert read_optional(registry.store, run.key(OUTCOME), Outcome) is None, "the pod did not start"
    asyncio.run(rebuilt(deferred.value.trigger).on_kill())  # from what it serialized, as the triggerer makes it
    kube_api.wait_for(lambda: all(p.gone for p in kube_api.all_pods()), timeout=30, what="the pod to be deleted")
    outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    assert outcome is not None and outcome.status == "killed", outcome
    assert outcome.error == "killed by Airflow (task stopped) during start-up"
    assert secret_key not in kube_api.secrets, "the run's credentials are revoked"
    assert [r.version for r in registry.versions("rows")] == ["1.0"], "no version"


def test_api_errors_while_a_single_pod_runs_are_retried_and_the_run_succeeds(kube_deployment, kube_api: FakeKubernetes,
                                                                            tmp_path: Path):
    """A flaky API server during a one-pod run (KubernetesPodOperator's own waits and reads, which retry 5xx and dropped
    connections): 503s, a 500 and a reset on the pod's reads; the run goes on and its pod is deleted once, at its end."""
    import threading

    from airflow_aicenter.operators import TrainPipelineOperator
    from tests.aicenter_helpers import FAST
    from tests.conftest import write_files
    from tests.operators.kube_api import make_context
    from tests.operators.test_kubernetes_launcher import MAIN, TRAIN

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": ""}), "rows")

    def inject() -> None:
        kube_api.wait_for(lambda: bool(kube_api.pods), timeout=60, what="the pod")
        kube_api.fail_next(r"/pods/[^/]+$", 2, 503)
        kube_api.fail_next(r"/pods/[^/]+$", 1, 500)
        kube_api.fail_next(r"/pods/[^/]+$", 1, "reset")

    watcher = threading.Thread(target=inject, daemon=True)
    watcher.start()
    result = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False,
                                   **FAST).execute(make_context())
    watcher.join(5)
    assert result["version"] == "1.1"
    served = [status for _, _, status in kube_api.faults_served]
    assert served.count(503) == 2 and 500 in served and "reset" in served, served
    assert len([p for m, p in kube_api.requests if m == "DELETE" and "/pods/" in p]) == 1, "deleted once, at its end"


@pytest.mark.parametrize("entry", [{"name": "aicenter-gone-pod", "namespace": "default"}, "not an identity"],
                         ids=["gone", "malformed"])
def test_a_task_state_store_entry_for_no_pod_falls_back_to_the_label_lookup(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: Any):
    """The task state store names a pod that is gone (or holds no identity): the run is not refused or stuck; the
    label lookup finds nothing, one pod is created, the run succeeds and the store names the new pod."""
    from airflow.sdk.execution_time import task_runner

    from airflow_aicenter.operators import TrainPipelineOperator
    from tests.aicenter_helpers import FAST
    from tests.conftest import write_files
    from tests.operators.kube_api import StateStoreComms, make_context
    from tests.operators.test_kubernetes_launcher import MAIN, TRAIN

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": ""}), "rows")
    store = tmp_path / "task-state.json"
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", StateStoreComms(store), raising=False)
    context = make_context(state_store=store)
    context["task_state_store"].set("pod_identifier", entry)  # an earlier try's, whose pod was removed since
    result = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False,
                                   **FAST).execute(context)
    assert result["version"] == "1.1"
    [pod] = kube_api.all_pods()
    assert context["task_state_store"].get("pod_identifier") == {"name": pod.key[1], "namespace": pod.key[0]}
