"""Distributed runs on the Kubernetes launcher: an Indexed Job of 2 nodes x 2 processes and its headless Service.

The operator runs in this process with a hand-made task context; the test API server runs the
Job controller (one pod per completion index, with hostname, subdomain and JOB_COMPLETION_INDEX;
node 0's stable name resolves to this host) and validates every manifest against the
Kubernetes schemas. The ranks do a real TCP rendezvous on MASTER_ADDR/MASTER_PORT.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_aicenter.errors import ConfigurationError, RunError
from airflow_aicenter.launchers.job import JobLauncher, job_name
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Results, read
from airflow_aicenter.registry import Registry
from tests.aicenter_helpers import run_trigger
from tests.operators.conftest import ddp_full_op
from tests.operators.kube_api import FakeKubernetes, make_context


def calls(registry: Registry, prefix: str, folder: str = "") -> list[dict[str, Any]]:
    raw = registry.store.get_bytes(f"{prefix}/artifacts/{folder}calls.jsonl").decode()
    return [json.loads(line) for line in raw.splitlines()]


def test_two_nodes_of_two_processes_train_together(ddp_deployment, kube_api: FakeKubernetes, capfd: pytest.CaptureFixture[str]):
    registry, dataset = ddp_deployment
    context = make_context()
    result = ddp_full_op(dataset).execute(context)
    # node 0's staging and upload logs reach the task log line by line (they came as one "b'...\\n...'" string);
    # a run that succeeded leaves the other nodes' logs out
    captured = capfd.readouterr()
    logged = (captured.out + captured.err).splitlines()
    node_lines = [line[line.index("[node 0] "):] for line in logged if "[node 0] " in line]
    assert any("[aicenter]" in line for line in node_lines), node_lines[:5]
    assert not any(line.startswith("[node 0] b'") or "\\n" in line for line in node_lines), node_lines[:5]
    assert not any("[node 1] " in line for line in logged)
    assert any("the logs of nodes 1 to 1 are not copied" in line for line in logged)

    assert result["version"] == "1.1" and result["score"] == 6.0, "rank 0 summed the ranks 0+1+2+3 over TCP"
    record = registry.get("ddp", "1.1")
    results = read(registry.store, f"{record.run.prefix}/_results.json", Results)
    assert results.aicenter["distributed"] == {"nodes": 2, "procs_per_node": 2, "world_size": 4}
    # the Job and the Service as sent (validated against the schemas by the server)
    [job] = [m for m in kube_api.created if m.get("kind") == "Job"]
    [service] = [m for m in kube_api.created if m.get("kind") == "Service"]
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None"
    template = job["spec"]["template"]["spec"]
    assert [c["name"] for c in template["initContainers"]] == ["stage"]
    assert [c["name"] for c in template["containers"]] == ["base", "sync"], "the same three containers as a single pod"
    env = {e["name"]: e.get("value") for e in template["initContainers"][0]["env"]}
    assert env["AICENTER_MASTER_ADDR"] == f"{name}-0.{name}"
    assert env["AICENTER_WORKER_HOSTS"] == f"{name}-0.{name},{name}-1.{name}"
    base_env = {e["name"] for e in template["containers"][0]["env"]}
    assert not any(k.startswith("AWS_") or k == "AICENTER_RUN_SPEC" for k in base_env)
    assert template["automountServiceAccountToken"] is False
    # every rank's view: torchrun's and ModelArts' variables
    prefix = record.run.prefix
    rank0, rank3 = calls(registry, prefix), calls(registry, prefix, "rank-3/")
    assert [c["event"] for c in rank0] == ["__init__", "process_data", "__init__", "train", "evaluate", "save"]
    assert [c["event"] for c in rank3] == ["__init__", "train"]
    env3 = rank3[0]["env"]
    assert (env3["RANK"], env3["LOCAL_RANK"], env3["NODE_RANK"], env3["WORLD_SIZE"], env3["MA_NUM_HOSTS"]) == ("3", "1", "1", "4", "2")
    assert env3["VC_WORKER_HOSTS"] == f"{name}-0.{name},{name}-1.{name}" or env3["VC_WORKER_HOSTS"] == "127.0.0.1,127.0.0.1"
    # removed at the end
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_a_failing_rank_on_node_1_fails_the_task_naming_it(ddp_deployment, kube_api: FakeKubernetes):
    registry, dataset = ddp_deployment
    with pytest.raises(RunError, match=r"node 1: rank 3: Main.train\(\) raised ValueError: rank 3 refuses to train"):
        ddp_full_op(dataset, env={"FAIL_RANK": "3"}).execute(make_context())
    assert [r.version for r in registry.versions("ddp")] == ["1.0"], "no version"
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_deferrable_job_completes_on_reentry(ddp_deployment, kube_api: FakeKubernetes):
    registry, dataset = ddp_deployment
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        ddp_full_op(dataset, deferrable=True).execute(context)
    event = run_trigger(deferred.value)
    assert event["status"] == "success" and event["name"].startswith("aicenter-train-")
    result = ddp_full_op(dataset, deferrable=True).trigger_reentry(context, event)  # a fresh operator, as after deserialisation
    assert result["version"] == "1.1" and result["score"] == 6.0
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_a_deferred_run_that_failed_shows_every_node_s_last_lines(ddp_deployment, kube_api: FakeKubernetes,
                                                                  capfd: pytest.CaptureFixture[str]):
    """Deferred: when the run failed, the trigger (whose log the triggerer writes into the task log) copies the last
    lines of every other node as it sees the Job fail (node 1's failing rank among them), not whole logs; the
    re-entry does not copy them again."""
    from airflow_aicenter.launchers.job import TAIL_LINES

    registry, dataset = ddp_deployment
    context = make_context()
    with pytest.raises(TaskDeferred) as deferred:
        ddp_full_op(dataset, deferrable=True, env={"FAIL_RANK": "3"}).execute(context)
    capfd.readouterr()
    event = run_trigger(deferred.value)
    assert event["status"] == "error"
    with pytest.raises(RunError, match=r"node 1: rank 3: Main.train\(\) raised ValueError: rank 3 refuses to train"):
        ddp_full_op(dataset, deferrable=True, env={"FAIL_RANK": "3"}).trigger_reentry(context, event)
    captured = capfd.readouterr()
    logged = (captured.out + captured.err).splitlines()
    node1 = [line for line in logged if "[node 1] " in line]
    assert any("rank 3 refuses to train" in line for line in node1), node1[-20:]
    assert 0 < len(node1) <= 3 * TAIL_LINES
    kube_api.wait_for(lambda: not kube_api.jobs and not kube_api.services, timeout=30, what="Job and Service removal")


def test_multi_node_refusals_before_anything_is_created(ddp_deployment, kube_api: FakeKubernetes, monkeypatch):
    registry, dataset = ddp_deployment
    with pytest.raises(ConfigurationError, match="nodes=0 is not valid"):
        TrainPipelineOperator(task_id="t", package="ddp", dataset=dataset, nodes=0)
    with pytest.raises(ConfigurationError, match="procs_per_node=0 is not valid"):
        TrainPipelineOperator(task_id="t", package="ddp", dataset=dataset, procs_per_node=0)
    with pytest.raises(ConfigurationError, match="nodes=2 needs several machines"):
        TrainPipelineOperator(task_id="t", package="ddp", dataset=dataset, nodes=2, launcher="local").execute(make_context())
    assert not kube_api.created


def test_job_names_are_dns_labels_per_task_instance():
    from airflow_aicenter.records import RunRef

    a = RunRef(dag_id="d", run_id="manual__2026", task_id="Train_Model.step", try_number=1)
    b = a.model_copy(update={"try_number": 2})
    c = a.model_copy(update={"map_index": 3})
    assert job_name(a) == job_name(b) != job_name(c)
    assert len(job_name(a)) <= 52 and job_name(a).startswith("aicenter-train-model-step-")
    assert isinstance(JobLauncher, type)
