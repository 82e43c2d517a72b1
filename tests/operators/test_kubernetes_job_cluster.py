"""Distributed runs on a shared cluster (issue 23): a flaky API server, Kueue queues, all-or-nothing starts (sync and
deferred), node logs, disruptions, and reattaching through Airflow's task state store after a worker died.

The operator runs in this process against the test API server (tests/operators/kube_api.py),
which validates every manifest against the Kubernetes schemas and learns here what a shared
cluster does: injected 5xx answers and connection resets, Jobs suspended until admitted (as
Kueue does), pods that stay Pending, pods disrupted (and deleted), podFailurePolicy. A worker
that dies is a real process killed with SIGKILL; its task state store is Airflow's own accessor,
served from a file the next try's worker shares (kube_api.StateStoreComms).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.operators import TrainPipelineOperator
from tests.aicenter_helpers import FAST, MAIN
from tests.conftest import write_files
from tests.operators.conftest import ddp_full_op
from tests.operators.kube_api import FakeKubernetes, make_context, rebuilt, run_in_thread

JOB_PATH = r"^/apis/batch/v1/namespaces/[^/]+/jobs/[^/]+$"


def when_job_exists(kube: FakeKubernetes, then: Any) -> threading.Thread:
    """Run ``then()`` once the Job is created (faults injected while the run is going, not before)."""
    def watch() -> None:
        kube.wait_for(lambda: bool(kube.jobs), timeout=60, what="the Job")
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_api_errors_during_the_job_wait_are_retried_and_the_run_succeeds(ddp_deployment, kube_api: FakeKubernetes):
    """503s, a 500 and dropped connections while the Job runs: the run goes on, the Job is never deleted early."""
    registry, dataset = ddp_deployment

    def inject() -> None:
        kube_api.fail_next(JOB_PATH, 3, 503)
        kube_api.fail_next(JOB_PATH, 1, 500)
        kube_api.fail_next(JOB_PATH, 5, "reset")  # more than urllib3's own retries of a GET
        kube_api.fail_next(r"/pods$", 2, 503)  # the pod list read when the Job ended

    watcher = when_job_exists(kube_api, inject)
    result = ddp_full_op(dataset).execute(make_context())
    watcher.join(5)
    assert result["version"] == "1.1" and result["score"] == 6.0
    served = [status for _, _, status in kube_api.faults_served]
    assert served.count(503) >= 3 and 500 in served and "reset" in served, served
    deletes = [path for method, path in kube_api.requests if method == "DELETE" and "/jobs/" in path]
    assert len(deletes) == 1, f"the Job is deleted once, at its end: {deletes}"
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_api_errors_when_creating_the_job_are_retried(ddp_deployment, kube_api: FakeKubernetes):
    """The create answered 503 twice, the Service create once: created on a later try, one Job only."""
    registry, dataset = ddp_deployment
    kube_api.fail_next(r"/jobs$", 2, 503, method="POST")
    kube_api.fail_next(r"/services$", 1, 503, method="POST")
    kube_api.fail_next(JOB_PATH, 1, 502)  # the first look for an earlier attempt's Job
    result = ddp_full_op(dataset).execute(make_context())
    assert result["version"] == "1.1"
    assert len(kube_api.faults_served) == 4
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_the_test_api_server_validates_what_it_receives_and_what_it_serves(kube_deployment, kube_api: FakeKubernetes):
    """Every manifest a client sends is checked against the Kubernetes schema (422 Invalid, as an API server answers),
    and so is every status the server itself writes (suspended and admitted Jobs, conditions, pods Pending, evicted,
    disrupted): the kube_api fixture fails a test whose server served an object the schema refuses."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = config.new_client_from_config(str(kube_api.kubeconfig()))  # not the process-wide default configuration
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "bad"}, "spec": {
        "completionMode": "Indexed", "completions": 1, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "i", "gpus": 1}]}}}}
    with pytest.raises(ApiException) as refused:
        client.BatchV1Api(api).create_namespaced_job("default", job)
    assert refused.value.status == 422 and "Job is invalid" in str(refused.value.body)
    assert not kube_api.jobs
    served = {**job, "spec": {**job["spec"], "template": {"spec": {"restartPolicy": "Never",
                                                                   "containers": [{"name": "c", "image": "i"}]}}},
              "status": {"conditions": [{"type": "Failed", "status": "True", "cause": "not a field"}]}}
    kube_api._served(served, "Job")
    assert kube_api.invalid and "bad: Job is invalid" in kube_api.invalid[0], kube_api.invalid
    kube_api.invalid.clear()


# -- Kueue: queue_name, suspended Jobs, priority -----------------------------------------
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def test_a_queued_job_is_created_suspended_and_runs_when_admitted(ddp_deployment, kube_api: FakeKubernetes):
    registry, dataset = ddp_deployment
    op = ddp_full_op(dataset, queue_name="team-a", priority_class_name="training-high")
    thread, out = run_in_thread(op, make_context())
    kube_api.wait_for(lambda: bool(kube_api.jobs) or not thread.is_alive(), timeout=60, what="the Job")
    assert "error" not in out, out
    [job] = [m for m in kube_api.created if m.get("kind") == "Job"]
    assert job["spec"]["suspend"] is True, "queued: Kueue admits it whole"
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert job["spec"]["template"]["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "training-high"
    thread.join(3)
    assert thread.is_alive() and not kube_api.all_pods(), "no pod while the Job waits in the queue"
    kube_api.admit_job()
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["version"] == "1.1" and out["result"]["score"] == 6.0
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_queue_name_from_the_connection_extra_and_bad_values(ddp_deployment, kube_api: FakeKubernetes, monkeypatch):
    registry, dataset = ddp_deployment
    with pytest.raises(ConfigurationError, match=r"queue_name='Team A!' is not a valid Kubernetes label value"):
        ddp_full_op(dataset, queue_name="Team A!")
    with pytest.raises(ConfigurationError, match=r"queue_name='team-a' is for the kubernetes launcher"):
        TrainPipelineOperator(task_id="t", package="ddp", dataset=dataset, queue_name="team-a",
                              launcher="local").execute(make_context())
    extra = json.loads(os.environ["AIRFLOW_CONN_AICENTER_DEFAULT"])["extra"]
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {**extra, "queue_name": "from-the-connection"}}))
    launcher = ddp_full_op(dataset).make_launcher("kubernetes")
    assert launcher.settings.queue_name == "from-the-connection"
    assert ddp_full_op(dataset, queue_name="mine").make_launcher("kubernetes").settings.queue_name == "mine"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {**extra, "queue_name": "-bad-"}}))
    with pytest.raises(ConfigurationError, match=r"the connection's extra queue_name='-bad-' is not a valid"):
        ddp_full_op(dataset).make_launcher("kubernetes")
    assert not kube_api.created


def test_a_single_pod_run_carries_the_queue_label_and_priority(ddp_deployment, kube_api: FakeKubernetes):
    from tests.operators.kube_api import seed_pod

    registry, dataset = ddp_deployment
    op = TrainPipelineOperator(task_id="train", package="ddp", dataset=dataset, queue_name="team-b",
                               priority_class_name="low", install_requirements=False, **FAST)
    pod = seed_pod(op, registry, make_context())
    assert pod["metadata"]["labels"][QUEUE_LABEL] == "team-b"
    assert pod["spec"]["priorityClassName"] == "low"


# -- all-or-nothing starts: startup_timeout -----------------------------------------------
def completion_index(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])


def test_a_gang_not_all_running_within_startup_timeout_fails_naming_the_counts_and_is_removed(ddp_deployment, kube_api):
    """Node 1 is never scheduled (no free GPU node): after startup_timeout the run fails, retryable, and the Job goes."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_aicenter.errors import RunError

    registry, dataset = ddp_deployment
    kube_api.unschedulable = lambda pod: completion_index(pod) == 1
    with pytest.raises(RunError, match=r"1 of 2 nodes running after 4 s") as failed:
        ddp_full_op(dataset, startup_timeout=4).execute(make_context())
    assert not isinstance(failed.value, AirflowFailException), "retryable: capacity may free up"
    assert "node 1: Unschedulable: 0/3 nodes are available" in str(failed.value)
    assert "startup_timeout" in str(failed.value)
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")
    kube_api.wait_for(lambda: not kube_api.pods, timeout=30, what="every pod stopped: no GPU held half-started")
    assert [r.version for r in registry.versions("ddp")] == ["1.0"], "no version"


def test_the_start_clock_is_the_job_s_own_start_time_not_the_worker_s(ddp_deployment, kube_api):
    """A Job the cluster started long ago (a worker that restarted and reattached sees it so) with a node still Pending:
    the synchronous wait fails at once, naming the counts, instead of giving the gang startup_timeout again."""
    from datetime import timedelta

    from airflow_aicenter.errors import RunError
    from tests.operators.kube_api import now, rfc3339

    registry, dataset = ddp_deployment
    kube_api.unschedulable = lambda pod: completion_index(pod) == 1

    def started_long_ago() -> None:
        with kube_api.cond:
            [job] = kube_api.jobs.values()
            job.obj["status"]["startTime"] = rfc3339(now() - timedelta(seconds=600))

    when_job_exists(kube_api, started_long_ago)
    began = time.monotonic()
    with pytest.raises(RunError, match=r"1 of 2 nodes running after 90 s") as failed:
        ddp_full_op(dataset, startup_timeout=90).execute(make_context())
    assert time.monotonic() - began < 45, "failed at once: the Job started 600 s ago, past startup_timeout"
    assert "node 1: Unschedulable" in str(failed.value)
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")
    assert [r.version for r in registry.versions("ddp")] == ["1.0"], "no version"


def first_event(deferred: Any, timeout: float = 30) -> dict[str, Any]:
    """The deferred task's trigger run as the triggerer runs it (rebuilt from what it serialized), to its first event
    (within ``timeout`` seconds)."""
    trigger = rebuilt(deferred.trigger)

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first(), timeout))


def test_a_deferred_gang_not_all_running_within_startup_timeout_fails_naming_the_counts_and_is_removed(ddp_deployment,
                                                                                                      kube_api):
    """The same all-or-nothing start when the wait is deferred: the trigger ends at startup_timeout (it does not wait
    for a Job that cannot run), and the re-entry fails naming the counts and removes the Job."""
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    from airflow_aicenter.errors import RunError

    registry, dataset = ddp_deployment
    kube_api.unschedulable = lambda pod: completion_index(pod) == 1
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        ddp_full_op(dataset, startup_timeout=3, deferrable=True).execute(context)
    event = first_event(deferred.value)
    assert event["status"] == "startup_timeout", event
    with pytest.raises(RunError, match=r"1 of 2 nodes running after 3 s") as failed:
        ddp_full_op(dataset, startup_timeout=3, deferrable=True).trigger_reentry(context, event)
    assert not isinstance(failed.value, AirflowFailException), "retryable: capacity may free up"
    assert "node 1: Unschedulable: 0/3 nodes are available" in str(failed.value)
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")
    kube_api.wait_for(lambda: not kube_api.pods, timeout=30, what="every pod stopped: no GPU held half-started")
    assert [r.version for r in registry.versions("ddp")] == ["1.0"], "no version"


#: startup_timeout of the queued runs: after admission both nodes must start within it on a loaded 2-core machine
#: (``startTime`` has whole seconds, so up to one of them is gone at admission); they wait longer than it in the queue.
QUEUED_STARTUP = 6


def test_a_deferred_queued_job_waits_for_admission_then_runs(ddp_deployment, kube_api: FakeKubernetes):
    """Deferred and queued: time in the queue is not startup time; once admitted the gang starts and the run succeeds;
    the trigger rides out 5xx answers and dropped connections."""
    from airflow.sdk.exceptions import TaskDeferred

    registry, dataset = ddp_deployment
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        ddp_full_op(dataset, queue_name="team-a", startup_timeout=QUEUED_STARTUP, deferrable=True).execute(context)
    threading.Timer(QUEUED_STARTUP + 2, kube_api.admit_job).start()  # past startup_timeout, as Kueue admits it later
    kube_api.fail_next(r"/jobs/[^/]+/status$", 3, 503)  # a flaky API server while the trigger waits
    kube_api.fail_next(r"/jobs/[^/]+/status$", 2, "reset")
    kube_api.fail_next(r"/pods$", 2, 502)
    event = first_event(deferred.value, timeout=90)
    assert event["status"] == "success", event
    assert len(kube_api.faults_served) == 7, kube_api.faults_served
    result = ddp_full_op(dataset, queue_name="team-a", startup_timeout=QUEUED_STARTUP,
                         deferrable=True).trigger_reentry(context, event)
    assert result["version"] == "1.1"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_time_in_the_queue_does_not_count_against_startup_timeout(ddp_deployment, kube_api: FakeKubernetes):
    registry, dataset = ddp_deployment
    thread, out = run_in_thread(ddp_full_op(dataset, queue_name="team-a", startup_timeout=QUEUED_STARTUP), make_context())
    kube_api.wait_for(lambda: bool(kube_api.jobs) or not thread.is_alive(), timeout=60, what="the Job")
    thread.join(QUEUED_STARTUP + 2)  # past the startup_timeout, suspended
    assert thread.is_alive(), out
    kube_api.admit_job()
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["version"] == "1.1"


# -- node 0's log while the run goes on -----------------------------------------------------
WAITING_TRAIN = '''
import os, time

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        rank = os.environ["RANK"]
        print(f"streamed hello from rank {rank}", flush=True)
        print(f"the credential is {os.environ.get('DB_CREDENTIAL', 'unset')}", flush=True)
        deadline = time.time() + 90
        while rank == "0" and not os.path.exists(os.environ["RELEASE"]) and time.time() < deadline:
            time.sleep(0.2)
        print(f"streamed bye from rank {rank}", flush=True)
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("trained")
'''


def test_node_0_log_reaches_the_task_log_while_the_run_goes_on(kube_deployment, kube_api: FakeKubernetes, tmp_path: Path,
                                                               capfd: pytest.CaptureFixture[str]):
    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": WAITING_TRAIN, "requirements.txt": ""}), "slow")
    release = tmp_path / "release"
    op = TrainPipelineOperator(task_id="train", package="slow", dataset=dataset, nodes=2, install_requirements=False,
                               env={"RELEASE": str(release)}, **FAST)
    thread, out = run_in_thread(op, make_context())
    seen = ""
    deadline = time.monotonic() + 90
    while "[node 0 rank 0] streamed hello from rank 0" not in seen and time.monotonic() < deadline and thread.is_alive():
        captured = capfd.readouterr()
        seen += captured.out + captured.err
        time.sleep(0.3)
    alive = thread.is_alive()
    release.write_text("go")
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert alive and "[node 0 rank 0] streamed hello from rank 0" in seen, f"node 0's line before the run ended:\n{seen[-3000:]}"
    captured = capfd.readouterr()
    rest = seen + captured.out + captured.err
    assert "[node 0 rank 0] streamed bye from rank 0" in rest
    assert rest.count("streamed hello from rank 0") == 1, "node 0's log once, not again at the end"


def test_a_deferred_run_streams_node_0_s_log_from_the_trigger_while_the_run_goes_on(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    """Deferred, the trigger follows node 0's log (the triggerer writes a trigger's log into the task log): node 0's
    line is there before the run ends, once, masked; the re-entry does not copy it again."""
    from airflow.sdk.exceptions import TaskDeferred

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": WAITING_TRAIN, "requirements.txt": ""}), "slow")
    release = tmp_path / "release"
    token = "tok-5f0c8e2a9b7d4c1e8f3a6b2d"

    def op() -> TrainPipelineOperator:
        return TrainPipelineOperator(task_id="train", package="slow", dataset=dataset, nodes=2, install_requirements=False,
                                     env={"RELEASE": str(release)}, env_vars={"DB_CREDENTIAL": token}, deferrable=True,
                                     **FAST)

    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        op().execute(context)
    events: list[dict[str, Any]] = []
    triggerer = threading.Thread(target=lambda: events.append(first_event(deferred.value, timeout=120)), daemon=True)
    triggerer.start()
    seen = ""
    deadline = time.monotonic() + 90
    while "[node 0 rank 0] streamed hello from rank 0" not in seen and time.monotonic() < deadline and triggerer.is_alive():
        captured = capfd.readouterr()
        seen += captured.out + captured.err
        time.sleep(0.3)
    waiting = triggerer.is_alive() and not events
    release.write_text("go")
    triggerer.join(120)
    assert waiting and "[node 0 rank 0] streamed hello from rank 0" in seen, f"node 0's line before the end:\n{seen[-3000:]}"
    [event] = events
    assert event["status"] == "success", event
    result = op().trigger_reentry(context, event)
    assert result["version"] == "1.1"
    captured = capfd.readouterr()
    rest = seen + captured.out + captured.err
    assert "[node 0 rank 0] streamed bye from rank 0" in rest
    assert rest.count("streamed hello from rank 0") == 1, "node 0's log once, not again at the end"
    assert "[node 0] [aicenter]" in rest, "node 0's staging and upload lines, relayed by the trigger"
    assert token not in rest and "[node 0 rank 0] the credential is ***" in rest, "masked"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


NOISY_TRAIN = '''
import os, time

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        rank = os.environ["RANK"]
        if rank == "0":
            print("rank 0 trains", flush=True)
            time.sleep(60)  # stopped when node 1 fails the Job
        for i in range(200):
            print(f"node 1 says line {i}", flush=True)
        print(f"the token is {os.environ['SERVICE_TOKEN']}", flush=True)
        raise ValueError("node 1 gives up")
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        pass
'''


def test_a_failed_run_shows_the_other_nodes_last_lines_only_redacted(kube_deployment, kube_api: FakeKubernetes, tmp_path: Path,
                                                                     capfd: pytest.CaptureFixture[str]):
    """Node 1 prints 200 lines, then a token, then fails: the task log gets its last lines (capped), masked, not its
    whole log; node 0's log was streamed as the run went on."""
    from airflow_aicenter.errors import RunError
    from airflow_aicenter.launchers.job import TAIL_LINES

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": NOISY_TRAIN, "requirements.txt": ""}), "noisy")
    token = "tok-5f0c8e2a9b7d4c1e8f3a6b2d"
    op = TrainPipelineOperator(task_id="train", package="noisy", dataset=dataset, nodes=2, install_requirements=False,
                               env_vars={"SERVICE_TOKEN": token}, **FAST)
    with pytest.raises(RunError, match=r"node 1: rank 1: Main.train\(\) raised ValueError: node 1 gives up"):
        op.execute(make_context())
    captured = capfd.readouterr()
    logged = captured.out + captured.err
    assert "[node 0 rank 0] rank 0 trains" in logged, "node 0 streamed"
    node1 = [line[line.index("[node 1] "):] for line in logged.splitlines() if "[node 1] " in line]
    assert any("node 1 says line 199" in line for line in node1), node1[-30:]
    assert not any("node 1 says line 150" in line for line in node1), "the last lines only, not the whole log"
    assert 0 < len(node1) <= 3 * TAIL_LINES, len(node1)
    assert token not in logged, "masked"
    assert any("the token is ***" in line for line in node1), node1[-30:]
    assert "lines of node 1's" in logged


def test_a_deferred_failed_run_gives_the_same_report_node_0_s_lines_and_the_other_nodes_last_lines(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    """Deferred, node 1 fails while node 0 trains: the Job controller stops node 0 and its pod is removed before the
    task re-enters. The task log still gets node 0's lines and node 1's last lines (capped, masked), as the
    synchronous wait gives them: a removed pod's last lines come from its node's outcome record."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_aicenter.errors import RunError
    from airflow_aicenter.launchers.job import TAIL_LINES
    from tests.aicenter_helpers import run_trigger

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": NOISY_TRAIN, "requirements.txt": ""}), "noisy")
    token = "tok-5f0c8e2a9b7d4c1e8f3a6b2d"

    def op() -> TrainPipelineOperator:
        return TrainPipelineOperator(task_id="train", package="noisy", dataset=dataset, nodes=2, install_requirements=False,
                                     env_vars={"SERVICE_TOKEN": token}, deferrable=True, **FAST)

    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        op().execute(context)
    event = run_trigger(deferred.value)  # its log is the task's (the triggerer writes it into the task log)
    assert event["status"] == "error", event
    [job] = kube_api.jobs.values()
    kube_api.wait_for(lambda: not any(p.key in job.pods for p in kube_api.pods.values()
                                      if p.obj["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"),
                      timeout=30, what="node 0's pod removed by the Job controller")
    with pytest.raises(RunError, match=r"node 1: rank 1: Main.train\(\) raised ValueError: node 1 gives up"):
        op().trigger_reentry(context, event)
    captured = capfd.readouterr()
    logged = captured.out + captured.err
    assert logged.count("node 1 says line 199") == 1, "relayed once (by the trigger), not again on re-entry"
    node0 = [line for line in logged.splitlines() if "[node 0" in line]
    assert any("rank 0 trains" in line for line in node0), f"node 0's lines are in the task log:\n{logged[-3000:]}"
    node1 = [line[line.index("[node 1] "):] for line in logged.splitlines() if "[node 1] " in line]
    assert any("node 1 says line 199" in line for line in node1), node1[-30:]
    assert not any("node 1 says line 150" in line for line in node1), "the last lines only, not the whole log"
    assert 0 < len(node1) <= 3 * TAIL_LINES, len(node1)
    assert token not in logged, "masked"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


# -- disruptions: an evicted node is a retryable failure; the retry resumes from the checkpoint ----
CHECKPOINT_DDP = '''
import json, os, time

class Main:
    def __init__(self):
        self.state = os.path.join(os.environ["checkpoint_directory"], "state.json")
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        if os.environ["RANK"] == "0":
            epoch = json.load(open(self.state))["epoch"] if os.path.exists(self.state) else 0
            with open(os.path.join(os.environ["artifacts_directory"], "resumed.txt"), "w") as fh:
                fh.write(str(epoch))
            json.dump({"epoch": epoch + 1}, open(self.state, "w"))
        time.sleep(float(os.environ["HOLD"]))  # the first try is disrupted while it trains
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("trained")
'''


def test_an_evicted_node_is_a_retryable_failure_naming_it_and_the_retry_resumes_from_the_checkpoint(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path):
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_aicenter.errors import RunError
    from airflow_aicenter.records import Outcome, read

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": CHECKPOINT_DDP, "requirements.txt": ""}), "ck")

    def op(hold: str) -> TrainPipelineOperator:
        return TrainPipelineOperator(task_id="train", package="ck", dataset=dataset, nodes=2, install_requirements=False,
                                     checkpoint_interval=1, env={"HOLD": hold}, **FAST)

    thread, out = run_in_thread(op("60"), make_context())

    def synced() -> bool:
        return any("periodic checkpoint" in line for p in kube_api.all_pods() for _, name, line in p.log if name == "sync")

    kube_api.wait_for(lambda: synced() or not thread.is_alive(), timeout=90, what="node 0's first checkpoint sync")
    assert thread.is_alive(), out
    kube_api.disrupt(1, reason="EvictionByEvictionAPI", message="Eviction API: evicting")
    thread.join(120)
    error = out.get("error")
    assert isinstance(error, RunError) and not isinstance(error, AirflowFailException), repr(error)
    assert re.search(r"node 1 \(pod aicenter-train-\w+-1-\w+\) was disrupted on node fake-node \(EvictionByEvictionAPI: "
                     r"Eviction API: evicting\)", str(error)), str(error)
    assert "resumes from the latest checkpoint" in str(error)
    kube_api.wait_for(lambda: not kube_api.jobs, timeout=30, what="the failed Job removed")

    # the task's retry (try 2): resumes from try 1's checkpoint and makes the version
    result = op("0").execute(make_context(try_number=2))
    run = registry.get("ck", result["version"]).run
    assert run.try_number == 2
    assert registry.store.get_bytes(f"{run.prefix}/artifacts/resumed.txt").decode() == "1", "resumed from try 1's checkpoint"
    second = read(registry.store, f"{run.prefix}/outcome.json", Outcome)
    assert second.checkpoint is not None and second.checkpoint["resumed_from_try"] == 1


def test_a_deferred_run_whose_node_is_preempted_and_deleted_is_a_retryable_disruption_naming_it(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path):
    """Deferred: node 1's pod is preempted and deleted while the trigger waits. The re-entry (a fresh operator, no pod
    left to read) fails retryable naming node 1, its pod and the machine it ran on, as the synchronous wait does."""
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    from airflow_aicenter.errors import RunError

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": CHECKPOINT_DDP, "requirements.txt": ""}), "ck")

    def op() -> TrainPipelineOperator:
        return TrainPipelineOperator(task_id="train", package="ck", dataset=dataset, nodes=2, install_requirements=False,
                                     env={"HOLD": "60"}, deferrable=True, **FAST)

    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        op().execute(context)
    events: list[dict[str, Any]] = []
    triggerer = threading.Thread(target=lambda: events.append(first_event(deferred.value, timeout=120)), daemon=True)
    triggerer.start()

    def training() -> bool:
        return sum(1 for p in kube_api.pods.values() for c in p.containers
                   if c.name == "base" and c.process is not None and c.exit_code is None) == 2

    kube_api.wait_for(lambda: training() or not triggerer.is_alive(), timeout=90, what="both nodes training")
    pod = kube_api.disrupt(1, reason="PreemptionByScheduler", message="Preempted in order to admit critical pod", gone=True)
    triggerer.join(120)
    [event] = events
    assert event["status"] == "error", event
    kube_api.wait_for(lambda: not kube_api.pods, timeout=30, what="every pod of the failed Job gone")
    with pytest.raises(RunError) as failed:
        op().trigger_reentry(context, event)
    assert not isinstance(failed.value, AirflowFailException), "retryable"
    name = pod.key[1]
    assert f"node 1 (pod {name}) was disrupted on node fake-node (DisruptionTarget" in str(failed.value), str(failed.value)
    assert "resumes from the latest checkpoint" in str(failed.value)
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_a_node_preempted_and_deleted_is_named_as_a_retryable_disruption(kube_deployment, kube_api: FakeKubernetes,
                                                                        tmp_path: Path):
    """Node 1's pod is preempted and deleted while the run trains: nobody can read it afterwards. The Job's
    podFailurePolicy fails the Job at once on its DisruptionTarget (no half-restarted gang), and the run fails as a
    retryable disruption naming the node, its pod and the machine it ran on."""
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_aicenter.errors import RunError

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": CHECKPOINT_DDP, "requirements.txt": ""}), "ck")
    op = TrainPipelineOperator(task_id="train", package="ck", dataset=dataset, nodes=2, install_requirements=False,
                               env={"HOLD": "60"}, **FAST)
    thread, out = run_in_thread(op, make_context())

    def training() -> bool:
        return sum(1 for p in kube_api.pods.values() for c in p.containers
                   if c.name == "base" and c.process is not None and c.exit_code is None) == 2

    kube_api.wait_for(lambda: training() or not thread.is_alive(), timeout=90, what="both nodes training")
    assert thread.is_alive(), out
    pod = kube_api.disrupt(1, reason="PreemptionByScheduler", message="Preempted in order to admit critical pod", gone=True)
    thread.join(120)
    error = out.get("error")
    assert isinstance(error, RunError) and not isinstance(error, AirflowFailException), repr(error)
    name = pod.key[1]
    assert f"node 1 (pod {name}) was disrupted on node fake-node (DisruptionTarget" in str(error), str(error)
    assert "resumes from the latest checkpoint" in str(error)
    [job] = [m for m in kube_api.created if m.get("kind") == "Job"]
    assert job["spec"]["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    kube_api.wait_for(lambda: not kube_api.jobs, timeout=30, what="the failed Job removed")


def test_an_api_server_down_past_the_retry_budget_keeps_the_job_and_the_retry_reattaches(ddp_deployment, kube_api, monkeypatch):
    """The API answers 503 for longer than the budget: the task fails retryable and the Job runs on; try 2 waits for
    it (still running) or completes its run (ended meanwhile), and removes it either way."""
    from airflow_aicenter.launchers import kube_retry

    registry, dataset = ddp_deployment
    monkeypatch.setattr(kube_retry, "BUDGET", 2.0)
    faults: list[Any] = []
    watcher = when_job_exists(kube_api, lambda: faults.append(kube_api.fail_next(JOB_PATH, 10_000, 503)))
    with pytest.raises(kube_retry.KubernetesUnavailable, match=r"the Kubernetes API failed to read Job .* for 2 s"):
        ddp_full_op(dataset).execute(make_context())
    watcher.join(5)
    assert kube_api.jobs, "the Job was not deleted because reads failed"
    assert not [p for m, p in kube_api.requests if m == "DELETE" and "/jobs/" in p]
    faults[0].count = 0  # the API server is back
    result = ddp_full_op(dataset).execute(make_context(try_number=2))
    assert result["version"] == "1.1" and result["score"] == 6.0
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1, "try 1's Job was not started again"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_a_deferred_wait_past_the_retry_budget_keeps_the_job_and_the_retry_waits_for_it(ddp_deployment, kube_api,
                                                                                          monkeypatch):
    """The trigger's reads answer 503 for longer than the budget: the trigger fails retryable (KubernetesUnavailable) and
    the Job runs on, untouched; try 2 waits for that same Job (defers to it) or, its run ended meanwhile, completes it."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_aicenter.launchers import kube_retry

    registry, dataset = ddp_deployment
    monkeypatch.setattr(kube_retry, "BUDGET", 2.0)
    with pytest.raises(TaskDeferred) as deferred:
        ddp_full_op(dataset, deferrable=True).execute(make_context())
    fault = kube_api.fail_next(r"/jobs/[^/]+/status$", 10_000, 503)
    with pytest.raises(kube_retry.KubernetesUnavailable, match=r"the Kubernetes API failed to read Job .* for 2 s"):
        first_event(deferred.value)
    assert kube_api.jobs, "the Job was not deleted because reads failed"
    assert not [p for m, p in kube_api.requests if m == "DELETE" and "/jobs/" in p]
    fault.count = 0  # the API server is back
    context = make_context(try_number=2)
    try:
        result = ddp_full_op(dataset, deferrable=True).execute(context)
    except TaskDeferred as again:
        event = first_event(again, timeout=90)
        assert event["status"] == "success", event
        result = ddp_full_op(dataset, deferrable=True).trigger_reentry(context, event)
    assert result["version"] == "1.1" and result["score"] == 6.0
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1, "try 1's Job was not started again"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_an_evicted_single_pod_is_a_retryable_failure_naming_its_node(kube_deployment, kube_api: FakeKubernetes,
                                                                      tmp_path: Path):
    from airflow.sdk.exceptions import AirflowFailException

    from airflow_aicenter.errors import RunError

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": CHECKPOINT_DDP, "requirements.txt": ""}), "one")
    op = TrainPipelineOperator(task_id="train", package="one", dataset=dataset, install_requirements=False,
                               env={"HOLD": "60"}, **FAST)
    thread, out = run_in_thread(op, make_context())

    def training() -> bool:
        return any(c.name == "base" and c.process is not None and c.exit_code is None for p in kube_api.pods.values()
                   for c in p.containers)

    kube_api.wait_for(lambda: training() or not thread.is_alive(), timeout=90, what="the pod's user container")
    assert thread.is_alive(), out
    kube_api.disrupt(reason="PreemptionByScheduler", message="Preempted in order to admit critical pod")
    thread.join(120)
    error = out.get("error")
    assert isinstance(error, RunError) and not isinstance(error, AirflowFailException), repr(error)
    assert "the pod was disrupted on node fake-node (PreemptionByScheduler: Preempted in order to admit critical pod)" in str(
        error), str(error)
    assert "resumes from the latest checkpoint" in str(error)


# -- on_kill: the Job goes, the run says killed --------------------------------------------
@pytest.mark.parametrize("when", ["pending", "while the Job is created"])
def test_on_kill_removes_the_job_revokes_its_credentials_and_records_the_run_as_killed(
        when: str, kube_s3_deployment, kube_api: FakeKubernetes):
    """on_kill of a distributed run: the Job and its Service are deleted (the Job only on a terminal state, kill or
    timeout), the per-run credentials revoked, the run recorded ``killed`` and the task's error says so (not that the
    Job disappeared). ``while the Job is created``: on_kill comes while the create is in flight (the test API server
    holds it), so it finds nothing to delete; the launch path removes the Job it then creates."""
    from airflow_aicenter.errors import RunError
    from airflow_aicenter.layout import OUTCOME
    from airflow_aicenter.records import Outcome, read_optional

    registry, dataset = kube_s3_deployment
    kube_api.start_delay = 60.0  # every node Pending until deleted
    held = kube_api.hold_next(r"/jobs$", method="POST") if when != "pending" else None
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, nodes=2, install_requirements=False,
                               **FAST)
    thread, out = run_in_thread(op, make_context())
    if held is not None:
        assert held.reached.wait(60), out
    else:
        kube_api.wait_for(lambda: len(kube_api.pods) == 2 or not thread.is_alive(), timeout=60, what="the Job's pods")
    assert thread.is_alive(), out
    [secret] = list(kube_api.secrets)
    run = op.launcher_in_use.pod_run.run  # type: ignore[union-attr]
    op.on_kill()
    if held is not None:
        held.release.set()
    thread.join(60)
    assert not thread.is_alive()
    error = out.get("error")
    assert isinstance(error, RunError) and " killed: killed by Airflow (task stopped) during start-up" in str(error), \
        out.get("traceback")
    outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    assert outcome is not None and outcome.status == "killed", outcome
    assert secret not in kube_api.secrets, "the run's credentials are revoked"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services and not kube_api.pods, timeout=30,
                      what="the Job, its Service and its pods removed")
    assert [r.version for r in registry.versions("rows")] == ["1.0"], "no version"


def test_a_deferred_run_killed_by_a_user_has_its_job_and_credentials_removed_by_the_trigger(
        kube_s3_deployment, kube_api: FakeKubernetes):
    """A deferred task marked failed or cleared gets no on_kill of its own (no worker holds it): Airflow 3.3 calls its
    trigger's on_kill instead, which removes the Job, its Service and its pods and revokes the run's credentials. Every
    node was still Pending, so no agent recorded the ending: the trigger records the run ``killed``, as the operator's
    on_kill does."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_aicenter.layout import OUTCOME
    from airflow_aicenter.records import Outcome, read_optional

    registry, dataset = kube_s3_deployment
    kube_api.start_delay = 60.0  # every node Pending until deleted
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, nodes=2, install_requirements=False,
                               deferrable=True, **FAST)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context())
    kube_api.wait_for(lambda: len(kube_api.pods) == 2, timeout=60, what="the Job's pods")
    [secret] = list(kube_api.secrets)
    run = op.launcher_in_use.pod_run.run  # type: ignore[union-attr]
    assert read_optional(registry.store, run.key(OUTCOME), Outcome) is None, "no node started"
    trigger = rebuilt(deferred.value.trigger)  # from what it serialized, as the triggerer makes it
    asyncio.run(trigger.on_kill())
    assert secret not in list(kube_api.secrets), "the run's credentials are revoked"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services and not kube_api.pods, timeout=30,
                      what="the Job, its Service and its pods removed")
    outcome = read_optional(registry.store, run.key(OUTCOME), Outcome)
    assert outcome is not None and outcome.status == "killed", outcome
    assert outcome.error == "killed by Airflow (task stopped) during start-up", outcome.error
    asyncio.run(trigger.on_kill())  # twice (a cancel retried) is harmless: nothing left to remove


# -- reattach through Airflow's task state store --------------------------------------------
def test_a_killed_worker_s_next_try_reattaches_to_the_job_named_in_the_task_state_store(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Try 1's worker is killed (SIGKILL) after creating the Job; meanwhile the connection's namespace changed, so a
    lookup by name in the namespace of today finds nothing. Try 2 reads the Job's identity (name, namespace, uid)
    from the task state store and waits for that Job: one Job created in all."""
    from airflow.sdk.execution_time import task_runner

    from tests.operators.kube_api import StateStoreComms, kill_worker_once_stored

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": WAITING_TRAIN, "requirements.txt": ""}), "slow")
    store, release = tmp_path / "task-state.json", tmp_path / "release"
    op_args: dict[str, Any] = {"package": "slow", "dataset": dataset, "nodes": 2, "install_requirements": False,
                               "env": {"RELEASE": str(release)}}
    kill_worker_once_stored(store, "aicenter_job", **op_args)
    [(namespace, name)] = list(kube_api.jobs)
    assert namespace == "default", "the Job runs on without its worker"
    comms = StateStoreComms(store)
    [ti_id] = json.loads(store.read_text())["tis"]
    stored = comms.values(ti_id)["aicenter_job"]
    assert stored == {"name": name, "namespace": "default", "uid": kube_api.jobs[(namespace, name)].obj["metadata"]["uid"]}

    for key, value in kube_api.connection_env("team-b").items():  # new runs go to another namespace now
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
    seen = len(kube_api.requests)
    thread, out = run_in_thread(TrainPipelineOperator(task_id="train", **FAST, **op_args),
                                make_context(try_number=2, state_store=store))
    kube_api.wait_for(lambda: any(m == "GET" and f"/namespaces/default/jobs/{name}" in p for m, p in kube_api.requests[seen:])
                      or not thread.is_alive(), timeout=60, what="try 2 looking at try 1's Job")
    release.write_text("go")
    thread.join(120)
    assert "error" not in out, out.get("error")
    assert out["result"]["version"] == "1.1"
    assert registry.get("slow", "1.1").run.try_number == 1, "try 1's run, waited for by try 2"
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1, "try 2 reattached: no second Job"
    assert not [p for m, p in kube_api.requests if m == "POST" and "/namespaces/team-b/" in p]
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_a_run_that_ended_while_no_worker_watched_has_its_job_removed_where_the_task_state_store_says(
        kube_deployment, kube_api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Try 1's worker is killed; its run goes on and succeeds meanwhile; the namespace of new runs changed. Try 2
    completes try 1's run from its outcome and removes the ended Job from the namespace the task state store names
    (a look by name in today's namespace would leave it there for good)."""
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.context import set_current_context

    from airflow_aicenter.records import Outcome, read_optional
    from tests.operators.kube_api import StateStoreComms, kill_worker_once_stored

    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": WAITING_TRAIN, "requirements.txt": ""}), "slow")
    store, release = tmp_path / "task-state.json", tmp_path / "release"
    op_args: dict[str, Any] = {"package": "slow", "dataset": dataset, "nodes": 2, "install_requirements": False,
                               "env": {"RELEASE": str(release)}}
    kill_worker_once_stored(store, "aicenter_job", **op_args)
    release.write_text("go")  # the run finishes with no worker watching
    [(namespace, name)] = list(kube_api.jobs)
    key = "runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/train/1/outcome.json"
    kube_api.wait_for(lambda: (o := read_optional(registry.store, key, Outcome)) is not None and o.status == "succeeded",
                      timeout=90, what="try 1's run to succeed")
    kube_api.wait_for(lambda: any(c["type"] == "Complete" for c in kube_api.jobs[(namespace, name)].obj["status"].get(
        "conditions", [])), timeout=30, what="the Job to complete")

    for k, value in kube_api.connection_env("team-b").items():
        monkeypatch.setenv(k, value)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", StateStoreComms(store), raising=False)
    context = make_context(try_number=2, state_store=store)
    with set_current_context(context):  # as the task runner sets it around execute
        result = TrainPipelineOperator(task_id="train", **FAST, **op_args).execute(context)
    assert result["version"] == "1.1" and result["run_uri"].endswith("/train/1")
    assert len([m for m in kube_api.created if m.get("kind") == "Job"]) == 1
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="try 1's Job removed")


@pytest.mark.parametrize("entry", [{"name": "aicenter-train-gone", "namespace": "default", "uid": "0000"}, "not an identity"],
                         ids=["gone", "malformed"])
def test_a_task_state_store_entry_for_no_job_falls_back_to_the_name_and_is_replaced(
        ddp_deployment, kube_api: FakeKubernetes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: Any):
    from airflow.sdk.execution_time import task_runner

    from tests.operators.kube_api import StateStoreComms

    registry, dataset = ddp_deployment
    store = tmp_path / "task-state.json"
    comms = StateStoreComms(store)
    monkeypatch.setattr(task_runner, "SUPERVISOR_COMMS", comms, raising=False)
    context = make_context(state_store=store)
    context["task_state_store"].set("aicenter_job", entry)  # an earlier try's, whose Job was removed since
    result = ddp_full_op(dataset).execute(context)
    assert result["version"] == "1.1"
    [job] = [m for m in kube_api.created if m.get("kind") == "Job"]
    stored = context["task_state_store"].get("aicenter_job")
    assert stored["name"] == job["metadata"]["name"] and stored["namespace"] == "default" and stored["uid"]
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_transient_errors_of_both_kubernetes_clients_are_retried_within_the_budget():
    """The synchronous client's and the trigger's (kubernetes_asyncio, aiohttp) transient errors are retried; others
    are raised at once; past the budget the call fails retryable, naming what it tried."""
    import aiohttp
    from kubernetes.client.exceptions import ApiException
    from kubernetes_asyncio.client.exceptions import ApiException as AsyncApiException

    from airflow_aicenter.launchers import kube_retry

    assert kube_retry.transient(AsyncApiException(status=503)) and kube_retry.transient(ApiException(status=429))
    assert kube_retry.transient(aiohttp.ServerDisconnectedError()) and kube_retry.transient(ConnectionResetError())
    assert not kube_retry.transient(AsyncApiException(status=404)) and not kube_retry.transient(ValueError("no"))
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise AsyncApiException(status=503, reason="Service Unavailable")
        return "read"

    assert asyncio.run(kube_retry.acall(flaky, what="read the Job", budget=10)) == "read" and len(calls) == 3

    async def down() -> str:
        raise aiohttp.ClientConnectionError("refused")

    with pytest.raises(kube_retry.KubernetesUnavailable, match=r"failed to read the Job for 1 s \(\d+ tries, last: "
                                                               r"ClientConnectionError: refused\)"):
        asyncio.run(kube_retry.acall(down, what="read the Job", budget=1))

    async def missing() -> str:
        raise AsyncApiException(status=404, reason="Not Found")

    with pytest.raises(AsyncApiException):
        asyncio.run(kube_retry.acall(missing, what="read the Job", budget=10))


def test_the_retry_waits_are_read_from_the_environment_and_a_bad_one_is_refused(monkeypatch: pytest.MonkeyPatch):
    """AICENTER_KUBE_RETRY_FIRST_WAIT / _MAX_WAIT set the pauses between tries (docs/kubernetes.md); a value that is
    no number of seconds above 0 fails the call as a configuration error naming the variable, never a silent default."""
    from kubernetes.client.exceptions import ApiException

    from airflow_aicenter.launchers import kube_retry

    class Warnings:
        def __init__(self) -> None:
            self.pauses: list[float] = []

        def warning(self, msg: str, *args: Any) -> None:
            self.pauses.append(float(args[-1]))

    def flaky_until(n: int) -> Any:
        calls: list[int] = []

        def read() -> str:
            calls.append(1)
            if len(calls) <= n:
                raise ApiException(status=503, reason="Service Unavailable")
            return "read"
        return read

    monkeypatch.delenv("AICENTER_KUBE_RETRY_FIRST_WAIT", raising=False)
    monkeypatch.delenv("AICENTER_KUBE_RETRY_MAX_WAIT", raising=False)
    log = Warnings()
    assert kube_retry.call(flaky_until(1), what="read the Job", log=log) == "read"
    assert 0.25 <= log.pauses[0] <= 0.5, log.pauses  # the default first wait: 0.5 s, jittered down to half
    monkeypatch.setenv("AICENTER_KUBE_RETRY_FIRST_WAIT", "0.02")
    monkeypatch.setenv("AICENTER_KUBE_RETRY_MAX_WAIT", "0.04")
    log = Warnings()
    assert kube_retry.call(flaky_until(4), what="read the Job", log=log) == "read"
    assert len(log.pauses) == 4 and 0.01 <= log.pauses[0] <= 0.02 and max(log.pauses) <= 0.04, log.pauses
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("AICENTER_KUBE_RETRY_MAX_WAIT", bad)
        with pytest.raises(ConfigurationError, match=r"AICENTER_KUBE_RETRY_MAX_WAIT=.* is not a number of seconds above 0"):
            kube_retry.call(flaky_until(0), what="read the Job")
