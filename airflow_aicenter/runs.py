"""Run records (ModelArts style): every pipeline run kept in the store, listed, looked up, compared.

A run is one task try's folder ``runs/<dag_id>/<run_id>/<task>/<try>/``; its id is that path
without ``runs/`` (``dag/run/task/try``). A folder is a run once its ``outcome.json`` exists,
which the runtime writes before any user code starts (and the operator for a run it refuses
before compute, phase "prepare"), so failed and killed runs are recorded with their cause and
inputs just like successful ones. ``_results.json`` (success) adds the AI Center view;
``registration.json`` the version the run created.

No Airflow import: the ``aicenter`` CLI reads stores without Airflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow_aicenter.errors import AICenterError, StorageError
from airflow_aicenter.layout import ARTIFACTS, OUTCOME, PREDICTIONS, REGISTRATION, RESULTS, RUNS, LayoutError, RunPath
from airflow_aicenter.plans import PLANS
from airflow_aicenter.records import (
    DAMAGED_RECORD_FIX,
    DamagedRecordError,
    Outcome,
    Registration,
    Trigger,
    read,
    read_optional,
)
from airflow_aicenter.secrets import masked_env
from airflow_aicenter.storage import Store

#: Reading run records is latency-bound (one small GET each); this many go at once.
READ_CONCURRENCY = 16
STATUSES = ("running", "succeeded", "failed", "killed")


class RunNotFoundError(AICenterError):
    """No run (or more than one) matches the id the user gave."""


@dataclass
class RunRecord:
    """One run as the records show it. Fields the run never got to (a failed run's datasets) are None."""

    id: str
    uri: str
    outcome: Outcome
    results: dict[str, Any] | None = None  # _results.json as written (AI Center keys + "aicenter")
    registration: Registration | None = None
    results_uri: str | None = None

    @property
    def prefix(self) -> str:
        return RunPath.parse(self.id).prefix

    @property
    def dag_id(self) -> str:
        return self.id.split("/")[0]

    @property
    def status(self) -> str:
        return self.outcome.status

    @property
    def pipeline(self) -> str:
        return self.outcome.pipeline

    @property
    def package(self) -> str:
        return self.outcome.package

    @property
    def version(self) -> str:
        """The version the run started from (trained or evaluated)."""
        return self.outcome.version

    @property
    def makes_version(self) -> bool:
        """Whether the run's pipeline makes a version (train, full): evaluate and predict only use one."""
        plan = PLANS.get(self.pipeline)
        return plan is not None and plan.makes_version

    @property
    def new_version(self) -> str | None:
        """The version the run created (train/full), once registered; None for pipelines that make none."""
        if self.registration is not None:
            return self.registration.version
        if self.results and self.makes_version:  # other pipelines' outputs name the version they used
            version = _dig(self.results, "run_summary", "outputs", "version")
            return version if isinstance(version, str) else None
        return None

    def _input(self, attr: str) -> str | None:
        """The operator argument ``attr`` (``dataset``, ``evaluation_dataset``) as the records hold it.

        ``_results.json`` names it by the pipeline's own key (``train_data``, ``inference_data``:
        ``PipelinePlan.input_keys``); a run without one (failed, refused) has it in ``outcome.json``.
        """
        plan = PLANS.get(self.pipeline)
        keys = [key for key, given in (plan.input_keys if plan else ()) if given == attr]
        for key in keys if self.results else ():
            value = _dig(self.results, "parameters", "inputs", key)
            if isinstance(value, str):
                return value
        value = getattr(self.outcome, attr)
        return value if isinstance(value, str) else None

    @property
    def dataset(self) -> str | None:
        return self._input("dataset")

    @property
    def evaluation_dataset(self) -> str | None:
        return self._input("evaluation_dataset")

    @property
    def predicted(self) -> int | None:
        """Batch prediction: how many inputs got an output (None for other pipelines)."""
        return self.outcome.predicted

    @property
    def failed(self) -> int | None:
        """Batch prediction: how many inputs raised an error (None for other pipelines)."""
        return self.outcome.failed

    @property
    def predictions_uri(self) -> str | None:
        """Where a batch prediction wrote its outputs."""
        plan = PLANS.get(self.pipeline)
        return f"{self.uri}/{PREDICTIONS}/" if plan is not None and plan.serving else None

    @property
    def env(self) -> dict[str, str] | None:
        """The run's env parameters, masked: from ``_results.json``, else (a failed run) from ``outcome.json``.

        None only for records older than outcome inputs.
        """
        env = _dig(self.results, "parameters", "env") if self.results else self.outcome.env
        if not isinstance(env, dict):
            return None
        return masked_env(env)

    @property
    def trigger(self) -> Trigger | None:
        """Who or what started the run's DAG run (the person, ``schedule``, assets); None in older records."""
        return self.outcome.trigger

    @property
    def dag_run(self) -> dict[str, Any]:
        """The DAG run and task try the run folder belongs to: what links to Airflow's DAG-run and log pages need."""
        path = RunPath.parse(self.id)
        return {"dag_id": path.dag_id, "run_id": path.run_id, "task_id": path.task_id, "try_number": path.try_number,
                "map_index": path.map_index}

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.outcome.start_at, UTC)

    @property
    def duration(self) -> float | None:
        return None if self.outcome.end_at is None else round(self.outcome.end_at - self.outcome.start_at, 3)

    @property
    def cause(self) -> str | None:
        """Why the run did not succeed (None when it did)."""
        if self.status == "succeeded":
            return None
        if self.status == "running":
            return f"still running, or died without reporting (last phase: {self.outcome.phase or 'start-up'})"
        return self.outcome.error or self.status

    @property
    def promotion(self) -> dict[str, Any] | None:
        promotion = _dig(self.results, "aicenter", "promotion")
        if not isinstance(promotion, dict):
            return None
        return {"promoted": _dig(self.results, "aicenter", "promoted"), **promotion}

    def summary(self) -> dict[str, Any]:
        """Everything about the run, JSON-ready (``runs show --json``)."""
        o = self.outcome
        return {
            "id": self.id,
            "uri": self.uri,
            "pipeline": self.pipeline,
            "status": self.status,
            "cause": self.cause,
            "failed_phase": o.phase if self.status in ("failed", "killed", "running") else None,
            "package": self.package,
            "version": self.version,
            "requested_version": self.outcome.requested_version,
            "new_version": self.new_version,
            "triggered_by": None if self.trigger is None else self.trigger.by,
            "trigger": None if self.trigger is None else self.trigger.model_dump(),
            "dag_run": self.dag_run,
            "dataset": self.dataset,
            "evaluation_dataset": self.evaluation_dataset,
            "predicted": self.predicted,
            "failed": self.failed,
            "predictions_uri": self.predictions_uri,
            "env": self.env,
            "score": o.score,
            "start_at": self.start.isoformat(),
            "end_at": None if o.end_at is None else datetime.fromtimestamp(o.end_at, UTC).isoformat(),
            "duration": self.duration,
            "phases": o.phases,
            "warnings": o.warnings,
            "artifacts": {"files": o.artifacts, "bytes": o.artifacts_bytes, "uri": f"{self.uri}/{ARTIFACTS}/"},
            "snapshots": o.snapshots,
            "results_uri": self.results_uri,
            "promotion": self.promotion,
        }


@dataclass
class _Folder:
    id: str
    files: set[str] = field(default_factory=set)


_RUN_IDS_HINT = "`aicenter runs list` shows the run ids (dag/run/task/try)"


def _normalise(store: Store, ref: str) -> str:
    """Accept an id, a ``runs/...`` key, the run's URI, or a URI/key of a file in it.

    Refuses what names no folder of the layout ('.', '..', empty parts) with a ``RunNotFoundError``:
    such a reference would otherwise reach the store as a path it cannot hold.
    """
    ref = ref.strip()
    for prefix in (store.uri + "/", f"{RUNS}/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
    for suffix in (RESULTS, OUTCOME, REGISTRATION):
        ref = ref.removesuffix(suffix)
    wanted = ref.strip("/")
    if not wanted:
        raise RunNotFoundError(f"an empty run id names no run; {_RUN_IDS_HINT}")
    if any(part in ("", ".", "..") for part in wanted.split("/")):
        raise RunNotFoundError(
            f"{ref!r} is not a run id or part of one: a run id has no '.', '..' or empty parts; {_RUN_IDS_HINT}"
        )
    return wanted


def _run_folder(key: str) -> tuple[str, str] | None:
    """(run id, file name) of a file directly in a run folder; None for anything else under ``runs/``."""
    folder, _, name = key.rpartition("/")
    try:
        path = RunPath.parse(folder)
    except LayoutError:  # deeper files (artifacts/, checkpoints/), or keys another tool wrote
        return None
    return path.id, name


def _folders(store: Store) -> dict[str, _Folder]:
    """Run folders (those with outcome.json) and their top-level files, from one listing of ``runs/``."""
    folders: dict[str, _Folder] = {}
    for info in store.list(f"{RUNS}/"):
        found = _run_folder(info.key)
        if found is not None:
            run_id, name = found
            folders.setdefault(run_id, _Folder(run_id)).files.add(name)
    return {k: f for k, f in folders.items() if OUTCOME in f.files}


def _load(store: Store, run_id: str, files: set[str] | None = None) -> RunRecord:
    path = RunPath.parse(run_id)
    outcome = read(store, path.key(OUTCOME), Outcome)
    results = None
    if files is None or RESULTS in files:
        raw = b""
        try:
            raw = store.get_bytes(path.key(RESULTS))
            results = json.loads(raw)
        except StorageError:
            results = None  # not written: the run failed, or the task is still finishing
        except ValueError as exc:
            raise _damaged_results(store, path, raw, f"not valid JSON: {exc}") from exc
        if results is not None and not isinstance(results, dict):
            raise _damaged_results(store, path, raw, f"a JSON {type(results).__name__}, not an object")
    registration = None
    if files is None or REGISTRATION in files:
        registration = read_optional(store, path.key(REGISTRATION), Registration)
    return RunRecord(
        id=run_id, uri=store.url(path.prefix), outcome=outcome, results=results, registration=registration,
        results_uri=store.url(path.key(RESULTS)) if results is not None else None,
    )


def _damaged_results(store: Store, path: RunPath, raw: bytes, problem: str) -> DamagedRecordError:
    key = path.key(RESULTS)
    return DamagedRecordError(f"{store.url(key)} is {problem}; {DAMAGED_RECORD_FIX}", key=key, raw=raw)


def _dig(record: dict[str, Any] | None, *keys: str) -> Any:
    """``record[k1][k2]...``, or None where a level is missing or not an object (a hand-edited ``_results.json``)."""
    value: Any = record
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def list_runs(
    store: Store,
    *,
    package: str | None = None,
    status: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_error: Callable[[str, StorageError], None] | None = None,
) -> list[RunRecord]:
    """Every run in the store, newest first, optionally only one package's or one status's.

    ``progress(done, total)`` is called as records are read (for a progress bar). A record
    that cannot be read raises, unless ``on_error(run_id, error)`` is given: then it is
    reported there and left out, so one damaged folder does not hide the whole history.
    """
    if status is not None and status not in STATUSES:
        raise AICenterError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
    folders = list(_folders(store).values())
    total, done = len(folders), 0
    if progress:
        progress(0, total)
    def load(folder: _Folder) -> RunRecord | StorageError:
        try:
            return _load(store, folder.id, folder.files)
        except StorageError as exc:
            if on_error is None:
                raise
            return exc

    records: list[RunRecord] = []
    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        for folder, record in zip(folders, pool.map(load, folders), strict=True):
            done += 1
            if progress:
                progress(done, total)
            if isinstance(record, StorageError):
                assert on_error is not None
                on_error(folder.id, record)
            elif (package is None or record.package == package) and (status is None or record.status == status):
                records.append(record)
    return sorted(records, key=lambda r: (r.outcome.start_at, r.id), reverse=True)


def find_run(store: Store, ref: str, visible: Callable[[str], bool] | None = None) -> RunRecord:
    """The run ``ref`` names: its full id (or URI), or an unambiguous start, end or run of whole parts of it.

    Several tries of one task match as that task's last try (``dag/run/task`` or just ``task``).
    ``visible(dag_id)`` (the UI: the user's read access) leaves out every run of a DAG it refuses
    before matching: an ambiguity lists, and a part resolves among, only the runs the caller may
    see; a run of another DAG is "no run", exists or not.
    """
    wanted = _normalise(store, ref)
    if wanted.count("/") >= 3:  # a full id: exact, never a guess
        try:
            path = RunPath.parse(wanted)
        except LayoutError as exc:
            raise RunNotFoundError(str(exc)) from exc
        if (visible is None or visible(path.dag_id)) and store.exists(path.key(OUTCOME)):
            return _load(store, wanted)
        raise RunNotFoundError(f"no run {ref!r} in {store.uri}: {path.key(OUTCOME)} does not exist; {_RUN_IDS_HINT}")
    folders = {k: f for k, f in _folders(store).items() if visible is None or visible(k.split("/", 1)[0])}
    matches = sorted(i for i in folders if i.startswith(wanted) or i.endswith(wanted) or f"/{wanted}/" in f"/{i}/")
    if len({m.rsplit("/", 1)[0] for m in matches}) == 1 and len(matches) > 1:
        matches = [max(matches, key=lambda m: int(m.rsplit("/", 1)[1]) if m.rsplit("/", 1)[1].isdigit() else -1)]
    if not matches:
        raise RunNotFoundError(
            f"no run {ref!r} in {store.uri}; `aicenter runs list` shows the run ids (dag/run/task/try), "
            "and any unambiguous part of one works (e.g. the task id)"
        )
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (f" and {len(matches) - 5} more" if len(matches) > 5 else "")
        raise RunNotFoundError(f"run {ref!r} is ambiguous: it matches {len(matches)} runs ({shown}); give more of the id")
    return _load(store, matches[0], folders[matches[0]].files)


def find_runs(store: Store, refs: Iterable[str], visible: Callable[[str], bool] | None = None) -> list[RunRecord]:
    return [find_run(store, ref, visible) for ref in refs]


# -- comparison ---------------------------------------------------------------------------
def _fmt_time(record: RunRecord) -> str:
    return record.start.strftime("%Y-%m-%d %H:%M:%S")


COMPARED: tuple[tuple[str, Callable[[RunRecord], Any]], ...] = (
    ("pipeline", lambda r: r.pipeline),
    ("status", lambda r: r.status),
    ("start", _fmt_time),
    ("duration_s", lambda r: r.duration),
    ("package", lambda r: r.package),
    ("version", lambda r: r.version),
    ("new_version", lambda r: r.new_version),
    ("dataset", lambda r: r.dataset),
    ("evaluation_dataset", lambda r: r.evaluation_dataset),
    ("score", lambda r: r.outcome.score),
    ("predicted", lambda r: r.predicted),
    ("failed", lambda r: r.failed),
    ("promoted", lambda r: None if r.promotion is None else r.promotion.get("promoted")),
    ("cause", lambda r: r.cause),
)


def compare(records: list[RunRecord]) -> list[tuple[str, list[Any]]]:
    """Rows of (field, one value per run): the fixed fields, then one ``env.<KEY>`` row per parameter."""
    rows = [(name, [get(r) for r in records]) for name, get in COMPARED]
    keys = sorted({k for r in records for k in (r.env or {})})
    for key in keys:
        rows.append((f"env.{key}", [None if r.env is None else r.env.get(key) for r in records]))
    return rows
