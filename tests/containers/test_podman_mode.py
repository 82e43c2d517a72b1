"""The test API server's podman mode itself, with a three-container pod written by hand, through the API.

The launcher tests (test_pods.py) cover pods that run; this covers what they rarely reach: a
failed init container fails the pod, its exit code, termination message and log are reported,
and the other containers never start (``PodInitializing``), as on Kubernetes.
"""

from __future__ import annotations

import time
from typing import Any

from kubernetes import client as k8s_client

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
