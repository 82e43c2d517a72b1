"""The deferrable wait for a distributed run's Indexed Job, with the all-or-nothing start.

KubernetesJobTrigger waits for the Job to complete or fail, and nothing else: a gang whose
nodes cannot all be scheduled waits there for ever while the scheduled ones hold their GPUs.
:class:`GangJobTrigger` is that trigger plus the synchronous wait's ``startup_timeout``: once
the Job is admitted (not suspended: time queued in Kueue is not startup time), every node must
be running within ``startup_timeout`` seconds, else the trigger ends with ``status:
startup_timeout`` and the counts, and the task's re-entry removes the Job and fails the run
(retryable), naming how many nodes ran and why the others wait.

The admission time is the Job's own ``status.startTime`` (set by the Job controller when it
starts or resumes the Job), so a restarted triggerer keeps the clock instead of starting it
again. Every API call is retried through transient errors as the synchronous wait's are
(:mod:`airflow_aicenter.launchers.kube_retry`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.cncf.kubernetes.triggers.job import KubernetesJobTrigger
from airflow.triggers.base import TriggerEvent
from kubernetes.client.exceptions import ApiException

from airflow_aicenter.launchers import kube_retry
from airflow_aicenter.launchers.job import (
    STARTUP_TIMEOUT,
    JobLogs,
    NodeLogStream,
    admitted_for,
    delete_job,
    delete_quietly,
    gang_timeout_message,
    job_ended,
    node_started,
    redactor_from,
    remember,
    run_of_job,
)
from airflow_aicenter.launchers.pod import PodRun
from airflow_aicenter.secrets import Redactor
from airflow_aicenter.triggers.pod import ON_KILL_BUDGET, record_stopped_run

#: The event key saying the trigger already copied the nodes' logs into the task log (the re-entry does not again).
LOGS_RELAYED = "logs_relayed"


class GangJobTrigger(KubernetesJobTrigger):
    """KubernetesJobTrigger with the gang's ``startup_timeout`` (see the module docstring).

    Node 0's log is followed into the task log while the Job runs, and when the Job ends the
    nodes' logs are relayed (node 0's staging and upload, the other nodes' last lines on failure),
    as the synchronous wait does, with the same code (:class:`~airflow_aicenter.launchers.job.JobLogs`,
    through the synchronous client in threads, as KubernetesJobTrigger reads XComs): the triggerer
    writes a trigger's log into the task's log, and the Job controller removes the pods it stops
    soon after the Job failed, before the task re-enters.

    :param nodes: the Job's number of pods (completions).
    :param startup_timeout: seconds every node may take to be running once the Job is admitted.
    :param procs_per_node: processes per node (the ``[node 0 rank r]`` prefix of node 0's lines).
    :param credentials_secret: the run's credentials Secret, revoked by :meth:`on_kill`.
    :param aicenter_conn_id: the connection of the run's store, where :meth:`on_kill` records a run no node of which
        could record it (None: the record is left to the nodes).
    :param keep_job: ``on_finish_action`` keeps pods: :meth:`on_kill` leaves the Job running.
    """

    def __init__(self, *, nodes: int, startup_timeout: float, procs_per_node: int | None = None,
                 credentials_secret: str | None = None, aicenter_conn_id: str | None = None, keep_job: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nodes = nodes
        self.startup_timeout = startup_timeout
        self.procs_per_node = procs_per_node
        self.credentials_secret = credentials_secret
        self.aicenter_conn_id = aicenter_conn_id
        self.keep_job = keep_job
        #: An event was sent: the task's re-entry owns the Job from then on (on_kill leaves it alone).
        self.fired = False
        #: Every pod of the Job seen while waiting: its node index and machine (the event hands it to the re-entry,
        #: which names a disrupted node's machine after its pod is gone).
        self.seen: dict[str, tuple[str, str | None]] = {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            **kwargs, "nodes": self.nodes, "startup_timeout": self.startup_timeout, "procs_per_node": self.procs_per_node,
            "credentials_secret": self.credentials_secret, "aicenter_conn_id": self.aicenter_conn_id,
            "keep_job": self.keep_job,
        }

    async def on_kill(self) -> None:
        """A user marked the deferred task failed or succeeded, or cleared it: remove what the run holds.

        No worker holds a deferred task, so the operator's on_kill cannot run; Airflow 3.3 calls
        this instead (on a user's action only, never when a triggerer restarts or hands the trigger
        on). As the operator's on_kill does: the Job (its pods with it, whose agents record the run
        as killed on their way out) and its Service are deleted, unless ``on_finish_action`` keeps
        pods, and the run's credentials Secret is revoked. A run no agent recorded (every node still
        Pending, or one that could not write) is recorded ``killed`` in the store, as the operator's
        on_kill does: Airflow gives on_kill 30 s (``[triggerer] on_kill_timeout``), of which the
        nodes get ``KILL_RECORD_WAIT`` to record it themselves (:func:`~airflow_aicenter.triggers.pod.record_stopped_run`).
        """
        if self.fired:
            return
        await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        hook = KubernetesHook(conn_id=self.kubernetes_conn_id, in_cluster=self.in_cluster, config_file=self.config_file,
                              cluster_context=self.cluster_context)
        recorder = None if self.keep_job else self.aicenter_conn_id  # a Job left running records its own ending
        run = self._run(hook) if recorder else None  # read before the Job goes: its annotation names the run
        if not self.keep_job:
            delete_job(hook, self.job_name, self.job_namespace, self.log)
        if self.credentials_secret:
            delete_quietly(hook.core_v1_client.delete_namespaced_secret, self.credentials_secret, self.job_namespace,
                           self.log)
        if recorder and run is not None:
            record_stopped_run(recorder, run, self.log)

    def _run(self, hook: Any) -> PodRun | None:
        """The run the Job executes (None when the Job cannot be read)."""
        try:
            job = kube_retry.call(hook.batch_v1_client.read_namespaced_job, self.job_name, self.job_namespace,
                                  what=f"read Job {self.job_namespace}/{self.job_name}", log=self.log,
                                  budget=ON_KILL_BUDGET)
        except (ApiException, kube_retry.KubernetesUnavailable) as exc:
            self.log.warning("Could not read Job %s/%s (%s); its nodes record how the run ended", self.job_namespace,
                             self.job_name, getattr(exc, "reason", None) or exc)
            return None
        return run_of_job(job)

    def _job_logs(self) -> JobLogs | None:
        """The nodes' logs through the synchronous client (built here, on the event loop, as KubernetesJobTrigger builds
        its pod manager's), masked with the Job's own secret-looking env (the worker's masker is not here). None when
        the client cannot be built: the wait goes on and the re-entry relays the logs instead."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        try:
            hook = KubernetesHook(conn_id=self.kubernetes_conn_id, in_cluster=self.in_cluster, config_file=self.config_file,
                                  cluster_context=self.cluster_context)
            core = hook.core_v1_client
        except Exception as exc:  # noqa: BLE001 - logs are a convenience; the Job's wait must not fail for them
            self.log.warning("Cannot follow the nodes' logs from the triggerer (%s); they are copied when the task resumes",
                             exc)
            return None
        return JobLogs(core, namespace=self.job_namespace, job=self.job_name, nodes=self.nodes,
                       container=self.base_container_name, log=self.log, redactor=Redactor(), poll=self.poll_interval,
                       procs_per_node=self.procs_per_node, seen=self.seen)

    async def _relay(self, logs: JobLogs | None, job: Any, *, streamed: bool) -> bool:
        """The nodes' logs into the task log as the Job ended (:meth:`JobLogs.relay`); False: the re-entry relays them."""
        if logs is None:
            return False
        try:
            await asyncio.to_thread(logs.relay, job, skip_streamed=streamed)
        except Exception as exc:  # noqa: BLE001 - the event must still come; the re-entry copies what is left
            self.log.warning("Could not copy the nodes' logs (%s); the task copies them when it resumes", exc)
            return False
        return True

    async def _read_job(self) -> Any:
        from kubernetes_asyncio.client import BatchV1Api

        async def read() -> Any:
            async with self.hook.get_conn() as connection:
                return await BatchV1Api(connection).read_namespaced_job_status(name=self.job_name,
                                                                               namespace=self.job_namespace)

        return await kube_retry.acall(read, what=f"read Job {self.job_namespace}/{self.job_name}", log=self.log)

    async def _pods(self) -> list[Any]:
        from kubernetes_asyncio.client import CoreV1Api

        async def pods() -> Any:
            async with self.hook.get_conn() as connection:
                return await CoreV1Api(connection).list_namespaced_pod(namespace=self.job_namespace,
                                                                       label_selector=f"job-name={self.job_name}")

        listed = await kube_retry.acall(pods, what=f"list the pods of Job {self.job_name}", log=self.log)
        return remember(self.seen, listed.items)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        stream: NodeLogStream | None = None
        try:
            started = False
            first_seen: float | None = None
            logs = self._job_logs()
            while True:
                job = await self._read_job()
                if job_ended(job):  # a condition whose status is "True" (KubernetesHook's check takes "False" for true)
                    error = next((c.reason or "Failed" for c in job.status.conditions
                                  if c.type == "Failed" and c.status == "True"), None)
                    if stream is not None:
                        await asyncio.to_thread(stream.finish)
                    relayed = await self._relay(logs, job, streamed=stream is not None and stream.complete)
                    self.fired = True
                    yield TriggerEvent({
                        "name": job.metadata.name, "namespace": job.metadata.namespace, "pod_names": list(self.pod_names),
                        "pod_namespace": self.pod_namespace, "status": "error" if error else "success",
                        "message": f"Job failed with error: {error}" if error else "Job completed successfully",
                        "xcom_result": None, LOGS_RELAYED: relayed, "seen": {k: list(v) for k, v in self.seen.items()},
                    })
                    return
                if stream is None and logs is not None and not (job.spec is not None and job.spec.suspend):
                    redactor_from(job, logs.redactor)  # the Job's own secret-looking env, masked from the first line
                    stream = NodeLogStream(logs)  # admitted: node 0 is followed into the task log from now on
                if not started and job.spec is not None and job.spec.suspend:
                    first_seen = None  # queued (again): the start clock waits for admission
                elif not started:
                    first_seen = first_seen if first_seen is not None else time.monotonic()
                    pods = await self._pods()
                    if sum(1 for p in pods if node_started(p)) >= self.nodes:
                        started = True
                        self.log.info("All %d nodes of Job %s are running", self.nodes, self.job_name)
                    elif admitted_for(job, first_seen) > self.startup_timeout:
                        self.fired = True
                        yield TriggerEvent({
                            "name": self.job_name, "namespace": self.job_namespace, "status": STARTUP_TIMEOUT,
                            "message": gang_timeout_message(pods, self.nodes, self.startup_timeout),
                        })
                        return
                await asyncio.sleep(self.poll_interval)
        finally:
            if stream is not None:
                stream.finish(0)  # ended, or cancelled (the trigger moved to another triggerer): stop following
