"""Launchers: where a run's runtime executes. One interface, one class per execution mode.

- :class:`~airflow_aicenter.launchers.local.LocalLauncher`: a child process of the worker (the
  embedded default; trusted code on a laptop or in CI).
- :class:`~airflow_aicenter.launchers.pod.PodLauncher`: one Kubernetes pod, through
  KubernetesPodOperator itself (every pod argument, ``deferrable=True``, reattach).
- :class:`~airflow_aicenter.launchers.job.JobLauncher`: an Indexed ``batch/v1`` Job and a headless
  Service for ``nodes > 1``.

The operator resolves and checks, picks a launcher in ``execute``, and hands the finished run
(:class:`~airflow_aicenter.launchers.base.Finished`) to its one post-run step.
"""

from airflow_aicenter.launchers.base import Finished, Launcher, settle_outcome

__all__ = ["Finished", "Launcher", "settle_outcome"]
