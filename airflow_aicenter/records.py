"""Every JSON record the product persists, and the one place that reads and writes them.

Version records, aliases, run specs, outcomes, snapshot manifests and ``_results.json`` are
pydantic models so a malformed record fails loudly at read time instead of half-working.
No Airflow import: the runtime writes outcomes and manifests from inside the pod.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError

from airflow_aicenter.errors import NotFoundError, StorageError
from airflow_aicenter.layout import RunPath
from airflow_aicenter.plans import Pipeline
from airflow_aicenter.runtime.user import cap
from airflow_aicenter.secrets import masked_env
from airflow_aicenter.storage.store import Store

InputType = Literal["json", "file"]
#: "skipped": an incremental run found no new or changed file; ``Outcome.skipped`` says why (no version).
RunStatus = Literal["running", "succeeded", "failed", "killed", "skipped"]
M = TypeVar("M", bound=BaseModel)


def utcnow() -> datetime:
    return datetime.now(UTC)


#: A recorded error: capped when read, assigned (models with ``validate_assignment``) and written
#: (so a warning appended to a list in place is capped too).
CappedText = Annotated[str, AfterValidator(cap), PlainSerializer(cap, return_type=str)]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class BlobRef(Record):
    """A version's (or an environment's) content in the blob store.

    ``kind`` says what the blob is: ``"zip"``, the package as one deterministic zip (records
    written before per-file versions have no ``kind`` and read as zip); ``"files"``, the
    encoded manifest of a per-file version (package/contents.py), whose files are blobs of
    their own at ``layout.blob_key(file.sha256)``. ``sha256`` and ``size`` are always those of
    the blob itself (the zip or the manifest), stored at ``layout.blob_key(sha256)``, so
    identical content is recognised by ``sha256`` for both kinds.
    """

    sha256: str
    size: int
    kind: Literal["zip", "files"] = "zip"


class TriggerAsset(Record):
    """An asset event that started an asset-triggered DAG run, and the task run that emitted it."""

    uri: str
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    #: The package version the event announced (an ``aicenter://`` event's extra), else None.
    version: str | None = None


class Trigger(Record):
    """Who or what started the DAG run a run belongs to: what the pages and the CLI show as "triggered by".

    Recorded from Airflow's DAG run, so a record names the person even after the DAG run is gone.
    """

    #: One line: the person (``alice``), ``schedule``, ``asset aicenter://churn/``, else Airflow's run type.
    by: str
    #: Airflow's DAG run type: ``manual``, ``scheduled``, ``asset_triggered``, ``backfill``, ...
    run_type: str = ""
    #: The triggering user's name, when a person started it (the UI, the API, ``airflow dags trigger``).
    user: str | None = None
    assets: list[TriggerAsset] = Field(default_factory=list)


class RunRef(Record):
    """Which Airflow task try (or CLI call) a record came from, and who or what started its DAG run."""

    dag_id: str
    run_id: str
    task_id: str
    try_number: int = 1
    map_index: int = -1
    uri: str = ""  # the run folder (runs/<dag_id>/<run_id>/<task_id>/<try>) as a URI
    trigger: Trigger | None = None  # None: records from before triggers were recorded, and CLI calls

    @property
    def task_try(self) -> dict[str, Any]:
        """The DAG run and task try, what the Airflow UI's DAG-run and log links are built from."""
        return {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "try_number": self.try_number,
                "map_index": self.map_index}

    @property
    def path(self) -> RunPath:
        return RunPath(self.dag_id, self.run_id, self.task_id, self.map_index, self.try_number)

    @property
    def prefix(self) -> str:
        return self.path.prefix

    def key(self, name: str) -> str:
        """A file of the run folder (``layout.OUTCOME``, ``layout.RESULTS``, ``artifacts/...``)."""
        return self.path.key(name)

    @property
    def label(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}/{self.try_number}"


class VersionRecord(Record):
    """A package version exists exactly when this record exists (created once)."""

    package: str
    version: str
    blob: BlobRef
    parent: str | None = None
    pipeline: Literal["upload", "train", "full"] = "upload"
    run: RunRef | None = None
    snapshot: str | None = None
    score: float | None = None
    #: What ``score`` was measured on: the evaluation dataset's URI, or ``<dataset>#process_data``
    #: for the split a full run's ``process_data`` made. Promotion compares like with like.
    evaluated_on: str | None = None
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    #: Who made it: the person, schedule or asset that started the run (``run.trigger.by``); ``cli:<user>``
    #: for an upload; ``<dag_id>.<task_id>`` for a run whose trigger is unknown.
    created_by: str = ""
    #: What the run that made it used (``Outcome.resources``) and, with the connection extra ``prices``, cost.
    resources: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None


class EvaluationRecord(Record):
    package: str
    version: str
    score: float | None
    dataset: str | None = None
    run: RunRef | None = None
    created_at: datetime = Field(default_factory=utcnow)


class AliasRecord(Record):
    """One entry of an alias's history; the highest sequence number is the current target."""

    package: str
    alias: str
    seq: int
    version: str
    previous: str | None = None
    reason: str = ""
    set_by: str = ""
    set_at: datetime = Field(default_factory=utcnow)


ApprovalStatus = Literal["pending", "approved", "rejected"]


class ApprovalRecord(Record):
    """A person's approval of a version for an alias (``promote_if="approved"``), beside the version record.

    Version records are created once, so the approval is kept next to it, also created once:
    the request (``pending``) when the run registers the candidate, then at most one decision
    (``approved`` or ``rejected``, the first one written wins). ``by`` is the person (``None``
    when the request timed out), ``at`` when it was decided (or asked), ``comment`` theirs.
    """

    package: str
    version: str
    alias: str
    status: ApprovalStatus
    by: str | None = None
    at: datetime = Field(default_factory=utcnow)
    comment: str = ""
    #: Why, in words: "approved by ada", "rejected by ada", "no decision within 0:00:05 (the request timed out)".
    reason: str = ""
    #: The run that asked (its folder) and the page where the request is answered.
    run: RunRef | None = None
    request_url: str | None = None


class ManifestEntry(Record):
    path: str
    sha256: str
    size: int
    #: The source object's ETag when it was staged: an incremental run compares it instead of downloading.
    etag: str | None = None


class Manifest(Record):
    """A snapshot of a data folder: paths mapped to blobs in ``blobs/sha256/``."""

    source: str | None
    directory: str
    files: list[ManifestEntry]
    file_count: int
    total_bytes: int
    created_at: datetime = Field(default_factory=utcnow)


class SnapshotHint(Record):
    """The last snapshot manifest of a source: a hint that makes re-snapshots zero-copy, never authoritative."""

    source: str
    manifest: str


class RunSpec(Record):
    """What the operator asks the runtime to do. Holds no secret: credentials come from env."""

    pipeline: Pipeline
    storage: str
    run_prefix: str
    package: str
    version: str
    blob: BlobRef
    dataset: str | None = None
    evaluation_dataset: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    save_training_data: bool = False
    save_test_data: bool = False
    gpu: int = 0
    dataset_mount: str | None = None  # a read-only mounted dataset folder (no staging)
    install_requirements: bool = False  # install requirements.txt into the package's own environment (uv, cached)
    #: Source distributions may be built (their code runs, without credentials); the environment is
    #: then cached for this package alone. False: wheels only (DESIGN "★ Environments").
    allow_source_builds: bool = False
    #: Names of the user's secret env values, which the launcher hands the runtime as real
    #: environment variables (never in the spec); the agent forwards exactly these to user code.
    user_env_names: list[str] = Field(default_factory=list)
    # Distributed runs (DESIGN "Distributed training"); the defaults are one process on one node.
    nodes: int = Field(default=1, ge=1)
    procs_per_node: int = Field(default=1, ge=1)
    node_rank: int | None = Field(default=None, ge=0)  # None: env JOB_COMPLETION_INDEX, else 0
    master_addr: str | None = None  # None: env AICENTER_MASTER_ADDR, else 127.0.0.1
    master_port: int | None = Field(default=None, ge=1, le=65535)  # None: env AICENTER_MASTER_PORT, else free / 29500
    # Batch prediction (DESIGN "Batch prediction").
    input_type: InputType = "json"
    max_failed: int = Field(default=0, ge=0)
    #: The task's checkpoint folder (``runs/<dag>/<run>/<task>/checkpoints/``, shared by its tries); None: no sync.
    checkpoint_prefix: str | None = None
    checkpoint_interval: float = 300  # seconds between background checkpoint syncs
    #: The parent version's training-data snapshot manifest URI: stage only files new or changed since.
    incremental_base: str | None = None
    #: The deployment's package indexes (connection extra ``package_indexes``): the first replaces
    #: PyPI, the others are searched before it. May hold credentials: never logged unmasked.
    package_indexes: list[str] = Field(default_factory=list)
    #: The connection extra ``allowed_dataset_roots``: the only folders ``file://`` data may come from.
    #: The runtime checks every source a manifest names against them again before reading it.
    allowed_dataset_roots: list[str] = Field(default_factory=list)
    #: What the task asked for (``"latest"``, ``"production"``); ``version`` is what that resolved to.
    requested_version: str | None = None
    #: Who or what started the DAG run (copied into the outcome, so a failed run shows it too).
    trigger: Trigger | None = None
    #: Seconds between the agent's updates of progress.json and metrics.jsonl (DESIGN "Progress, metrics and resources").
    progress_interval: float = Field(default=30, gt=0)
    #: The connection extra ``prices`` (validated by ``runtime.resources.prices_of``): the run's cost is computed with it.
    prices: dict[str, float] | None = None


class Outcome(Record):
    """What the runtime reports back through ``outcome.json`` in the run folder.

    ``error``, ``warnings`` and ``skipped`` are capped (``runtime.user.cap``), however they are set.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    status: RunStatus
    pipeline: Pipeline
    package: str
    #: The version the run ran: resolved (``1.4``), unless it was refused before its version could be resolved.
    version: str
    start_at: float
    end_at: float | None = None
    phases: dict[str, float] = Field(default_factory=dict)  # phase -> seconds
    phase: str | None = None  # the phase that was running when it failed
    score: float | None = None
    blob: BlobRef | None = None  # the new package content (train/full)
    artifacts: int = 0
    artifacts_bytes: int = 0
    snapshots: dict[str, str] = Field(default_factory=dict)  # directory name -> manifest URI
    error: CappedText | None = None  # one-line cause
    warnings: list[CappedText] = Field(default_factory=list)
    # The run's inputs, so the records show a failed run's parameters too (no secret: masked).
    dataset: str | None = None
    evaluation_dataset: str | None = None
    env: dict[str, str] | None = None
    #: ``{"nodes", "procs_per_node", "world_size"}`` when the world size is above 1.
    distributed: dict[str, int] | None = None
    #: Batch prediction: inputs with an output, inputs with an error.
    predicted: int | None = None
    failed: int | None = None
    #: ``{"resumed_from_try", "files", "bytes"}`` of the task's checkpoint (``_results.json`` aicenter.checkpoint).
    checkpoint: dict[str, Any] | None = None
    skipped: CappedText | None = None  # why an incremental run had nothing to train on (status "skipped")
    #: What the task asked for (``"latest"``, an alias); None in records from before it was recorded.
    requested_version: str | None = None
    #: Who or what started the DAG run (``RunSpec.trigger``); None when unknown.
    trigger: Trigger | None = None
    #: The package environment: ``{"key", "source", "seconds"}`` (source: none, local, store, installed).
    environment: dict[str, Any] | None = None
    #: What the run used (``runtime.resources``): wall and CPU seconds and peak memory of the user processes,
    #: GPU seconds, utilisation and memory, bytes staged and uploaded; ``cost`` with the connection's prices.
    resources: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    #: The last lines of the user processes' output (stdout, stderr, the traceback) when they failed:
    #: at most ``supervisor.TAIL_LINES``, each capped, secrets masked. None when they did not fail.
    output_tail: list[str] | None = None

    @classmethod
    def starting(cls, spec: RunSpec, status: RunStatus = "running", **fields: Any) -> Outcome:
        """The outcome of a run of ``spec`` at its start: inputs filled in, the rest to come.

        Also written on the runtime's behalf when it could not report (killed, never started).
        """
        return cls(
            status=status, pipeline=spec.pipeline, package=spec.package, version=spec.version, start_at=time.time(),
            dataset=spec.dataset, evaluation_dataset=spec.evaluation_dataset, env=masked_env(spec.env),
            requested_version=spec.requested_version, trigger=spec.trigger, **fields,
        )

    @property
    def execution_time(self) -> float:
        return round((self.end_at or time.time()) - self.start_at, 3)


class Progress(Record):
    """``progress.json`` of a run folder: where package code says it is (``aicenter.report``), updated while it runs."""

    step: int | float | None = None  # an int stays an int (step 5, not 5.0)
    total: int | float | None = None
    percent: float | None = None
    #: Seconds left, from the rate of steps since the first report; None until it can be told.
    eta_seconds: float | None = None
    #: The latest value of every metric reported (names and values as package code gave them, secrets masked).
    metrics: dict[str, int | float | None] = Field(default_factory=dict)
    #: Reports read so far, lines that were not a report (skipped), and the points in metrics.jsonl.
    reports: int = 0
    skipped: int = 0
    points: int = 0
    started_at: float | None = None
    updated_at: float
    #: True once the user processes have ended (the last update).
    final: bool = False


class Registration(Record):
    """Written into the run folder once the run's version is committed (idempotency marker)."""

    package: str
    version: str | None
    registered_at: datetime = Field(default_factory=utcnow)


# -- _results.json (AI Center's format; extra keys only under "aicenter") -------------------
class ResultsInputs(Record):
    model_config = ConfigDict(extra="forbid")
    package: str
    version: str
    train_data: str | None = None
    evaluation_data: str | None = None
    inference_data: str | None = None  # batch prediction
    gpu: Literal["True", "False"]


class ResultsParameters(Record):
    pipeline: str
    inputs: ResultsInputs
    env: dict[str, str]


class ResultsOutputs(Record):
    model_config = ConfigDict(extra="forbid")
    train_data: str | None = None
    evaluation_data: str | None = None
    artifacts_data: str | None = None
    package: str
    version: str | None = None
    score: float | None = None
    # batch prediction
    predictions_data: str | None = None
    predicted: int | None = None
    failed: int | None = None


class ResultsSummary(Record):
    execution_time: float
    start_at: int
    end_at: int
    outputs: ResultsOutputs


class Results(Record):
    parameters: ResultsParameters
    run_summary: ResultsSummary
    aicenter: dict[str, Any] = Field(default_factory=dict)


# -- read / write ---------------------------------------------------------------------------
def end_outcome(
    store: Store, key: str, outcome: Outcome | RunSpec, status: RunStatus, error: str | Callable[[str], str]
) -> Outcome:
    """The one writer of a run's final outcome on its runtime's behalf (the runtime writes its own).

    ``outcome`` is the run's outcome so far, or the spec of a run that left none; it ends now with
    ``status`` and ``error``, which may be built from the phase the run stopped in (``"start-up"``
    before any), and is written at ``key``. Returns it.
    """
    outcome = Outcome.starting(outcome) if isinstance(outcome, RunSpec) else outcome
    outcome.status, outcome.end_at = status, time.time()
    outcome.error = error if isinstance(error, str) else error(outcome.phase or "start-up")
    write(store, key, outcome)
    return outcome


def dump(model: BaseModel) -> bytes:
    # exclude_unset keeps AI Center's per-pipeline keys exact: only what a run set is written.
    return model.model_dump_json(indent=2, exclude_unset=isinstance(model, Results)).encode()


def write(store: Store, key: str, model: BaseModel, *, create: bool = False) -> None:
    """Write a record; ``create=True`` makes it a create-once commit point."""
    store.put_bytes(key, dump(model), create=create)


class DamagedRecordError(StorageError):
    """A record was read but its content is not a valid record (bit rot, a hand edit, a foreign writer).

    Unlike a failed request, trying again cannot help: ``retryable`` is False. ``raw`` keeps the
    bytes read, so a reader that skips the record can still see what it names (gc keeps every
    digest found in them).
    """

    retryable = False

    def __init__(self, message: str, *, key: str, raw: bytes) -> None:
        super().__init__(message)
        self.key, self.raw = key, raw


#: What to do about a damaged record, the end of every message about one.
DAMAGED_RECORD_FIX = ("restore it from a backup, or remove it if what it records is to go "
                      "(`aicenter verify` lists every damaged record)")


#: No record the product writes comes near this size (a snapshot manifest of 100,000 files is about
#: 20 MB); a larger object under a record's key is garbage, and reading it whole would cost its size
#: in memory. Readers that list before they read (gc, verify) refuse it by its listed size.
MAX_RECORD_BYTES = 256 * 2**20


def oversized(store: Store, key: str, size: int) -> DamagedRecordError | None:
    """The error for an object too large to be a record (by its listed size), or None."""
    if size <= MAX_RECORD_BYTES:
        return None
    return DamagedRecordError(f"{store.url(key)} is not a record: it holds {size} bytes, over the {MAX_RECORD_BYTES} "
                              f"bytes any record takes; {DAMAGED_RECORD_FIX}", key=key, raw=b"")


def parse(store: Store, key: str, raw: bytes, model: type[M]) -> M:
    """``raw`` (the bytes stored at ``key``) as a ``model`` record; DamagedRecordError when it is not one."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'the record'}: {e['msg']}" for e in exc.errors()[:3]]
        detail = "; ".join(problems) + (f" and {exc.error_count() - 3} more" if exc.error_count() > 3 else "")
        raise DamagedRecordError(f"{store.url(key)} is not a valid {model.__name__} record ({detail}); {DAMAGED_RECORD_FIX}",
                                 key=key, raw=raw) from exc


def read(store: Store, key: str, model: type[M]) -> M:
    """The record at ``key``: NotFoundError when absent, DamagedRecordError when its content is not valid."""
    return parse(store, key, store.get_bytes(key), model)


def read_optional(store: Store, key: str, model: type[M]) -> M | None:
    try:
        return read(store, key, model)
    except NotFoundError:
        return None
