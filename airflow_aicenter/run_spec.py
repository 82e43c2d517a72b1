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
from airflow_aicenter.records import RunRef, RunSpec, VersionRecord
from airflow_aicenter.runtime.environment import package_indexes
from airflow_aicenter.runtime.manifest import dataset_roots
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


def run_ref(ti: TaskTry, store: Store) -> RunRef:
    """The run folder of this task try (one folder a try: output isolation), with its URI in ``store``."""
    ref = RunRef(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        task_id=ti.task_id,
        try_number=ti.try_number or 1,
        map_index=ti.map_index if ti.map_index is not None else -1,
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
        incremental_base=incremental_base,
        package_indexes=package_indexes(extra.get("package_indexes")),
        allowed_dataset_roots=[str(r) for r in dataset_roots(extra.get("allowed_dataset_roots"))],
        **request.spec_extra,
    )


def secret_env(request: RunRequest) -> dict[str, str]:
    """What a runtime process gets besides its spec: the secret user parameters, and their names so it masks them."""
    return {**request.secret_env(), SECRET_KEYS_ENV: ",".join(sorted(request.masked_keys))}
