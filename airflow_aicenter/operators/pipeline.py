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

from airflow_aicenter.errors import AICenterError, ConfigurationError, RunError
from airflow_aicenter.hooks.aicenter import LAUNCHERS, AICenterHook
from airflow_aicenter.operators.links import ArtifactsLink, ResultsLink
from airflow_aicenter.operators.local import LocalLauncher, check_gpus
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


class BasePipelineOperator(KubernetesPodOperator):
    """Shared flow of the three AI Center pipeline types. Use a subclass."""

    pipeline: ClassVar[Pipeline]
    template_fields: Sequence[str] = (
        "package",
        "version",
        "dataset",
        "evaluation_dataset",
        "env",
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
        **kwargs: Any,
    ) -> None:
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
        if launcher is not None and launcher not in LAUNCHERS:
            raise ConfigurationError(f"launcher={launcher!r} is not valid; use one of {', '.join(LAUNCHERS)} or None")
        if self.pipeline in ("train", "full"):
            self.outlets = [*self.outlets, AssetAlias(PACKAGE_ALIAS)]
        self._local: LocalLauncher | None = None

    # -- the one flow --------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        hook = AICenterHook(self.aicenter_conn_id)
        launcher = self.launcher or hook.settings.launcher
        registry = hook.get_registry()
        store = registry.store
        self._mask_secrets()
        run = self.run_ref(context, store)

        parent = registry.resolve(self.package, str(self.version))
        self.log.info("Package %s version %s (resolved from %r), run folder %s", self.package, parent.version, self.version, run.uri)
        registry.check(parent, self.pipeline)
        self.check_datasets(hook)
        spec = self.build_spec(hook, parent, run)
        outcome = self.launch(context, hook, spec, launcher)

        new_version = self.register(registry, parent, outcome, run) if self.pipeline != "evaluate" else None
        if self.pipeline == "evaluate":
            registry.add_evaluation(
                EvaluationRecord(package=self.package, version=parent.version, score=outcome.score, dataset=self.evaluation_dataset, run=run)
            )
        result = self.finish(context, store, run, parent, outcome, new_version)
        return result

    def run_ref(self, context: Context, store: Store) -> RunRef:
        ti = context["ti"]
        ref = RunRef(
            dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
            try_number=ti.try_number or 1, map_index=ti.map_index if ti.map_index is not None else -1,
        )
        ref.uri = store.url(ref.prefix)
        return ref

    def _mask_secrets(self) -> None:
        from airflow.sdk.log import mask_secret

        for key, value in self.env.items():
            if is_secret_key(key) and value:
                mask_secret(str(value), key)

    def check_datasets(self, hook: AICenterHook) -> None:
        """Fail before compute when a dataset is missing, empty or unreadable."""
        from airflow_aicenter.errors import DatasetError

        needed = {"train": ("dataset",), "evaluate": ("evaluation_dataset",), "full": ("dataset",)}[self.pipeline]
        for attr in needed:
            if not getattr(self, attr):
                raise ConfigurationError(f"{type(self).__name__} needs {attr}=...: the URI of the data folder (s3://... or file:///...)")
        for attr in ("dataset", "evaluation_dataset"):
            uri = getattr(self, attr)
            if not uri:
                continue
            store = hook.get_store(uri)
            if next(iter(store.list("")), None) is None:
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

    def launch(self, context: Context, hook: AICenterHook, spec: RunSpec, launcher: str) -> Outcome:
        if launcher == "kubernetes":
            raise ConfigurationError(
                "launcher='kubernetes' is not available in this release yet; use launcher='local' "
                "(or set launcher to local in the aicenter connection)"
            )
        check_gpus(spec.gpu)
        self._local = LocalLauncher(self.log, python=self.python)
        runtime_env = hook.runtime_env()
        secrets = tuple(v for k, v in {**runtime_env, **self.secret_env()}.items() if is_secret_key(k) and len(v) >= 4)
        code = self._local.run(spec, {**runtime_env, **self.secret_env()}, secrets=secrets)
        return self.read_outcome(hook.get_store(), spec, exit_code=code)

    def read_outcome(self, store: Store, spec: RunSpec, *, exit_code: int | None) -> Outcome:
        """The runtime's report; a runtime that died without one gets a failed outcome written for it."""
        key = f"{spec.run_prefix}/outcome.json"
        outcome = read_optional(store, key, Outcome)
        if outcome is None or outcome.status == "running":
            outcome = outcome or Outcome(status="failed", pipeline=spec.pipeline, package=spec.package, version=spec.version, start_at=time.time())
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
        snapshot = outcome.snapshots.get("data_directory")
        record = registry.commit_once(
            self.package, run=run, parent=parent.version, blob=outcome.blob, pipeline=self.pipeline,
            snapshot=snapshot, score=outcome.score, created_by=f"{run.dag_id}.{run.task_id}",
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
        """Write ``_results.json``, push the XCom dict, emit the Asset event."""
        artifacts_uri = store.url(f"{run.prefix}/artifacts/")
        results_uri = store.url(f"{run.prefix}/_results.json")
        results = self.build_results(context, run, parent, outcome, new_version, artifacts_uri, extra or {})
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
        self.log.info("Results: %s", results_uri)
        return value

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
        if self.pipeline == "evaluate" or self.evaluation_dataset:
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

    def __init__(self, *, package: str, dataset: str, version: str = "latest", save_training_data: bool = False, **kwargs: Any) -> None:
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
        dataset: str,
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
