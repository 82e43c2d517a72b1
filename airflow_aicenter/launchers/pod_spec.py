"""The pod of a run, as three containers (four with source builds): one pure module for the single pod and every pod of a Job.

DESIGN "Trust boundaries": a pod is three containers sharing volumes, never credentials.

- ``stage`` (init container; the run spec and the store credentials): stages the package, the
  data and the environment, restores the latest checkpoint, and writes the user supervisor's
  plan and the supervisor itself into the work volume
  (``python -m airflow_aicenter.runtime --phase stage``);
- ``build`` (init container, only with ``allow_source_builds``): builds the package's environment
  when ``stage`` found it neither cached nor stored (``--phase build``, reading the plan stage
  wrote). A source build runs package-supplied code, so it runs like package code: no run
  spec, no store credentials, no user ``env``, the work and package volumes read-only, the
  ``state`` volume absent; the environment volume is writable here alone (DESIGN "Environments");
- ``base`` (the main container, named as KubernetesPodOperator expects): the stdlib-only user
  supervisor runs the package code. No run spec, no store credentials, no service-account
  token; package (unless the run makes a version), data, environment and the supervisor are
  mounted read-only;
- ``sync`` (the run spec and the credentials): syncs checkpoints while it waits for the
  supervisor's exit file, then uploads and writes ``outcome.json`` and the termination message
  (``--phase sync``); it packs and stores an environment ``build`` made, from the volume ``base``
  had read-only.

One ``emptyDir`` per purpose (a container runtime such as podman does not share ``subPath``
mounts of one ``emptyDir``), mounted where the runtime expects its folders, so the agent's
paths are the same in every container. The ``state`` volume (the agent's handover from stage
to sync) is never mounted in ``base``.

Only kubernetes client models here: no API calls, no store, no Airflow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_aicenter.errors import ConfigurationError

#: The work volume: the agent's AICENTER_WORKDIR (artifacts, checkpoints, process_data's splits, control).
WORK_MOUNT = "/aicenter/work"
#: The package folder (``save()`` writes there in the runs that make a version).
PACKAGE_MOUNT = f"{WORK_MOUNT}/package"
#: The staged datasets: read-only to user code.
DATA_MOUNT = f"{WORK_MOUNT}/data"
TEST_DATA_MOUNT = f"{WORK_MOUNT}/test_data"
#: The user supervisor and user.py, copied there by ``stage``: read-only to user code.
BIN_MOUNT = f"{WORK_MOUNT}/bin"
#: The package environment, built by ``stage`` at the path ``base`` runs it from (venvs are not relocatable).
ENV_MOUNT = "/aicenter/env"
#: The agent's handover from ``stage`` to ``sync``; never in ``base``.
STATE_MOUNT = "/aicenter/state"
#: Where a dataset PersistentVolumeClaim is mounted, read-only; the run's data_directory.
DATASET_MOUNT = "/aicenter/dataset"
TMP_MOUNT = "/tmp"
WORK_VOLUME, TMP_VOLUME, DATASET_VOLUME = "aicenter-work", "aicenter-tmp", "aicenter-dataset"
PACKAGE_VOLUME, DATA_VOLUME, TEST_DATA_VOLUME = "aicenter-package", "aicenter-data", "aicenter-test-data"
BIN_VOLUME, ENV_VOLUME, STATE_VOLUME, AGENT_TMP_VOLUME = "aicenter-bin", "aicenter-env", "aicenter-state", "aicenter-agent-tmp"
#: The build container's /tmp: its own, shared with neither the agents nor user code.
BUILD_TMP_VOLUME = "aicenter-build-tmp"
STAGE_CONTAINER, BUILD_CONTAINER, SYNC_CONTAINER = "stage", "build", "sync"
RUNTIME_COMMAND = ("python", "-m", "airflow_aicenter.runtime")
STAGE_COMMAND = (*RUNTIME_COMMAND, "--phase", "stage")
SYNC_COMMAND = (*RUNTIME_COMMAND, "--phase", "sync")
CONTROL = f"{WORK_MOUNT}/control"
#: The build plan ``stage`` writes for ``build`` (absent: nothing to build).
BUILD_PLAN = f"{CONTROL}/build.json"
BUILD_COMMAND = (*RUNTIME_COMMAND, "--phase", "build", BUILD_PLAN)
#: Seconds between the user container's heartbeats (``control/alive``).
HEARTBEAT = 5
_NO_EXIT = (
    '{"status": "failed", "results": [], "failed": null, '
    '"cause": "the user supervisor exited with code %s before it reported (see the base container log)"}'
)
#: ``base``: the user supervisor with its plan, under a shell that (a) touches ``control/alive``
#: every few seconds, so ``sync`` sees a container that was killed whole (out of memory) stop,
#: (b) writes the exit file itself when the supervisor could not (it crashed or never started),
#: so ``sync`` never waits for an exit file that cannot come, and (c) passes SIGTERM on to the
#: supervisor: the kubelet signals only a container's first process, and a shell that is PID 1
#: ignores SIGTERM, so without the trap user code heard nothing before the grace period's SIGKILL
#: (a stop that comes before the supervisor has started is passed on as soon as it has).
SUPERVISOR_COMMAND = (
    "sh",
    "-c",
    "sup=; stop=; trap 'stop=1; [ -z \"$sup\" ] || kill -TERM \"$sup\" 2>/dev/null' TERM; "
    f"(while :; do : > {CONTROL}/alive; sleep {HEARTBEAT}; done) & beat=$!; "
    f"python {BIN_MOUNT}/supervisor.py {CONTROL}/supervisor.json & sup=$!; "
    "[ -z \"$stop\" ] || kill -TERM \"$sup\" 2>/dev/null; "
    "wait \"$sup\"; code=$?; while kill -0 \"$sup\" 2>/dev/null; do wait \"$sup\"; code=$?; done; "
    "kill \"$beat\" 2>/dev/null; "
    f"[ -e {CONTROL}/exit.json ] || printf '{_NO_EXIT}' \"$code\" > {CONTROL}/exit.json; exit $code",
)
#: The runtime image's user (docker/Dockerfile); any image works, HOME is set explicitly.
RUNTIME_UID = 10001
SPEC_ENV = "AICENTER_RUN_SPEC"
#: On ``stage``: the names of the variables the user gave the user container (its values stay
#: there), and those of them that come from a Secret: user code gets them, its output masks them.
USER_ENV_NAMES, USER_SECRET_NAMES = "AICENTER_USER_ENV_NAMES", "AICENTER_USER_SECRET_NAMES"
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_PACKAGE, LABEL_VERSION, LABEL_RUN = "aicenter/package", "aicenter/version", "aicenter/run"
#: Annotation with the exact RunRef (JSON) of the run the pod executes; labels are lossy.
ANNOTATION_RUN = "aicenter/run"
#: Keys of the ``aws_secret_name`` Secret, mapped to the same env names; the token is optional.
AWS_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_SESSION_TOKEN": True}
#: The rendezvous port of node 0 of a Job (every pod has its own network namespace).
MASTER_PORT = 29500
LABEL_JOB = "aicenter/job"
_MAX_LABEL = 63
#: Kueue's label naming the LocalQueue a pod or Job waits in (``queue_name``).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Default seconds for every node of a distributed run to be running once admitted (``startup_timeout``).
DEFAULT_STARTUP_TIMEOUT = 600.0
#: The node's blob cache (connection extra ``blob_cache``): a hostPath volume, mounted in ``stage`` alone, here.
BLOB_CACHE_VOLUME, BLOB_CACHE_MOUNT = "aicenter-blob-cache", "/aicenter/blob-cache"
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


def check_queue_name(value: object, where: str = "queue_name") -> str | None:
    """A Kueue LocalQueue name as a label value (<= 63 chars of ``[A-Za-z0-9._-]``, alphanumeric at both ends).

    Checked before anything is created: Kubernetes would refuse the whole Job for a bad label
    value, after the run's credentials were issued.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_LABEL or not _LABEL_VALUE.fullmatch(value):
        raise ConfigurationError(
            f"{where}={value!r} is not a valid Kubernetes label value; give the name of a Kueue LocalQueue in the task's "
            "namespace (up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        )
    return value


def check_startup_timeout(value: object) -> float:
    """``startup_timeout`` as seconds > 0 (given as seconds or a ``timedelta``)."""
    from datetime import timedelta

    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise ConfigurationError(
            f"startup_timeout={value!r} is not a positive duration; give seconds > 0 or a timedelta (default "
            f"{DEFAULT_STARTUP_TIMEOUT:.0f} s): how long every node of a distributed run may take to be running"
        )
    return float(seconds)


@dataclass(frozen=True)
class NodeBlobCache:
    """The connection extra ``blob_cache``: a folder on each node that keeps per-file package files between pods.

    :param host_path: the node's folder (a hostPath volume, created if missing), mounted in ``stage`` alone.
    :param max_size: what it may hold before the least recently used entries go (``AICENTER_BLOB_CACHE_MAX``).
    """

    host_path: str
    max_size: str | None = None


_BLOB_CACHE_FIX = ('set the aicenter connection\'s extra to e.g. "blob_cache": {"host_path": "/var/cache/aicenter/blobs"} '
                   '(optionally with "max_size": "40G"), or remove blob_cache to fetch package files in every pod')


def check_blob_cache(value: object) -> NodeBlobCache | None:
    """The connection extra ``blob_cache``, checked before any pod exists (a bad hostPath would leave the pod Pending).

    An absolute folder other than ``/`` without ``..``: it becomes a hostPath volume on every node the runs use.
    """
    from airflow_aicenter.storage.cache import parse_size

    if value is None or value == {}:
        return None
    where = "the aicenter connection's extra blob_cache"
    if not isinstance(value, dict) or not set(value) <= {"host_path", "max_size"} or "host_path" not in value:
        raise ConfigurationError(f"{where}={value!r} is not an object with host_path (and optionally max_size): "
                                 f"{_BLOB_CACHE_FIX}")
    path, size = value["host_path"], value.get("max_size")
    if (not isinstance(path, str) or not path.startswith("/") or PurePosixPath(path) == PurePosixPath("/")
            or "\x00" in path):
        raise ConfigurationError(f"{where} host_path={path!r} is not an absolute folder on the node (other than /): "
                                 f"{_BLOB_CACHE_FIX}")
    if ".." in PurePosixPath(path).parts:
        raise ConfigurationError(f"{where} host_path={path!r} contains '..': give the folder's absolute path without it; "
                                 f"{_BLOB_CACHE_FIX}")
    if size is not None:
        try:
            if not isinstance(size, str | int) or isinstance(size, bool):
                raise ConfigurationError("not a size")
            parse_size(str(size))
        except ConfigurationError:
            raise ConfigurationError(f"{where} max_size={size!r} is not a size: give bytes or a number with K, M, G or T "
                                     f"(e.g. \"40G\"), or 0 for no limit; {_BLOB_CACHE_FIX}") from None
    return NodeBlobCache(host_path=str(PurePosixPath(path)), max_size=None if size is None else str(size))


# -- small pure helpers ------------------------------------------------------------------
def label_value(value: str) -> str:
    """A valid label value: [A-Za-z0-9._-], alphanumeric at both ends, <= 63 chars.

    Truncated values get a hash suffix so that two long names do not collide.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")
    if len(safe) <= _MAX_LABEL:
        return safe
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{safe[: _MAX_LABEL - len(digest) - 1].rstrip('._-')}-{digest}"


def memory_quantity(gb: float) -> str:
    """``4`` -> ``"4Gi"``, ``0.5`` -> ``"512Mi"``."""
    return f"{int(gb)}Gi" if float(gb).is_integer() else f"{round(gb * 1024)}Mi"


def cpu_quantity(cpu: float | str) -> str:
    if isinstance(cpu, str):
        return cpu
    return str(int(cpu)) if float(cpu).is_integer() else f"{round(cpu * 1000)}m"


def _positive(name: str, value: float | str | None) -> None:
    if value is None or (name == "cpu" and isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?m?", value)):
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(f'{name}={value!r} is not valid; give a positive number (cpu also takes "500m")')


def check_sub_path(sub_path: str | None) -> None:
    if sub_path is None:
        return
    parts = PurePosixPath(sub_path).parts
    if not sub_path or sub_path.startswith("/") or ".." in parts:
        raise ConfigurationError(
            f"dataset_sub_path={sub_path!r} is not valid; give a relative folder inside the volume claim, without '..'"
        )


def check_infra(
    *, cpu: float | str | None, memory_gb: float | None, storage_gb: float | None, dataset_sub_path: str | None
) -> None:
    """Validate AI Center's infra settings when the DAG is parsed, long before a pod exists."""
    _positive("cpu", cpu)
    _positive("memory_gb", memory_gb)
    _positive("storage_gb", storage_gb)
    check_sub_path(dataset_sub_path)


_API_CLIENT: list[ApiClient] = []


def as_model(value: Any, klass: str) -> Any:
    """A kubernetes model from a dict in API (camelCase) form; models pass through."""
    if value is None or not isinstance(value, dict):
        return value
    if not value:
        return None

    class _Response:
        data = json.dumps(value)

    if not _API_CLIENT:
        _API_CLIENT.append(ApiClient())
    return _API_CLIENT[0].deserialize(_Response(), klass)


def _name(item: Any) -> str | None:
    return item.get("name") if isinstance(item, dict) else item.name


def _mount_path(item: Any) -> str | None:
    return item.get("mountPath") if isinstance(item, dict) else item.mount_path


def base_container(pod: k8s.V1Pod, name: str) -> k8s.V1Container:
    containers = pod.spec.containers or []
    return next((c for c in containers if c.name == name), containers[0])


def stage_container(pod_spec: k8s.V1PodSpec | None) -> k8s.V1Container | None:
    """The ``stage`` init container (it carries the run spec), if the pod is ours."""
    if pod_spec is None:
        return None
    return next((c for c in (pod_spec.init_containers or []) if _name(c) == STAGE_CONTAINER), None)


def run_spec_json(pod_spec: k8s.V1PodSpec | None) -> str | None:
    """The run spec a pod (or a Job's pod template) carries in its ``stage`` container, else None."""
    stage = stage_container(pod_spec)
    if stage is None:
        return None
    for var in stage.env or []:
        name = var.get("name") if isinstance(var, dict) else var.name
        value = var.get("value") if isinstance(var, dict) else var.value
        if name == SPEC_ENV and value is not None:
            return str(value)
    return None


def termination(pod: k8s.V1Pod | None, container: str) -> tuple[int | None, str | None, str | None]:
    """(exit code, reason, message) of the container (or init container) once terminated, else Nones."""
    status = pod.status if pod is not None else None
    statuses = [*(status.container_statuses or []), *(status.init_container_statuses or [])] if status else []
    found = next((s for s in statuses if s.name == container), None)
    terminated = found.state.terminated if found and found.state else None
    if terminated is None:
        return None, None, None
    message = (terminated.message or "").strip() or None
    return terminated.exit_code, terminated.reason, message


def run_ending(pod: k8s.V1Pod | None, base: str) -> tuple[str, int | None, str | None, str | None]:
    """Which container tells how the run ended, and its (exit code, reason, message).

    A ``stage`` that failed ended the run before any user code; otherwise a ``base`` killed
    from outside (out of memory) says more than ``sync``; else ``sync`` wrote the run's message.
    """
    for init in (STAGE_CONTAINER, BUILD_CONTAINER):
        code, reason, message = termination(pod, init)
        if code not in (None, 0):
            return init, code, reason, message
    code, reason, message = termination(pod, base)
    if reason == "OOMKilled" or code is None:
        return base, code, reason, message
    sync = termination(pod, SYNC_CONTAINER)
    if sync[0] is not None:
        return (SYNC_CONTAINER, *sync)
    return base, code, reason, message


def disruption(pod: k8s.V1Pod) -> str | None:
    """How a pod was disrupted by its node (eviction, preemption, node loss, taint), or None.

    Kubernetes marks such pods with the ``DisruptionTarget`` condition (reason
    ``EvictionByEvictionAPI``, ``PreemptionByScheduler``, ``DeletionByTaintManager``,
    ``TerminationByKubelet``...); node-pressure evictions also set ``status.reason: Evicted``.
    """
    status = pod.status
    if status is None:
        return None
    for condition in status.conditions or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            return f"{condition.reason}: {condition.message}" if condition.message else str(condition.reason)
    if status.reason in ("Evicted", "NodeLost", "Preempting", "Terminated", "Shutdown"):
        return f"{status.reason}: {status.message}" if status.message else str(status.reason)
    return None


DISRUPTED_RETRY = "a retryable failure: the task's retry resumes from the latest checkpoint (give the task retries)"


# -- merging ours under the user's -------------------------------------------------------
def infra_resources(
    *, gpu: int, cpu: float | str | None, memory_gb: float | None, storage_gb: float | None
) -> tuple[dict[str, str], dict[str, str]]:
    """(requests, limits) for AI Center's infra settings.

    CPU is requested, not limited (limits throttle); memory and ephemeral storage are both
    requested and limited so the scheduler places the pod where it fits and it cannot
    starve its node; GPUs are extended resources, given as a limit.
    """
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if cpu is not None:
        requests["cpu"] = cpu_quantity(cpu)
    if memory_gb is not None:
        requests["memory"] = limits["memory"] = memory_quantity(memory_gb)
    if storage_gb is not None:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = memory_quantity(storage_gb)
    if gpu:
        limits[GPU_RESOURCE] = str(gpu)
    return requests, limits


def merge_resources(requests: dict[str, str], limits: dict[str, str], user: Any) -> k8s.V1ResourceRequirements | None:
    """Ours, except for every resource the user named (in requests or limits): theirs, whole."""
    user = as_model(user, "V1ResourceRequirements")
    user_requests = dict((user.requests or {}) if user else {})
    user_limits = dict((user.limits or {}) if user else {})
    named = set(user_requests) | set(user_limits)
    merged_requests = {**{k: v for k, v in requests.items() if k not in named}, **user_requests}
    merged_limits = {**{k: v for k, v in limits.items() if k not in named}, **user_limits}
    if not merged_requests and not merged_limits and user is None:
        return None
    result = user or k8s.V1ResourceRequirements()
    result.requests = merged_requests or None
    result.limits = merged_limits or None
    return result


def merge_tolerations(user: list[Any] | None, gpu: int) -> list[Any]:
    tolerations = list(user or [])
    keys = {(t.get("key") if isinstance(t, dict) else t.key) for t in tolerations}
    if gpu and GPU_RESOURCE not in keys:
        tolerations.append(k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"))
    return tolerations


def _fill(target: Any, defaults: dict[str, Any]) -> Any:
    for attr, value in defaults.items():
        if getattr(target, attr) is None:
            setattr(target, attr, value)
    return target


def merge_pod_security(user: Any, container_user: Any) -> k8s.V1PodSecurityContext:
    """Non-root (uid 10001), seccomp RuntimeDefault; a user who asks for uid 0 gets it."""
    pod = as_model(user, "V1PodSecurityContext") or k8s.V1PodSecurityContext()
    container = as_model(container_user, "V1SecurityContext")
    wants_root = pod.run_as_user == 0 or (container is not None and container.run_as_user == 0)
    defaults: dict[str, Any] = {
        "run_as_user": RUNTIME_UID,
        "run_as_group": RUNTIME_UID,
        "fs_group": RUNTIME_UID,
        "seccomp_profile": k8s.V1SeccompProfile(type="RuntimeDefault"),
    }
    if not wants_root:
        defaults["run_as_non_root"] = True
    return _fill(pod, defaults)


def merge_container_security(user: Any) -> k8s.V1SecurityContext:
    """No privilege escalation, all capabilities dropped, read-only root filesystem.

    Kubernetes rejects ``allowPrivilegeEscalation: false`` next to ``privileged`` or an added
    CAP_SYS_ADMIN, so a user who asks for those keeps them and we leave that field alone.
    """
    container = as_model(user, "V1SecurityContext") or k8s.V1SecurityContext()
    added = set((container.capabilities.add or []) if container.capabilities else [])
    defaults: dict[str, Any] = {
        "capabilities": k8s.V1Capabilities(drop=["ALL"]),
        "read_only_root_filesystem": True,
    }
    if not container.privileged and not added & {"SYS_ADMIN", "CAP_SYS_ADMIN"}:
        defaults["allow_privilege_escalation"] = False
    return _fill(container, defaults)


def agent_security() -> k8s.V1SecurityContext:
    """``stage`` and ``sync`` run our code only: always the restrictive settings, whatever ``base`` asks for."""
    return k8s.V1SecurityContext(
        capabilities=k8s.V1Capabilities(drop=["ALL"]), read_only_root_filesystem=True, allow_privilege_escalation=False
    )


def _secret_ref(var: Any) -> bool:
    source = var.get("valueFrom") if isinstance(var, dict) else var.value_from
    if source is None:
        return False
    return bool(source.get("secretKeyRef") if isinstance(source, dict) else source.secret_key_ref)


def set_env(container: k8s.V1Container, env: Sequence[k8s.V1EnvVar], *, owned: set[str]) -> None:
    """Add ours; names in ``owned`` replace the user's, the others only fill gaps."""
    current = [e for e in (container.env or []) if _name(e) not in owned]
    names = {_name(e) for e in current}
    container.env = [*current, *(e for e in env if e.name in owned or e.name not in names)]


# -- the pod ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PodResources:
    """AI Center's infra settings of a run's pod: the operator's arguments of the same names (see its ``:param`` docs)."""

    gpu: int = 0
    cpu: float | str | None = None
    memory_gb: float | None = None
    storage_gb: float | None = None
    dataset_volume_claim: str | None = None
    dataset_sub_path: str | None = None


@dataclass(frozen=True)
class PodShape:
    """Everything the launcher decided about a run's pod (the operator's pod arguments are in the pod itself).

    :param image: the runtime image when neither the operator nor a template names one.
    :param base_container: KubernetesPodOperator's main container name (``base``).
    :param makes_version: the run writes a new package (``save()``): the package is writable in ``base``.
    :param resources: GPUs, CPU, memory, storage and a mounted dataset claim.
    :param spec_json: the run spec (``stage`` and ``sync`` only); None for a pod that is not tied to a run yet.
    :param run_json: the run (annotation); ``labels`` the lookup labels.
    :param store_env: the store's endpoint, region and credentials (``stage`` and ``sync`` only).
    :param agent_env: more env for ``stage`` and ``sync`` (a Job's rendezvous address).
    :param ports: container ports of ``base`` (a Job's rendezvous port).
    :param blob_cache: the node's blob cache (connection extra ``blob_cache``): a hostPath in ``stage`` alone.
    """

    image: str | None
    base_container: str = "base"
    makes_version: bool = True
    resources: PodResources = field(default_factory=PodResources)
    spec_json: str | None = None
    run_json: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    store_env: tuple[k8s.V1EnvVar, ...] = ()
    agent_env: tuple[k8s.V1EnvVar, ...] = ()
    ports: tuple[k8s.V1ContainerPort, ...] = ()
    blob_cache: NodeBlobCache | None = None

    @property
    def source_builds(self) -> bool:
        """The run installs its requirements with ``allow_source_builds``: the pod gets the ``build`` container."""
        if self.spec_json is None:
            return False
        spec = json.loads(self.spec_json)
        return bool(spec.get("install_requirements") and spec.get("allow_source_builds"))


@dataclass(frozen=True)
class _Volume:
    name: str
    path: str
    #: Mounted read-only in ``base``; None: not mounted in ``base`` at all.
    base_read_only: bool | None
    in_sync: bool = True
    in_stage: bool = True


def volumes_of(shape: PodShape) -> list[_Volume]:
    """Our volumes and where each container sees them (DESIGN "Trust boundaries")."""
    return [
        _Volume(WORK_VOLUME, WORK_MOUNT, False),
        _Volume(PACKAGE_VOLUME, PACKAGE_MOUNT, not shape.makes_version),
        _Volume(DATA_VOLUME, DATA_MOUNT, True),
        _Volume(TEST_DATA_VOLUME, TEST_DATA_MOUNT, True),
        _Volume(BIN_VOLUME, BIN_MOUNT, True, in_sync=False),
        _Volume(ENV_VOLUME, ENV_MOUNT, True),  # sync reads it (read-only) to store what build made
        _Volume(STATE_VOLUME, STATE_MOUNT, None),
        _Volume(TMP_VOLUME, TMP_MOUNT, False, in_sync=False, in_stage=False),
        _Volume(AGENT_TMP_VOLUME, TMP_MOUNT, None),
    ]


def shape_pod(pod: k8s.V1Pod, shape: PodShape) -> k8s.V1Pod:
    """The run's three containers around KubernetesPodOperator's pod; the user's settings win, field by field.

    The user's container settings (image, resources, env, mounts, security) stay on ``base``;
    GPUs and AI Center's resources go to ``base`` alone. ``stage`` and ``sync`` run the same
    image with the run spec and the store's credentials, and the user's own volume mounts (a
    file store mounted into the pod must be reachable by the containers that write it).
    """
    base = base_container(pod, shape.base_container)
    base.image = base.image or shape.image
    if not base.image:
        raise ConfigurationError(
            "launcher='kubernetes' needs the runtime image: pass image='<registry>/aicenter-runtime:<tag>' or set "
            '"image" in the aicenter connection\'s extras (build it from docker/Dockerfile, see docker/README.md)'
        )
    if not base.command and not base.args:
        base.command = list(SUPERVISOR_COMMAND)
    user_mounts = list(base.volume_mounts or [])
    taken = {_mount_path(m) for m in user_mounts}
    volumes = list(pod.spec.volumes or [])
    res = shape.resources
    size = memory_quantity(res.storage_gb) if res.storage_gb is not None else None
    ours = volumes_of(shape)
    for volume in ours:
        if volume.name == TMP_VOLUME and TMP_MOUNT in taken:
            continue
        source = k8s.V1EmptyDirVolumeSource(size_limit=size if volume.name == WORK_VOLUME else None)
        volumes.append(k8s.V1Volume(name=volume.name, empty_dir=source))
    dataset: k8s.V1VolumeMount | None = None
    if res.dataset_volume_claim:
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=res.dataset_volume_claim, read_only=True)
        volumes.append(k8s.V1Volume(name=DATASET_VOLUME, persistent_volume_claim=claim))
        dataset = k8s.V1VolumeMount(
            name=DATASET_VOLUME, mount_path=DATASET_MOUNT, read_only=True, sub_path=res.dataset_sub_path or None
        )
    if shape.blob_cache is not None:
        # Shared by every pod on the node: stage alone mounts it (our code; it verifies each entry's digest as it
        # copies it into the package volume, see storage/cache.py), never base, build or sync.
        host = k8s.V1HostPathVolumeSource(path=shape.blob_cache.host_path, type="DirectoryOrCreate")
        volumes.append(k8s.V1Volume(name=BLOB_CACHE_VOLUME, host_path=host))
    pod.spec.volumes = volumes

    base_mounts = list(user_mounts)
    for volume in ours:
        if volume.base_read_only is None or volume.path in taken:  # the user's mount there wins in base
            continue
        base_mounts.append(k8s.V1VolumeMount(name=volume.name, mount_path=volume.path, read_only=volume.base_read_only or None))
    if dataset is not None and DATASET_MOUNT not in taken:
        base_mounts.append(dataset)
    base.volume_mounts = base_mounts
    # The user's own variables of the user container (env_vars, secrets=[Secret('env', ...)]) reach
    # user code: stage learns their names (never their values) to put in the supervisor's plan.
    user_vars = [e for e in (base.env or []) if _name(e) not in (SPEC_ENV, "AICENTER_WORKDIR")]
    user_names = sorted({str(_name(e)) for e in user_vars})
    secret_names = sorted({str(_name(e)) for e in user_vars if _secret_ref(e)})
    set_env(
        base,
        [
            k8s.V1EnvVar(name="HOME", value=f"{WORK_MOUNT}/.home"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
        ],
        owned=set(),
    )
    base.env = [e for e in (base.env or []) if _name(e) not in (SPEC_ENV, "AICENTER_WORKDIR")]
    requests, limits = infra_resources(gpu=res.gpu, cpu=res.cpu, memory_gb=res.memory_gb, storage_gb=res.storage_gb)
    base.resources = merge_resources(requests, limits, base.resources)
    pod.spec.tolerations = merge_tolerations(pod.spec.tolerations, res.gpu)
    pod.spec.security_context = merge_pod_security(pod.spec.security_context, base.security_context)
    base.security_context = merge_container_security(base.security_context)
    if shape.ports:
        base.ports = [*(base.ports or []), *shape.ports]
    if pod.spec.automount_service_account_token is None:
        # Package code has no business with the Kubernetes API; IRSA and workload identity
        # inject their own projected token into the containers that need it.
        pod.spec.automount_service_account_token = False
    pod.spec.share_process_namespace = False

    def runtime_container(name: str, command: Sequence[str], env: list[k8s.V1EnvVar],
                          mounts: list[k8s.V1VolumeMount]) -> k8s.V1Container:
        """A container of ours beside ``base`` (stage, build, sync): the runtime image, the agents' security."""
        return k8s.V1Container(
            name=name,
            image=base.image,
            image_pull_policy=base.image_pull_policy,
            command=list(command),
            env=env,
            volume_mounts=mounts,
            security_context=agent_security(),
            termination_message_policy="FallbackToLogsOnError",
        )

    def agent(name: str, command: Sequence[str]) -> k8s.V1Container:
        mounts = [m for m in user_mounts if _mount_path(m) not in {v.path for v in ours}]
        for volume in ours:
            if (volume.in_stage if name == STAGE_CONTAINER else volume.in_sync) and volume.name != TMP_VOLUME:
                read_only = name == SYNC_CONTAINER and volume.name == ENV_VOLUME
                mounts.append(k8s.V1VolumeMount(name=volume.name, mount_path=volume.path, read_only=read_only or None))
        if dataset is not None:
            mounts.append(copy.deepcopy(dataset))
        node_cache: list[k8s.V1EnvVar] = []
        if shape.blob_cache is not None and name == STAGE_CONTAINER:
            mounts.append(k8s.V1VolumeMount(name=BLOB_CACHE_VOLUME, mount_path=BLOB_CACHE_MOUNT))
            node_cache.append(k8s.V1EnvVar(name="AICENTER_BLOB_CACHE", value=BLOB_CACHE_MOUNT))
            if shape.blob_cache.max_size is not None:
                node_cache.append(k8s.V1EnvVar(name="AICENTER_BLOB_CACHE_MAX", value=shape.blob_cache.max_size))
        env = [
            k8s.V1EnvVar(name="AICENTER_WORKDIR", value=WORK_MOUNT),
            k8s.V1EnvVar(name="AICENTER_STATE", value=STATE_MOUNT),
            k8s.V1EnvVar(name="AICENTER_CACHE", value=ENV_MOUNT),
            k8s.V1EnvVar(name="AICENTER_USER_HOME", value=f"{WORK_MOUNT}/.home"),
            k8s.V1EnvVar(name="HOME", value=f"{STATE_MOUNT}/home"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
            *([k8s.V1EnvVar(name=SPEC_ENV, value=shape.spec_json)] if shape.spec_json is not None else []),
            *shape.store_env,
            *shape.agent_env,
            *node_cache,
            *([k8s.V1EnvVar(name=USER_ENV_NAMES, value=",".join(user_names))] if user_names else []),
            *([k8s.V1EnvVar(name=USER_SECRET_NAMES, value=",".join(secret_names))] if secret_names else []),
        ]
        return runtime_container(name, command, env, mounts)

    def build() -> k8s.V1Container:
        """``build``: the environment only, as package code (no spec, credentials or user env; see the module doc)."""
        # The user's own mounts, as base has them (a netrc for a private index mounted from a Secret).
        own = {WORK_MOUNT, PACKAGE_MOUNT, ENV_MOUNT, TMP_MOUNT, *(v.path for v in ours)}
        mounts = [
            *(copy.deepcopy(m) for m in user_mounts if _mount_path(m) not in own),
            k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=WORK_MOUNT, read_only=True),
            k8s.V1VolumeMount(name=PACKAGE_VOLUME, mount_path=PACKAGE_MOUNT, read_only=True),
            k8s.V1VolumeMount(name=ENV_VOLUME, mount_path=ENV_MOUNT),
            k8s.V1VolumeMount(name=BUILD_TMP_VOLUME, mount_path=TMP_MOUNT),
        ]
        env = [
            k8s.V1EnvVar(name="AICENTER_CACHE", value=ENV_MOUNT),
            k8s.V1EnvVar(name="HOME", value=TMP_MOUNT),
            k8s.V1EnvVar(name="TMPDIR", value=TMP_MOUNT),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
        ]
        return runtime_container(BUILD_CONTAINER, BUILD_COMMAND, env, mounts)

    init = [c for c in (pod.spec.init_containers or []) if _name(c) not in (STAGE_CONTAINER, BUILD_CONTAINER)]
    builds = [build()] if shape.source_builds else []
    if builds:
        pod.spec.volumes = [*pod.spec.volumes, k8s.V1Volume(name=BUILD_TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource())]
    pod.spec.init_containers = [*init, agent(STAGE_CONTAINER, STAGE_COMMAND), *builds]
    others = [c for c in (pod.spec.containers or []) if c is not base and _name(c) != SYNC_CONTAINER]
    pod.spec.containers = [base, *others, agent(SYNC_CONTAINER, SYNC_COMMAND)]
    if shape.labels:
        pod.metadata.labels = {**(pod.metadata.labels or {}), **shape.labels}
    if shape.run_json is not None:
        pod.metadata.annotations = {**(pod.metadata.annotations or {}), ANNOTATION_RUN: shape.run_json}
    return pod


# -- the Indexed Job of a distributed run -------------------------------------------------
def job_agent_env(name: str, nodes: int) -> tuple[k8s.V1EnvVar, ...]:
    """The rendezvous address the agent gives the user processes: node 0's stable name and port."""
    hosts = ",".join(f"{name}-{i}.{name}" for i in range(nodes))
    return (
        k8s.V1EnvVar(name="AICENTER_MASTER_ADDR", value=f"{name}-0.{name}"),
        k8s.V1EnvVar(name="AICENTER_MASTER_PORT", value=str(MASTER_PORT)),
        k8s.V1EnvVar(name="AICENTER_WORKER_HOSTS", value=hosts),
    )


def job_ports() -> tuple[k8s.V1ContainerPort, ...]:
    return (k8s.V1ContainerPort(name="rendezvous", container_port=MASTER_PORT),)


#: A node disrupted by the cluster (eviction, preemption, node loss: the ``DisruptionTarget`` condition) fails the whole
#: Job at once, named in its ``Failed`` condition (reason ``PodFailurePolicy``) even when the pod is gone; without it a
#: gang with a gone pod could wait on a replacement or half-restart. The launcher reports it as a retryable disruption.
DISRUPTION_FAILS_JOB = k8s.V1PodFailurePolicy(rules=[k8s.V1PodFailurePolicyRule(
    action="FailJob", on_pod_conditions=[k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")],
)])


def job_manifests(
    pod: k8s.V1Pod, *, name: str, namespace: str, nodes: int, run_label: str, run_json: str
) -> tuple[k8s.V1Job, k8s.V1Service]:
    """The Indexed Job (the run's pod as its template) and its headless Service (node 0's stable name)."""
    labels = {**(pod.metadata.labels or {}), LABEL_JOB: name}
    # KPO's per-try labels would make the Job's pods look like a KPO pod of one try.
    for kpo_label in ("try_number", "already_checked"):
        labels.pop(kpo_label, None)
    # Queued (Kueue): the Job carries the queue label and is created suspended; Kueue admits it whole.
    queue = labels.get(QUEUE_LABEL)
    pod.spec.restart_policy = "Never"
    pod.spec.subdomain = name
    meta = k8s.V1ObjectMeta(labels=labels, annotations=pod.metadata.annotations)
    template = k8s.V1PodTemplateSpec(metadata=meta, spec=pod.spec)
    job = k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={LABEL_JOB: name, LABEL_RUN: label_value(run_label), **({QUEUE_LABEL: queue} if queue else {})},
            annotations={ANNOTATION_RUN: run_json},
        ),
        spec=k8s.V1JobSpec(completion_mode="Indexed", completions=nodes, parallelism=nodes, backoff_limit=0, template=template,
                           suspend=True if queue else None, pod_failure_policy=DISRUPTION_FAILS_JOB),
    )
    service = k8s.V1Service(
        api_version="v1",
        kind="Service",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={LABEL_JOB: name}),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None",
            selector={LABEL_JOB: name},
            publish_not_ready_addresses=True,
            ports=[k8s.V1ServicePort(name="rendezvous", port=MASTER_PORT, target_port=MASTER_PORT)],
        ),
    )
    return job, service
