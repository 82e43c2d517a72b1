"""The Kubernetes launcher: the runtime in a pod that KubernetesPodOperator starts and watches.

:class:`KubernetesLauncher` is a mixin placed before ``KubernetesPodOperator`` in
``BasePipelineOperator``'s bases, so its overrides call the real operator with ``super()``
and every KubernetesPodOperator argument, pod template and ``deferrable=True`` keep working.
What it adds, and why:

- **the pod** (:meth:`build_pod_request_obj`): the runtime command, the run spec in
  ``AICENTER_RUN_SPEC`` (never a secret: secret-looking ``env`` keys are refused, see
  :func:`refuse_secret_env`), a work volume (``emptyDir``, ``sizeLimit`` = ``storage_gb``)
  holding the run folder, ``$HOME`` and pip's ``--user`` installs, a ``/tmp`` volume (so the
  root filesystem can be read-only), AI Center's infra settings as resources (``gpu`` ->
  ``nvidia.com/gpu`` limit plus a toleration, ``cpu``, ``memory_gb``, ``storage_gb``), lookup
  labels, and a restrictive security context. Whatever the user gave (arguments, templates)
  wins over each of our settings, field by field.
- **credentials**: S3 keys come from a named Kubernetes Secret through ``secretKeyRef``
  (``aws_secret_name``) or from the pod's service account (IRSA / workload identity: nothing
  injected). Only the endpoint URL and region, which are not secret, travel as plain env.
- **results without the XCom sidecar** (#37298, #45772): the runtime writes ``outcome.json``
  into the run folder; after the pod ends the operator reads it in :meth:`cleanup`, *before*
  the pod is deleted, and runs the same register -> ``_results.json`` -> XCom -> Asset step as
  the local launcher. A worker that dies in between leaves the finished pod behind; the next
  attempt reattaches to it (:meth:`get_or_create_pod`) and ``Registry.commit_once`` keyed on
  the pod's own run makes the registration happen once.
- **never trust the pod phase alone** (#73006): success needs ``outcome.json`` saying so.
- **never reattach to a foreign pod** (#39096): a pod found by labels must carry our
  ``aicenter/run`` annotation for this very task, or the task fails naming the pod.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_aicenter.errors import AICenterError, ConfigurationError, RunError
from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.records import Outcome, RunRef, RunSpec, is_secret_key, read_optional, write

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_aicenter.operators.pipeline import BasePipelineOperator

#: Where the work volume is mounted; the runtime's AICENTER_WORKDIR (run folder, HOME, pip --user).
WORK_MOUNT = "/aicenter/work"
#: Where a dataset PersistentVolumeClaim is mounted, read-only; the run's data_directory.
DATASET_MOUNT = "/aicenter/dataset"
TMP_MOUNT = "/tmp"
WORK_VOLUME, TMP_VOLUME, DATASET_VOLUME = "aicenter-work", "aicenter-tmp", "aicenter-dataset"
RUNTIME_COMMAND = ("python", "-m", "airflow_aicenter.runtime")
#: The runtime image's user (docker/Dockerfile); any image works, HOME is set explicitly.
RUNTIME_UID = 10001
SPEC_ENV = "AICENTER_RUN_SPEC"
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_PACKAGE, LABEL_VERSION, LABEL_RUN = "aicenter/package", "aicenter/version", "aicenter/run"
#: Annotation with the exact RunRef (JSON) of the run the pod executes; labels are lossy.
ANNOTATION_RUN = "aicenter/run"
#: Keys of the ``aws_secret_name`` Secret, mapped to the same env names; the token is optional.
AWS_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_SESSION_TOKEN": True}
#: Seconds on_kill waits for the runtime to record "killed" itself before writing it.
KILL_RECORD_WAIT = 10.0
EVENT_KEY = "aicenter"
_MAX_LABEL = 63


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
        raise ConfigurationError(f"{name}={value!r} is not valid; give a positive number (cpu also takes \"500m\")")


def check_sub_path(sub_path: str | None) -> None:
    if sub_path is None:
        return
    parts = PurePosixPath(sub_path).parts
    if not sub_path or sub_path.startswith("/") or ".." in parts:
        raise ConfigurationError(
            f"dataset_sub_path={sub_path!r} is not valid; give a relative folder inside the volume claim, without '..'"
        )


def check_infra(*, cpu: float | str | None, memory_gb: float | None, storage_gb: float | None, dataset_sub_path: str | None) -> None:
    """Validate AI Center's infra settings when the DAG is parsed, long before a pod exists."""
    _positive("cpu", cpu)
    _positive("memory_gb", memory_gb)
    _positive("storage_gb", storage_gb)
    check_sub_path(dataset_sub_path)


def pvc_uri(claim: str, sub_path: str | None) -> str:
    """How a mounted dataset is named in records and ``_results.json``."""
    return f"pvc://{claim}/{(sub_path or '').strip('/')}".rstrip("/")


def refuse_secret_env(env: dict[str, Any]) -> None:
    """Secret-looking ``env`` keys cannot go into a pod spec (anyone who can read pods reads them).

    Creating Secrets on the fly would leave orphans behind on every crash and needs write
    access to Secrets, so the user points at an existing Secret instead.
    """
    secret = sorted(k for k in env if is_secret_key(k))
    if secret:
        first = secret[0]
        raise ConfigurationError(
            f"env key(s) {', '.join(secret)} look secret and would be readable in the pod spec; with launcher='kubernetes' "
            f"put them in a Kubernetes Secret and pass secrets=[Secret('env', '{first}', '<secret-name>', '<key>')] "
            "(airflow.providers.cncf.kubernetes.secret.Secret) or env_from=[...]; if a key is not secret, pass it as "
            f"env_vars={{'{first}': ...}} instead"
        )


def _first_lines(error: BaseException, limit: int = 2) -> str:
    """The gist of a KubernetesPodOperator error, without its multi-line pod dump.

    KPO's cleanup raises a generic "Pod ... returned a failure" from a ``finally`` block, which
    hides the real launch error (image pull, timeout) in ``__context__``: that one is used.
    """
    if "returned a failure" in str(error) and error.__context__ is not None:
        error = error.__context__
    text = str(error).split("remote_pod:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:limit]) or type(error).__name__


_API: ApiClient | None = None


def as_model(value: Any, klass: str) -> Any:
    """A kubernetes model from a dict in API (camelCase) form; models pass through."""
    global _API
    if value is None or not isinstance(value, dict):
        return value
    if not value:
        return None
    _API = _API or ApiClient()

    class _Response:
        data = json.dumps(value)

    return _API.deserialize(_Response(), klass)


def base_container(pod: k8s.V1Pod, name: str) -> k8s.V1Container:
    containers = pod.spec.containers or []
    return next((c for c in containers if c.name == name), containers[0])


def termination(pod: k8s.V1Pod | None, container: str) -> tuple[int | None, str | None, str | None]:
    """(exit code, reason, message) of the container once terminated, else Nones."""
    statuses = (pod.status.container_statuses or []) if pod is not None and pod.status else []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status and status.state else None
    if terminated is None:
        return None, None, None
    message = (terminated.message or "").strip() or None
    return terminated.exit_code, terminated.reason, message


# -- what a pod runs ---------------------------------------------------------------------
@dataclass(frozen=True)
class PodRun:
    """The run a pod executes: its spec (pod env) and its run folder (annotation)."""

    spec: RunSpec
    run: RunRef

    @classmethod
    def from_pod(cls, pod: k8s.V1Pod | None, container: str) -> PodRun | None:
        if pod is None or pod.metadata is None or pod.spec is None:
            return None
        raw_run = (pod.metadata.annotations or {}).get(ANNOTATION_RUN)
        env = {e.name: e.value for e in (base_container(pod, container).env or []) if e.value is not None}
        if not raw_run or SPEC_ENV not in env:
            return None
        try:
            return cls(spec=RunSpec.model_validate_json(env[SPEC_ENV]), run=RunRef.model_validate_json(raw_run))
        except ValueError:
            return None

    def to_event(self) -> dict[str, str]:
        return {"spec": self.spec.model_dump_json(), "run": self.run.model_dump_json()}

    @classmethod
    def from_event(cls, data: Any) -> PodRun | None:
        if not isinstance(data, dict) or "spec" not in data or "run" not in data:
            return None
        return cls(spec=RunSpec.model_validate_json(data["spec"]), run=RunRef.model_validate_json(data["run"]))

    def same_task(self, other: PodRun) -> bool:
        """Same task instance, package and pipeline (any try): safe to reattach to."""
        a, b = self.run, other.run
        return (a.dag_id, a.run_id, a.task_id, a.map_index, self.spec.package, self.spec.pipeline) == (
            b.dag_id, b.run_id, b.task_id, b.map_index, other.spec.package, other.spec.pipeline)


# -- merging ours under the user's -------------------------------------------------------
def infra_resources(*, gpu: int, cpu: float | str | None, memory_gb: float | None, storage_gb: float | None) -> tuple[dict[str, str], dict[str, str]]:
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
        "run_as_user": RUNTIME_UID, "run_as_group": RUNTIME_UID, "fs_group": RUNTIME_UID,
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


def _set_env(container: k8s.V1Container, env: list[k8s.V1EnvVar], *, owned: set[str]) -> None:
    """Add ours; names in ``owned`` replace the user's, the others only fill gaps."""
    current = [e for e in (container.env or []) if (e.get("name") if isinstance(e, dict) else e.name) not in owned]
    names = {(e.get("name") if isinstance(e, dict) else e.name) for e in current}
    container.env = [*current, *(e for e in env if e.name in owned or e.name not in names)]


# -- the mixin ---------------------------------------------------------------------------
class KubernetesLauncher:
    """KubernetesPodOperator overrides that run the AI Center runtime in a pod. See the module doc."""

    _pod_run: PodRun | None = None
    _aicenter_hook: AICenterHook | None = None
    _aicenter_result: dict[str, Any] | None = None
    _complete_error: BaseException | None = None
    _final_pod: k8s.V1Pod | None = None

    # -- entry from BasePipelineOperator.execute --------------------------------------
    def check_kubernetes(self: BasePipelineOperator) -> None:
        """What a pod cannot do, refused before anything starts (and recorded like any refused run)."""
        refuse_secret_env(self.env)
        if self.pipeline == "evaluate" and self.dataset_volume_claim:
            raise ConfigurationError("dataset_volume_claim mounts the training dataset; evaluation runs read evaluation_dataset=URI")

    def execute_kubernetes(self: BasePipelineOperator, context: Context, hook: AICenterHook, spec: RunSpec, run: RunRef) -> dict[str, Any]:
        """Run the spec in a pod; returns the XCom dict (sync) or defers (deferrable)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.sdk.exceptions import TaskDeferred

        if hook.settings.storage.startswith("file://"):
            self.log.warning(
                "The store is %s on the worker's disk: the pod must see the same path (mount it with volumes=/volume_mounts), "
                "or use an s3:// store", hook.settings.storage)
        self._aicenter_hook = hook
        self._pod_run = PodRun(
            spec=spec.model_copy(update={
                "install_requirements": True if self.install_requirements is None else self.install_requirements,
                "dataset_mount": DATASET_MOUNT if self.dataset_volume_claim else None,
            }),
            run=run,
        )
        try:
            KubernetesPodOperator.execute(self, context)
        except (TaskDeferred, AICenterError):
            raise
        except Exception as exc:
            if exc is self._complete_error:
                raise
            return self._fail_or_complete(context, exc)
        if self._aicenter_result is not None:
            return self._aicenter_result
        return self._fail_or_complete(context, None)

    # -- the pod ----------------------------------------------------------------------
    def build_pod_request_obj(self: BasePipelineOperator, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        hook = self._aicenter_hook or AICenterHook(self.aicenter_conn_id)
        settings = hook.settings
        if self.namespace is None and settings.namespace and self._template_namespace() is None:
            self.namespace = settings.namespace
        check_sub_path(self.dataset_sub_path)
        pod = super().build_pod_request_obj(context, dry_run=dry_run)  # type: ignore[misc]
        container = base_container(pod, self.base_container_name)

        container.image = container.image or settings.image
        if not container.image:
            raise ConfigurationError(
                "launcher='kubernetes' needs the runtime image: pass image='<registry>/aicenter-runtime:<tag>' or set "
                '"image" in the aicenter connection\'s extras (build it from docker/Dockerfile, see docker/README.md)'
            )
        if not container.command and not container.args:
            container.command = list(RUNTIME_COMMAND)

        self._add_volumes(pod, container)
        self._add_env(container, hook)
        requests, limits = infra_resources(gpu=self.gpu, cpu=self.cpu, memory_gb=self.memory_gb, storage_gb=self.storage_gb)
        container.resources = merge_resources(requests, limits, container.resources)
        pod.spec.tolerations = merge_tolerations(pod.spec.tolerations, self.gpu)
        pod.spec.security_context = merge_pod_security(pod.spec.security_context, container.security_context)
        container.security_context = merge_container_security(container.security_context)
        if pod.spec.automount_service_account_token is None:
            # Training code has no business with the Kubernetes API; IRSA and workload
            # identity inject their own projected token and do not need this one.
            pod.spec.automount_service_account_token = False

        if self._pod_run is not None:
            spec, run = self._pod_run.spec, self._pod_run.run
            pod.metadata.labels = {
                **(pod.metadata.labels or {}),
                LABEL_PACKAGE: label_value(spec.package),
                LABEL_VERSION: label_value(spec.version),
                LABEL_RUN: label_value(run.label),
            }
            pod.metadata.annotations = {**(pod.metadata.annotations or {}), ANNOTATION_RUN: run.model_dump_json()}
        return pod

    def _template_namespace(self: BasePipelineOperator) -> str | None:
        from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

        template: Any = None
        if self.full_pod_spec is not None:
            template = self.full_pod_spec
        if template is None or not (template.metadata and template.metadata.namespace):
            if self.pod_template_file:
                template = PodGenerator.deserialize_model_file(self.pod_template_file)
            elif self.pod_template_dict:
                template = PodGenerator.deserialize_model_dict(self.pod_template_dict)
        return template.metadata.namespace if template is not None and template.metadata else None

    def _add_volumes(self: BasePipelineOperator, pod: k8s.V1Pod, container: k8s.V1Container) -> None:
        mounts = list(container.volume_mounts or [])
        taken = {(m.get("mountPath") if isinstance(m, dict) else m.mount_path) for m in mounts}
        volumes = list(pod.spec.volumes or [])
        storage = memory_quantity(self.storage_gb) if self.storage_gb is not None else None
        ours: list[tuple[k8s.V1Volume, k8s.V1VolumeMount]] = [
            (k8s.V1Volume(name=WORK_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=storage)),
             k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=WORK_MOUNT)),
            (k8s.V1Volume(name=TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()),
             k8s.V1VolumeMount(name=TMP_VOLUME, mount_path=TMP_MOUNT)),
        ]
        if self.dataset_volume_claim:
            claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=self.dataset_volume_claim, read_only=True)
            ours.append((k8s.V1Volume(name=DATASET_VOLUME, persistent_volume_claim=claim),
                         k8s.V1VolumeMount(name=DATASET_VOLUME, mount_path=DATASET_MOUNT, read_only=True,
                                           sub_path=self.dataset_sub_path or None)))
        for volume, mount in ours:
            if mount.mount_path in taken:  # the user mounts their own volume there: theirs wins
                continue
            volumes.append(volume)
            mounts.append(mount)
        pod.spec.volumes = volumes
        container.volume_mounts = mounts

    def _add_env(self: BasePipelineOperator, container: k8s.V1Container, hook: AICenterHook) -> None:
        env = [
            k8s.V1EnvVar(name="AICENTER_WORKDIR", value=WORK_MOUNT),
            k8s.V1EnvVar(name="HOME", value=f"{WORK_MOUNT}/.home"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
        ]
        if self._pod_run is not None:
            env.append(k8s.V1EnvVar(name=SPEC_ENV, value=self._pod_run.spec.model_dump_json()))
        if hook.uses_s3(self.dataset, self.evaluation_dataset):
            options = hook.s3_options
            if options is not None and options.endpoint_url:
                env.append(k8s.V1EnvVar(name="AWS_ENDPOINT_URL", value=options.endpoint_url))
            if options is not None and options.region:
                env.append(k8s.V1EnvVar(name="AWS_REGION", value=options.region))
            secret_name = self.aws_secret_name or hook.settings.extra.get("aws_secret_name")
            if secret_name:
                for key, optional in AWS_SECRET_KEYS.items():
                    ref = k8s.V1SecretKeySelector(name=secret_name, key=key, optional=optional or None)
                    env.append(k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(secret_key_ref=ref)))
        _set_env(container, env, owned={SPEC_ENV, "AICENTER_WORKDIR"})

    # -- reattach ---------------------------------------------------------------------
    def get_or_create_pod(self: BasePipelineOperator, pod_request_obj: k8s.V1Pod, context: Context) -> k8s.V1Pod:
        """KPO's, plus: reuse a finished pod whose run succeeded, and refuse foreign pods.

        KubernetesPodOperator deletes a terminated pod it finds and starts a new one; for us
        that would train again and register a second version. A finished pod of this task
        whose ``outcome.json`` says succeeded is reused instead: its result is registered
        (once, under its own run) and reported.
        """
        pod = self._finished_pod_to_reuse(pod_request_obj, context) if self.reattach_on_restart else None
        if pod is None:
            pod = super().get_or_create_pod(pod_request_obj, context)  # type: ignore[misc]
        found = PodRun.from_pod(pod, self.base_container_name)
        planned = self._pod_run
        name = f"{pod.metadata.namespace}/{pod.metadata.name}"
        if found is None or (planned is not None and not found.same_task(planned)):
            what = "was not started by airflow-aicenter" if found is None else f"runs {found.spec.package} ({found.spec.pipeline}) for {found.run.label}"
            raise RunError(
                f"pod {name} matches this task's labels but {what}; refusing to reattach to it. "
                f"Delete it (kubectl delete pod -n {pod.metadata.namespace} {pod.metadata.name}) and clear the task"
            )
        if planned is not None and found.run.prefix != planned.run.prefix:
            self.log.info("Reattached to pod %s of an earlier attempt: its run folder %s holds the result", name, found.run.uri or found.run.prefix)
        self._pod_run = found
        self.trigger_kwargs = {**(self.trigger_kwargs or {}), EVENT_KEY: found.to_event()}
        return pod

    def _finished_pod_to_reuse(self: BasePipelineOperator, pod_request_obj: k8s.V1Pod, context: Context) -> k8s.V1Pod | None:
        pod = self.find_pod(pod_request_obj.metadata.namespace, context=context)
        if pod is None or pod.status is None or pod.status.phase not in ("Succeeded", "Failed"):
            return None
        found = PodRun.from_pod(pod, self.base_container_name)
        if found is None:
            return None
        outcome = read_optional(self._hook().get_store(), f"{found.run.prefix}/outcome.json", Outcome)
        if outcome is None or outcome.status != "succeeded":
            return None  # a failed run is trained again by the retry, as KPO does
        self.log.info("Found finished pod %s/%s whose run succeeded: using its result instead of training again",
                      pod.metadata.namespace, pod.metadata.name)
        return pod

    # -- after the pod ----------------------------------------------------------------
    def cleanup(self: BasePipelineOperator, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, xcom_result: dict | None = None,
                context: Context | None = None) -> None:
        """Complete a succeeded run *before* KPO deletes the pod, so a crash here is recoverable."""
        if remote_pod is not None:
            self._final_pod = remote_pod
        phase = remote_pod.status.phase if remote_pod is not None and remote_pod.status else None
        if not self._killed and context is not None and self._pod_run is not None and phase in ("Succeeded", "Failed"):
            outcome = read_optional(self._hook().get_store(), f"{self._pod_run.run.prefix}/outcome.json", Outcome)
            if outcome is not None and outcome.status == "succeeded":
                try:
                    self._aicenter_result = self._complete(context, outcome)
                except Exception as exc:
                    self._complete_error = exc
                    self.log.error("Completing the run failed; pod %s is kept so that a retry reattaches to it and "
                                   "registers its result once", remote_pod.metadata.name)
                    raise
        super().cleanup(pod, remote_pod, xcom_result, context)  # type: ignore[misc]

    def trigger_reentry(self: BasePipelineOperator, context: Context, event: dict[str, Any]) -> Any:
        """Deferrable re-entry: KPO's logs and cleanup, then the same post-pod step as sync."""
        from airflow.sdk.exceptions import TaskDeferred

        if self._aicenter_result is not None:  # completed while skipping the deferral
            return self._aicenter_result
        self._pod_run = PodRun.from_event(event.get(EVENT_KEY)) or self._pod_run
        if self._pod_run is None:
            raise RunError(f"the trigger event carries no aicenter run ({sorted(event)}); clear the task to run it again")
        self.trigger_kwargs = {**(self.trigger_kwargs or {}), EVENT_KEY: self._pod_run.to_event()}
        try:
            super().trigger_reentry(context, event)  # type: ignore[misc]
        except (TaskDeferred, AICenterError):
            raise
        except Exception as exc:
            if exc is self._complete_error:
                raise
            self._aicenter_result = self._fail_or_complete(context, exc)
            return self._aicenter_result
        if self._aicenter_result is None:
            self._aicenter_result = self._fail_or_complete(context, None)
        return self._aicenter_result

    def _hook(self: BasePipelineOperator) -> AICenterHook:
        if self._aicenter_hook is None:
            self._aicenter_hook = AICenterHook(self.aicenter_conn_id)
        return self._aicenter_hook

    def _complete(self: BasePipelineOperator, context: Context, outcome: Outcome) -> dict[str, Any]:
        assert self._pod_run is not None
        hook = self._hook()
        spec = self._pod_run.spec
        parent = hook.get_registry().get(spec.package, spec.version)
        return self.complete(context, hook, self._pod_run.run, parent, outcome)

    def _fail_or_complete(self: BasePipelineOperator, context: Context, failure: BaseException | None) -> dict[str, Any]:
        """outcome.json decides: succeeded -> complete; otherwise fail with the one-line cause."""
        assert self._pod_run is not None
        spec = self._pod_run.spec
        store = self._hook().get_store()
        key = f"{self._pod_run.run.prefix}/outcome.json"
        outcome = read_optional(store, key, Outcome)
        code, reason, message = termination(self._final_pod or self.remote_pod or self.pod, self.base_container_name)
        if outcome is not None and outcome.status == "succeeded":
            if failure is not None:
                self.log.warning("The pod reported a problem (%s), but the runtime's outcome.json says the run succeeded",
                                 _first_lines(failure))
            return self._complete(context, outcome)
        if outcome is None and code is None:
            cause = f"the training pod did not run: {_first_lines(failure) if failure else 'it ended without starting the runtime'}"
            write(store, key, Outcome.starting(spec, "failed", end_at=time.time(), error=cause))
            raise RunError(f"{spec.pipeline} run of {spec.package}:{spec.version} failed: {cause}") from None
        if outcome is None or outcome.status == "running":
            outcome = outcome or Outcome.starting(spec)
            detail = f"exit code {code}" + (f", {reason}" if reason else "")
            outcome.status, outcome.end_at = "failed", time.time()
            outcome.error = (f"the pod's container ended ({detail}) during {outcome.phase or 'start-up'} before the runtime "
                             "reported an outcome" + (f": {message.splitlines()[-1]}" if message else ""))
            if reason == "OOMKilled":
                outcome.error += "; it ran out of memory: give it more with memory_gb=..."
            write(store, key, outcome)
        try:
            outcome = self.read_outcome(store, spec, exit_code=code)
        except RunError as exc:
            raise RunError(str(exc)) from None
        return self._complete(context, outcome)

    # -- kill -------------------------------------------------------------------------
    def on_kill(self: BasePipelineOperator) -> None:
        """KPO deletes the pod; the run is then recorded as killed (if the runtime could not)."""
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnKillAction

        super().on_kill()  # type: ignore[misc]
        if self._pod_run is None or self.on_kill_action == OnKillAction.KEEP_POD:
            return
        spec, key = self._pod_run.spec, f"{self._pod_run.run.prefix}/outcome.json"
        try:
            store = self._hook().get_store()
            deadline = time.monotonic() + KILL_RECORD_WAIT
            outcome = read_optional(store, key, Outcome)
            while self.pod is not None and outcome is not None and outcome.status == "running" and time.monotonic() < deadline:
                time.sleep(0.5)
                outcome = read_optional(store, key, Outcome)
            if outcome is None or outcome.status == "running":
                outcome = outcome or Outcome.starting(spec)
                outcome.status, outcome.end_at = "killed", time.time()
                outcome.error = f"killed by Airflow (task stopped) during {outcome.phase or 'start-up'}"
                write(store, key, outcome)
            self.log.info("Run %s recorded as %s", self._pod_run.run.label, outcome.status)
        except Exception:  # noqa: BLE001 - on_kill must not fail the kill itself
            self.log.exception("Could not record the run as killed")
