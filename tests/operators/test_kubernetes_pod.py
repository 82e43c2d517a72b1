"""The training pod's manifest, offline: built by the real operator, validated by Kubernetes' OpenAPI schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.pod import PodRun, refuse_secret_env
from airflow_aicenter.launchers.pod_spec import (
    ANNOTATION_RUN,
    DATASET_MOUNT,
    SPEC_ENV,
    SUPERVISOR_COMMAND,
    WORK_MOUNT,
    label_value,
)
from airflow_aicenter.operators import FullPipelineOperator, TrainPipelineOperator
from airflow_aicenter.records import BlobRef, RunRef, RunSpec
from tests.operators.kube_api import make_context

#: Validated against the oldest supported-ish and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.33", kubernetes_validate.latest_version())
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
AWS_PASSWORD = "aws-conn-s3cr3t-password"


pytestmark = pytest.mark.usefixtures("connections")


def s3_connections(monkeypatch: pytest.MonkeyPatch, **extra: Any) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": "s3://ml-bucket/aicenter", "aws_conn_id": "aws_ml",
                                            "image": "registry.example.com/aicenter-runtime:0.1.0", **extra}}))
    monkeypatch.setenv("AIRFLOW_CONN_AWS_ML", json.dumps(
        {"conn_type": "aws", "login": "AKIAWORKERKEY", "password": AWS_PASSWORD,
         "extra": {"endpoint_url": "https://s3.internal.example.com", "region_name": "eu-west-3"}}))


def spec_for(op: Any, *, storage: str = "file:///srv/aicenter") -> RunSpec:
    return RunSpec(pipeline=op.plan.name, storage=storage, run_prefix="runs/aicenter_k8s/manual__2026-03-01/train/1",
                   package=op.package, version="1.0", blob=BlobRef(sha256="ab" * 32, size=10), dataset=op.dataset,
                   env={k: v for k, v in op.env.items()}, gpu=op.gpu,
                   dataset_mount=DATASET_MOUNT if op.dataset_volume_claim else None, install_requirements=True)


def manifest(op: Any, *, storage: str = "file:///srv/aicenter") -> dict[str, Any]:
    """What execute() sends to the API server (minus the in-cluster probe), as JSON."""
    context = make_context()
    launcher = op.make_launcher("kubernetes")
    launcher.pod_run = PodRun(spec=spec_for(op, storage=storage), run=RunRef(
        dag_id="aicenter_k8s", run_id=context["run_id"], task_id="train", try_number=1))
    op.launcher_in_use = launcher
    pod = op.build_pod_request_obj(context, dry_run=True)
    data = ApiClient().sanitize_for_serialization(pod)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(data, version, strict=True)
    for key, value in data["metadata"]["labels"].items():
        assert LABEL_VALUE.match(value) and len(value) <= 63, (key, value)
    return data


def base(data: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in data["spec"]["containers"] if c["name"] == "base")


def stage(data: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in data["spec"]["initContainers"] if c["name"] == "stage")


def sync(data: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in data["spec"]["containers"] if c["name"] == "sync")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volumes_of(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in data["spec"].get("volumes", [])}


def test_gpu_pod() -> None:
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", gpu=2, cpu=8,
                               memory_gb=32, storage_gb=100, env={"EPOCHS": "5"})
    data = manifest(op)
    container = base(data)
    assert container["image"] == "registry.example.com/aicenter-runtime:0.1.0"
    assert container["command"] == list(SUPERVISOR_COMMAND)
    assert stage(data)["command"] == ["python", "-m", "airflow_aicenter.runtime", "--phase", "stage"]
    assert sync(data)["command"] == ["python", "-m", "airflow_aicenter.runtime", "--phase", "sync"]
    assert "resources" not in stage(data) and "resources" not in sync(data), "GPUs and AI Center's resources: base only"
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "100Gi"},
        "limits": {"memory": "32Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "2"},
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in data["spec"]["tolerations"]
    assert volumes_of(data)["aicenter-work"]["emptyDir"] == {"sizeLimit": "100Gi"}
    assert mounts_of(container)[WORK_MOUNT]["name"] == "aicenter-work"
    assert mounts_of(container)["/tmp"]["name"] == "aicenter-tmp"
    env = env_of(stage(data))
    spec = RunSpec.model_validate_json(env[SPEC_ENV])
    assert spec.gpu == 2 and spec.env == {"EPOCHS": "5"} and spec.install_requirements
    assert env["AICENTER_WORKDIR"] == WORK_MOUNT and env_of(container)["HOME"].startswith(WORK_MOUNT)
    assert SPEC_ENV not in env_of(container), "no run spec in the user container"
    labels = data["metadata"]["labels"]
    assert labels["aicenter/package"] == "churn" and labels["aicenter/version"] == "1.0"
    assert labels["aicenter/run"].startswith("aicenter_k8s_manual__2026-03-01T00_00_00_00_00_train_1")
    assert RunRef.model_validate_json(data["metadata"]["annotations"][ANNOTATION_RUN]).try_number == 1
    # restrictive by default
    assert data["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                               "seccompProfile": {"type": "RuntimeDefault"}}
    for each in (container, stage(data), sync(data)):
        assert each["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                           "readOnlyRootFilesystem": True}
    assert data["spec"]["shareProcessNamespace"] is False
    assert data["spec"]["automountServiceAccountToken"] is False
    assert data["spec"]["restartPolicy"] == "Never"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "sidecar" not in json.dumps(data)
    assert [c["name"] for c in data["spec"]["containers"]] == ["base", "sync"]
    assert [c["name"] for c in data["spec"]["initContainers"]] == ["stage"]


def test_cpu_only_pod() -> None:
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", cpu=0.5, memory_gb=1.5)
    data = manifest(op)
    container = base(data)
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1536Mi"}, "limits": {"memory": "1536Mi"}}
    assert "tolerations" not in data["spec"] or not any(t.get("key") == "nvidia.com/gpu" for t in data["spec"]["tolerations"])
    assert volumes_of(data)["aicenter-work"]["emptyDir"] == {}  # no storage_gb: no size limit
    assert "nvidia" not in json.dumps(data)


def test_pvc_dataset_pod() -> None:
    op = FullPipelineOperator(task_id="train", package="churn", dataset_volume_claim="churn-data", dataset_sub_path="2026/01")
    assert op.dataset == "pvc://churn-data/2026/01"
    data = manifest(op)
    container = base(data)
    assert volumes_of(data)["aicenter-dataset"]["persistentVolumeClaim"] == {"claimName": "churn-data", "readOnly": True}
    for each in (container, stage(data), sync(data)):
        assert mounts_of(each)[DATASET_MOUNT] == {"name": "aicenter-dataset", "mountPath": DATASET_MOUNT, "readOnly": True,
                                                  "subPath": "2026/01"}
    spec = RunSpec.model_validate_json(env_of(stage(data))[SPEC_ENV])
    assert spec.dataset_mount == DATASET_MOUNT and spec.dataset == "pvc://churn-data/2026/01"


def test_user_settings_win_over_ours() -> None:
    op = TrainPipelineOperator(
        task_id="train", package="churn", dataset="file:///srv/data/churn", gpu=2, cpu=4, memory_gb=8, storage_gb=20,
        image="my.registry/custom-runtime:2",
        container_resources=k8s.V1ResourceRequirements(limits={"memory": "2Gi", "nvidia.com/gpu": "1"}),
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Equal", value="a100", effect="NoExecute")],
        security_context={"runAsUser": 2000, "runAsGroup": 2000},
        container_security_context={"readOnlyRootFilesystem": False, "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}},
        env_vars={"HOME": "/home/custom", "PIP_INDEX_URL": "https://pypi.internal/simple"},
        volumes=[k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory"))],
        volume_mounts=[k8s.V1VolumeMount(name="scratch", mount_path="/tmp")],
        automount_service_account_token=True,
        node_selector={"gpu": "a100"},
    )
    data = manifest(op)
    container = base(data)
    assert container["image"] == "my.registry/custom-runtime:2"
    # memory and GPU named by the user: theirs whole; cpu and storage: ours
    assert container["resources"] == {"limits": {"ephemeral-storage": "20Gi", "memory": "2Gi", "nvidia.com/gpu": "1"},
                                      "requests": {"cpu": "4", "ephemeral-storage": "20Gi"}}
    assert data["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "a100", "effect": "NoExecute"}]
    assert data["spec"]["securityContext"]["runAsUser"] == 2000 and data["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    assert container["securityContext"]["capabilities"] == {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(container)
    assert env["HOME"] == "/home/custom" and env["PIP_INDEX_URL"] == "https://pypi.internal/simple"
    assert [e["name"] for e in container["env"]].count("HOME") == 1
    assert mounts_of(container)["/tmp"]["name"] == "scratch" and "aicenter-tmp" not in volumes_of(data)
    assert data["spec"]["automountServiceAccountToken"] is True
    assert data["spec"]["nodeSelector"] == {"gpu": "a100"}


def test_privileged_or_root_requests_are_kept_valid() -> None:
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn",
                               security_context={"runAsUser": 0}, container_security_context={"privileged": True})
    data = manifest(op)
    assert "runAsNonRoot" not in data["spec"]["securityContext"]
    assert "allowPrivilegeEscalation" not in base(data)["securityContext"]


def test_pod_template(tmp_path: Path) -> None:
    template = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ml-team", "labels": {"team": "churn"}, "annotations": {"owner": "ml"}},
        "spec": {
            "priorityClassName": "training",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "containers": [{"name": "base", "image": "template.registry/runtime:7",
                            "resources": {"limits": {"memory": "64Gi"}}}],
        },
    }
    path = tmp_path / "pod.yaml"
    path.write_text(json.dumps(template))
    for kwargs in ({"pod_template_file": str(path)}, {"pod_template_dict": template}):
        op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", gpu=1, memory_gb=16, **kwargs)
        op.image = None
        data = manifest(op)
        container = base(data)
        assert container["image"] == "template.registry/runtime:7"  # the template's image, not the connection's
        assert data["metadata"]["namespace"] == "ml-team"
        assert data["metadata"]["labels"]["team"] == "churn" and data["metadata"]["annotations"]["owner"] == "ml"
        assert data["spec"]["priorityClassName"] == "training" and data["spec"]["nodeSelector"] == {"pool": "gpu"}
        keys = [t["key"] for t in data["spec"]["tolerations"]]
        assert keys == ["dedicated", "nvidia.com/gpu"]
        assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
        assert container["command"] == list(SUPERVISOR_COMMAND)
        assert SPEC_ENV in env_of(stage(data)) and stage(data)["image"] == "template.registry/runtime:7"


def test_full_pod_spec_is_honoured() -> None:
    full = k8s.V1Pod(metadata=k8s.V1ObjectMeta(labels={"from": "full-spec"}),
                     spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="base", image="full.registry/runtime:1")],
                                        service_account_name="trainer"))
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", full_pod_spec=full)
    op.image = None
    data = manifest(op)
    assert base(data)["image"] == "full.registry/runtime:1"
    assert data["spec"]["serviceAccountName"] == "trainer" and data["metadata"]["labels"]["from"] == "full-spec"


def test_s3_credentials_from_a_kubernetes_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    s3_connections(monkeypatch)
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="s3://ml-bucket/datasets/churn/",
                               aws_secret_name="aicenter-s3")
    data = manifest(op, storage="s3://ml-bucket/aicenter")
    assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_of(base(data))), "no store access in base"
    assert env_of(stage(data)) == env_of(sync(data)), "the same credentials for stage and sync"
    env = env_of(stage(data))
    assert env["AWS_ENDPOINT_URL"] == "https://s3.internal.example.com" and env["AWS_REGION"] == "eu-west-3"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "aicenter-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "aicenter-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_SESSION_TOKEN"] == {"secretKeyRef": {"name": "aicenter-s3", "key": "AWS_SESSION_TOKEN", "optional": True}}
    text = json.dumps(data)
    assert AWS_PASSWORD not in text and "AKIAWORKERKEY" not in text, "the worker's AWS credentials never reach the pod"


def test_s3_credentials_secret_name_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    s3_connections(monkeypatch, aws_secret_name="team-s3")
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="s3://ml-bucket/datasets/churn/")
    env = env_of(sync(manifest(op, storage="s3://ml-bucket/aicenter")))
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "team-s3"


def test_s3_dataset_beside_a_file_store_still_gets_the_endpoint_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    s3_connections(monkeypatch, storage="file:///mnt/shared/aicenter", aws_secret_name="aicenter-s3")
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="s3://ml-bucket/datasets/churn/")
    data = manifest(op, storage="file:///mnt/shared/aicenter")
    env = env_of(stage(data))
    assert env["AWS_ENDPOINT_URL"] == "https://s3.internal.example.com" and env["AWS_REGION"] == "eu-west-3"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "aicenter-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert AWS_PASSWORD not in json.dumps(data) and "AKIAWORKERKEY" not in json.dumps(data)


def test_s3_through_the_service_account_injects_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    s3_connections(monkeypatch)
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="s3://ml-bucket/datasets/churn/",
                               service_account_name="aicenter-irsa")
    data = manifest(op, storage="s3://ml-bucket/aicenter")
    env = env_of(stage(data))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert env["AWS_REGION"] == "eu-west-3" and data["spec"]["serviceAccountName"] == "aicenter-irsa"
    assert AWS_PASSWORD not in json.dumps(data)


def test_namespace_from_the_aicenter_connection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": (tmp_path / "s").as_uri(), "image": "img:1", "namespace": "ml"}}))
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn")
    assert manifest(op)["metadata"]["namespace"] == "ml"
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", namespace="mine")
    assert manifest(op)["metadata"]["namespace"] == "mine"


def test_no_image_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": (tmp_path / "s").as_uri(), "launcher": "kubernetes"}}))
    op = TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn")
    with pytest.raises(ConfigurationError, match=r"needs the runtime image: pass image=.*docker/README.md"):
        manifest(op)


def test_secret_looking_env_is_refused_for_pods() -> None:
    refuse_secret_env({"EPOCHS": "5", "LEARNING_RATE": "0.1"})
    with pytest.raises(ConfigurationError, match=r"API_TOKEN, db_password look secret.*secrets=\[Secret\('env', 'API_TOKEN'"):
        refuse_secret_env({"API_TOKEN": "x", "db_password": "y", "EPOCHS": "5"})


@pytest.mark.parametrize("kwargs, message", [
    ({"do_xcom_push": True}, "XCom sidecar"),
    ({"dataset_volume_claim": "claim"}, "either dataset="),
    ({"cpu": -1}, "cpu=-1 is not valid"),
    ({"cpu": "lots"}, "cpu='lots' is not valid"),
    ({"memory_gb": 0}, "memory_gb=0 is not valid"),
    ({"dataset_sub_path": "../etc"}, "dataset_sub_path='../etc' is not valid"),
    ({"dataset_sub_path": "/abs"}, "dataset_sub_path='/abs' is not valid"),
])
def test_bad_pod_settings_fail_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        TrainPipelineOperator(task_id="train", package="churn", dataset="file:///srv/data/churn", **kwargs)


def test_label_values() -> None:
    assert label_value("churn") == "churn"
    assert label_value("aicenter_training/manual__2026-01-01T00:00:00+00:00/train/1") == \
        "aicenter_training_manual__2026-01-01T00_00_00_00_00_train_1"
    long_a, long_b = "x" * 80 + "a", "x" * 80 + "b"
    for value in (long_a, long_b, "-._weird_-", "ünïcode/é", "/" * 70):
        label = label_value(value)
        assert len(label) <= 63 and LABEL_VALUE.match(label), label
    assert label_value(long_a) != label_value(long_b)
