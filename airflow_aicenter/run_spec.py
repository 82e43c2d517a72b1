"""Before a run, without Airflow: the task's request, its run folder, and the spec the runtime is given.

The operator's rendered arguments become one :class:`~airflow_aicenter.completion.RunRequest`
(:func:`run_request`), so the spec, the secret env and the post-run step read one value.
:func:`prepare` is the step before compute: resolve the version, check the package, the inputs
and the launcher, find an earlier try's run to complete instead, build the spec; a refusal is
recorded as a run. The spec never holds a secret: secret user parameters travel as process env
(:func:`secret_env`), their names only in the spec. No Airflow import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from airflow_aicenter.completion import Log, PostRun, Recovered, RunRequest
from airflow_aicenter.errors import AICenterError, ConfigurationError
from airflow_aicenter.launchers.base import Launcher
from airflow_aicenter.plans import PipelinePlan
from airflow_aicenter.records import RunRef, RunSpec, Trigger, TriggerAsset, VersionRecord
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.environment import package_indexes
from airflow_aicenter.runtime.manifest import dataset_roots
from airflow_aicenter.runtime.resources import prices_of
from airflow_aicenter.secrets import SECRET_KEYS_ENV

if TYPE_CHECKING:
    from airflow_aicenter.storage import Store


def positive_count(name: str, value: object) -> int:
    """A count of at least 1 (``nodes``, ``procs_per_node``); anything else is refused, naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name}={value!r} is not valid; give a whole number of at least 1")
    return value


def rendered_count(name: str, value: object) -> int:
    """``nodes`` or ``procs_per_node`` once rendered: a template such as ``{{ params.procs_per_node }}``
    renders to text ("3"), which names the count; anything else is refused as :func:`positive_count` does."""
    if isinstance(value, str) and value.strip().isdigit():
        return positive_count(name, int(value))
    return positive_count(name, value)


class RequestArguments(Protocol):
    """The operator's arguments a :class:`RunRequest` is made of (its attributes of the same names)."""

    @property
    def package(self) -> str: ...
    @property
    def requested_version(self) -> str: ...
    @property
    def dataset(self) -> str | None: ...
    @property
    def evaluation_dataset(self) -> str | None: ...
    @property
    def env(self) -> Mapping[str, Any]: ...
    @property
    def gpu(self) -> int: ...
    @property
    def promote_to(self) -> str | None: ...
    @property
    def promote_if(self) -> str: ...
    @property
    def save_training_data(self) -> bool: ...
    @property
    def save_test_data(self) -> bool: ...
    @property
    def install_requirements(self) -> bool: ...
    @property
    def allow_source_builds(self) -> bool: ...
    @property
    def nodes(self) -> int | str: ...
    @property
    def procs_per_node(self) -> int | str: ...
    @property
    def checkpoint_interval(self) -> float: ...
    @property
    def progress_interval(self) -> float: ...
    @property
    def incremental(self) -> bool: ...


def run_request(
    plan: PipelinePlan, args: RequestArguments, *, secret_keys: frozenset[str], spec_extra: Mapping[str, Any]
) -> RunRequest:
    """The rendered arguments of a ``plan`` task as one value (the spec, the launcher's secret env and the post-run
    step read it). ``secret_keys``: ``env`` keys whose values are secret although their names do not look it."""
    return RunRequest(
        plan=plan,
        package=args.package,
        requested_version=str(args.requested_version),
        dataset=args.dataset,
        evaluation_dataset=args.evaluation_dataset,
        env=args.env,
        gpu=args.gpu,
        promote_to=args.promote_to,
        promote_if=args.promote_if,
        secret_keys=secret_keys,
        save_training_data=args.save_training_data,
        save_test_data=args.save_test_data,
        install_requirements=args.install_requirements,
        allow_source_builds=args.allow_source_builds,
        nodes=rendered_count("nodes", args.nodes),
        procs_per_node=rendered_count("procs_per_node", args.procs_per_node),
        checkpoint_interval=args.checkpoint_interval,
        progress_interval=args.progress_interval,
        incremental=args.incremental,
        spec_extra=spec_extra,
    )


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


@dataclass(frozen=True)
class Prepared:
    """A run ready to start: its launcher, spec and folder; ``recovered``: an earlier try's run to complete instead."""

    launcher: Launcher
    spec: RunSpec
    run: RunRef
    recovered: Recovered | None = None


def prepare(
    registry: Registry,
    request: RunRequest,
    run: RunRef,
    *,
    launcher: Callable[[], Launcher],
    check_inputs: Callable[[], None],
    extra: Mapping[str, Any],
    log: Log,
) -> Prepared:
    """Everything before compute, in order: build the ``launcher``, resolve the version, check the package against the
    plan's contract, ``check_inputs`` (the datasets), the launcher's own checks, recover an earlier try's run, the spec.

    A refusal (any :class:`AICenterError`) is recorded as a failed run in ``run``'s folder (phase "prepare", with the
    version it resolved to, if any) and raised. ``extra``: the connection's extras (see :func:`build_spec`).
    """
    post, parent = PostRun(registry, request, log), None
    try:
        chosen = launcher()
        parent = registry.resolve(request.package, request.requested_version)
        log.info("Package %s version %s (resolved from %r), run folder %s", request.package, parent.version,
                 request.requested_version, run.uri)
        registry.check(parent, request.plan.contract)
        check_inputs()
        chosen.check()
        recovered = post.recover(run, outlives_worker=chosen.outlives_worker)
        if recovered is not None:
            parent, run = recovered.parent, recovered.run
        spec = build_spec(request, parent, run, storage=registry.store.uri, extra=extra)
    except AICenterError as exc:
        post.record_refused(run, exc, resolved=None if parent is None else parent.version)
        raise
    return Prepared(chosen, spec, run, recovered)
