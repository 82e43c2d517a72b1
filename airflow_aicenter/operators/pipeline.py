"""Train, Evaluate and Full pipeline operators: one code path, three call plans.

resolve version -> validate statically -> launch the runtime -> read outcome.json ->
register the new version -> write _results.json -> XCom + Asset event. The pipeline type
only picks the call plan (in the runtime), the methods required and the result keys.

They subclass KubernetesPodOperator so every pod setting is available as it is; the local
launcher (the embedded default) runs the very same runtime as a child process instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Asset, AssetAlias

from airflow_aicenter.crashpoints import crash_point
from airflow_aicenter.errors import AICenterError, ConfigurationError, DatasetError, NotFoundError, RunError
from airflow_aicenter.hooks.aicenter import LAUNCHERS, AICenterHook
from airflow_aicenter.operators.kubernetes import KubernetesLauncher, check_infra, pvc_uri
from airflow_aicenter.operators.links import ArtifactsLink, ResultsLink
from airflow_aicenter.operators.local import LocalLauncher, check_gpus
from airflow_aicenter.package import validate_alias_name
from airflow_aicenter.promotion import PromoteIf, Promotion, check_promote_if, promote
from airflow_aicenter.records import (
    EvaluationRecord,
    Outcome,
    Pipeline,
    Results,
    RunRef,
    RunSpec,
    VersionRecord,
    is_secret_key,
    masked_env,
    read_optional,
    redact,
    secret_values,
    write,
)
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Every version-producing run adds an event for ``Asset("aicenter://<package>")`` through this alias.
PACKAGE_ALIAS = "aicenter-package-versions"


def package_asset(package: str) -> Asset:
    return Asset(f"aicenter://{package}")


def gpu_count(gpu: bool | int) -> int:
    if isinstance(gpu, bool):
        return int(gpu)
    if isinstance(gpu, int) and gpu >= 0:
        return gpu
    raise ConfigurationError(f"gpu={gpu!r} is not valid; use True/False or a GPU count such as 2")


class BasePipelineOperator(KubernetesLauncher, KubernetesPodOperator):
    """Shared flow of the three AI Center pipeline types. Use a subclass.

    With ``launcher="kubernetes"`` the run is a pod (see operators/kubernetes.py), shaped by
    every KubernetesPodOperator argument plus AI Center's infra settings: ``gpu`` (count),
    ``cpu`` (cores or "500m"), ``memory_gb``, ``storage_gb`` (work volume and ephemeral
    storage); ``dataset_volume_claim`` / ``dataset_sub_path`` mount the training data
    read-only instead of staging it; ``aws_secret_name`` names the Kubernetes Secret with the
    pods' S3 keys (else the pod's service account is used); ``install_requirements`` (default:
    True in a pod, False for the local launcher) pip-installs the package's requirements.txt.
    """

    pipeline: ClassVar[Pipeline]
    template_fields: Sequence[str] = (
        "package",
        "version",
        "dataset",
        "evaluation_dataset",
        "env",
        "dataset_volume_claim",
        "dataset_sub_path",
        *KubernetesPodOperator.template_fields,
    )
    template_fields_renderers = {**KubernetesPodOperator.template_fields_renderers, "env": "json"}
    operator_extra_links = (ResultsLink(), ArtifactsLink())
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        package: str,
        version: str = "latest",
        dataset: str | None = None,
        evaluation_dataset: str | None = None,
        env: dict[str, str] | None = None,
        save_training_data: bool = False,
        save_test_data: bool = False,
        gpu: bool | int = False,
        aicenter_conn_id: str = AICenterHook.default_conn_name,
        launcher: str | None = None,
        python: str | None = None,
        cpu: float | str | None = None,
        memory_gb: float | None = None,
        storage_gb: float | None = None,
        dataset_volume_claim: str | None = None,
        dataset_sub_path: str | None = None,
        aws_secret_name: str | None = None,
        install_requirements: bool | None = None,
        promote_to: str | None = None,
        promote_if: PromoteIf = "better",
        **kwargs: Any,
    ) -> None:
        # Without a termination file (a hard crash) the log tail becomes the pod's failure message.
        kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")
        super().__init__(**kwargs)
        self.package = package
        self.version = version
        self.dataset = dataset
        self.evaluation_dataset = evaluation_dataset
        self.env = env or {}
        self.save_training_data = save_training_data
        self.save_test_data = save_test_data
        self.gpu = gpu_count(gpu)
        self.aicenter_conn_id = aicenter_conn_id
        self.launcher = launcher
        self.python = python
        # AI Center infra settings and pod options (used by launcher="kubernetes"; see operators/kubernetes.py).
        check_infra(cpu=cpu, memory_gb=memory_gb, storage_gb=storage_gb, dataset_sub_path=dataset_sub_path)
        self.cpu, self.memory_gb, self.storage_gb = cpu, memory_gb, storage_gb
        self.dataset_volume_claim, self.dataset_sub_path = dataset_volume_claim, dataset_sub_path
        self.aws_secret_name = aws_secret_name
        self.install_requirements = install_requirements  # None: True in a pod, False for the local launcher
        if dataset_volume_claim and dataset and not dataset.startswith("pvc://"):
            raise ConfigurationError(
                f"give either dataset={dataset!r} (staged from the store) or dataset_volume_claim={dataset_volume_claim!r} "
                "(mounted read-only), not both"
            )
        if dataset_volume_claim and not dataset:
            self.dataset = pvc_uri(dataset_volume_claim, dataset_sub_path)
        if self.do_xcom_push:
            raise ConfigurationError(
                "do_xcom_push=True would add KubernetesPodOperator's XCom sidecar (known to hang the task); the results "
                "are pushed to XCom (return_value) without it: leave do_xcom_push unset"
            )
        if launcher is not None and launcher not in LAUNCHERS:
            raise ConfigurationError(f"launcher={launcher!r} is not valid; use one of {', '.join(LAUNCHERS)} or None")
        self.promote_to = promote_to
        self.promote_if = check_promote_if(promote_if)
        if promote_to is not None:
            validate_alias_name(promote_to)
            if self.pipeline == "train" and promote_if == "better":
                raise ConfigurationError(
                    "promote_if='better' needs a score, and a training run has none: use FullPipelineOperator "
                    "(trains and evaluates) or promote_if='always'"
                )
        if self.pipeline in ("train", "full"):
            self.outlets = [*self.outlets, AssetAlias(PACKAGE_ALIAS)]
        self._local: LocalLauncher | None = None

    # -- the one flow --------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        hook = AICenterHook(self.aicenter_conn_id)
        launcher = self.launcher or hook.settings.launcher
        registry = hook.get_registry()
        store = registry.store
        run = self.run_ref(context, store)

        try:
            parent = registry.resolve(self.package, str(self.version))
            self.log.info("Package %s version %s (resolved from %r), run folder %s", self.package, parent.version, self.version, run.uri)
            registry.check(parent, self.pipeline)
            self.check_datasets(hook)
            if launcher == "kubernetes":
                self.check_kubernetes()
            else:
                self.check_local()
            spec = self.build_spec(hook, parent, run)
        except AICenterError as exc:
            self.record_refused(store, run, exc)
            raise
        if launcher == "kubernetes":
            # Sync: runs the pod, then complete(); deferrable: defers, trigger_reentry() completes.
            return self.execute_kubernetes(context, hook, spec, run)
        outcome = self.launch(context, hook, spec, launcher)
        return self.complete(context, hook, run, parent, outcome)

    def complete(self, context: Context, hook: AICenterHook, run: RunRef, parent: VersionRecord, outcome: Outcome) -> dict[str, Any]:
        """After a successful runtime: register (once per run), _results.json, XCom, Asset event.

        Shared by the local launcher and both KubernetesPodOperator paths; safe to repeat for
        the same run (a reattached or retried post-pod step registers nothing new).
        """
        registry = hook.get_registry()
        new_version = self.register(registry, parent, outcome, run) if self.pipeline != "evaluate" else None
        if self.pipeline == "evaluate":
            registry.add_evaluation(
                EvaluationRecord(package=self.package, version=parent.version, score=outcome.score, dataset=self.evaluation_dataset, run=run)
            )
        return self.finish(context, registry.store, run, parent, outcome, new_version)

    def run_ref(self, context: Context, store: Store) -> RunRef:
        ti = context["ti"]
        ref = RunRef(
            dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
            try_number=ti.try_number or 1, map_index=ti.map_index if ti.map_index is not None else -1,
        )
        ref.uri = store.url(ref.prefix)
        return ref

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Mask secret-looking ``env`` values as soon as they exist, before Airflow stores the rendered fields.

        Airflow's own masker knows a fixed list of names (token, password, ...), not ``*key*`` or
        ``*credential*``; without this, ``env={"STRIPE_KEY": ...}`` would be kept in plain text in
        the metadata database and shown in the UI's Rendered Template view.
        """
        super().render_template_fields(context, jinja_env)
        self._mask_secrets()

    def _mask_secrets(self) -> None:
        from airflow.sdk.log import mask_secret

        # No name passed: Airflow only keeps a value whose name is on its own list (token, password, ...).
        for value in secret_values(self.env):
            mask_secret(value)

    def check_datasets(self, hook: AICenterHook) -> None:
        """Fail before compute when a dataset is missing, empty or unreadable."""
        needed = {"train": ("dataset",), "evaluate": ("evaluation_dataset",), "full": ("dataset",)}[self.pipeline]
        for attr in needed:
            if not getattr(self, attr):
                raise ConfigurationError(f"{type(self).__name__} needs {attr}=...: the URI of the data folder (s3://... or file:///...)")
        for attr in ("dataset", "evaluation_dataset"):
            uri = getattr(self, attr)
            if uri and uri.startswith("pvc://") and not (attr == "dataset" and self.dataset_volume_claim):
                raise ConfigurationError(
                    f"{attr}={uri!r} names a volume claim; mount it with dataset_volume_claim='<claim>' "
                    "(and dataset_sub_path=...) and leave dataset unset, or give an s3:// or file:// URI"
                )
            if not uri or uri.startswith("pvc://"):  # a mounted volume claim: the pod checks it
                continue
            try:
                empty = next(iter(hook.get_store(uri).list("")), None) is None
            except NotFoundError:
                empty = True
            if empty:
                raise DatasetError(f"{attr} {uri} is empty or does not exist; upload the data there or fix the URI")

    def build_spec(self, hook: AICenterHook, parent: VersionRecord, run: RunRef) -> RunSpec:
        return RunSpec(
            pipeline=self.pipeline,
            storage=hook.get_store().uri,
            run_prefix=run.prefix,
            package=self.package,
            version=parent.version,
            blob=parent.blob,
            dataset=self.dataset,
            evaluation_dataset=self.evaluation_dataset,
            env={k: str(v) for k, v in self.env.items() if not is_secret_key(k)},
            save_training_data=self.save_training_data,
            save_test_data=self.save_test_data,
            gpu=self.gpu,
        )

    def secret_env(self) -> dict[str, str]:
        """User parameters whose names look secret travel as process env, never in the spec."""
        return {k: str(v) for k, v in self.env.items() if is_secret_key(k)}

    def record_refused(self, store: Store, run: RunRef, error: AICenterError) -> None:
        """A run refused before compute is recorded too (phase "prepare"), so the run records show it."""
        now = time.time()
        outcome = Outcome(
            status="failed", pipeline=self.pipeline, package=self.package, version=str(self.version), start_at=now,
            end_at=now, phase="prepare", error=redact(str(error), secret_values(self.env)), dataset=self.dataset,
            evaluation_dataset=self.evaluation_dataset, env=masked_env(self.env),
        )
        try:
            write(store, f"{run.prefix}/outcome.json", outcome)
        except AICenterError as exc:  # the store itself may be what is wrong: the original error matters more
            self.log.warning("Could not record the refused run in %s: %s", run.uri, exc)

    def check_local(self) -> None:
        """What the local launcher cannot do, refused before anything starts."""
        if self.dataset_volume_claim:
            raise ConfigurationError(
                "dataset_volume_claim mounts a volume into a pod and needs launcher='kubernetes'; "
                "with the local launcher pass dataset='file:///path/to/data'"
            )
        check_gpus(self.gpu)

    def launch(self, context: Context, hook: AICenterHook, spec: RunSpec, launcher: str) -> Outcome:
        """The local launcher: the runtime as a child process (launcher="kubernetes" goes to execute_kubernetes)."""
        spec = spec.model_copy(update={"install_requirements": bool(self.install_requirements)})
        self._local = LocalLauncher(self.log, python=self.python)
        runtime_env = hook.runtime_env(self.dataset, self.evaluation_dataset)
        child_env = {**runtime_env, **self.secret_env()}
        code = self._local.run(spec, child_env, secrets=secret_values(child_env))
        return self.read_outcome(hook.get_store(), spec, exit_code=code)

    def read_outcome(self, store: Store, spec: RunSpec, *, exit_code: int | None) -> Outcome:
        """The runtime's report; a runtime that died without one gets a failed outcome written for it."""
        key = f"{spec.run_prefix}/outcome.json"
        outcome = read_optional(store, key, Outcome)
        if outcome is None or outcome.status == "running":
            outcome = outcome or Outcome.starting(spec, "failed")
            outcome.status = "failed"
            outcome.end_at = time.time()
            outcome.error = (
                f"the runtime exited with code {exit_code} during {outcome.phase or 'start-up'} before reporting an outcome "
                "(killed, out of memory, or crashed); see the log above"
            )
            write(store, key, outcome)
        if outcome.status != "succeeded":
            raise RunError(f"{self.pipeline} run of {spec.package}:{spec.version} {outcome.status}: {outcome.error}")
        return outcome

    def register(self, registry: Registry, parent: VersionRecord, outcome: Outcome, run: RunRef) -> VersionRecord:
        assert outcome.blob is not None, "a successful train/full outcome carries the new package blob"
        crash_point("register")
        snapshot = outcome.snapshots.get("data_directory")
        record = registry.commit_once(
            self.package, run=run, parent=parent.version, blob=outcome.blob, pipeline=self.pipeline,
            snapshot=snapshot, score=outcome.score, evaluated_on=self.evaluated_on(outcome), created_by=f"{run.dag_id}.{run.task_id}",
            description=parent.description,
        )
        self.log.info("Registered %s version %s (parent %s)", self.package, record.version, parent.version)
        return record

    def finish(
        self,
        context: Context,
        store: Store,
        run: RunRef,
        parent: VersionRecord,
        outcome: Outcome,
        new_version: VersionRecord | None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Promote if asked, write ``_results.json``, push the XCom dict, emit the Asset event."""
        extra = {**(extra or {}), **self.promote(Registry(store), run, new_version or parent, outcome)}
        artifacts_uri = store.url(f"{run.prefix}/artifacts/")
        results_uri = store.url(f"{run.prefix}/_results.json")
        results = self.build_results(context, run, parent, outcome, new_version, artifacts_uri, extra or {})
        crash_point("results")
        write(store, f"{run.prefix}/_results.json", results)
        snapshot = outcome.snapshots.get("data_directory") or outcome.snapshots.get("test_data_directory")
        version = new_version or parent
        value = {
            "package": self.package,
            "version": version.version,
            "package_uri": store.url(f"blobs/sha256/{version.blob.sha256}"),
            "results_uri": results_uri,
            "artifacts_uri": artifacts_uri,
            "snapshot_uri": snapshot,
            "score": outcome.score,
            "run_uri": run.uri,
            **(extra or {}),
        }
        context["ti"].xcom_push(key="return_value", value=value)
        context["ti"].xcom_push(key="browse", value={"results": store.browse_url(f"{run.prefix}/_results.json"),
                                                     "artifacts": store.browse_url(f"{run.prefix}/artifacts/")})
        if new_version is not None:
            context["outlet_events"][AssetAlias(PACKAGE_ALIAS)].add(
                package_asset(self.package),
                extra={"package": self.package, "version": new_version.version, "parent": parent.version,
                       "score": outcome.score, "run_uri": run.uri},
            )
        for warning in outcome.warnings:
            self.log.warning("%s", warning)
        self.log.info("Results: %s", results_uri)
        return value

    def evaluated_on(self, outcome: Outcome) -> str | None:
        """The data this run's score was measured on: the evaluation dataset, else the full run's own split."""
        if outcome.score is None:
            return None
        return self.evaluation_dataset or f"{self.dataset}#process_data"

    def promote(self, registry: Registry, run: RunRef, candidate: VersionRecord, outcome: Outcome) -> dict[str, Any]:
        """Point ``promote_to`` at the run's version (full: the new one; evaluate: the evaluated one) if earned.

        Returns the extra XCom / ``_results.json`` keys; nothing when no promotion was asked for.
        """
        if self.promote_to is None:
            return {}
        set_by = f"run {run.prefix.removeprefix('runs/')}"  # dag/run/task[__map]/try
        current = registry.alias(self.package, self.promote_to)
        if current is not None and current.version == candidate.version and \
                current.set_by.rsplit("/", 1)[0] == set_by.rsplit("/", 1)[0]:
            # An earlier attempt of this very task promoted it, then died before its results: still ours.
            decision = Promotion(self.promote_to, current.previous, candidate.version, True,
                                 f"promoted by an earlier attempt of this task ({current.set_by}; {current.reason})")
        else:
            decision = promote(
                registry, self.package, self.promote_to, candidate.version, score=outcome.score,
                promote_if=self.promote_if, set_by=set_by, evaluated_on=self.evaluated_on(outcome),
            )
        if decision.promoted:
            self.log.info("Promoted %s %r: %s -> %s (%s)", self.package, self.promote_to,
                          decision.from_version or "(none)", decision.to_version, decision.reason)
        else:
            self.log.info("Not promoting %s %s to %r: %s", self.package, decision.to_version, self.promote_to, decision.reason)
        return {"promoted": decision.promoted, "promotion": decision.as_dict()}

    def build_results(
        self,
        context: Context,
        run: RunRef,
        parent: VersionRecord,
        outcome: Outcome,
        new_version: VersionRecord | None,
        artifacts_uri: str,
        extra: dict[str, Any],
    ) -> Results:
        inputs: dict[str, Any] = {"package": self.package, "version": parent.version, "gpu": str(bool(self.gpu))}
        outputs: dict[str, Any] = {"artifacts_data": artifacts_uri, "package": self.package,
                                   "version": (new_version or parent).version}
        if self.pipeline in ("train", "full"):
            inputs["train_data"] = self.dataset
            outputs["train_data"] = outcome.snapshots.get("data_directory")
        if self.pipeline in ("evaluate", "full"):  # a full run carries both datasets, null when not given
            inputs["evaluation_data"] = self.evaluation_dataset
            outputs["evaluation_data"] = outcome.snapshots.get("test_data_directory")
        if self.pipeline in ("evaluate", "full"):
            outputs["score"] = outcome.score
        return Results.model_validate(
            {
                "parameters": {"pipeline": f"{run.dag_id}.{run.task_id}", "inputs": inputs, "env": masked_env(self.env)},
                "run_summary": {
                    "execution_time": outcome.execution_time,
                    "start_at": int(outcome.start_at),
                    "end_at": int(outcome.end_at or time.time()),
                    "outputs": outputs,
                },
                "aicenter": {
                    "pipeline_type": self.pipeline,
                    "status": outcome.status,
                    "run_uri": run.uri,
                    "requested_version": str(self.version),
                    "phases": outcome.phases,
                    "warnings": outcome.warnings,
                    "artifacts": {"files": outcome.artifacts, "bytes": outcome.artifacts_bytes},
                    **extra,
                },
            }
        )

    def on_kill(self) -> None:
        if self._local is not None:
            self._local.kill()
            return
        super().on_kill()


class TrainPipelineOperator(BasePipelineOperator):
    """AI Center training pipeline: ``Main()``, ``train(data_directory)``, ``save()`` -> new minor version."""

    pipeline = "train"

    def __init__(self, *, package: str, dataset: str | None = None, version: str = "latest", save_training_data: bool = False, **kwargs: Any) -> None:
        super().__init__(package=package, version=version, dataset=dataset, save_training_data=save_training_data, **kwargs)


class EvaluatePipelineOperator(BasePipelineOperator):
    """AI Center evaluation pipeline: ``Main()``, ``evaluate(evaluation_directory)`` -> score; no new version."""

    pipeline = "evaluate"

    def __init__(self, *, package: str, evaluation_dataset: str, version: str = "latest", save_test_data: bool = False, **kwargs: Any) -> None:
        super().__init__(package=package, version=version, evaluation_dataset=evaluation_dataset, save_test_data=save_test_data, **kwargs)


class FullPipelineOperator(BasePipelineOperator):
    """AI Center full pipeline: process_data, train, evaluate, save -> new minor version with its score."""

    pipeline = "full"

    def __init__(
        self,
        *,
        package: str,
        dataset: str | None = None,
        version: str = "latest",
        evaluation_dataset: str | None = None,
        save_training_data: bool = False,
        save_test_data: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            package=package, version=version, dataset=dataset, evaluation_dataset=evaluation_dataset,
            save_training_data=save_training_data, save_test_data=save_test_data, **kwargs,
        )
