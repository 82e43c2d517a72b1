"""The Job launcher: a distributed run on ``nodes > 1`` machines as an Indexed ``batch/v1`` Job.

Kubernetes Jobs are the engine; we orchestrate nothing of our own. One pod per node
(``completionMode: Indexed``, ``completions = parallelism = nodes``), no pod retries
(``backoffLimit: 0``: Airflow retries the task), and a headless Service named in the pod
template's ``subdomain`` so node 0 has a stable name, ``<job>-0.<service>``: that is
``MASTER_ADDR``; ``NODE_RANK`` is the completion index (``JOB_COMPLETION_INDEX``). Each pod is
the same pod the single-node launcher builds (image, volumes, resources, GPUs per node,
security context, credentials), through the operator's ``build_pod_request_obj``.

The Job and the Service are named after the task instance (not the try), so a worker that
restarts finds its running Job and waits for it instead of starting a second one. On Airflow
3.3 the Job's identity (name, namespace, uid) also goes into the task state store when it is
created (as KubernetesPodOperator's ``durable`` does for its pod): the next try reattaches to
that very Job even where a lookup by name would miss it (the namespace of new runs changed
meanwhile) or find another (a Job of the same name that is not the one created). Without a
state store, or with nothing stored, the lookup by name is the fallback. They are
removed at the end, whatever the ending. The node that failed is named in the task's error,
with its own cause from ``node-<k>.outcome.json``.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, cast

from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from airflow_aicenter.errors import ConfigurationError, RunError
from airflow_aicenter.hooks.aicenter import AICenterHook
from airflow_aicenter.launchers import kube_retry
from airflow_aicenter.launchers.base import Finished, record_killed, settle_outcome
from airflow_aicenter.launchers.pod import PodLauncher, PodRun, PodSettings
from airflow_aicenter.launchers.pod_spec import (
    DISRUPTED_RETRY,
    LABEL_JOB,
    MASTER_PORT,
    QUEUE_LABEL,
    STAGE_CONTAINER,
    SYNC_CONTAINER,
    disruption,
    job_agent_env,
    job_manifests,
    job_ports,
    run_ending,
)
from airflow_aicenter.layout import OUTCOME, outcome_name
from airflow_aicenter.records import Outcome, RunRef, RunSpec, end_outcome, read_optional, write
from airflow_aicenter.secrets import Redactor, is_secret_key

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import Context

__all__ = ["LABEL_JOB", "MASTER_PORT", "JobLauncher", "job_name"]
#: Seconds between Job status polls while waiting, unless the operator's ``poll_interval`` (KubernetesPodOperator's,
#: 2 s by default; the deferrable trigger polls at it too) says otherwise.
POLL = 2.0
#: Seconds a recovered earlier try's Job gets to end on its own before it is removed.
TIDY_WAIT = 30.0
#: Lines of each container of every other node copied into the task log when a distributed run fails (their
#: last lines: where it failed; whole logs of many nodes would bury the cause).
TAIL_LINES = 20
#: The longest line copied from another node's log; the rest of it is cut (marked).
TAIL_LINE_CHARS = 2000
#: Seconds between looks for node 0's user container once its staging ended (it starts within moments).
STAGED_POLL = 0.1
#: The deferrable trigger's event status when not every node ran within ``startup_timeout``.
STARTUP_TIMEOUT = "startup_timeout"
#: The task state store key of the Job's identity (``{"name", "namespace", "uid"}``); renaming it strands running Jobs.
STATE_KEY = "aicenter_job"


_RANK_PREFIX = re.compile(r"^\[rank (\d+)\] ")
#: The Job controller's message when a pod's DisruptionTarget matched a FailJob rule of podFailurePolicy.
_POLICY_DISRUPTION = re.compile(r"Pod [^/\s]+/(\S+) has condition DisruptionTarget matching FailJob rule")


class JobLogs:
    """What the task log gets of a Job's nodes: node 0's user container followed while the run goes on
    (:class:`NodeLogStream`), and once the Job ended, what :meth:`relay` copies.

    One code path for both waits: the synchronous one (:class:`JobLauncher`) and the deferrable
    trigger (``GangJobTrigger``, through the synchronous client in threads; the triggerer writes a
    trigger's log into the task's log). Both see the Job end at the same moment, before the Job
    controller's removal of the pods it stops takes their logs away.

    :param core: a CoreV1Api of the synchronous kubernetes client.
    :param container: the user container's name (the operator's ``base_container_name``).
    :param procs_per_node: processes per node (None: unknown), for the ``[node 0 rank r]`` prefix.
    :param seen: every pod of the Job seen while waiting, by name: its node index and machine (shared with the launcher).
    """

    def __init__(self, core: Any, *, namespace: str, job: str, nodes: int, container: str, log: Any, redactor: Redactor,
                 poll: float, procs_per_node: int | None = None,
                 seen: dict[str, tuple[str, str | None]] | None = None) -> None:
        self.core, self.namespace, self.job, self.nodes, self.container = core, namespace, job, nodes, container
        self.log, self.redactor, self.poll, self.procs_per_node = log, redactor, poll, procs_per_node
        self.seen = seen if seen is not None else {}

    def pods(self) -> list[k8s.V1Pod]:
        """The Job's pods by node index, each remembered in :attr:`seen` with the machine it runs on."""
        pods = kube_retry.call(self.core.list_namespaced_pod, self.namespace, label_selector=f"job-name={self.job}",
                               what=f"list the pods of Job {self.job}", log=self.log).items
        return remember(self.seen, pods)

    def safe_pods(self) -> list[k8s.V1Pod]:
        try:
            return self.pods()
        except (ApiException, kube_retry.KubernetesUnavailable):
            return []

    def relay(self, job: k8s.V1Job, *, skip_streamed: bool = False, followed: bool = True) -> None:
        """What the task log gets of the nodes' logs once the Job ended.

        Node 0's user container was streamed while the run went on (:class:`NodeLogStream`); when
        that stream did not reach the container's end, its whole log is copied now. Node 0's
        staging and upload containers are copied whole (the agent's lines: what was staged and
        uploaded). The other nodes' logs are copied only when the Job failed, and only the last
        ``TAIL_LINES`` lines of each container (asked of the API server, not read whole), each line
        at most ``TAIL_LINE_CHARS`` long: where a node failed, not hours of its training. Every
        line is masked with the run's known secrets (:attr:`redactor`, with the Job's own secret-looking
        env added). ``followed=False`` (nobody streamed node 0) treats node 0's user container like the other nodes'.
        """
        redactor_from(job, self.redactor)
        failed = any(c.type == "Failed" and c.status == "True" for c in (job.status.conditions or []))
        for pod in self.safe_pods():
            index = node_index(pod)
            for container in (STAGE_CONTAINER, self.container, SYNC_CONTAINER):
                if index == "0" and (followed or container != self.container):
                    if skip_streamed and container == self.container:
                        continue
                    lines = self.pod_log(pod, container)
                elif failed:
                    lines = self.pod_log(pod, container, tail=TAIL_LINES)
                    if lines:
                        self.log.info("The last %d lines of node %s's %s container (%s):", len(lines), index, container,
                                      pod.metadata.name)
                else:
                    continue
                for line in lines:
                    self.log.info("[node %s] %s", index, line)
        if not failed:
            others = f"the logs of nodes 1 to {self.nodes - 1}"
            self.log.info("The run succeeded: %s are not copied (only a failed run's last lines are)",
                          others if followed else f"node 0's training log and {others}")

    def pod_log(self, pod: k8s.V1Pod, container: str, *, tail: int | None = None) -> list[str]:
        """A container's log lines (its last ``tail`` lines, each cut at TAIL_LINE_CHARS), masked; [] if unreadable."""
        index = node_index(pod)
        limits: dict[str, Any] = {} if tail is None else {"tail_lines": tail, "limit_bytes": tail * (TAIL_LINE_CHARS + 1)}
        try:
            # Raw bytes: with its content preloaded the client gives str(bytes) of a plain-text body.
            response = kube_retry.call(
                self.core.read_namespaced_pod_log, pod.metadata.name, pod.metadata.namespace,
                container=container, _preload_content=False, what=f"read the log of node {index}", log=self.log,
                budget=30, **limits,
            )
            text = response.data.decode("utf-8", "replace")
        except (ApiException, kube_retry.KubernetesUnavailable) as exc:
            self.log.warning("Could not read the %s log of node %s (%s): %s", container, index, pod.metadata.name,
                             getattr(exc, "reason", exc))
            return []
        lines = str(text).splitlines()
        if tail is not None:
            lines = [line if len(line) <= TAIL_LINE_CHARS else f"{line[:TAIL_LINE_CHARS]} [... line cut]"
                     for line in lines[-tail:]]
        return [self.redactor.redact(line) for line in lines]


def remember(seen: dict[str, tuple[str, str | None]], pods: Sequence[Any]) -> list[Any]:
    """Note each pod's node index and machine in ``seen`` (a pod gone at the end is still named with its machine);
    the pods by node index."""
    for pod in pods:
        known = seen.get(pod.metadata.name, (None, None))[1]
        seen[pod.metadata.name] = (node_index(pod), (pod.spec.node_name if pod.spec else None) or known)
    return sorted(pods, key=lambda p: int((p.metadata.labels or {}).get("batch.kubernetes.io/job-completion-index", "0")))


def redactor_from(job: k8s.V1Job, redactor: Redactor) -> Redactor:
    """Add the plain values of the Job's secret-looking env (every container of its pod template) to ``redactor``."""
    spec = job.spec.template.spec if job.spec is not None and job.spec.template is not None else None
    for container in [*((spec.init_containers if spec else None) or []), *((spec.containers if spec else None) or [])]:
        for var in container.env or []:
            if var.value and is_secret_key(var.name):
                redactor.add(var.value)
    return redactor


class NodeLogStream:
    """Node 0's user container log, followed into the task log while the run goes on.

    Lines read ``[node 0 rank r] ...`` (the supervisor's ``[rank r]`` prefix is folded in; with
    one process per node, node 0 runs rank 0 alone). The stream runs in a daemon thread (in the
    starting thread's context: a trigger's log stays the task's): it looks for node 0's pod at
    once and then every ``poll`` seconds until its user container started, then follows its log
    until it ends. ``complete`` says whether it reached the end, so the log is not relayed twice;
    a stream broken by the API server leaves the whole log to the relay at the end instead.
    """

    def __init__(self, logs: JobLogs) -> None:
        self.logs = logs
        self.complete = False
        self.stop = threading.Event()
        self.response: Any = None
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run,), name=f"aicenter-log-{logs.job}", daemon=True)
        self.thread.start()

    def line(self, text: str) -> str:
        text = self.logs.redactor.redact(text)
        match = _RANK_PREFIX.match(text)
        if match:
            return f"[node 0 rank {match.group(1)}] {text[match.end():]}"
        if self.logs.procs_per_node == 1:
            return f"[node 0 rank 0] {text}"
        return f"[node 0] {text}"

    def _node0(self) -> k8s.V1Pod | None:
        """Node 0's pod once its user container started (None while it has not, or once the run is over)."""
        container = self.logs.container
        while not self.stop.is_set():
            try:
                pods = self.logs.pods()
            except Exception:  # noqa: BLE001 - the wait itself reports API trouble; keep looking
                pods = []
            staged = False
            for pod in pods:
                if node_index(pod) != "0" or pod.status is None:
                    continue
                for status in pod.status.container_statuses or []:
                    state = status.state
                    if status.name == container and state is not None and (state.running or state.terminated):
                        return pod
                init = pod.status.init_container_statuses or []
                staged = bool(init) and all(s.state is not None and s.state.terminated for s in init)
            # Staged: the user container starts within moments, and a run that fails at once (another node's error
            # stops this one) would be gone before the next look at poll_interval.
            self.stop.wait(min(self.logs.poll, STAGED_POLL) if staged else self.logs.poll)
        return None

    def _run(self) -> None:
        log = self.logs.log
        pod = self._node0()
        if pod is None:
            return
        try:
            self.response = self.logs.core.read_namespaced_pod_log(
                pod.metadata.name, pod.metadata.namespace, container=self.logs.container, follow=True,
                _preload_content=False, _request_timeout=(30, None),  # a training may print nothing for hours
            )
            pending = b""
            while chunk := self.response.read1(65536):  # what has arrived, not a full buffer
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    log.info("%s", self.line(raw.decode("utf-8", "replace").rstrip("\r")))
            if pending:
                log.info("%s", self.line(pending.decode("utf-8", "replace")))
            self.complete = True
        except Exception as exc:  # noqa: BLE001 - the relay at the end has the whole log
            if not self.stop.is_set():
                log.warning("Following node 0's log stopped (%s); it is relayed whole when the run ends", exc)

    def finish(self, wait: float = 10.0) -> None:
        """Stop looking for node 0; let a stream that runs read to its end (the container ended), then close it."""
        self.stop.set()
        self.thread.join(wait)
        if self.thread.is_alive() and self.response is not None:
            self.complete = False
            try:
                self.response.release_conn()
            except Exception:  # noqa: BLE001 - closing a stream that is going away
                pass


class GangStartTimeout(RunError):
    """Not every node of a Job was running within ``startup_timeout`` after admission."""


def node_index(pod: k8s.V1Pod) -> str:
    return str((pod.metadata.labels or {}).get("batch.kubernetes.io/job-completion-index", "?"))


def node_started(pod: k8s.V1Pod) -> bool:
    """Scheduled and a container of it started (its stage container counts: the node holds its GPUs)."""
    status = pod.status
    if status is None:
        return False
    if status.phase in ("Running", "Succeeded", "Failed"):
        return True
    return any(s.state is not None and (s.state.running or s.state.terminated) for s in status.init_container_statuses or [])


def why_pending(pod: k8s.V1Pod) -> str:
    """Why a node's pod is not running: its scheduling condition, else a waiting container's reason."""
    status = pod.status
    for condition in (status.conditions if status else None) or []:
        if condition.type == "PodScheduled" and condition.status != "True":
            return f"{condition.reason or 'not scheduled'}: {condition.message or ''}".rstrip(": ")
    for container in [*((status.init_container_statuses if status else None) or []),
                      *((status.container_statuses if status else None) or [])]:
        if container.state is not None and container.state.waiting is not None:
            waiting = container.state.waiting
            return f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return f"pod {pod.metadata.name} is {status.phase if status else 'Pending'}"


def admitted_for(job: Any, first_seen: float) -> float:
    """Seconds since the Job was admitted: from its ``status.startTime``, else since this process first saw it admitted.

    The Job controller sets ``startTime`` when it starts the Job and again when it resumes a
    suspended one (Kueue's admission), so queued time never counts, and a worker or triggerer
    that restarted and reattached keeps the gang's clock instead of starting it again. Both
    waits use it: the synchronous one (:meth:`JobLauncher._wait`) and GangJobTrigger.
    """
    start = getattr(job.status, "start_time", None) if job.status is not None else None
    if isinstance(start, datetime):
        return (datetime.now(UTC) - (start if start.tzinfo else start.replace(tzinfo=UTC))).total_seconds()
    return time.monotonic() - first_seen


def gang_timeout_message(pods: Sequence[Any], nodes: int, timeout: float) -> str:
    """Why a gang failed to start: how many of its nodes run, and why each other one waits (the Job is removed)."""
    running = sum(1 for p in pods if node_started(p))
    waiting = "; ".join(f"node {node_index(p)}: {why_pending(p)}" for p in pods if not node_started(p))
    return (
        f"{running} of {nodes} nodes running after {timeout:.0f} s (startup_timeout); the Job was removed so that no "
        f"node holds its GPUs half-started{': ' + waiting if waiting else ''}. The cluster lacks room for every node at "
        "once: retry later, use a Kueue queue (queue_name), ask for fewer nodes or raise startup_timeout"
    )


def job_name(run: RunRef) -> str:
    """A DNS-1123 label for the task instance (any try): ``aicenter-<task>-<hash>``, <= 52 chars.

    52 leaves room for the ``-<index>`` hostnames and the pod name suffix Kubernetes adds.
    """
    task = run.path.task
    digest = hashlib.sha256(task.prefix.encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "-" for c in task.task_id.lower()).strip("-")[:28] or "run"
    return f"aicenter-{stem}-{digest}".replace("--", "-")


class JobLauncher(PodLauncher):
    """``nodes`` pods of an Indexed Job and a headless Service; waits (or defers) until the Job ends.

    :param operator: the pipeline operator (its pod settings shape every node's pod).
    :param hook: the operator's AICenterHook.
    :param settings: AI Center's pod options (``gpu`` is per node).
    :param nodes: the number of machines (pods).
    """

    name = "kubernetes-job"
    outlives_worker: ClassVar[bool] = True
    runs_in_operator: ClassVar[bool] = False

    def __init__(self, operator: KubernetesPodOperator, hook: AICenterHook, settings: PodSettings, *, nodes: int) -> None:
        super().__init__(operator, hook, settings)
        self.nodes = nodes
        self.kube = cast("KubernetesHook", operator.hook)
        #: Seconds between polls of the Job and its pods (the operator's ``poll_interval``).
        self.poll = float(getattr(operator, "poll_interval", None) or POLL)
        self.job: str | None = None
        self.namespace: str | None = None
        self.streamer: NodeLogStream | None = None
        #: Every pod of the Job seen while waiting: its node index and the machine it ran on (a pod that is gone at
        #: the end is still named with its machine).
        self.seen: dict[str, tuple[str, str | None]] = {}

    def check(self) -> None:
        super().check()
        if self.settings.resources.dataset_volume_claim:
            raise ConfigurationError(
                "dataset_volume_claim with nodes > 1 would mount one claim into every node's pod; stage the data from "
                "the store (dataset='s3://...') for a multi-node run"
            )

    # -- the manifests ----------------------------------------------------------------------
    def manifests(self, context: Context, spec: RunSpec, run: RunRef) -> tuple[k8s.V1Job, k8s.V1Service]:
        """The Job and its headless Service, from the operator's own pod (its every pod argument, see pod_spec.py)."""
        self.pod_run = self.plan(spec, run)
        name = job_name(run)
        self.agent_env, self.ports = list(job_agent_env(name, self.nodes)), list(job_ports())
        pod = self.op.build_pod_request_obj(context)
        namespace = pod.metadata.namespace or self.op.namespace or "default"
        self.job, self.namespace = name, namespace
        return job_manifests(pod, name=name, namespace=namespace, nodes=self.nodes, run_label=run.label,
                             run_json=run.model_dump_json())

    # -- run --------------------------------------------------------------------------------
    def launch(self, context: Context, spec: RunSpec, run: RunRef) -> Finished:
        self.pod_run = self.plan(spec, run)
        self.issue_credentials(spec, run)
        job, service = self.manifests(context, spec, run)
        self.redactor_from(job)
        batch, core = self.kube.batch_v1_client, self.kube.core_v1_client
        assert self.job is not None and self.namespace is not None
        state = self._state_store(context)
        existing = self._stored_job(state) or self._read_job()
        if existing is not None and self._adopt_job(existing):
            self.op.log.info("Reattached to Job %s/%s of an earlier attempt", self.namespace, self.job)
        else:
            if existing is not None:  # a finished Job of an earlier try: it is replaced
                self._delete()
            self.job, self.namespace = job.metadata.name, job.metadata.namespace
            self._create(core.create_namespaced_service, service, "create the Service")
            created = self._create(batch.create_namespaced_job, job, "create the Job")
            self._store_identity(state, created)
            self.op.log.info(
                "Created Job %s/%s: %d nodes x %d processes", self.namespace, self.job, self.nodes, spec.procs_per_node
            )
        if self.killed.is_set():  # on_kill came while the Job was being created: it found nothing to delete then
            self._end()
            return self._killed()
        if self.op.deferrable:
            self._defer(context)
        streamer = self.streamer = NodeLogStream(self.logs())
        try:
            status = self._wait()
        except GangStartTimeout as timeout:
            self._end()  # removed at once: no GPU held by half a gang
            self._await_pods_gone()  # the started nodes record "killed" as they stop; the cause is the timeout
            return self.ending_of_start(str(timeout))
        except kube_retry.KubernetesUnavailable:
            # The API server failed for the whole retry budget: the Job may well be running on. It
            # is kept (with its credentials) for the task's retry to reattach to, never deleted on a read error.
            raise
        except BaseException:
            self._end()  # killed, timed out, or the Job disappeared
            if self.killed.is_set():  # on_kill removed the Job: the run was killed, it did not disappear
                return self._killed()
            raise
        finally:
            streamer.finish()
        try:
            return self.ending_of_job(status)
        finally:
            self._end()

    def _killed(self) -> Finished:
        """The ending of a run on_kill stopped (:meth:`kill` records it too; whichever comes first, it says killed)."""
        with self.recording:
            return self.killed_ending(self.reported()[3])

    def _end(self) -> None:
        if not self.op.deferrable:
            self._delete()
            self.revoke_credentials()

    def _create(self, create: Any, body: Any, what: str) -> Any:
        """Create an object, retrying transient API errors; 409 is one of our tries that got through (or the Service
        of an earlier attempt), which is what we wanted. Returns the object as created (None after a 409)."""
        assert self.namespace is not None
        try:
            return kube_retry.call(create, self.namespace, body, what=what, log=self.op.log)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None

    # -- the task state store (Airflow 3.3) ----------------------------------------------------
    def _state_store(self, context: Context) -> Any:
        """The task state store of this task instance, or None (Airflow before 3.3, or ``durable=False``)."""
        if not getattr(self.op, "durable", True):
            return None
        return context.get("task_state_store")

    def _store_identity(self, state: Any, created: k8s.V1Job | None) -> None:
        """Keep the created Job's identity for the next try; a store that fails only costs that (the name lookup stays)."""
        if state is None:
            return
        job = created
        if job is None or job.metadata is None:  # a 409: an earlier create of ours got through; its uid is read
            try:
                job = self._read_job()
            except (ApiException, kube_retry.KubernetesUnavailable):
                job = None  # stored without its uid: the name and namespace still find it
        uid = job.metadata.uid if job is not None and job.metadata is not None else None
        try:
            state.set(STATE_KEY, {"name": self.job, "namespace": self.namespace, "uid": uid})
        except Exception as exc:  # noqa: BLE001 - the Job runs regardless; only the reattach falls back to the name
            self.op.log.warning("Could not keep Job %s/%s in the task state store (%s); a restarted worker finds it by "
                                "name instead", self.namespace, self.job, exc)

    def _stored_job(self, state: Any) -> k8s.V1Job | None:
        """The Job an earlier try stored, if it is still there and still the same object (its uid); then ``job`` and
        ``namespace`` name it. None: nothing stored, a malformed entry, or that Job is gone or replaced."""
        if state is None:
            return None
        try:
            stored = state.get(STATE_KEY)
        except Exception as exc:  # noqa: BLE001 - an unreachable store must not stop the run; the name lookup follows
            self.op.log.warning("Could not read the task state store (%s); looking for the Job by name", exc)
            return None
        if stored is None:
            return None
        if not (isinstance(stored, dict) and isinstance(stored.get("name"), str) and isinstance(stored.get("namespace"), str)):
            self.op.log.warning("The task state store's %s entry is malformed (%r); looking for the Job by name", STATE_KEY,
                                stored)
            return None
        planned = self.job, self.namespace
        self.job, self.namespace = stored["name"], stored["namespace"]
        job = self._read_job()
        uid = stored.get("uid")
        if job is not None and (uid is None or job.metadata.uid == uid):
            self.op.log.info("Job %s/%s found through the task state store", self.namespace, self.job)
            return job
        why = "is gone" if job is None else f"was replaced by another object of that name (uid {job.metadata.uid}, not {uid})"
        self.op.log.info("Job %s/%s of the task state store %s; looking for the Job by name", self.namespace, self.job, why)
        self.job, self.namespace = planned
        return None

    def _defer(self, context: Context) -> None:
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

        from airflow_aicenter.triggers.job import GangJobTrigger

        assert self.job is not None and self.namespace is not None
        self.op.defer(
            trigger=GangJobTrigger(
                nodes=self.nodes,
                startup_timeout=self.settings.startup_timeout,
                procs_per_node=self.pod_run.spec.procs_per_node if self.pod_run is not None else None,
                credentials_secret=self.credentials_secret,
                aicenter_conn_id=self.hook.aicenter_conn_id,
                keep_job=self.op.on_finish_action == OnFinishAction.KEEP_POD,
                job_name=self.job,
                job_namespace=self.namespace,
                pod_names=[],
                pod_namespace=self.namespace,
                base_container_name=self.op.base_container_name,
                kubernetes_conn_id=self.op.kubernetes_conn_id,
                cluster_context=self.op.cluster_context,
                config_file=self.op.config_file,
                in_cluster=self.op.in_cluster,
                poll_interval=self.op.poll_interval,
                get_logs=False,
                do_xcom_push=False,
            ),
            method_name="trigger_reentry",
        )

    def resume(self, context: Context, event: dict[str, Any]) -> Finished:
        """Deferrable re-entry: the Job's own annotation says which run it executes.

        The trigger ends either with the Job (complete or failed) or, when not every node ran within
        ``startup_timeout``, with ``status: startup_timeout``: then the Job is removed at once and the run fails
        with the trigger's count of running nodes (retryable), as in the synchronous wait.
        """
        self.job, self.namespace = event["name"], event["namespace"]
        for name, (index, machine) in (event.get("seen") or {}).items():  # the trigger's view: gone pods keep a machine
            self.seen.setdefault(str(name), (str(index), machine))
        job = self._read_job()
        if job is None or not self._adopt_job(job):
            raise RunError(f"Job {self.namespace}/{self.job} is gone or not ours; clear the task to run it again")
        try:
            if event.get("status") == STARTUP_TIMEOUT:
                self._delete()  # no GPU held by half a gang
                self._await_pods_gone()
                return self.ending_of_start(str(event.get("message") or "the Job's nodes did not all start in time"))
            if job_ended(job) and not event.get("logs_relayed"):  # an event of a trigger that did not relay them
                self._relay_logs(job, followed=False)
            return self.ending_of_job(job.status)
        finally:
            self._delete()
            self.revoke_credentials(self.pod_run.run if self.pod_run else None)

    def tidy_recovered(self, run: RunRef) -> None:
        """An earlier try finished while its worker could not see it (the API server was down): its Job and
        Service, still there, are removed now, and its credentials revoked.

        Its run wrote ``outcome.json``, so its work is done; the Job may still be ending (containers exiting after
        the outcome, the Job controller not yet marking it complete). It gets ``TIDY_WAIT`` seconds to end, then is
        removed either way: left, it would stay in the namespace for good. The Job is the one the task state store
        names where there is one (the running task's context), else the one of this task's name."""
        self.job, self.namespace = job_name(run), self.pod_namespace()
        deadline = time.monotonic() + TIDY_WAIT
        try:
            job = self._stored_job(self._state_store(_current_context())) or self._read_job()
            while job is not None and not job_ended(job) and time.monotonic() < deadline:
                time.sleep(self.poll / 2)
                job = self._read_job()
        except (ApiException, kube_retry.KubernetesUnavailable) as exc:
            self.op.log.warning("Could not look for Job %s/%s of an earlier try: %s", self.namespace, self.job, exc)
            return
        if job is None:
            return
        state = "which ended" if job_ended(job) else f"whose run is complete (still ending after {TIDY_WAIT:.0f} s)"
        self.op.log.info("Removing Job %s/%s of try %s, %s", self.namespace, self.job, run.try_number, state)
        self._delete()
        self.revoke_credentials(run)

    def _read_job(self) -> k8s.V1Job | None:
        assert self.job is not None and self.namespace is not None
        try:
            return kube_retry.call(self.kube.batch_v1_client.read_namespaced_job, self.job, self.namespace,
                                   what=f"read Job {self.namespace}/{self.job}", log=self.op.log)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _adopt_job(self, job: k8s.V1Job) -> bool:
        """Take over a Job of this task instance that is still running (a worker restart)."""
        found = run_of_job(job)
        if found is None:
            raise RunError(f"Job {self.namespace}/{self.job} was not started by airflow-aicenter; delete it and clear the task")
        if self.pod_run is not None and not found.same_task(self.pod_run):
            raise RunError(f"Job {self.namespace}/{self.job} runs {found.run.label}, not this task; delete it and clear the task")
        finished = any(c.type in ("Complete", "Failed") and c.status == "True" for c in (job.status.conditions or []))
        if finished and self.pod_run is not None:
            return False
        self.pod_run = found
        return True

    def _wait(self) -> k8s.V1JobStatus:
        """Poll the Job to its end; until every node runs, hold it to ``startup_timeout`` (all-or-nothing start).

        The clock starts when the Job is admitted (not suspended): time queued in Kueue is not
        startup time. It is the Job's own ``status.startTime`` (:func:`admitted_for`), so a worker
        that restarted and reattached does not give the gang ``startup_timeout`` again. A node
        counts as started once its pod is scheduled and its first container started (staging
        counts: the node holds its GPUs then).
        """
        admitted: float | None = None
        started = False
        timeout = self.settings.startup_timeout
        while True:
            job = self._read_job()
            if job is None:
                raise RunError(f"Job {self.namespace}/{self.job} disappeared while running (deleted by someone?)")
            if job_ended(job):
                streamer = self.streamer
                if streamer is not None:
                    streamer.finish()
                self._relay_logs(job, skip_streamed=streamer is not None and streamer.complete)
                return job.status
            if not started and job.spec.suspend:
                if admitted is None:
                    self.op.log.info("Job %s/%s waits in queue %s to be admitted", self.namespace, self.job,
                                     (job.metadata.labels or {}).get(QUEUE_LABEL))
                admitted = None  # queued (again): the start clock waits for admission
            elif not started:
                admitted = admitted if admitted is not None else time.monotonic()
                pods = self._pods()
                running = [p for p in pods if node_started(p)]
                if len(running) >= self.nodes:
                    started = True
                    self.op.log.info("All %d nodes of Job %s are running", self.nodes, self.job)
                elif admitted_for(job, admitted) > timeout:
                    raise GangStartTimeout(gang_timeout_message(pods, self.nodes, timeout))
            time.sleep(self.poll)

    def logs(self) -> JobLogs:
        """The nodes' logs of this launcher's Job (:class:`JobLogs`), masked with :attr:`redactor`."""
        assert self.job is not None and self.namespace is not None
        return JobLogs(self.kube.core_v1_client, namespace=self.namespace, job=self.job, nodes=self.nodes,
                       container=self.op.base_container_name, log=self.op.log, redactor=self.redactor, poll=self.poll,
                       procs_per_node=self.pod_run.spec.procs_per_node if self.pod_run is not None else None, seen=self.seen)

    def _pods(self) -> list[k8s.V1Pod]:
        return self.logs().pods()

    def _relay_logs(self, job: k8s.V1Job, *, skip_streamed: bool = False, followed: bool = True) -> None:
        """The nodes' logs into the task log once the Job ended (:meth:`JobLogs.relay`)."""
        self.logs().relay(job, skip_streamed=skip_streamed, followed=followed)

    def redactor_from(self, job: k8s.V1Job) -> Redactor:
        """Add the plain values of the Job's secret-looking env (every container of its pod template) to
        :attr:`redactor`, which already holds the run's ``env`` secrets and its issued credentials."""
        return redactor_from(job, self.redactor)

    def ending_of_job(self, status: k8s.V1JobStatus | None) -> Finished:
        """Node 0's outcome.json decides; a failed node's own outcome names the cause."""
        spec, run, store, outcome = self.reported()
        succeeded = status is not None and any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])
        if succeeded and outcome is not None and outcome.status == "succeeded":
            return Finished(spec, run, outcome)
        disrupted = self.disruptions(status)
        if disrupted:  # the node went away under the run: not the training's fault, the retry resumes
            cause = "; ".join([*disrupted, DISRUPTED_RETRY])
            end_outcome(store, run.key(OUTCOME), outcome or spec, "failed", cause)
            return Finished(spec, run, settle_outcome(store, spec, run, ended=cause))
        causes = []
        for node in range(1, self.nodes):
            node_outcome = read_optional(store, run.key(outcome_name(node)), Outcome)
            if node_outcome is not None and node_outcome.status not in ("succeeded", "running"):
                causes.append(f"node {node}: {node_outcome.error}")
        pods = {(p.metadata.labels or {}).get("batch.kubernetes.io/job-completion-index"): p for p in self._safe_pods()}
        for index, pod in sorted(pods.items(), key=lambda kv: str(kv[0])):
            container, code, reason, _ = run_ending(pod, self.op.base_container_name)
            if code not in (None, 0) and not any(c.startswith(f"node {index}:") for c in causes) and index != "0":
                how = f"exit code {code}{', ' + reason if reason else ''}"
                causes.append(f"node {index}: its {container} container ended ({how})")
        if causes and (outcome is None or outcome.status in ("running", "succeeded")):
            outcome = end_outcome(store, run.key(OUTCOME), outcome or spec, "failed", "; ".join(causes))
        elif causes and outcome is not None and outcome.error:
            outcome.error = f"{outcome.error}; {'; '.join(causes)}"
            write(store, run.key(OUTCOME), outcome)
        return Finished(spec, run, settle_outcome(store, spec, run, ended=f"Job {self.job} ended without node 0's report"))

    def disruptions(self, status: k8s.V1JobStatus | None) -> list[str]:
        """The nodes the cluster took away (``DisruptionTarget``, eviction, preemption, node loss), each named with its
        pod and machine: from the pods still listed, and from the Job's ``PodFailurePolicy`` condition for a pod that
        is gone (deleted or preempted before the Job ended)."""
        found: dict[str, str] = {}
        for pod in self._safe_pods():
            if why := disruption(pod):
                machine = (pod.spec.node_name if pod.spec else None) or self.seen.get(pod.metadata.name, ("", None))[1]
                found[pod.metadata.name] = (f"node {node_index(pod)} (pod {pod.metadata.name}) was disrupted on node "
                                            f"{machine or '?'} ({why})")
        for condition in (status.conditions if status else None) or []:
            match = _POLICY_DISRUPTION.search(condition.message or "")
            if condition.type != "Failed" or condition.status != "True" or condition.reason != "PodFailurePolicy" or not match:
                continue
            name = match.group(1)
            if name in found:
                continue
            index, machine = self.seen.get(name, (None, None))
            if index is None:
                numbered = re.match(rf"^{re.escape(self.job or '')}-(\d+)-", name)
                index = numbered.group(1) if numbered else "?"
            found[name] = f"node {index} (pod {name}) was disrupted on node {machine or '?'} (DisruptionTarget; the pod is gone)"
        return list(found.values())

    def ending_of_start(self, cause: str) -> Finished:
        """The gang did not start in time: the run failed with ``cause`` (retryable: capacity may free up)."""
        spec, run, store, outcome = self.reported()
        if outcome is None or outcome.status in ("running", "succeeded", "killed"):
            end_outcome(store, run.key(OUTCOME), outcome or spec, "failed", cause)
        return Finished(spec, run, settle_outcome(store, spec, run, ended=cause))

    def _await_pods_gone(self, limit: float = 60.0) -> None:
        """Wait (bounded) until the deleted Job's pods are gone, so what they record last is known."""
        deadline = time.monotonic() + limit
        while self._safe_pods() and time.monotonic() < deadline:
            time.sleep(self.poll / 2)

    def _safe_pods(self) -> list[k8s.V1Pod]:
        try:
            return self._pods()
        except (ApiException, kube_retry.KubernetesUnavailable):
            return []

    def _delete(self) -> None:
        """Remove the Job (its pods with it) and the Service; a missing one is fine."""
        from airflow.providers.cncf.kubernetes.utils.pod_manager import OnFinishAction

        if self.job is None or self.namespace is None or self.op.on_finish_action == OnFinishAction.KEEP_POD:
            return
        delete_job(self.kube, self.job, self.namespace, self.op.log)

    def kill(self) -> None:
        """Delete the Job and Service; the run is recorded as killed."""
        self.killed.set()
        self._delete()
        self.revoke_credentials(self.pod_run.run if self.pod_run else None)
        if self.pod_run is None:
            return
        store = self.hook.get_store()
        with self.recording:  # the launch path may be recording the ending now: one after the other
            record_killed(store, self.pod_run.spec, self.pod_run.run)


def delete_quietly(delete: Any, name: str, namespace: str, log: Any, body: k8s.V1DeleteOptions | None = None) -> None:
    """``delete(name, namespace)``, retried through transient errors; a missing object is fine, another failure a warning."""
    try:
        kube_retry.call(delete, name, namespace, body=body, what=f"delete {namespace}/{name}", log=log)
    except ApiException as exc:
        if exc.status != 404:
            log.warning("Could not delete %s/%s: %s", namespace, name, exc.reason)
    except kube_retry.KubernetesUnavailable as exc:
        log.warning("Could not delete %s/%s: %s", namespace, name, exc)


def delete_job(kube: KubernetesHook, job: str, namespace: str, log: Any) -> None:
    """Remove a run's Job (its pods with it, in the background) and its Service of the same name.

    The launcher's ending and on_kill, and the deferred trigger's on_kill, remove a Job this way.
    """
    body = k8s.V1DeleteOptions(propagation_policy="Background")
    for delete in (kube.batch_v1_client.delete_namespaced_job, kube.core_v1_client.delete_namespaced_service):
        delete_quietly(delete, job, namespace, log, body)


def _current_context() -> Any:
    """The running task's context (the task runner sets it around ``execute``), or an empty one outside a task."""
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:  # noqa: BLE001 - no task is running here: no state store to read
        return {}


def run_of_job(job: k8s.V1Job) -> PodRun | None:
    """The run a Job executes, from its pod template's annotation (None: not a Job of airflow-aicenter)."""
    return PodRun.from_pod(k8s.V1Pod(metadata=job.metadata, spec=job.spec.template.spec))


def job_ended(job: k8s.V1Job) -> bool:
    """Whether the Job controller marked the Job complete or failed."""
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in (job.status.conditions or []))
