"""The pod launcher: the runtime in one pod that KubernetesPodOperator itself starts and watches.

The pipeline operators subclass KubernetesPodOperator, so every pod argument, pod template and
``deferrable=True`` work as they do there. This module shapes the pod through KPO's public
extension points and reads the run's ending afterwards:

- **the pod** (:meth:`PodLauncher.shape_pod`, called from the operator's
  ``build_pod_request_obj``): the runtime command, the run spec in ``AICENTER_RUN_SPEC`` (never
  a secret: secret-looking ``env`` keys are refused, see :func:`refuse_secret_env`), a work
  volume (``emptyDir``, ``sizeLimit`` = ``storage_gb``), a ``/tmp`` volume (the root
  filesystem is read-only), AI Center's infra settings as resources (``gpu`` ->
  ``nvidia.com/gpu`` plus a toleration), lookup labels, the run annotation, and a restrictive
  security context. Whatever the user gave wins over each of our settings, field by field.
- **credentials**: S3 keys from a named Kubernetes Secret (``aws_secret_name``), per-run STS
  session credentials (``runtime_role_arn``), or the pod's service account. Only the endpoint
  URL and region, which are not secret, travel as plain env.
- **results without the XCom sidecar** (#37298, #45772): the runtime writes ``outcome.json``
  into the run folder; after KPO is done (sync or deferrable re-entry) the launcher reads it.
  Success needs ``outcome.json`` saying so, never the pod phase alone (#73006).
- **never reattach to a foreign pod** (#39096): a pod found by labels must carry our
  ``aicenter/run`` annotation for this very task, or the task fails naming the pod.
- **the final pod** is captured through a KPO callback (``on_pod_completion``), so the cause of
  a pod that died (OOMKilled, exit code, termination message) is read from its status, not
  from KPO's error messages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s

from airflow_aicenter.errors import AICenterError, ConfigurationError, RunError
from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.launchers.base import Finished, Launcher, settle_outcome
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.records import Outcome, RunRef, RunSpec, is_secret_key, read_optional, write

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import Context

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


def pvc_uri(claim: str, sub_path: str | None) -> str:
    """How a mounted dataset is named in records and ``_results.json``."""
    return f"pvc://{claim}/{(sub_path or '').strip('/')}".rstrip("/")


def refuse_secret_env(env: dict[str, Any], secret_keys: frozenset[str] = frozenset()) -> None:
    """Secret-looking ``env`` keys cannot go into a pod spec (anyone who can read pods reads them).

    Creating Secrets on the fly would leave orphans behind on every crash and needs write
    access to Secrets, so the user points at an existing Secret instead.
    """
    secret = sorted(k for k in env if is_secret_key(k) or k in secret_keys)
    if secret:
        first = secret[0]
        raise ConfigurationError(
            f"env key(s) {', '.join(secret)} look secret and would be readable in the pod spec; with launcher='kubernetes' "
            f"put them in a Kubernetes Secret and pass secrets=[Secret('env', '{first}', '<secret-name>', '<key>')] "
            "(airflow.providers.cncf.kubernetes.secret.Secret) or env_from=[...]; if a key is not secret, pass it as "
            f"env_vars={{'{first}': ...}} instead"
        )


def launch_cause(error: BaseException) -> str:
    """The gist of why a pod did not run, from the exception chain's types, not its text.

    KubernetesPodOperator's cleanup raises a generic ``AirflowException`` from a ``finally``
    block over the real launch error (image pull, timeout): the most specific error in the
    chain is used, and only its first line (never the pod dump that may follow).
    """
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    specific = [e for e in chain if type(e).__name__ not in ("AirflowException", "Exception")]
    chosen = specific[0] if specific else chain[-1]
    first = next((line.strip() for line in str(chosen).splitlines() if line.strip()), "")
    return f"{type(chosen).__name__}: {first}" if first else type(chosen).__name__


@functools.cache
def _api_client() -> ApiClient:
    return ApiClient()


def as_model(value: Any, klass: str) -> Any:
    """A kubernetes model from a dict in API (camelCase) form; models pass through."""
    if value is None or not isinstance(value, dict):
        return value
    if not value:
        return None

    class _Response:
        data = json.dumps(value)

    return _api_client().deserialize(_Response(), klass)


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
            b.dag_id,
            b.run_id,
            b.task_id,
            b.map_index,
            other.spec.package,
            other.spec.pipeline,
        )


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


def _set_env(container: k8s.V1Container, env: list[k8s.V1EnvVar], *, owned: set[str]) -> None:
    """Add ours; names in ``owned`` replace the user's, the others only fill gaps."""
    current = [e for e in (container.env or []) if (e.get("name") if isinstance(e, dict) else e.name) not in owned]
    names = {(e.get("name") if isinstance(e, dict) else e.name) for e in current}
    container.env = [*current, *(e for e in env if e.name in owned or e.name not in names)]


# -- the launcher ----------------------------------------------------------------------------
def credentials_secret_name(run: RunRef) -> str:
    """The per-run Secret holding a pod's STS session credentials (one per task try)."""
    return f"aicenter-run-{hashlib.sha256(run.prefix.encode()).hexdigest()[:16]}"


@dataclass
class PodSettings:
    """AI Center's pod options of one operator (see the operator's ``:param`` docs)."""

    pipeline: str
    env: dict[str, Any]
    gpu: int = 0
    cpu: float | str | None = None
    memory_gb: float | None = None
    storage_gb: float | None = None
    dataset_volume_claim: str | None = None
    dataset_sub_path: str | None = None
    aws_secret_name: str | None = None
    datasets: tuple[str | None, ...] = ()
    #: ``env`` keys whose values Airflow's masker knows (a templated Variable or Connection field).
    secret_keys: frozenset[str] = frozenset()
    #: Extra env for the runtime container (per-run credentials), replacing the user's of the same name.
    credentials: list[k8s.V1EnvVar] = field(default_factory=list)


class RunCallbacks(KubernetesPodOperatorCallback):
    """KPO callbacks: keep the finished pod, whose status says how the container ended."""

    @staticmethod
    def on_pod_completion(*, pod: k8s.V1Pod, operator: KubernetesPodOperator | None = None, **kwargs: Any) -> None:
        launcher = getattr(operator, "launcher_in_use", None)
        if isinstance(launcher, PodLauncher):
            launcher.final_pod = pod


class PodLauncher(Launcher):
    """One pod per run, started and watched by the operator's own KubernetesPodOperator machinery.

    :param operator: the pipeline operator (a KubernetesPodOperator).
    :param hook: the operator's AICenterHook (store, connection settings).
    :param settings: AI Center's pod options.
    """

    name = "kubernetes"
    outlives_worker: ClassVar[bool] = True

    def __init__(self, operator: KubernetesPodOperator, hook: AICenterHook, settings: PodSettings) -> None:
        self.op, self.hook, self.settings = operator, hook, settings
        self.pod_run: PodRun | None = None
        self.final_pod: k8s.V1Pod | None = None
        self.credentials_secret: str | None = None

    def check(self) -> None:
        refuse_secret_env(self.settings.env, self.settings.secret_keys)
        from airflow_aicenter.credentials import role_settings

        role_settings(self.hook.settings.extra)  # a malformed runtime_role_arn fails here, before any pod
        if self.settings.pipeline == "evaluate" and self.settings.dataset_volume_claim:
            raise ConfigurationError(
                "dataset_volume_claim mounts the training dataset; evaluation runs read evaluation_dataset=URI"
            )
        check_sub_path(self.settings.dataset_sub_path)

    def plan(self, spec: RunSpec, run: RunRef) -> PodRun:
        """The spec as the pod runs it: a mounted dataset is not staged."""
        return PodRun(
            spec=spec.model_copy(
                update={
                    "dataset_mount": DATASET_MOUNT if self.settings.dataset_volume_claim else None,
                }
            ),
            run=run,
        )

    # -- per-run credentials ------------------------------------------------------------------
    def pod_namespace(self) -> str:
        return str(self.op.namespace or self.hook.settings.namespace or self.op.hook.get_namespace() or "default")

    def issue_credentials(self, spec: RunSpec, run: RunRef) -> None:
        """With ``runtime_role_arn``: STS session credentials for this run alone, in a Secret of its own.

        The session policy lets the pod write only its run folder and the task's checkpoints, create
        (never overwrite) blobs and environments, and read its package, datasets and checkpoints;
        version records and aliases stay the worker's. The values go into a per-run Kubernetes
        Secret referenced by ``secretKeyRef`` (never into the pod spec), are masked in every log,
        and the Secret is deleted when the run ends (the credentials expire on their own anyway).
        """
        from airflow.sdk.log import mask_secret

        from airflow_aicenter.credentials import run_credentials

        reads = [spec.incremental_base] if spec.incremental_base else []
        creds = run_credentials(
            self.hook.settings.extra,
            self.hook.settings.aws_conn_id,
            storage=spec.storage,
            run_prefix=spec.run_prefix,
            checkpoint_prefix=spec.checkpoint_prefix,
            datasets=[spec.dataset, spec.evaluation_dataset],
            reads=reads,
        )
        if creds is None:
            return
        values = creds.to_env()
        for value in values.values():
            mask_secret(value)
        name = credentials_secret_name(run)
        body = k8s.V1Secret(
            api_version="v1",
            kind="Secret",
            type="Opaque",
            metadata=k8s.V1ObjectMeta(name=name, labels={LABEL_RUN: label_value(run.label), "aicenter/credentials": "run"}),
            string_data=values,
        )
        core = self.op.hook.core_v1_client
        try:
            core.create_namespaced_secret(self.pod_namespace(), body)
        except Exception as exc:
            if getattr(exc, "status", None) != 409:
                raise
            core.replace_namespaced_secret(name, self.pod_namespace(), body)
        self.credentials_secret = name
        self.settings.credentials = [
            k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=name, key=key)))
            for key in sorted(values)
        ]
        self.op.log.info(
            "Run credentials: role %s, session policy limited to %s (expire %s), in Secret %s",
            creds.role_arn,
            spec.run_prefix,
            creds.expiration.isoformat(),
            name,
        )

    def revoke_credentials(self, run: RunRef | None = None) -> None:
        """Delete the run's credentials Secret (after the run; on deferrable re-entry, from the run's name)."""
        name = self.credentials_secret
        if name is None and run is not None and self.hook.settings.extra.get("runtime_role_arn"):
            name = credentials_secret_name(run)
        if name is None:
            return
        try:
            self.op.hook.core_v1_client.delete_namespaced_secret(name, self.pod_namespace())
        except Exception as exc:  # noqa: BLE001 - the credentials expire anyway; say so and go on
            self.op.log.warning("Could not delete the run's credentials Secret %s: %s", name, exc)
        self.credentials_secret = None

    # -- run ------------------------------------------------------------------------------
    def launch(self, context: Context, spec: RunSpec, run: RunRef) -> Finished:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.sdk.exceptions import TaskDeferred

        if self.hook.settings.storage.startswith("file://"):
            self.op.log.warning(
                "The store is %s on the worker's disk: the pod must see the same path (mount it with volumes=/volume_mounts), "
                "or use an s3:// store",
                self.hook.settings.storage,
            )
        self.pod_run = self.plan(spec, run)
        self.op.trigger_kwargs = {**(self.op.trigger_kwargs or {}), EVENT_KEY: self.pod_run.to_event()}
        self.issue_credentials(spec, run)
        deferred = False
        try:
            KubernetesPodOperator.execute(self.op, context)
        except TaskDeferred:
            deferred = True
            raise
        except AICenterError:
            raise
        except Exception as exc:  # noqa: BLE001 - outcome.json decides what the pod's failure means
            return self.ending(exc)
        finally:
            if not deferred:
                self.revoke_credentials()
        return self.ending(None)

    def resume(self, context: Context, event: dict[str, Any]) -> Finished:
        """Deferrable re-entry: KPO's own (logs, callbacks, pod deletion), then the run's ending."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.sdk.exceptions import TaskDeferred

        self.pod_run = PodRun.from_event(event.get(EVENT_KEY)) or self.pod_run
        if self.pod_run is None:
            raise RunError(f"the trigger event carries no aicenter run ({sorted(event)}); clear the task to run it again")
        self.op.trigger_kwargs = {**(self.op.trigger_kwargs or {}), EVENT_KEY: self.pod_run.to_event()}
        try:
            KubernetesPodOperator.trigger_reentry(self.op, context, event)
        except TaskDeferred:
            raise
        except AICenterError:
            self.revoke_credentials(self.pod_run.run)
            raise
        except Exception as exc:  # noqa: BLE001 - outcome.json decides
            self.revoke_credentials(self.pod_run.run)
            return self.ending(exc)
        self.revoke_credentials(self.pod_run.run)
        return self.ending(None)

    def ending(self, failure: BaseException | None) -> Finished:
        """outcome.json decides: succeeded -> Finished; otherwise the one-line cause, from the pod's status."""
        assert self.pod_run is not None
        spec, run = self.pod_run.spec, self.pod_run.run
        store = self.hook.get_store()
        outcome = read_optional(store, run.key(OUTCOME), Outcome)
        pod = self.final_pod or getattr(self.op, "remote_pod", None) or getattr(self.op, "pod", None)
        code, reason, message = termination(pod, self.op.base_container_name)
        if outcome is not None and outcome.status == "succeeded":
            if failure is not None:
                self.op.log.warning(
                    "The pod reported a problem (%s), but the runtime's outcome.json says the run succeeded",
                    launch_cause(failure),
                )
            return Finished(spec, run, outcome)
        if outcome is None and code is None:
            cause = (
                f"the training pod did not run: {launch_cause(failure) if failure else 'it ended without starting the runtime'}"
            )
            write(store, run.key(OUTCOME), Outcome.starting(spec, "failed", end_at=time.time(), error=cause))
            raise RunError(f"{spec.pipeline} run of {spec.package}:{spec.version} failed: {cause}")
        ended = f"the pod's container ended (exit code {code}" + (f", {reason})" if reason else ")")
        if message and (outcome is None or outcome.status == "running"):
            ended += f" with: {message.splitlines()[-1]}"
        if reason == "OOMKilled":
            ended += "; it ran out of memory: give it more with memory_gb=..."
        return Finished(spec, run, settle_outcome(store, spec, run, ended=ended))

    # -- the pod ----------------------------------------------------------------------------
    def shape_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        """Our container settings under the user's (called from the operator's build_pod_request_obj)."""
        op, settings = self.op, self.settings
        container = base_container(pod, op.base_container_name)
        container.image = container.image or self.hook.settings.image
        if not container.image:
            raise ConfigurationError(
                "launcher='kubernetes' needs the runtime image: pass image='<registry>/aicenter-runtime:<tag>' or set "
                '"image" in the aicenter connection\'s extras (build it from docker/Dockerfile, see docker/README.md)'
            )
        if not container.command and not container.args:
            container.command = list(RUNTIME_COMMAND)
        self._add_volumes(pod, container)
        self._add_env(container)
        requests, limits = infra_resources(
            gpu=settings.gpu, cpu=settings.cpu, memory_gb=settings.memory_gb, storage_gb=settings.storage_gb
        )
        container.resources = merge_resources(requests, limits, container.resources)
        pod.spec.tolerations = merge_tolerations(pod.spec.tolerations, settings.gpu)
        pod.spec.security_context = merge_pod_security(pod.spec.security_context, container.security_context)
        container.security_context = merge_container_security(container.security_context)
        if pod.spec.automount_service_account_token is None:
            # Training code has no business with the Kubernetes API; IRSA and workload
            # identity inject their own projected token and do not need this one.
            pod.spec.automount_service_account_token = False
        if self.pod_run is not None:
            spec, run = self.pod_run.spec, self.pod_run.run
            pod.metadata.labels = {
                **(pod.metadata.labels or {}),
                LABEL_PACKAGE: label_value(spec.package),
                LABEL_VERSION: label_value(spec.version),
                LABEL_RUN: label_value(run.label),
            }
            pod.metadata.annotations = {**(pod.metadata.annotations or {}), ANNOTATION_RUN: run.model_dump_json()}
        return pod

    def _add_volumes(self, pod: k8s.V1Pod, container: k8s.V1Container) -> None:
        settings = self.settings
        mounts = list(container.volume_mounts or [])
        taken = {(m.get("mountPath") if isinstance(m, dict) else m.mount_path) for m in mounts}
        volumes = list(pod.spec.volumes or [])
        storage = memory_quantity(settings.storage_gb) if settings.storage_gb is not None else None
        ours: list[tuple[k8s.V1Volume, k8s.V1VolumeMount]] = [
            (
                k8s.V1Volume(name=WORK_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=storage)),
                k8s.V1VolumeMount(name=WORK_VOLUME, mount_path=WORK_MOUNT),
            ),
            (
                k8s.V1Volume(name=TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()),
                k8s.V1VolumeMount(name=TMP_VOLUME, mount_path=TMP_MOUNT),
            ),
        ]
        if settings.dataset_volume_claim:
            claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=settings.dataset_volume_claim, read_only=True)
            ours.append(
                (
                    k8s.V1Volume(name=DATASET_VOLUME, persistent_volume_claim=claim),
                    k8s.V1VolumeMount(
                        name=DATASET_VOLUME, mount_path=DATASET_MOUNT, read_only=True, sub_path=settings.dataset_sub_path or None
                    ),
                )
            )
        for volume, mount in ours:
            if mount.mount_path in taken:  # the user mounts their own volume there: theirs wins
                continue
            volumes.append(volume)
            mounts.append(mount)
        pod.spec.volumes = volumes
        container.volume_mounts = mounts

    def _add_env(self, container: k8s.V1Container) -> None:
        hook = self.hook
        env = [
            k8s.V1EnvVar(name="AICENTER_WORKDIR", value=WORK_MOUNT),
            k8s.V1EnvVar(name="HOME", value=f"{WORK_MOUNT}/.home"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
        ]
        if self.pod_run is not None:
            env.append(k8s.V1EnvVar(name=SPEC_ENV, value=self.pod_run.spec.model_dump_json()))
        owned = {SPEC_ENV, "AICENTER_WORKDIR"}
        if hook.uses_s3(*self.settings.datasets):
            options = hook.s3_options
            if options is not None and options.endpoint_url:
                env.append(k8s.V1EnvVar(name="AWS_ENDPOINT_URL", value=options.endpoint_url))
            if options is not None and options.region:
                env.append(k8s.V1EnvVar(name="AWS_REGION", value=options.region))
            secret_name = self.settings.aws_secret_name or hook.settings.extra.get("aws_secret_name")
            if self.settings.credentials:
                env.extend(self.settings.credentials)
                owned |= {e.name for e in self.settings.credentials}
            elif secret_name:
                for key, optional in AWS_SECRET_KEYS.items():
                    ref = k8s.V1SecretKeySelector(name=secret_name, key=key, optional=optional or None)
                    env.append(k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(secret_key_ref=ref)))
        _set_env(container, env, owned=owned)

    # -- reattach ---------------------------------------------------------------------------
    def adopt(self, pod: k8s.V1Pod) -> None:
        """A pod KPO found or created must run this very task (any try), or the task fails naming it."""
        found = PodRun.from_pod(pod, self.op.base_container_name)
        planned = self.pod_run
        name = f"{pod.metadata.namespace}/{pod.metadata.name}"
        if found is None or (planned is not None and not found.same_task(planned)):
            what = (
                "was not started by airflow-aicenter"
                if found is None
                else f"runs {found.spec.package} ({found.spec.pipeline}) for {found.run.label}"
            )
            raise RunError(
                f"pod {name} matches this task's labels but {what}; refusing to reattach to it. "
                f"Delete it (kubectl delete pod -n {pod.metadata.namespace} {pod.metadata.name}) and clear the task"
            )
        if planned is not None and found.run.prefix != planned.run.prefix:
            self.op.log.info(
                "Reattached to pod %s of an earlier attempt: its run folder %s holds the result",
                name,
                found.run.uri or found.run.prefix,
            )
        self.pod_run = found
        self.op.trigger_kwargs = {**(self.op.trigger_kwargs or {}), EVENT_KEY: found.to_event()}

    # -- kill -------------------------------------------------------------------------------
    def kill(self) -> None:
        """KPO deletes the pod; the run is then recorded as killed (if the runtime could not)."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnKillAction

        KubernetesPodOperator.on_kill(self.op)
        self.revoke_credentials(self.pod_run.run if self.pod_run else None)
        if self.pod_run is None or self.op.on_kill_action == OnKillAction.KEEP_POD:
            return
        spec, key = self.pod_run.spec, self.pod_run.run.key(OUTCOME)
        try:
            store = self.hook.get_store()
            deadline = time.monotonic() + KILL_RECORD_WAIT
            outcome = read_optional(store, key, Outcome)
            while self.op.pod is not None and outcome is not None and outcome.status == "running" and time.monotonic() < deadline:
                time.sleep(0.5)
                outcome = read_optional(store, key, Outcome)
            if outcome is None or outcome.status == "running":
                outcome = outcome or Outcome.starting(spec)
                outcome.status, outcome.end_at = "killed", time.time()
                outcome.error = f"killed by Airflow (task stopped) during {outcome.phase or 'start-up'}"
                write(store, key, outcome)
            self.op.log.info("Run %s recorded as %s", self.pod_run.run.label, outcome.status)
        except Exception:
            self.op.log.exception("Could not record the run as killed")
