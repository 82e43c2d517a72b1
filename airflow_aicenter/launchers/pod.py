"""The pod launcher: the run in one pod that KubernetesPodOperator itself starts and watches.

The pipeline operators subclass KubernetesPodOperator, so every pod argument, pod template and
``deferrable=True`` work as they do there. The operator calls KPO's own ``execute`` and
``trigger_reentry``; this module decides the pod's shape before and reads the run's ending after:

- **the pod** (:meth:`PodLauncher.shape_pod`, called from the operator's
  ``build_pod_request_obj``): three containers, built by :mod:`.pod_spec` (``stage``, the user
  supervisor in ``base``, ``sync``); the run spec in ``AICENTER_RUN_SPEC`` of ``stage`` and
  ``sync`` only (never a secret: secret-looking ``env`` keys are refused, see
  :func:`refuse_secret_env`), AI Center's infra settings as ``base``'s resources (``gpu`` ->
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

import hashlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
from kubernetes.client import models as k8s

from airflow_aicenter.errors import ConfigurationError, RunError
from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.launchers.base import (
    Finished,
    Launcher,
    await_ending,
    killed_by_airflow,
    record_killed,
    settle_outcome,
)
from airflow_aicenter.launchers.pod_spec import (
    ANNOTATION_RUN,
    AWS_SECRET_KEYS,
    DATASET_MOUNT,
    DEFAULT_STARTUP_TIMEOUT,
    DISRUPTED_RETRY,
    LABEL_PACKAGE,
    LABEL_RUN,
    LABEL_VERSION,
    QUEUE_LABEL,
    PodResources,
    PodShape,
    check_blob_cache,
    check_sub_path,
    disruption,
    label_value,
    run_ending,
    run_spec_json,
    shape_pod,
)
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.plans import plan_for
from airflow_aicenter.records import Outcome, RunRef, RunSpec, end_outcome, read_optional
from airflow_aicenter.secrets import Redactor, is_secret_key

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import Context

    from airflow_aicenter.storage import Store


#: Seconds on_kill waits for the runtime to record "killed" itself before writing it.
KILL_RECORD_WAIT = 10.0
EVENT_KEY = "aicenter"


def pvc_uri(claim: str, sub_path: str | None) -> str:
    """How a mounted dataset is named in records and ``_results.json``."""
    return f"pvc://{claim}/{(sub_path or '').strip('/')}".rstrip("/")


def template_namespace(op: KubernetesPodOperator) -> str | None:
    """The namespace the operator's own pod template names (``full_pod_spec``, ``pod_template_file`` or
    ``pod_template_dict``): it wins over the connection's ``namespace``."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    template: Any = op.full_pod_spec
    if template is None or not (template.metadata and template.metadata.namespace):
        if op.pod_template_file:
            template = PodGenerator.deserialize_model_file(op.pod_template_file)
        elif op.pod_template_dict:
            template = PodGenerator.deserialize_model_dict(op.pod_template_dict)
    namespace = template.metadata.namespace if template is not None and template.metadata else None
    return str(namespace) if namespace else None


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


# -- what a pod runs ---------------------------------------------------------------------
@dataclass(frozen=True)
class PodRun:
    """The run a pod executes: its spec (pod env) and its run folder (annotation)."""

    spec: RunSpec
    run: RunRef

    @classmethod
    def from_pod(cls, pod: k8s.V1Pod | None) -> PodRun | None:
        """The run a pod (or a Job's pod template) executes: its annotation and its ``stage`` container's spec."""
        if pod is None or pod.metadata is None or pod.spec is None:
            return None
        raw_run = (pod.metadata.annotations or {}).get(ANNOTATION_RUN)
        raw_spec = run_spec_json(pod.spec)
        if not raw_run or raw_spec is None:
            return None
        try:
            return cls(spec=RunSpec.model_validate_json(raw_spec), run=RunRef.model_validate_json(raw_run))
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


# -- the launcher ----------------------------------------------------------------------------
def credentials_secret_name(run: RunRef) -> str:
    """The per-run Secret holding a pod's STS session credentials (one per task try)."""
    return f"aicenter-run-{hashlib.sha256(run.prefix.encode()).hexdigest()[:16]}"


@dataclass
class PodSettings:
    """AI Center's pod options of one operator (see the operator's ``:param`` docs)."""

    pipeline: str
    env: dict[str, Any]
    resources: PodResources = field(default_factory=PodResources)
    aws_secret_name: str | None = None
    datasets: tuple[str | None, ...] = ()
    #: ``env`` keys whose values Airflow's masker knows (a templated Variable or Connection field).
    secret_keys: frozenset[str] = frozenset()
    #: Extra env for the runtime container (per-run credentials), replacing the user's of the same name.
    credentials: list[k8s.V1EnvVar] = field(default_factory=list)
    #: The Kueue LocalQueue (operator argument, else the connection extra): labels the pod or Job; a Job is queued suspended.
    queue_name: str | None = None
    #: Seconds every node of a Job may take to be running once admitted (all-or-nothing start).
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT


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
        #: More env for ``stage`` and ``sync``, and ports of ``base`` (a Job's rendezvous).
        self.agent_env: list[k8s.V1EnvVar] = []
        self.ports: list[k8s.V1ContainerPort] = []
        #: The run's secrets this launcher knows (``env``'s secret values, issued credentials): masked in what it logs.
        self.redactor = Redactor(str(v) for k, v in settings.env.items() if is_secret_key(k) or k in settings.secret_keys)
        #: Set by :meth:`stopping` when Airflow stops the task, before the pod or Job is deleted: a wait that then
        #: fails on the deleted object records the run as killed, not failed (see :meth:`ending`).
        self.killed = threading.Event()
        #: Held while the ending or the kill reads and writes the run's outcome; re-entrant, as on_kill runs in a
        #: signal handler of the thread whose execute may be recording at that moment.
        self.recording = threading.RLock()

    def check(self) -> None:
        refuse_secret_env(self.settings.env, self.settings.secret_keys)
        from airflow_aicenter.credentials import role_settings

        role_settings(self.hook.settings.extra)  # a malformed runtime_role_arn fails here, before any pod
        if self.settings.resources.dataset_volume_claim and "dataset" not in plan_for(self.settings.pipeline).all_datasets:
            raise ConfigurationError(
                "dataset_volume_claim mounts the training dataset; evaluation runs read evaluation_dataset=URI"
            )
        check_sub_path(self.settings.resources.dataset_sub_path)
        check_blob_cache(self.hook.settings.extra.get("blob_cache"))

    def plan(self, spec: RunSpec, run: RunRef) -> PodRun:
        """The spec as the pod runs it: a mounted dataset is not staged."""
        return PodRun(
            spec=spec.model_copy(
                update={
                    "dataset_mount": DATASET_MOUNT if self.settings.resources.dataset_volume_claim else None,
                }
            ),
            run=run,
        )

    # -- per-run credentials ------------------------------------------------------------------
    def pod_namespace(self) -> str:
        return str(self.op.namespace or self.hook.settings.namespace or self.op.hook.get_namespace() or "default")

    def issue_credentials(self, spec: RunSpec, run: RunRef) -> None:
        """With ``runtime_role_arn``: STS session credentials for this run alone, in a Secret of its own.

        The session policy (``credentials.run_scope``) lets the pod write only its run folder and the
        task's checkpoints, create (never overwrite) blobs and environments where the run makes them,
        and read its package blob, datasets (a manifest's source folders too), checkpoints and parent
        snapshot; it lists no blob or environment; version records and aliases stay the worker's.
        The values go into a per-run Kubernetes
        Secret referenced by ``secretKeyRef`` (never into the pod spec), are masked in every log,
        and the Secret is deleted when the run ends (the credentials expire on their own anyway).
        """
        from airflow.sdk.log import mask_secret

        from airflow_aicenter.credentials import run_credentials, run_scope

        creds = run_credentials(self.hook.settings.extra, self.hook.settings.aws_conn_id,
                                run_scope(spec, self.hook.get_store))
        if creds is None:
            return
        values = creds.to_env()
        for value in values.values():
            mask_secret(value)
            self.redactor.add(value)
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

    def credentials_secret_of(self, run: RunRef | None = None) -> str | None:
        """The run's credentials Secret: the one issued here, else (a deferrable re-entry) the name ``run``'s has."""
        if self.credentials_secret is None and run is not None and self.hook.settings.extra.get("runtime_role_arn"):
            return credentials_secret_name(run)
        return self.credentials_secret

    def revoke_credentials(self, run: RunRef | None = None) -> None:
        """Delete the run's credentials Secret (after the run; on deferrable re-entry, from the run's name)."""
        name = self.credentials_secret_of(run)
        if name is None:
            return
        try:
            self.op.hook.core_v1_client.delete_namespaced_secret(name, self.pod_namespace())
        except Exception as exc:  # noqa: BLE001 - the credentials expire anyway; say so and go on
            self.op.log.warning("Could not delete the run's credentials Secret %s: %s", name, exc)
        self.credentials_secret = None

    # -- run (the operator calls KPO's execute / trigger_reentry between these) -------------
    runs_in_operator: ClassVar[bool] = True

    def prepare(self, spec: RunSpec, run: RunRef) -> None:
        """Before KPO's ``execute``: the pod's run (its shape and the trigger's event) and its credentials."""
        if self.hook.settings.storage.startswith("file://"):
            self.op.log.warning(
                "The store is %s on the worker's disk: the pod must see the same path (mount it with volumes=/volume_mounts), "
                "or use an s3:// store",
                self.hook.settings.storage,
            )
        self.pod_run = self.plan(spec, run)
        self.op.trigger_kwargs = {**(self.op.trigger_kwargs or {}), EVENT_KEY: self.pod_run.to_event()}
        self.issue_credentials(spec, run)

    def launch(self, context: Context, spec: RunSpec, run: RunRef) -> Finished:
        """The operator runs the pod itself (KPO's ``execute``), between :meth:`prepare` and :meth:`ending`."""
        raise RunError("the kubernetes pod launcher runs through the operator's execute(); call it there")

    def resumed(self, event: dict[str, Any]) -> PodRun:
        """Deferrable re-entry, before KPO's ``trigger_reentry``: the run, from the trigger's event."""
        self.pod_run = PodRun.from_event(event.get(EVENT_KEY)) or self.pod_run
        if self.pod_run is None:
            raise RunError(f"the trigger event carries no aicenter run ({sorted(event)}); clear the task to run it again")
        self.op.trigger_kwargs = {**(self.op.trigger_kwargs or {}), EVENT_KEY: self.pod_run.to_event()}
        return self.pod_run

    def reported(self) -> tuple[RunSpec, RunRef, Store, Outcome | None]:
        """The run this launcher ran, its store, and what its runtime reported (``outcome.json``; None: nothing)."""
        assert self.pod_run is not None
        spec, run = self.pod_run.spec, self.pod_run.run
        store = self.hook.get_store()
        return spec, run, store, read_optional(store, run.key(OUTCOME), Outcome)

    def stopping(self) -> None:
        """Airflow is stopping the task (``on_kill``): called before the pod or Job is deleted, so that the launch
        path, whose wait fails when it goes, ends the run as killed (:meth:`ending`), whichever records first."""
        self.killed.set()

    def killed_ending(self, seen: Outcome | None) -> Finished:
        """The run Airflow stopped ends ``killed`` unless its runtime reported an ending itself (``seen``, the outcome
        read before the launcher settled anything); raises the run's RunError (or returns a succeeded run)."""
        spec, run, store, outcome = self.reported()
        if outcome is None or outcome.status == "running" or (
                outcome.status == "failed" and (seen is None or seen.status == "running")):  # ours, written before
            end_outcome(store, run.key(OUTCOME), seen or spec, "killed", killed_by_airflow)
        return Finished(spec, run, settle_outcome(store, spec, run))

    def ending(self, failure: BaseException | None) -> Finished:
        """outcome.json decides: succeeded -> Finished; otherwise the one-line cause, from the pod's status.

        The container that tells is ``stage`` when it failed (no user code ran), ``base`` when
        it was killed from outside (out of memory), else ``sync``, which wrote the run's message.
        A run Airflow stopped (:meth:`stopping`) that did not report an ending of its own ends
        ``killed``, not ``failed`` with the deleted pod's cause: on_kill and this wait race to
        record it, and both say killed.
        """
        with self.recording:
            seen = self.reported()[3]
            if self.killed.is_set():
                return self.killed_ending(seen)
            try:
                return self._ending(failure)
            except RunError:
                if self.killed.is_set():  # on_kill came (a signal handler of this thread) while this recorded
                    return self.killed_ending(seen)
                raise

    def _ending(self, failure: BaseException | None) -> Finished:
        spec, run, store, outcome = self.reported()
        pod = self.final_pod or getattr(self.op, "remote_pod", None) or getattr(self.op, "pod", None)
        container, code, reason, message = run_ending(pod, self.op.base_container_name)
        if outcome is not None and outcome.status == "succeeded":
            if failure is not None:
                self.op.log.warning(
                    "The pod reported a problem (%s), but the runtime's outcome.json says the run succeeded",
                    launch_cause(failure),
                )
            return Finished(spec, run, outcome)
        if pod is not None and (why := disruption(pod)) is not None:  # its node went away: not the training's fault
            node = (pod.spec.node_name if pod.spec else None) or "?"
            cause = f"the pod was disrupted on node {node} ({why}); {DISRUPTED_RETRY}"
            end_outcome(store, run.key(OUTCOME), outcome or spec, "failed", cause)
            return Finished(spec, run, settle_outcome(store, spec, run, ended=cause))
        if outcome is None and code is None:
            cause = (
                f"the training pod did not run: {launch_cause(failure) if failure else 'it ended without starting the runtime'}"
            )
            end_outcome(store, run.key(OUTCOME), spec, "failed", cause)
            raise RunError(f"{spec.pipeline} run of {spec.package}:{spec.version} failed: {cause}")
        which = "" if container == self.op.base_container_name else f" {container}"
        ended = f"the pod's{which} container ended (exit code {code}" + (f", {reason})" if reason else ")")
        if message and (outcome is None or outcome.status == "running"):
            ended += f" with: {message.splitlines()[-1]}"
        if reason == "OOMKilled":
            ended += "; it ran out of memory: give it more with memory_gb=..."
        return Finished(spec, run, settle_outcome(store, spec, run, ended=ended))

    # -- the pod ----------------------------------------------------------------------------
    def pod_shape(self) -> PodShape:
        """What this run's pod needs besides the operator's own pod arguments (see :mod:`.pod_spec`)."""
        settings, hook = self.settings, self.hook
        spec_json = run_json = None
        labels: dict[str, str] = {}
        if self.pod_run is not None:
            spec, run = self.pod_run.spec, self.pod_run.run
            spec_json, run_json = spec.model_dump_json(), run.model_dump_json()
            labels = {
                LABEL_PACKAGE: label_value(spec.package),
                LABEL_VERSION: label_value(spec.version),
                LABEL_RUN: label_value(run.label),
            }
        if settings.queue_name:
            labels[QUEUE_LABEL] = settings.queue_name
        return PodShape(
            image=hook.settings.image,
            base_container=self.op.base_container_name,
            makes_version=plan_for(settings.pipeline).makes_version,
            resources=settings.resources,
            spec_json=spec_json,
            run_json=run_json,
            labels=labels,
            store_env=tuple(self.store_env()),
            agent_env=tuple(self.agent_env),
            ports=tuple(self.ports),
            blob_cache=check_blob_cache(hook.settings.extra.get("blob_cache")),
        )

    def tidy_recovered(self, run: RunRef) -> None:
        """An earlier try's finished run is being completed instead of run again: nothing to tidy for one pod
        (KubernetesPodOperator removed it); the Job launcher removes that try's Job."""

    def shape_pod(self, pod: k8s.V1Pod) -> k8s.V1Pod:
        """Our three containers under the user's settings (called from the operator's build_pod_request_obj)."""
        return shape_pod(pod, self.pod_shape())

    def store_env(self) -> list[k8s.V1EnvVar]:
        """The store's endpoint and region (not secret) and credentials (Secret references): ``stage`` and ``sync`` only."""
        hook = self.hook
        env: list[k8s.V1EnvVar] = []
        if not hook.uses_s3(*self.settings.datasets):
            return env
        options = hook.s3_options
        if options is not None and options.endpoint_url:
            env.append(k8s.V1EnvVar(name="AWS_ENDPOINT_URL", value=options.endpoint_url))
        if options is not None and options.region:
            env.append(k8s.V1EnvVar(name="AWS_REGION", value=options.region))
        secret_name = self.settings.aws_secret_name or hook.settings.extra.get("aws_secret_name")
        if self.settings.credentials:
            env.extend(self.settings.credentials)
        elif secret_name:
            for key, optional in AWS_SECRET_KEYS.items():
                ref = k8s.V1SecretKeySelector(name=secret_name, key=key, optional=optional or None)
                env.append(k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(secret_key_ref=ref)))
        return env

    # -- reattach ---------------------------------------------------------------------------
    def adopt(self, pod: k8s.V1Pod) -> None:
        """A pod KPO found or created must run this very task (any try), or the task fails naming it."""
        found = PodRun.from_pod(pod)
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
        """After the operator's KPO ``on_kill`` deleted the pod: the run is recorded as killed (if the runtime could not)."""
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnKillAction

        self.killed.set()
        self.revoke_credentials(self.pod_run.run if self.pod_run else None)
        if self.pod_run is None or self.op.on_kill_action == OnKillAction.KEEP_POD:
            return
        try:
            store = self.hook.get_store()
            if self.op.pod is not None:
                await_ending(store, self.pod_run.run, KILL_RECORD_WAIT)
            with self.recording:  # the launch path's ending may be recording now: one after the other
                outcome = record_killed(store, self.pod_run.spec, self.pod_run.run)
            self.op.log.info("Run %s recorded as %s", self.pod_run.run.label, outcome.status)
        except Exception:
            self.op.log.exception("Could not record the run as killed")
