"""What happens after a run, without Airflow: recover, register, promote, results, XCom, event.

Every launcher path ends in :meth:`PostRun.complete` (local, pod sync and deferrable, Job, a
recovered earlier try): it registers the run's version (once per task instance), records an
evaluation, promotes, writes ``_results.json`` and returns one :class:`Completion`, which the
operator publishes as it is (XCom ``return_value``, the package asset's event, OpenLineage).
Before a run, :meth:`PostRun.recover` finds an earlier try's run to complete instead, and
:meth:`PostRun.record_refused` records a run refused before compute. The pipeline type is
asked of the plan. No Airflow import: tested alone, on real stores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from airflow_aicenter.crashpoints import crash_point
from airflow_aicenter.errors import AICenterError, RunError
from airflow_aicenter.layout import ARTIFACTS, OUTCOME, PREDICTIONS, RESULTS, LayoutError, RunPath, blob_key
from airflow_aicenter.plans import PipelinePlan
from airflow_aicenter.promotion import Promotion, promote
from airflow_aicenter.records import (
    EvaluationRecord,
    Outcome,
    Results,
    RunRef,
    VersionRecord,
    end_outcome,
    read_optional,
    write,
)
from airflow_aicenter.registry import Registry
from airflow_aicenter.secrets import Redactor, is_secret_key, masked_env, redact
from airflow_aicenter.storage.store import local_path

#: What the data of a run's snapshot is called in ``_results.json`` outputs, by operator argument.
SNAPSHOT_OF = {"dataset": "data_directory", "evaluation_dataset": "test_data_directory"}


def dataset_uri(value: str | None) -> str | None:
    """A dataset as records name it: a plain absolute path becomes its ``file://`` URI (a trailing ``/`` kept).

    Records, ``_results.json`` and the UI compare and link datasets by URI; a path given as
    ``dataset="/data/churn"`` is the same data as ``file:///data/churn``. A relative path is a
    ConfigurationError: the worker's current folder is no place to find data.
    """
    if not value or "://" in value:
        return value
    uri = local_path(value).as_uri()
    return f"{uri}/" if value.endswith("/") and not uri.endswith("/") else uri


class Log(Protocol):
    def info(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...

    def warning(self, msg: Any, /, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, eq=False)
class RunRequest:
    """What the task asked for: the operator's rendered arguments, one value for before and after the run.

    The spec (:func:`airflow_aicenter.run_spec.build_spec`), the launcher's secret env and the
    post-run step all read it, so every one of them sees the same arguments and the same secrets.
    """

    plan: PipelinePlan
    package: str
    requested_version: str = "latest"
    dataset: str | None = None
    evaluation_dataset: str | None = None
    env: Mapping[str, Any] = field(default_factory=dict)
    gpu: int = 0
    promote_to: str | None = None
    promote_if: str = "better"
    #: ``env`` keys whose values are secret although their names do not look it (values Airflow's masker knows).
    secret_keys: frozenset[str] = frozenset()
    save_training_data: bool = False
    save_test_data: bool = False
    install_requirements: bool = True
    allow_source_builds: bool = False
    nodes: int = 1
    procs_per_node: int = 1
    checkpoint_interval: float = 300.0
    #: Seconds between updates of progress.json, metrics.jsonl and the progress log lines.
    progress_interval: float = 30.0
    incremental: bool = False
    #: More RunSpec fields of a pipeline type (prediction's ``input_type`` and ``max_failed``).
    spec_extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in SNAPSHOT_OF:
            object.__setattr__(self, attr, dataset_uri(getattr(self, attr)))

    @cached_property
    def masked_keys(self) -> frozenset[str]:
        """``env`` keys whose values are secret: secret-looking names and ``secret_keys``."""
        return frozenset(k for k in self.env if is_secret_key(k) or k in self.secret_keys)

    @cached_property
    def redactor(self) -> Redactor:
        """The secret values of ``env``, masked in every record."""
        return Redactor(str(self.env[k]) for k in self.masked_keys)

    def secret_env(self) -> dict[str, str]:
        """The secret user parameters: they travel as process env, never in the spec."""
        return {k: str(v) for k, v in self.env.items() if k in self.masked_keys}

    def plain_env(self) -> dict[str, str]:
        """The user parameters the spec may hold."""
        return {k: str(v) for k, v in self.env.items() if k not in self.masked_keys}

    def datasets(self) -> dict[str, str | None]:
        """The dataset arguments by name, as plans name them (``dataset``, ``evaluation_dataset``)."""
        return {"dataset": self.dataset, "evaluation_dataset": self.evaluation_dataset}

    def evaluated_on(self, outcome: Outcome) -> str | None:
        """The data this run's score was measured on: the evaluation dataset, else the full run's own split."""
        if outcome.score is None:
            return None
        return self.evaluation_dataset or f"{self.dataset}#process_data"

    def masked_env(self) -> dict[str, str]:
        return masked_env(self.env, self.redactor)


@dataclass(frozen=True)
class Recovered:
    """An earlier try of this task whose run succeeded: it is completed, not redone."""

    run: RunRef
    outcome: Outcome
    parent: VersionRecord


@dataclass(frozen=True)
class LineageDataset:
    """One OpenLineage dataset: ``namespace``, ``name`` and, for a package version, its ``version``."""

    namespace: str
    name: str
    version: str | None = None


@dataclass(frozen=True)
class Completion:
    """The one value the operator publishes after a run.

    ``value`` is the XCom ``return_value``; ``event`` the package asset event's extra (only when
    the run made a version); ``results`` what ``_results.json`` holds.
    """

    value: dict[str, Any]
    results: Results
    parent: VersionRecord
    new_version: VersionRecord | None
    outcome: Outcome
    promotion: Promotion | None = None
    #: The run's page in the Airflow UI (an http(s) URL under the api-server's base URL, else a path from its root).
    run_url: str | None = None

    @property
    def event(self) -> dict[str, Any] | None:
        """The Asset event's extra: the new version, its parent and score, the run's page and its folder."""
        if self.new_version is None:
            return None
        return {
            "package": self.value["package"],
            "version": self.new_version.version,
            "parent": self.parent.version,
            "score": self.outcome.score,
            "run_url": self.run_url,
            "run_uri": self.value["run_uri"],
        }


def lineage_data(uri: str | None) -> list[LineageDataset]:
    """A data URI as OpenLineage names it (``s3://bucket`` + key, ``file`` + path)."""
    if not uri:
        return []
    scheme, _, rest = uri.partition("://")
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        return [LineageDataset(f"s3://{bucket}", key.rstrip("/") or "/")]
    return [LineageDataset(scheme or "file", rest.rstrip("/") or "/")]


def lineage(
    request: RunRequest, completion: Completion | None, namespace: str
) -> tuple[list[LineageDataset], list[LineageDataset]]:
    """Inputs (the datasets and the parent version) and outputs (the new version and its snapshot).

    Before a run (no ``completion``): the declared datasets only. Versions are datasets of
    ``namespace`` named after the package, with the version as their dataset version.
    """
    datasets = request.datasets()
    inputs = [d for attr in request.plan.all_datasets for d in lineage_data(datasets.get(attr))]
    if completion is None:
        return inputs, []
    outputs = []
    new = completion.new_version
    if new is not None:
        outputs.append(LineageDataset(namespace, new.package, new.version))
        outputs.extend(lineage_data(completion.outcome.snapshots.get("data_directory")))
    parent = completion.parent
    return [*inputs, LineageDataset(namespace, parent.package, parent.version)], outputs


def same_task(run_id: str, run: RunRef) -> bool:
    """Whether the run folder id ``run_id`` (``dag/run/task/try``) is a try of ``run``'s task instance."""
    try:
        return RunPath.parse(run_id).task == run.path.task
    except LayoutError:
        return False


class PostRun:
    """The post-run step of one task, on its registry.

    :param registry: the registry (and its store) of the operator's connection.
    :param request: what the task asked for.
    :param log: where to say what was done (the task's log); default: this module's logger.
    """

    def __init__(self, registry: Registry, request: RunRequest, log: Log | None = None) -> None:
        self.registry, self.request = registry, request
        self.log: Log = log or logging.getLogger(__name__)

    @property
    def plan(self) -> PipelinePlan:
        return self.request.plan

    # -- before the run -------------------------------------------------------------------
    def recover(self, run: RunRef, *, outlives_worker: bool) -> Recovered | None:
        """A task instance makes at most one version: an earlier try's finished run is completed, not redone.

        An earlier try whose runtime succeeded (its version may or may not be registered yet: the
        worker died in between) is completed under its own run folder; ``commit_once`` makes the
        registration happen once. An earlier try still ``running`` whose process cannot be alive
        (``outlives_worker`` False: a local run dies with its worker) is settled as killed, so no
        record stays running.
        """
        store, request = self.registry.store, self.request
        for earlier in range(run.try_number - 1, 0, -1):
            ref = run.model_copy(update={"try_number": earlier})
            ref.uri = store.url(ref.prefix)
            outcome = read_optional(store, ref.key(OUTCOME), Outcome)
            if outcome is None:
                continue
            if outcome.status == "running" and not outlives_worker:  # its worker was killed: nothing failed
                during = outcome.phase or "start-up"
                abandoned = f"abandoned: try {earlier} never reported an ending (its worker stopped during {during})"
                end_outcome(store, ref.key(OUTCOME), outcome, "killed", abandoned)
                self.log.warning("Marked try %s as abandoned: it never reported an ending", earlier)
                continue
            if (
                self.plan.makes_version
                and outcome.status == "succeeded"
                and outcome.blob is not None
                and outcome.package == request.package
                and outcome.pipeline == self.plan.name
            ):
                self.log.info(
                    "Try %s of this task already trained %s (run folder %s): completing it instead of training again",
                    earlier,
                    request.package,
                    ref.uri,
                )
                return Recovered(ref, outcome, self.registry.get(request.package, outcome.version))
        return None

    def record_refused(self, run: RunRef, error: AICenterError, resolved: str | None = None) -> None:
        """A run refused before compute is recorded too (phase "prepare"), so the run records show it.

        ``resolved`` is the version the requested one resolved to, when the refusal came after that.
        """
        request = self.request
        outcome = Outcome(
            status="running",
            pipeline=self.plan.name,
            package=request.package,
            version=resolved or str(request.requested_version),
            requested_version=str(request.requested_version),
            trigger=run.trigger,
            start_at=time.time(),
            phase="prepare",
            dataset=request.dataset,
            evaluation_dataset=request.evaluation_dataset,
            env=request.masked_env(),
        )
        try:
            end_outcome(self.registry.store, run.key(OUTCOME), outcome, "failed", redact(str(error), request.redactor))
        except AICenterError as exc:  # the store itself may be what is wrong: the original error matters more
            self.log.warning("Could not record the refused run in %s: %s", run.uri, exc)

    # -- after the run --------------------------------------------------------------------
    def complete(self, run: RunRef, outcome: Outcome, version: str, run_url: str | None = None) -> Completion:
        """Register (once per task instance), record an evaluation, promote, write ``_results.json``.

        ``version`` is the version the run ran (the parent of a new one); ``run_url`` the run's
        page (the operator's extra link), carried by ``_results.json`` and the Asset event. Safe
        to repeat for the same run. A run that succeeded but whose version could not be
        registered is recorded as failed (phase "register") and the error raised.
        """
        request, registry = self.request, self.registry
        parent = registry.get(request.package, version)
        try:
            new_version = self.register(parent, outcome, run) if self.plan.makes_version else None
        except AICenterError as exc:
            self.record_unregistered(run, outcome, exc)
            raise
        if self.plan.records_evaluation:
            registry.add_evaluation(
                EvaluationRecord(
                    package=request.package, version=parent.version, score=outcome.score, dataset=request.evaluation_dataset,
                    run=run,
                )
            )
        promotion = self.promote(run, new_version or parent, outcome)
        store = registry.store
        extra: dict[str, Any] = {}
        if promotion is not None:
            extra.update(promoted=promotion.promoted, promotion=promotion.as_dict())
        if self.plan.serving:
            predictions = store.url(run.key(f"{PREDICTIONS}/"))
            extra.update(predictions_uri=predictions, predicted=outcome.predicted, failed=outcome.failed)
        artifacts_uri = store.url(run.key(f"{ARTIFACTS}/"))
        results_uri = store.url(run.key(RESULTS))
        results = self.results(run, parent, outcome, new_version, artifacts_uri, {**extra, "run_url": run_url})
        crash_point("results")
        write(store, run.key(RESULTS), results)
        snapshot = outcome.snapshots.get("data_directory") or outcome.snapshots.get("test_data_directory")
        made = new_version or parent
        value = {
            "package": request.package,
            "version": made.version,
            "package_uri": store.url(blob_key(made.blob.sha256)),
            "results_uri": results_uri,
            "artifacts_uri": artifacts_uri,
            "snapshot_uri": snapshot,
            "score": outcome.score,
            "run_uri": run.uri or store.url(run.prefix),
            **extra,
        }
        for warning in outcome.warnings:
            self.log.warning("%s", warning)
        self.log.info("Results: %s", results_uri)
        return Completion(value, results, parent, new_version, outcome, promotion, run_url)

    def register(self, parent: VersionRecord, outcome: Outcome, run: RunRef) -> VersionRecord:
        """The run's package folder becomes the next minor version of ``parent``'s major, once per task instance."""
        if outcome.blob is None:
            raise RunError(
                f"the {self.plan.name} run reported success without the new package content; clear the task to run it again"
            )
        crash_point("register")
        package = self.request.package
        record = self.registry.commit_once(
            package,
            run=run,
            parent=parent.version,
            blob=outcome.blob,
            pipeline=self.plan.name,
            snapshot=outcome.snapshots.get("data_directory"),
            score=outcome.score,
            evaluated_on=self.request.evaluated_on(outcome),
            # The person, schedule or asset that started the run; the DAG and task are in ``run``.
            created_by=run.trigger.by if run.trigger is not None else f"{run.dag_id}.{run.task_id}",
            description=parent.description,
            resources=outcome.resources,
            cost=outcome.cost,
        )
        self.log.info("Registered %s version %s (parent %s)", package, record.version, parent.version)
        return record

    def record_unregistered(self, run: RunRef, outcome: Outcome, error: AICenterError) -> None:
        """A run whose runtime succeeded but whose version could not be registered is a failed run, with that cause."""
        outcome.phase = "register"
        cause = redact(f"registering the new version failed: {error}", self.request.redactor)
        try:
            end_outcome(self.registry.store, run.key(OUTCOME), outcome, "failed", cause)
        except AICenterError as exc:
            self.log.warning("Could not record the failed registration in %s: %s", run.uri, exc)

    def promote(self, run: RunRef, candidate: VersionRecord, outcome: Outcome) -> Promotion | None:
        """Point ``promote_to`` at the run's version (full: the new one; evaluate: the evaluated one) if earned.

        None when no promotion was asked for. An alias an earlier attempt of this very task
        already pointed at the candidate (it died before its results) is reported as promoted.
        """
        request = self.request
        alias = request.promote_to
        if alias is None:
            return None
        registry = self.registry
        set_by = f"run {run.path.id}"
        current = registry.alias(request.package, alias)
        if (
            current is not None
            and current.version == candidate.version
            and current.set_by.startswith("run ")
            and same_task(current.set_by.removeprefix("run "), run)
        ):
            decision = Promotion(
                alias,
                current.previous,
                candidate.version,
                True,
                f"promoted by an earlier attempt of this task ({current.set_by}; {current.reason})",
            )
        else:
            decision = promote(
                registry,
                request.package,
                alias,
                candidate.version,
                score=outcome.score,
                promote_if=request.promote_if,
                set_by=set_by,
                evaluated_on=request.evaluated_on(outcome),
            )
        if decision.promoted:
            self.log.info(
                "Promoted %s %r: %s -> %s (%s)",
                request.package,
                alias,
                decision.from_version or "(none)",
                decision.to_version,
                decision.reason,
            )
        else:
            self.log.info("Not promoting %s %s to %r: %s", request.package, decision.to_version, alias, decision.reason)
        return decision

    def results(
        self,
        run: RunRef,
        parent: VersionRecord,
        outcome: Outcome,
        new_version: VersionRecord | None,
        artifacts_uri: str,
        extra: dict[str, Any],
    ) -> Results:
        """``_results.json``: AI Center's keys for this pipeline type, ours under ``aicenter``."""
        request, plan = self.request, self.plan
        datasets = request.datasets()
        inputs: dict[str, Any] = {"package": request.package, "version": parent.version, "gpu": str(bool(request.gpu))}
        outputs: dict[str, Any] = {
            "artifacts_data": artifacts_uri,
            "package": request.package,
            "version": (new_version or parent).version,
        }
        for key, attr in plan.input_keys:
            inputs[key] = datasets[attr]
            if key != "inference_data":
                outputs[key] = outcome.snapshots.get(SNAPSHOT_OF[attr])
        if plan.scored:
            outputs["score"] = outcome.score
        if plan.serving:
            # The same counts the XCom value carries (``extra``), under AI Center's output name.
            outputs.update(predictions_data=extra["predictions_uri"], predicted=extra["predicted"], failed=extra["failed"])
        aicenter: dict[str, Any] = {
            "pipeline_type": plan.name,
            "status": outcome.status,
            "run_uri": run.uri,
            # The DAG run and task try (the pages link to them and to the log) and who or what started it.
            "run": run.task_try,
            "triggered_by": None if run.trigger is None else run.trigger.model_dump(),
            "requested_version": str(request.requested_version),
            "phases": outcome.phases,
            "warnings": outcome.warnings,
            "artifacts": {"files": outcome.artifacts, "bytes": outcome.artifacts_bytes},
            **extra,
        }
        if outcome.distributed:
            aicenter["distributed"] = outcome.distributed
        if outcome.checkpoint:
            aicenter["checkpoint"] = outcome.checkpoint
        if outcome.resources:  # what the run used and, with the connection's prices, cost (docs/progress.md)
            aicenter["resources"] = outcome.resources
        if outcome.cost:
            aicenter["cost"] = outcome.cost
        return Results.model_validate(
            {
                "parameters": {
                    "pipeline": f"{run.dag_id}.{run.task_id}",
                    "inputs": inputs,
                    "env": request.masked_env(),
                },
                "run_summary": {
                    "execution_time": outcome.execution_time,
                    "start_at": int(outcome.start_at),
                    "end_at": int(outcome.end_at or time.time()),
                    "outputs": outputs,
                },
                "aicenter": aicenter,
            }
        )
