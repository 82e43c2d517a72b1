"""The test API server's podman mode itself: a three-container pod, written by hand, through the API.

What the launcher tests rely on: init container first, then both containers together; emptyDir
volumes shared (and read-only where the manifest says), Secrets resolved only into the
containers that reference them, exit codes, termination messages and logs reported through the
Kubernetes API, a failed init container failing the pod, and nothing left behind in podman.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kubernetes import client as k8s_client

from tests.containers.podman import podman
from tests.operators.kube_api import FakeKubernetes

SECURE = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def three_containers(name: str, stage_script: str) -> dict[str, Any]:
    def container(cname: str, script: str, mounts: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"name": cname, "image": "aicenter-runtime:test", "command": ["/bin/sh", "-c", script],
                "securityContext": SECURE, "volumeMounts": mounts, **extra}

    key = {"name": "STORE_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False, "shareProcessNamespace": False,
            "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001, "runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [container("stage", stage_script, [{"name": "package", "mountPath": "/aicenter/package"}],
                                         env=[key])],
            "containers": [
                container("base", 'cat /aicenter/package/hello; echo "key=[$STORE_KEY]"; touch /aicenter/package/x 2>&1; '
                                  "echo done > /aicenter/control/exit.json; echo user-ended > /dev/termination-log",
                          [{"name": "package", "mountPath": "/aicenter/package", "readOnly": True},
                           {"name": "control", "mountPath": "/aicenter/control"}]),
                container("sync", 'while [ ! -f /aicenter/control/exit.json ]; do sleep 0.1; done; echo "sync key=$STORE_KEY"; '
                                  "echo synced > /dev/termination-log",
                          [{"name": "control", "mountPath": "/aicenter/control"}], env=[key]),
            ],
            "volumes": [{"name": "package", "emptyDir": {}}, {"name": "control", "emptyDir": {}}],
        },
    }


def api(kube: FakeKubernetes) -> k8s_client.CoreV1Api:
    config = k8s_client.Configuration(host=kube.url)
    config.api_key = {"authorization": "Bearer fake"}
    return k8s_client.CoreV1Api(k8s_client.ApiClient(config))


def wait_phase(core: k8s_client.CoreV1Api, name: str, phases: tuple[str, ...], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, "default")
        if pod.status.phase in phases:
            return pod
        time.sleep(0.2)
    raise AssertionError(f"pod {name} never reached {phases}")


def log(core: k8s_client.CoreV1Api, pod: str, container: str) -> str:
    return core.read_namespaced_pod_log(pod, "default", container=container, _preload_content=False).data.decode()


def state(statuses: list[Any], name: str) -> Any:
    return next(s.state for s in statuses if s.name == name)


def test_three_containers_run_in_order_and_report_through_the_api(kube_podman: FakeKubernetes):
    kube_podman.add_secret("creds", {"key": "s3cr3t-value"})
    core = api(kube_podman)
    core.create_namespaced_pod("default", three_containers("infra-ok", "echo hello-from-stage > /aicenter/package/hello; id -u"))
    pod = wait_phase(core, "infra-ok", ("Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded"
    assert state(pod.status.init_container_statuses, "stage").terminated.exit_code == 0
    base, sync = state(pod.status.container_statuses, "base"), state(pod.status.container_statuses, "sync")
    assert (base.terminated.exit_code, base.terminated.message) == (0, "user-ended\n")
    assert (sync.terminated.exit_code, sync.terminated.message) == (0, "synced\n")
    assert log(core, "infra-ok", "stage").split() == ["10001"]
    base_log = log(core, "infra-ok", "base")
    assert "hello-from-stage" in base_log, "the init container's volume is shared"
    assert "key=[]" in base_log, "a Secret reaches only the containers that reference it"
    assert "Read-only file system" in base_log, "a readOnly mount is read-only"
    assert log(core, "infra-ok", "sync").strip() == "sync key=s3cr3t-value"
    manifest = json.dumps(kube_podman.podman.manifests)  # type: ignore[union-attr]
    assert kube_podman.everything_sent().count("s3cr3t-value") == 0, "the API received no secret value"
    assert "s3cr3t-value" in manifest, "podman gets the resolved value (it knows no Kubernetes Secrets)"
    kube_podman.wait_for(lambda: all(p.done.is_set() for p in kube_podman.podman.played.values()), what="pod removed")  # type: ignore[union-attr]
    assert "infra-ok" not in podman("pod", "ps", "--format", "{{.Name}}").stdout
    assert not [v for v in podman("volume", "ls", "--format", "{{.Name}}").stdout.split() if v.endswith(("-package", "-control"))]


def test_a_failed_init_container_fails_the_pod_and_nothing_else_starts(kube_podman: FakeKubernetes):
    kube_podman.add_secret("creds", {"key": "k"})
    core = api(kube_podman)
    core.create_namespaced_pod("default", three_containers("infra-fail", "echo stage broke >&2; echo cause > /dev/termination-log; exit 5"))
    pod = wait_phase(core, "infra-fail", ("Failed", "Succeeded"))
    assert pod.status.phase == "Failed"
    stage = state(pod.status.init_container_statuses, "stage").terminated
    assert (stage.exit_code, stage.message) == (5, "cause\n")
    assert state(pod.status.container_statuses, "base").waiting.reason == "PodInitializing"
    assert state(pod.status.container_statuses, "sync").waiting.reason == "PodInitializing"
    assert "stage broke" in log(core, "infra-fail", "stage")
