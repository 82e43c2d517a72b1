"""Per-run STS credentials for pods (``runtime_role_arn``), in-process against the test API server and moto.

The worker assumes the role through the AWS connection (moto's STS) with the run's session
policy, puts the credentials into a per-run Secret, and the pod reaches S3 with them through
``secretKeyRef``: no credential is in the pod spec, and the Secret is gone after the run.
What the session policy allows is tested against moto with IAM access control in
tests/security/test_run_credentials.py.
"""

from __future__ import annotations

import json

import pytest

from airflow_aicenter.launchers.pod import credentials_secret_name
from airflow_aicenter.operators import TrainPipelineOperator
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.operators.test_kubernetes_launcher import FAST

ROLE = "arn:aws:iam::123456789012:role/aicenter-runtime"
CONN_PASSWORD = "aws-conn-password-not-for-pods"


def test_a_pod_gets_its_own_session_credentials_through_a_per_run_secret(kube_s3_deployment, kube_api: FakeKubernetes):
    registry, dataset = kube_s3_deployment
    context = make_context()
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, install_requirements=False, **FAST)
    result = op.execute(context)
    assert result["version"] == "1.1"

    [secret] = kube_api.secret_manifests
    run = registry.get("rows", "1.1").run
    assert secret["metadata"]["name"] == credentials_secret_name(run)
    values = secret["stringData"]
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    [pod] = kube_api.all_pods()
    containers = {c.name: c for c in [*pod.init, *pod.containers]}
    assert set(containers) == {"stage", "base", "sync"}
    for name in ("stage", "sync"):
        assert containers[name].env["AWS_SESSION_TOKEN"] == values["AWS_SESSION_TOKEN"], "stage and sync reach S3 with them"
        [spec] = [c for c in [*pod.obj["spec"]["initContainers"], *pod.obj["spec"]["containers"]] if c["name"] == name]
        env = {e["name"]: e for e in spec["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert not {k for k in containers["base"].env if k.startswith("AWS_")}, "the user container holds no store credential"
    sent = kube_api.everything_sent()
    for value in (*values.values(), CONN_PASSWORD, "testing"):
        assert f'"{value}"' not in sent, "no credential in any pod manifest"
    assert (pod.key[0], secret["metadata"]["name"]) not in kube_api.secrets, "the run's Secret is deleted after the run"


def test_a_role_the_worker_cannot_name_fails_before_any_pod(kube_s3_deployment, kube_api: FakeKubernetes, monkeypatch):
    from airflow_aicenter.errors import ConfigurationError

    registry, dataset = kube_s3_deployment
    extra = {"storage": registry.store.uri, "launcher": "kubernetes", "image": "aicenter-runtime:test", "aws_conn_id": "aws_moto",
             "runtime_role_arn": "not-an-arn"}
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": extra}))
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, **FAST)
    with pytest.raises(ConfigurationError, match="runtime_role_arn"):
        op.execute(make_context())
    assert not [m for m in kube_api.created if m.get("kind") == "Pod"]
