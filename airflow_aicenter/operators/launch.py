"""Where a run executes: the launcher of one execution, built from the operator's arguments, and the run it makes.

:func:`make_launcher` builds the launcher a name asks for (``kubernetes``: a pod, or an Indexed
Job for ``nodes > 1``; ``local``: a child process of the worker). :func:`start` runs a prepared
run to its :class:`~airflow_aicenter.launchers.base.Finished` ending and :func:`resume` carries
on after a deferral; for a pod, KubernetesPodOperator's own ``execute`` or ``trigger_reentry``
runs it (:func:`kpo_run`), handed in by the operator as a plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_aicenter import run_spec
from airflow_aicenter.launchers.base import Finished, Launcher
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.launchers.pod import PodLauncher, PodSettings
from airflow_aicenter.launchers.pod_spec import PodResources
from airflow_aicenter.operators.checks import run_queue

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_aicenter.completion import RunRequest
    from airflow_aicenter.hooks.aicenter import AICenterHook
    from airflow_aicenter.operators.base import BasePipelineOperator
    from airflow_aicenter.records import RunRef


def make_launcher(op: BasePipelineOperator, name: str, request: RunRequest, hook: AICenterHook) -> Launcher:
    """The ``name`` launcher for ``op``'s run of ``request``, on ``hook``'s connection; ``nodes > 1`` on Kubernetes is a Job."""
    queue_name = run_queue(name, op.queue_name, hook.settings.extra.get("queue_name"))
    if name == "kubernetes":
        resources = PodResources(gpu=request.gpu, cpu=op.cpu, memory_gb=op.memory_gb, storage_gb=op.storage_gb,
                                 dataset_volume_claim=op.dataset_volume_claim, dataset_sub_path=op.dataset_sub_path)
        settings = PodSettings(
            queue_name=queue_name,
            startup_timeout=op.startup_timeout,
            pipeline=request.plan.name,
            env=op.env,
            resources=resources,
            aws_secret_name=op.aws_secret_name,
            datasets=(op.dataset, op.evaluation_dataset),
            secret_keys=request.masked_keys,
        )
        if request.nodes > 1:
            from airflow_aicenter.launchers.job import JobLauncher

            return JobLauncher(op, hook, settings, nodes=request.nodes)
        return PodLauncher(op, hook, settings)
    return LocalLauncher(
        store=hook.get_store(),
        env={**hook.runtime_env(op.dataset, op.evaluation_dataset), **run_spec.secret_env(request)},
        secrets=request.redactor,
        python=op.python,
        gpu=request.gpu,
        nodes=request.nodes,
        dataset_volume_claim=op.dataset_volume_claim,
        log=op.log,
        run_as_user=hook.settings.extra.get("run_as_user"),
    )


def start(context: Context, ready: run_spec.Prepared, kpo_execute: Callable[[], Any]) -> Finished:
    """Run a prepared run to its ending: an earlier try's recovered run as it ended (its Job or pod tidied), a pod
    through KubernetesPodOperator's ``execute`` (``kpo_execute``), anything else through its launcher."""
    launcher, spec, run = ready.launcher, ready.spec, ready.run
    if ready.recovered is not None:
        if isinstance(launcher, PodLauncher):
            launcher.tidy_recovered(ready.recovered.run)
        return Finished(spec, run, ready.recovered.outcome)
    if isinstance(launcher, PodLauncher) and launcher.runs_in_operator:
        launcher.prepare(spec, run)
        return kpo_run(launcher, None, kpo_execute)
    return launcher.launch(context, spec, run)


def resume(context: Context, launcher: Launcher, event: dict[str, Any], kpo_reentry: Callable[[], Any]) -> Finished:
    """A deferred run's ending: a pod's through KubernetesPodOperator's ``trigger_reentry`` (``kpo_reentry``), a Job's
    through its launcher."""
    if not (isinstance(launcher, PodLauncher) and launcher.runs_in_operator):
        return launcher.resume(context, event)
    return kpo_run(launcher, launcher.resumed(event).run, kpo_reentry)


def kpo_run(launcher: PodLauncher, run: RunRef | None, kpo: Callable[[], Any]) -> Finished:
    """KubernetesPodOperator runs the pod (``execute``) or watches it on (``trigger_reentry``); outcome.json then
    decides how the run ended, and the run's credentials are revoked (unless the task defers)."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_aicenter.errors import AICenterError

    deferred = False
    try:
        kpo()
    except TaskDeferred:
        deferred = True
        raise
    except AICenterError:
        raise
    except Exception as exc:  # noqa: BLE001 - outcome.json decides what the pod's failure means
        return launcher.ending(exc)
    finally:
        if not deferred:
            launcher.revoke_credentials(run)
    return launcher.ending(None)
