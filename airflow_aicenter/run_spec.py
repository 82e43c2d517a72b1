"""Before a run, without Airflow: the run folder of a task try and the spec the runtime is given.

The operator resolves the version and checks the inputs; what it then hands a launcher is built
here from the task's :class:`~airflow_aicenter.completion.RunRequest` (its rendered arguments),
so the spec, the secret env and the post-run step read one value. The spec never holds a
secret: secret user parameters travel as process env (:func:`secret_env`), their names only in
the spec. No Airflow import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from airflow_aicenter.completion import RunRequest
from airflow_aicenter.records import RunRef, RunSpec, Trigger, TriggerAsset, VersionRecord
from airflow_aicenter.runtime.environment import package_indexes
from airflow_aicenter.runtime.manifest import dataset_roots
from airflow_aicenter.runtime.resources import prices_of
from airflow_aicenter.secrets import SECRET_KEYS_ENV

if TYPE_CHECKING:
    from airflow_aicenter.storage import Store


class TaskTry(Protocol):
    """What a run folder is named after: Airflow's task instance (``context["ti"]``) has these."""

    @property
    def dag_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def try_number(self) -> int | None: ...
    @property
    def map_index(self) -> int | None: ...


def trigger_of(dag_run: Any) -> Trigger | None:
    """Who or what started ``dag_run`` (Airflow's ``context["dag_run"]``): the person, the schedule or the assets.

    A scheduled run is ``schedule``; a run a person started (the UI, the API, ``airflow dags
    trigger`` or ``test``, a backfill) is that person; an asset-triggered run is the assets whose
    events started it, with the task runs that emitted them. None without a DAG run.
    """
    if dag_run is None:
        return None
    run_type = str(getattr(getattr(dag_run, "run_type", ""), "value", getattr(dag_run, "run_type", "")) or "")
    user = getattr(dag_run, "triggering_user_name", None) or None
    assets = []
    for event in getattr(dag_run, "consumed_asset_events", None) or ():
        version = (event.extra or {}).get("version") if str(event.asset.uri).startswith("aicenter://") else None
        assets.append(TriggerAsset(uri=event.asset.uri, dag_id=event.source_dag_id, run_id=event.source_run_id,
                                   task_id=event.source_task_id, version=None if version is None else str(version)))
    if run_type == "scheduled":
        by = "schedule"
    elif user:
        by = user
    elif assets:
        by = "asset " + ", ".join(dict.fromkeys(a.uri for a in assets))
    else:
        by = run_type or "unknown"
    return Trigger(by=by, run_type=run_type, user=user, assets=assets)


def run_ref(ti: TaskTry, store: Store, dag_run: Any = None) -> RunRef:
    """The run folder of this task try (one folder a try: output isolation), with its URI in ``store``, and who or
    what started its DAG run (``dag_run``: Airflow's ``context["dag_run"]``)."""
    ref = RunRef(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        task_id=ti.task_id,
        try_number=ti.try_number or 1,
        map_index=ti.map_index if ti.map_index is not None else -1,
        trigger=trigger_of(dag_run),
    )
    ref.uri = store.url(ref.prefix)
    return ref


def build_spec(
    request: RunRequest, parent: VersionRecord, run: RunRef, *, storage: str, extra: Mapping[str, Any]
) -> RunSpec:
    """What the runtime is asked to do: run ``parent`` (the resolved version) for ``request`` in ``run``'s folder.

    ``storage`` is the store's URI; ``extra`` the connection's extras (``package_indexes``,
    ``allowed_dataset_roots``). An incremental run needs the parent's data snapshot: it fails
    here, before compute, when the parent has none.
    """
    incremental_base = None
    if request.incremental:
        from airflow_aicenter.runtime.incremental import require_base

        incremental_base = require_base(parent)
    return RunSpec(
        pipeline=request.plan.name,
        storage=storage,
        run_prefix=run.prefix,
        package=request.package,
        version=parent.version,
        requested_version=request.requested_version,
        trigger=run.trigger,
        blob=parent.blob,
        dataset=request.dataset,
        evaluation_dataset=request.evaluation_dataset,
        env=request.plain_env(),
        # An incremental run snapshots its data: the next incremental run compares with it.
        save_training_data=request.save_training_data or request.incremental,
        save_test_data=request.save_test_data,
        gpu=request.gpu,
        install_requirements=request.install_requirements,
        allow_source_builds=request.allow_source_builds,
        user_env_names=sorted(request.masked_keys),
        nodes=request.nodes,
        procs_per_node=request.procs_per_node,
        checkpoint_prefix=run.path.task.checkpoints if request.plan.makes_version else None,
        checkpoint_interval=request.checkpoint_interval,
        progress_interval=request.progress_interval,
        prices=prices_of(extra.get("prices")),
        incremental_base=incremental_base,
        package_indexes=package_indexes(extra.get("package_indexes")),
        allowed_dataset_roots=[str(r) for r in dataset_roots(extra.get("allowed_dataset_roots"))],
        **request.spec_extra,
    )


def secret_env(request: RunRequest) -> dict[str, str]:
    """What a runtime process gets besides its spec: the secret user parameters, and their names so it masks them."""
    return {**request.secret_env(), SECRET_KEYS_ENV: ",".join(sorted(request.masked_keys))}
