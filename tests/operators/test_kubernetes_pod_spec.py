"""launchers/pod_spec.py alone: the three containers of a run's pod and the Job that repeats it.

Pure functions over kubernetes models; every manifest is validated against the Kubernetes
OpenAPI schema (kubernetes-validate), as the API server would.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.pod_spec import (
    ANNOTATION_RUN,
    BIN_MOUNT,
    DATA_MOUNT,
    DATASET_MOUNT,
    ENV_MOUNT,
    PACKAGE_MOUNT,
    SPEC_ENV,
    STATE_MOUNT,
    TEST_DATA_MOUNT,
    WORK_MOUNT,
    PodResources,
    PodShape,
    job_agent_env,
    job_manifests,
    job_ports,
    run_ending,
    run_spec_json,
    shape_pod,
)

SECRET_REF = k8s.V1EnvVar(name="AWS_SECRET_ACCESS_KEY", value_from=k8s.V1EnvVarSource(
    secret_key_ref=k8s.V1SecretKeySelector(name="aicenter-run-1", key="AWS_SECRET_ACCESS_KEY")))
SPEC = '{"pipeline": "train"}'


def kpo_pod(**container: Any) -> k8s.V1Pod:
    """What KubernetesPodOperator builds before we shape it: one ``base`` container with the user's settings."""
    return k8s.V1Pod(api_version="v1", kind="Pod", metadata=k8s.V1ObjectMeta(name="train-abc", namespace="ml", labels={"a": "b"}),
                     spec=k8s.V1PodSpec(restart_policy="Never", containers=[k8s.V1Container(name="base", **container)]))


def shaped(shape: PodShape | None = None, **container: Any) -> dict[str, Any]:
    shape = shape or PodShape(image="aicenter-runtime:1", spec_json=SPEC, run_json='{"run": 1}', store_env=(SECRET_REF,))
    data = ApiClient().sanitize_for_serialization(shape_pod(kpo_pod(**container), shape))
    kubernetes_validate.validate(data, kubernetes_validate.latest_version(), strict=True)
    return data


def containers(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in [*data["spec"].get("initContainers", []), *data["spec"]["containers"]]}


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_three_containers_in_order_with_the_same_image() -> None:
    data = shaped()
    assert [c["name"] for c in data["spec"]["initContainers"]] == ["stage"]
    assert [c["name"] for c in data["spec"]["containers"]] == ["base", "sync"]
    assert {c["image"] for c in containers(data).values()} == {"aicenter-runtime:1"}
    assert data["metadata"]["annotations"][ANNOTATION_RUN] == '{"run": 1}'


def test_the_user_container_has_no_credentials_no_spec_no_token() -> None:
    data = shaped()
    every = containers(data)
    base = every["base"]
    assert SPEC_ENV not in env(base) and "AWS_SECRET_ACCESS_KEY" not in env(base)
    assert "secret" not in str(base).lower()
    for name in ("stage", "sync"):
        assert env(every[name])[SPEC_ENV] == SPEC
        assert env(every[name])["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "aicenter-run-1"
    assert data["spec"]["automountServiceAccountToken"] is False
    assert data["spec"]["shareProcessNamespace"] is False
    assert STATE_MOUNT not in mounts(base), "the agent's handover from stage to sync is not in the user container"
    assert run_spec_json(shape_pod(kpo_pod(), PodShape(image="i", spec_json=SPEC)).spec) == SPEC


@pytest.mark.parametrize("makes_version", [True, False])
def test_read_only_mounts_in_the_user_container(makes_version: bool) -> None:
    data = shaped(PodShape(image="i", spec_json=SPEC, makes_version=makes_version,
                           resources=PodResources(dataset_volume_claim="claim")))
    every = containers(data)
    base = mounts(every["base"])
    for path in (DATA_MOUNT, TEST_DATA_MOUNT, BIN_MOUNT, ENV_MOUNT, DATASET_MOUNT):
        assert base[path].get("readOnly") is True, path
    assert base[WORK_MOUNT].get("readOnly") is None and base["/tmp"].get("readOnly") is None
    assert base[PACKAGE_MOUNT].get("readOnly") is (None if makes_version else True), "save() writes the package of a new version"
    for name in ("stage", "sync"):
        agent = mounts(every[name])
        # sync packs the environment stage or build made, and never writes it
        assert all(not m.get("readOnly") for path, m in agent.items() if path not in (DATASET_MOUNT, ENV_MOUNT))
        assert agent[STATE_MOUNT]["name"] == "aicenter-state" and agent["/tmp"]["name"] == "aicenter-agent-tmp"
    assert ENV_MOUNT in mounts(every["stage"]) and BIN_MOUNT in mounts(every["stage"])
    volumes = {v["name"]: v for v in data["spec"]["volumes"]}
    assert all("emptyDir" in v for name, v in volumes.items() if name != "aicenter-dataset"), "one emptyDir per purpose"
    paths = [(m["name"], m["mountPath"]) for c in every.values() for m in c["volumeMounts"]]
    assert all(not m.get("subPath") for c in every.values() for m in c["volumeMounts"] if m["name"] != "aicenter-dataset")
    assert len({name for name, _ in paths}) == len(volumes)


def test_security_on_every_container_and_the_pod() -> None:
    data = shaped()
    assert data["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                               "seccompProfile": {"type": "RuntimeDefault"}}
    for container in containers(data).values():
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                                "readOnlyRootFilesystem": True}


def test_privileges_asked_for_base_stay_in_base() -> None:
    data = shaped(security_context=k8s.V1SecurityContext(privileged=True, read_only_root_filesystem=False))
    every = containers(data)
    assert every["base"]["securityContext"]["privileged"] is True
    assert every["stage"]["securityContext"]["readOnlyRootFilesystem"] is True
    assert every["sync"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_gpus_and_resources_on_base_only_and_user_mounts_everywhere() -> None:
    shape = PodShape(image="i", spec_json=SPEC, resources=PodResources(gpu=2, cpu=4, memory_gb=16))
    data = shaped(shape, volume_mounts=[k8s.V1VolumeMount(name="store", mount_path="/srv/store")])
    every = containers(data)
    assert every["base"]["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert "resources" not in every["stage"] and "resources" not in every["sync"]
    for name in ("base", "stage", "sync"):
        assert mounts(every[name])["/srv/store"]["name"] == "store"


def test_a_user_command_stays_and_no_image_is_a_clear_error() -> None:
    assert containers(shaped(command=["bash"]))["base"]["command"] == ["bash"]
    with pytest.raises(ConfigurationError, match="needs the runtime image"):
        shape_pod(kpo_pod(), PodShape(image=None))


def test_every_pod_of_the_job_is_the_same_pod() -> None:
    shape = PodShape(image="i", spec_json=SPEC, run_json='{"r": 1}', agent_env=job_agent_env("job", 2), ports=job_ports(),
                     store_env=(SECRET_REF,))
    pod = shape_pod(kpo_pod(), shape)
    single = ApiClient().sanitize_for_serialization(pod)
    job, service = job_manifests(pod, name="job", namespace="ml", nodes=2, run_label="r", run_json='{"r": 1}')
    data = ApiClient().sanitize_for_serialization(job)
    for manifest in (data, ApiClient().sanitize_for_serialization(service)):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    template = data["spec"]["template"]["spec"]
    assert template["initContainers"] == single["spec"]["initContainers"]
    assert template["containers"] == single["spec"]["containers"]
    assert data["spec"]["completionMode"] == "Indexed" and data["spec"]["backoffLimit"] == 0
    every = {c["name"]: c for c in [*template["initContainers"], *template["containers"]]}
    assert env(every["stage"])["AICENTER_MASTER_ADDR"] == "job-0.job" and "AICENTER_MASTER_ADDR" not in env(every["base"])
    assert every["base"]["ports"] == [{"name": "rendezvous", "containerPort": 29500}]
    assert template["automountServiceAccountToken"] is False


def _status(name: str, code: int, reason: str = "Error", message: str | None = None) -> k8s.V1ContainerStatus:
    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code, reason=reason, message=message))
    return k8s.V1ContainerStatus(name=name, image="i", image_id="", ready=False, restart_count=0, state=state)


def test_which_container_tells_how_the_run_ended() -> None:
    def pod(init: list[Any], main: list[Any]) -> k8s.V1Pod:
        return k8s.V1Pod(status=k8s.V1PodStatus(init_container_statuses=init, container_statuses=main))

    assert run_ending(pod([_status("stage", 1, message="bad data")], []), "base") == ("stage", 1, "Error", "bad data")
    oom = pod([_status("stage", 0)], [_status("base", 137, "OOMKilled"), _status("sync", 1, message="m")])
    assert run_ending(oom, "base")[:3] == ("base", 137, "OOMKilled")
    done = pod([_status("stage", 0)], [_status("base", 1), _status("sync", 1, message="rank 0: ValueError")])
    assert run_ending(done, "base") == ("sync", 1, "Error", "rank 0: ValueError")


def test_stage_learns_the_names_of_the_user_containers_variables_never_their_values() -> None:
    secret = k8s.V1EnvVar(name="API_TOKEN", value_from=k8s.V1EnvVarSource(
        secret_key_ref=k8s.V1SecretKeySelector(name="team", key="API_TOKEN")))
    every = containers(shaped(env=[k8s.V1EnvVar(name="MY_FLAG", value="on-value"), secret]))
    stage = env(every["stage"])
    assert stage["AICENTER_USER_ENV_NAMES"] == "API_TOKEN,MY_FLAG" and stage["AICENTER_USER_SECRET_NAMES"] == "API_TOKEN"
    assert "on-value" not in str(every["stage"]) and "API_TOKEN" not in {e["name"] for e in every["sync"]["env"]}
    assert env(every["base"])["MY_FLAG"] == "on-value" and env(every["base"])["API_TOKEN"]["secretKeyRef"]["name"] == "team"


SOURCE_BUILDS = '{"pipeline": "train", "install_requirements": true, "allow_source_builds": true}'


def test_source_builds_get_a_build_container_without_credentials_and_the_only_writable_env() -> None:
    """DESIGN "Environments": a source build runs where package code runs, never next to the store credentials."""
    assert "build" not in containers(shaped()), "no build container without allow_source_builds"
    shape = PodShape(image="aicenter-runtime:1", spec_json=SOURCE_BUILDS, run_json='{"run": 1}', store_env=(SECRET_REF,))
    netrc = k8s.V1VolumeMount(name="netrc", mount_path="/etc/netrc", read_only=True)
    data = shaped(shape, env=[k8s.V1EnvVar(name="MY_FLAG", value="on")], volume_mounts=[netrc])
    assert [c["name"] for c in data["spec"]["initContainers"]] == ["stage", "build"]
    build = containers(data)["build"]
    assert build["image"] == "aicenter-runtime:1"
    assert build["command"][-3:] == ["--phase", "build", f"{WORK_MOUNT}/control/build.json"]
    variables = env(build)
    assert SPEC_ENV not in variables and not {k for k in variables if k.startswith("AWS_")}, "no run spec, no credentials"
    assert "MY_FLAG" not in variables and "AICENTER_USER_ENV_NAMES" not in variables, "not even the names of the user's env"
    assert variables["AICENTER_CACHE"] == ENV_MOUNT
    seen = mounts(build)
    assert STATE_MOUNT not in seen, "the agent's handover (a pickle sync loads) is out of the build's reach"
    assert not seen[ENV_MOUNT].get("readOnly"), "the build writes the environment"
    for path in (WORK_MOUNT, PACKAGE_MOUNT):
        assert seen[path]["readOnly"] is True, f"{path}: the supervisor and its plan stay stage's"
    assert DATA_MOUNT not in seen and BIN_MOUNT not in seen
    assert seen["/etc/netrc"]["name"] == "netrc", "the user's own mounts, as base has them (index credentials)"
    assert build["securityContext"]["readOnlyRootFilesystem"] is True
    assert build["securityContext"]["allowPrivilegeEscalation"] is False
    assert data["spec"]["automountServiceAccountToken"] is False
    parts = containers(data)
    assert mounts(parts["base"])[ENV_MOUNT]["readOnly"] is True, "package code cannot change what sync packs"
    assert mounts(parts["sync"])[ENV_MOUNT]["readOnly"] is True, "sync packs the environment, read-only"
    assert not mounts(parts["stage"])[ENV_MOUNT].get("readOnly"), "stage restores a stored environment there"
    job, _ = job_manifests(shape_pod(kpo_pod(), shape), name="j", namespace="ml", nodes=2, run_label="r", run_json="{}")
    assert [c.name for c in job.spec.template.spec.init_containers] == ["stage", "build"], "the Job's pods alike"


def test_a_failed_build_tells_how_the_run_ended() -> None:
    pod = k8s.V1Pod(status=k8s.V1PodStatus(init_container_statuses=[_status("stage", 0), _status("build", 1, message="uv failed")]))
    assert run_ending(pod, "base") == ("build", 1, "Error", "uv failed")
