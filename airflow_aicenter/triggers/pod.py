"""The deferrable wait for a one-pod run: KubernetesPodTrigger, whose on_kill also ends what the run holds.

KubernetesPodTrigger's ``on_kill`` (Airflow 3.3 calls it when a user marks the deferred task
failed or succeeded, or clears it) deletes the pod and nothing else. A run's pod is not all it
holds: its per-run credentials Secret stays until it expires, and a pod stopped while Pending
(no runtime started) leaves the run's record ``running`` for good. :class:`RunPodTrigger` is the
same wait (every argument and event of KubernetesPodTrigger) and, on kill, revokes the
credentials and records the run ``killed``, as the operator's own on_kill does for a task a
worker holds. The operator defers with it wherever KubernetesPodOperator would defer with
KubernetesPodTrigger.
"""

from __future__ import annotations

import asyncio
from typing import Any

from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
from airflow.providers.cncf.kubernetes.utils.pod_manager import OnKillAction

from airflow_aicenter.launchers import kube_retry
from airflow_aicenter.launchers.base import await_ending, record_killed
from airflow_aicenter.launchers.pod import EVENT_KEY, KILL_RECORD_WAIT, PodRun

#: Seconds an API call of a trigger's on_kill is retried: Airflow gives on_kill 30 s in all (``[triggerer] on_kill_timeout``).
ON_KILL_BUDGET = 10.0


def record_stopped_run(aicenter_conn_id: str, run: PodRun, log: Any) -> None:
    """A trigger's on_kill: the run recorded ``killed`` in its store (the connection's), unless a runtime that had
    started records its own ending within ``KILL_RECORD_WAIT`` seconds as it stops. Failures are logged: the pods are
    gone already, and the record only says why."""
    from airflow_aicenter.hooks.aicenter import AICenterHook

    try:
        store = AICenterHook(aicenter_conn_id).get_store()
        await_ending(store, run.run, KILL_RECORD_WAIT)
        outcome = record_killed(store, run.spec, run.run)
        log.info("Run %s recorded as %s", run.run.label, outcome.status)
    except Exception:
        log.exception("Could not record run %s as killed", run.run.label)


class RunPodTrigger(KubernetesPodTrigger):
    """KubernetesPodTrigger whose ``on_kill`` also revokes the run's credentials and records the run (module docstring).

    :param aicenter_conn_id: the connection of the run's store (None: the record is left to the runtime).
    :param credentials_secret: the run's credentials Secret in the pod's namespace (None: none was issued).
    Every other argument is KubernetesPodTrigger's; the run is the one its ``trigger_kwargs`` carry.
    """

    def __init__(self, *, aicenter_conn_id: str | None = None, credentials_secret: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aicenter_conn_id = aicenter_conn_id
        self.credentials_secret = credentials_secret

    @classmethod
    def replacing(cls, trigger: KubernetesPodTrigger, *, aicenter_conn_id: str | None,
                  credentials_secret: str | None) -> RunPodTrigger:
        """This trigger with every argument of ``trigger`` (KubernetesPodOperator's)."""
        _, kwargs = trigger.serialize()
        return cls(aicenter_conn_id=aicenter_conn_id, credentials_secret=credentials_secret, **kwargs)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            **kwargs, "aicenter_conn_id": self.aicenter_conn_id, "credentials_secret": self.credentials_secret,
        }

    async def on_kill(self) -> None:
        """KubernetesPodTrigger's (the pod deleted, unless an event was sent or ``on_kill_action`` keeps it), then the
        run's credentials revoked and, when the pod was deleted, the run recorded ``killed`` if its runtime did not."""
        fired = self._fired_event
        await super().on_kill()
        if fired:  # the task's re-entry owns the run from then on
            return
        await self._revoke()
        run = PodRun.from_event((self.trigger_kwargs or {}).get(EVENT_KEY))
        if run is not None and self.aicenter_conn_id and self.on_kill_action != OnKillAction.KEEP_POD:
            await asyncio.to_thread(record_stopped_run, self.aicenter_conn_id, run, self.log)

    async def _revoke(self) -> None:
        from kubernetes_asyncio.client import CoreV1Api
        from kubernetes_asyncio.client.exceptions import ApiException

        if not self.credentials_secret:
            return
        name = self.credentials_secret

        async def delete() -> Any:
            async with self.hook.get_conn() as connection:
                return await CoreV1Api(connection).delete_namespaced_secret(name=name, namespace=self.pod_namespace)

        try:
            await kube_retry.acall(delete, what=f"delete {self.pod_namespace}/{name}", log=self.log, budget=ON_KILL_BUDGET)
        except ApiException as exc:
            if exc.status != 404:
                self.log.warning("Could not delete the run's credentials Secret %s: %s", name, exc.reason)
        except kube_retry.KubernetesUnavailable as exc:
            self.log.warning("Could not delete the run's credentials Secret %s: %s", name, exc)
