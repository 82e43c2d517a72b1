"""The agent: one pipeline run's trusted process. Stage, start the user processes, upload, report.

Runs inside a Kubernetes pod or as a child process of the Airflow worker; the same code for
every launcher. The operator gives it a :class:`RunSpec`; it answers with ``outcome.json``
in the run folder (and its exit code). It never registers versions: the operator does that
once it has read the outcome, so a run that dies at any point leaves no version behind.

Package code never runs here. The agent holds the store credentials, so ``Main`` and its
methods run in user processes (``runtime/user.py``, started by path with the package's
interpreter) whose environment is built from scratch: the AI Center variables, the user's
``env`` and secret env, the distributed variables, and nothing of the agent's or the
worker's (DESIGN "Trust boundaries"). One user process per rank in distributed runs, one per
share of the inputs in batch prediction.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from airflow_aicenter.crashpoints import crash_point
from airflow_aicenter.errors import (
    AICenterError,
    ConfigurationError,
    DatasetError,
    NotFoundError,
    RunError,
    StorageError,
)
from airflow_aicenter.layout import ARTIFACTS, PREDICTIONS, manifest_name, outcome_name
from airflow_aicenter.package import iter_package_files, validate_package
from airflow_aicenter.plans import plan_for
from airflow_aicenter.records import BlobRef, Outcome, RunSpec, write
from airflow_aicenter.runtime import isolation, supervisor
from airflow_aicenter.runtime.checkpoint import CheckpointSync, try_of
from airflow_aicenter.runtime.environment import (
    Environment,
    build_planned,
    prepare_environment,
    store_built,
    store_meanwhile,
)
from airflow_aicenter.runtime.incremental import (
    IncrementalStaging,
    NothingNew,
    check_carried,
    list_fingerprints,
    read_base,
    stage_incremental,
)
from airflow_aicenter.runtime.manifest import EVALUATION, INFERENCE, TRAINING, is_manifest_uri, stage_manifest
from airflow_aicenter.runtime.progress import METRICS_FILE, ProgressTracker
from airflow_aicenter.runtime.report import METRICS_FILE_ENV
from airflow_aicenter.runtime.resources import cost_of
from airflow_aicenter.runtime.snapshot import take_snapshot, vouched_by_version
from airflow_aicenter.runtime.supervisor import RESULT_LIMIT, TAIL_LINE, TAIL_LINES, emit, read_untrusted_json, supervise
from airflow_aicenter.runtime.user import cap
from airflow_aicenter.secrets import SECRET_KEYS_ENV, Redactor, is_secret_key, redact, redact_json_lines_file
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.cache import BlobCache, PlacedFiles, runtime_cache
from airflow_aicenter.storage.transfer import (
    FileEntry,
    check_names,
    download_tree,
    local_files,
    run,
    sha256_file,
    stage_package,
    store_package_files,
    upload_tree,
)

#: The folders package code sees, by their AI Center environment variable names.
DIRECTORIES = (
    "data_directory",
    "test_data_directory",
    "training_data_directory",
    "evaluation_data_directory",
    "artifacts_directory",
    "checkpoint_directory",
)
TERMINATION_LOG = "/dev/termination-log"
#: The user process, started by path: the package's environment does not hold airflow_aicenter.
USER_SCRIPT = Path(__file__).resolve().with_name("user.py")
#: ``import aicenter`` in package code (stdlib only): copied alone into ``bin/lib/``, which user.py puts on the path.
REPORT_MODULE = USER_SCRIPT.with_name("report.py")
#: Longest line of user output passed on; the rest of the line is cut (a 400 MB line must not
#: cost the agent 400 MB).
LINE_LIMIT = supervisor.LINE_LIMIT
#: Seconds a user process gets between SIGTERM and SIGKILL (less than the launcher gives the agent).
USER_GRACE = supervisor.GRACE
#: The agent's variables a user process inherits: the system's, never credentials or run spec.
INHERITED = frozenset({"PATH", "HOME", "LANG", "TMPDIR", "TZ", "LD_LIBRARY_PATH", "PYTHONUSERBASE"})
INHERITED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_")
DEFAULT_MULTI_NODE_PORT = 29500


class Killed(BaseException):
    """SIGTERM arrived (on_kill, pod deletion, the launcher gone): stop and record the run as killed."""


class Unbreakable(io.TextIOBase):
    """The agent's stdout/stderr: a reader that went away (``| head``, a dead launcher) never stops the run.

    On the first failed write the stream's descriptor is pointed at ``/dev/null``, so the run
    goes on and still records its ending in ``outcome.json``.
    """

    def __init__(self, inner: TextIO) -> None:
        super().__init__()
        self.inner = inner

    def write(self, text: str) -> int:
        try:
            self.inner.write(text)
        except OSError:
            self._to_devnull()
        return len(text)

    def flush(self) -> None:
        try:
            self.inner.flush()
        except OSError:
            self._to_devnull()

    def fileno(self) -> int:
        return self.inner.fileno()

    def _to_devnull(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.inner.fileno())
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self.inner.flush()  # drops what was buffered for the dead reader


#: The secrets of the run this process serves: every line the agent logs is masked with them (a
#: message may quote the name of a file that user code made, a link refused in a walk).
LOG_SECRETS = Redactor()


def log(message: str) -> None:
    emit(sys.stderr, f"[aicenter] {LOG_SECRETS.redact(message)}\n")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Topology:
    """Where this agent's ranks sit in the run (torchrun's and ModelArts' view)."""

    nodes: int
    procs_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    worker_hosts: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def rank(self, local_rank: int) -> int:
        return self.node_rank * self.procs_per_node + local_rank

    @classmethod
    def of(cls, spec: RunSpec) -> Topology:
        node_rank = spec.node_rank if spec.node_rank is not None else int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
        addr = spec.master_addr or os.environ.get("AICENTER_MASTER_ADDR") or "127.0.0.1"
        port = spec.master_port
        if port is None:
            given = os.environ.get("AICENTER_MASTER_PORT")
            port = int(given) if given else (free_port() if spec.nodes == 1 else DEFAULT_MULTI_NODE_PORT)
        hosts = os.environ.get("AICENTER_WORKER_HOSTS") or addr
        return cls(spec.nodes, spec.procs_per_node, node_rank, addr, port, hosts)

    def env(self, local_rank: int, gpus: int) -> dict[str, str]:
        return {
            "RANK": str(self.rank(local_rank)), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(self.procs_per_node),
            "NODE_RANK": str(self.node_rank), "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            "MA_NUM_HOSTS": str(self.nodes), "MA_NUM_GPUS": str(gpus),
            "VC_TASK_INDEX": str(self.node_rank), "VC_WORKER_HOSTS": self.worker_hosts,
        }


#: The phases of a pod (DESIGN "Trust boundaries"): ``stage`` (init container) runs everything
#: before user code and hands the user supervisor its plan; ``sync`` waits for the supervisor's
#: exit file, then runs everything after. Without a phase (the local launcher) the agent runs
#: the three in one process, calling the supervisor in-process: the same steps either way.
#: ``build`` (init container after stage, source builds only) installs the environment stage
#: planned, without credentials or run spec (:func:`build_main`).
PHASES = ("stage", "build", "sync")
#: Stage's plan for the ``build`` container, in ``control/`` (absent: nothing to build).
BUILD_PLAN = "build.json"
#: The agent's handover from stage to sync, in a volume user code never sees (``AICENTER_STATE``).
STATE_FILE = "agent-state.pickle"
#: Seconds between looks for the supervisor's exit file (two stats a look: a short poll costs nothing and adds
#: on average half of it to every pod run's user phase).
EXIT_POLL = 0.05
#: The largest exit file sync reads from the user container (the results of every user process of the node).
EXIT_LIMIT = RESULT_LIMIT
#: The user container touches ``control/alive`` every few seconds (launchers/pod_spec.py): older
#: than this, it was killed whole (out of memory) and no exit file will come.
HEARTBEAT_LOST = 60.0
#: Seconds sync waits for the user container's first heartbeat (the kubelet starts ``base``
#: before ``sync``, and its shell's first heartbeat comes at once: a user command that replaced
#: the supervisor never gives one). The runtime image's environment may set another
#: (:data:`START_LOST_ENV`; docs/kubernetes.md).
START_LOST = 30.0
START_LOST_ENV = "AICENTER_SUPERVISOR_START_TIMEOUT"


def start_lost() -> float:
    """How long sync waits for the user container's first heartbeat: :data:`START_LOST_ENV`, else :data:`START_LOST`."""
    given = os.environ.get(START_LOST_ENV, "").strip()
    if not given:
        return START_LOST
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{START_LOST_ENV}={given!r} is not a number of seconds above 0: set it to one "
                                 f"(e.g. {START_LOST:g}) in the runtime image's environment, or unset it for {START_LOST:g} s")
    return seconds


class Agent:
    def __init__(self, spec: RunSpec, store: Store, workdir: Path, *, phase: str | None = None,
                 state: Path | None = None) -> None:
        self.spec, self.store = spec, store
        #: None: the whole run here; "stage" or "sync": one container's part of a pod's run.
        self.mode = phase
        self.state = state
        self.plan = plan_for(spec.pipeline)
        self.work = workdir.resolve()
        self.dirs = {name: self.work / name.removesuffix("_directory") for name in DIRECTORIES}
        self.control = self.work / "control"  # instructions and results of the user processes
        self.outcome = Outcome.starting(spec)
        self.entries: dict[str, list[FileEntry]] = {}
        #: The blob cache this process staged a per-file package through (its ``known`` hook spares the re-hash of
        #: untouched files when the folder is stored as the next version); None for a zip version or in a pod's sync.
        self.staged_from: BlobCache | None = None
        #: The digests of the package files staging placed, while untouched (storage/cache.py PlacedFiles): storing the
        #: folder as the next version hashes only what changed. A pod's stage hands it to sync in the agent's state.
        self.placed = PlacedFiles()
        #: Batch prediction: the first failed input, in input order, for the run's cause.
        self.first_error: str | None = None
        #: The task's checkpoint sync, once its latest checkpoint is restored (runtime/checkpoint.py).
        self.checkpoints: CheckpointSync | None = None
        #: An incremental run's staging: unchanged files carried into the snapshot (runtime/incremental.py).
        self.incremental: IncrementalStaging | None = None
        #: The training dataset's fingerprints, listed before a full staging: its snapshot keeps them for
        #: the next incremental run (runtime/incremental.py).
        self.fingerprints: dict[str, str] = {}
        #: Every form of the secret-looking variables' values (the user's secret env, S3 keys):
        #: never in outcome.json or the log.
        self.secrets = Redactor.from_env({**os.environ, **spec.env})
        for value in self.secrets.values:
            LOG_SECRETS.add(value)
        #: The names whose values the user supervisor masks in user output (the same values as ``secrets``).
        self.secret_env = secret_names({**os.environ, **spec.env})
        #: The local launcher's run_as_user, "uid:gid": user processes run as that user (DESIGN "Trust boundaries").
        run_as = os.environ.get("AICENTER_RUN_AS")
        self.run_as = dict(zip(("uid", "gid"), map(int, run_as.split(":")), strict=True)) if run_as else None
        self.topology = Topology.of(spec)
        if self.topology.world_size > 1:
            self.outcome.distributed = {"nodes": spec.nodes, "procs_per_node": spec.procs_per_node,
                                        "world_size": self.topology.world_size}
        #: Node 0 reports in outcome.json (the operator reads it); other nodes of a multi-node Job beside it.
        self.outcome_name = outcome_name(self.topology.node_rank)
        #: The package's environment once prepared (user_python); after an install it is stored meanwhile.
        self.environment: Environment | None = None
        #: Batch prediction: what merging the processes' parts needs once they are done.
        self.predict_parts: tuple[list[str], int] | None = None
        #: A pod with source builds: the environment stage left to the ``build`` container, for sync to store.
        self.built: dict[str, Any] | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.outcome.phase = name
        write(self.store, self.key(self.outcome_name), self.outcome)  # live progress; says where a hard crash hit
        crash_point(name)
        log(f"{name} ...")
        began = time.perf_counter()
        yield
        self.outcome.phases[name] = round(time.perf_counter() - began, 3)
        log(f"{name} done in {self.outcome.phases[name]:.2f} s")

    def key(self, name: str) -> str:
        return f"{self.spec.run_prefix}/{name}"

    # -- the run -------------------------------------------------------------------------
    def run(self) -> Outcome:
        if self.mode != "sync":
            write(self.store, self.key(self.outcome_name), self.outcome)
        try:
            self._run()
            if self.mode == "stage":  # user code and sync are still to come: the outcome stays running
                return self.outcome
            self.outcome.status, self.outcome.phase = "succeeded", None
        except Killed:
            self.outcome.status, self.outcome.error = "killed", f"killed during {self.outcome.phase}"
        except NothingNew as exc:  # an incremental run with nothing to train on: no user code, no version
            self.outcome.status, self.outcome.phase, self.outcome.skipped = "skipped", None, str(exc)
            log(f"SKIPPED: {exc}")
        except AICenterError as exc:
            self._fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - report, never hide
            import traceback

            emit(sys.stderr, redact(traceback.format_exc(), self.secrets))
            self._fail(f"internal error during {self.outcome.phase}: {type(exc).__name__}: {exc}")
        finally:
            self._final_checkpoint()
            if self.mode == "sync" and self.built is not None:
                self._store_built(self.built)
            if self.environment is not None:
                self.environment.finish(log)  # the environment's upload for the next run, begun after its install
            if not (self.mode == "stage" and self.outcome.status == "running"):  # a staged run goes on in sync
                self.outcome.end_at = time.time()
            if self.outcome.status != "succeeded":
                self._upload_artifacts_best_effort()
            self.outcome.warnings = [redact(w, self.secrets) for w in self.outcome.warnings]  # may name user files
            if not (self.mode == "stage" and self.outcome.status == "running"):
                self._finish_resources()
            crash_point("outcome")
            write(self.store, self.key(self.outcome_name), self.outcome)
            if self.mode == "stage" and self.outcome.status == "running":
                log("stage done: user code runs next, in the base container")
            else:
                log(f"run {self.outcome.status} in {self.outcome.execution_time:.2f} s")
        return self.outcome

    def _store_built(self, plan: dict[str, Any]) -> None:
        """Sync: store the environment the ``build`` container made (read-only to user code) for the next run."""
        try:
            log(store_built(self.store, plan, log))
        except (Exception, Killed) as exc:  # noqa: BLE001 - never fail a run for its cache
            log(f"WARNING: the environment was not stored for the next run ({type(exc).__name__}: {exc}); "
                "the next run builds it again")

    def _fail(self, cause: str) -> None:
        cause = redact(cause, self.secrets)
        self.outcome.status, self.outcome.error = "failed", cause
        log(f"FAILED: {cause}")

    def _run(self) -> None:
        spec, plan = self.spec, self.plan
        if not (plan.distributed or plan.serving) and self.topology.world_size > 1:
            raise RunError(f"the {plan.name} pipeline runs in one process; use nodes=1 and procs_per_node=1")
        if not 0 <= self.topology.node_rank < spec.nodes:
            raise RunError(f"node_rank {self.topology.node_rank} is outside 0..{spec.nodes - 1}; "
                           "check JOB_COMPLETION_INDEX and nodes")
        if plan.serving and spec.nodes > 1:
            raise RunError("batch prediction runs on one node; use nodes=1 and procs_per_node to share the inputs")
        if self.mode == "sync":
            root = self._take_over()
        else:
            root = self._before_user_code()
            groups = self._predict_plan(root) if plan.serving else self._package_plan(root)
            if self.mode == "stage":
                self._hand_over(root, groups)
                return
        with self.phase("user_code"), self._progress():
            if self.mode == "sync":
                results = self._wait_for_supervisor()
            else:
                results = []
                for group in groups:  # one after the other: a node's process_data before its ranks
                    results = self.supervise(group)
            if plan.serving:
                self._predict_results(results)
            else:
                self._package_results(results)
            self._check_names(root)
        last_node = self.topology.node_rank == 0
        if plan.makes_version and last_node:
            with self.phase("package_upload"):
                self.outcome.blob = self._store_package(root)
        if plan.serving:
            with self.phase("predictions_upload"):
                self._upload_predictions()
        with self.phase("artifacts_upload"):
            self._upload_artifacts()
        if last_node:
            with self.phase("snapshot"):
                if spec.save_training_data and "dataset" in plan.all_datasets and not plan.serving:
                    self._snapshot("data_directory", spec.dataset)
                if spec.save_test_data and ("evaluation_dataset" in plan.datasets or self.entries.get("test_data_directory")):
                    self._snapshot("test_data_directory", spec.evaluation_dataset or spec.dataset)
        if plan.serving:
            self._check_failed_inputs()

    @contextlib.contextmanager
    def _progress(self) -> Iterator[None]:
        """While user code runs, node 0 keeps the run's progress.json and metrics.jsonl (runtime/progress.py)."""
        if self.topology.node_rank != 0:
            yield
            return
        tracker = ProgressTracker(self.store, self.key, str(self.control / METRICS_FILE), self.spec.progress_interval, log,
                                  self.secrets).start()
        try:
            yield
        finally:
            tracker.stop()

    def _count(self, name: str, n: int) -> None:
        """Add ``n`` bytes to the run's ``resources`` (kept in the outcome: a pod's stage hands it to sync)."""
        resources = dict(self.outcome.resources or {})
        resources[name] = int(resources.get(name) or 0) + int(n)
        self.outcome.resources = resources

    def _used(self, usage: Any) -> None:
        """The user processes' figures from the supervisor's exit record (``supervisor.Usage``)."""
        if isinstance(usage, dict):
            keep = ("wall_seconds", "cpu_seconds", "peak_memory_bytes", "gpu_utilization", "gpu_memory_peak_bytes")
            figures = {k: usage.get(k) for k in keep if isinstance(usage.get(k), int | float) or usage.get(k) is None}
            self.outcome.resources = {**(self.outcome.resources or {}), **figures}

    def _finish_resources(self) -> None:
        """GPU seconds (wall seconds times the GPUs asked for) and, with prices, the cost (runtime/resources.py)."""
        resources = {"wall_seconds": None, "cpu_seconds": None, "peak_memory_bytes": None, "gpu_seconds": None,
                     "gpu_utilization": None, "gpu_memory_peak_bytes": None, "bytes_staged": 0, "bytes_uploaded": 0,
                     **(self.outcome.resources or {})}
        if resources["wall_seconds"] is not None:
            resources["gpu_seconds"] = round(float(resources["wall_seconds"]) * self.spec.gpu, 3)
        self.outcome.resources = resources
        if self.spec.prices:
            self.outcome.cost = cost_of(resources, self.spec.prices)

    def _before_user_code(self) -> Path:
        """Everything before package code runs (stage): package, environment, data, checkpoint."""
        spec = self.spec
        for path in (*self.dirs.values(), self.control):
            path.mkdir(parents=True, exist_ok=True)
        with self.phase("stage_package"):
            root = self._stage_package()
        if spec.install_requirements:
            with self.phase("requirements"):
                self.user_python(root)  # prepares the package's environment: cached, from the store, or installed
        with self.phase("stage_data"):
            self._stage_data()
        if spec.checkpoint_prefix:
            with self.phase("checkpoint_restore"):
                self._restore_checkpoint(spec.checkpoint_prefix)
        return root

    # -- a pod's handover: stage -> user supervisor -> sync -----------------------------------
    def _hand_over(self, root: Path, groups: list[list[dict[str, Any]]]) -> None:
        """Stage's last step: the supervisor and user.py into ``bin/``, its plan into ``control/``, our state aside.

        The environment's upload for the next run ends here too, before any package code runs
        (DESIGN "Environments"). The state goes to ``AICENTER_STATE``, a volume the user
        container does not mount, so nothing user code writes can change what sync uploads.
        """
        store_plan = None
        if self.environment is not None:
            self.environment.finish(log)
            store_plan = self.environment.store_plan  # a fresh install: sync packs it while base runs (read-only there)
            self.environment = None
        if self.built is not None:  # what a pod that ends in its build container was doing
            self.outcome.phase = "requirements"
        bin_dir = self.work / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, source in supervisor.BUNDLE.items():
            shutil.copyfile(source, bin_dir / name)
        plan = self._supervisor_plan(groups[-1])
        # The user container's own system variables (GPU devices, HOME) replace stage's for those names.
        # So do the variables the user gave that container (names only here; values stay there).
        given = _names("AICENTER_USER_ENV_NAMES")
        plan["inherit_env"] = {"names": sorted(INHERITED | given), "prefixes": list(INHERITED_PREFIXES)}
        plan["secret_env"] = sorted({*plan["secret_env"], *_names("AICENTER_USER_SECRET_NAMES"),
                                     *(n for n in given if is_secret_key(n))})
        if len(groups) > 1:
            plan["before"] = [{"processes": group} for group in groups[:-1]]
        (self.control / "supervisor.json").write_text(json.dumps(plan))
        state = {
            "root": str(root), "dirs": {k: str(v) for k, v in self.dirs.items()}, "outcome": self.outcome.model_dump_json(),
            "entries": self.entries, "fingerprints": self.fingerprints, "incremental": self.incremental,
            "predict_parts": self.predict_parts, "built": self.built, "store_env": store_plan, "placed": self.placed.table(),
            "checkpoint": (self.checkpoints.last, self.checkpoints.resumed_from_try) if self.checkpoints else None,
        }
        assert self.state is not None
        self.state.mkdir(parents=True, exist_ok=True)
        with (self.state / STATE_FILE).open("wb") as fh:
            pickle.dump(state, fh)
        log(f"handed over to the user supervisor: {len(plan['processes'])} process(es), plan {self.control / 'supervisor.json'}")

    def _take_over(self) -> Path:
        """Sync's first step: stage's state, and the periodic checkpoint sync while user code runs."""
        assert self.state is not None
        path = self.state / STATE_FILE
        if not path.exists():
            raise RunError(f"the stage container left no state in {path}; it did not finish (see its log)")
        with path.open("rb") as fh:
            state = pickle.load(fh)  # written by stage into a volume only stage and sync mount
        self.dirs = {k: Path(v) for k, v in state["dirs"].items()}
        self.outcome = Outcome.model_validate_json(state["outcome"])
        self.entries, self.fingerprints, self.incremental = state["entries"], state["fingerprints"], state["incremental"]
        self.predict_parts = state["predict_parts"]
        self.built = state.get("built")
        self.placed = PlacedFiles(state.get("placed"))  # stage's: the user container cannot reach the state volume
        if (store_plan := state.get("store_env")) is not None:  # packed and stored while user code runs; waited for at the end
            try:
                self.environment = store_meanwhile(self.store, store_plan, log)
            except StorageError as exc:  # never fail a run for its cache
                log(f"WARNING: the environment was not stored for the next run ({exc}); the next run installs it again")
        if state["checkpoint"] is not None and self.spec.checkpoint_prefix:
            sync = self._checkpoint_sync(self.spec.checkpoint_prefix)
            sync.last, sync.resumed_from_try = state["checkpoint"]
            self.checkpoints = sync
            if self.topology.node_rank == 0:
                sync.start()
        return Path(state["root"])

    def _wait_for_supervisor(self) -> list[dict[str, Any]]:
        """The user supervisor's exit file (``base`` container), then its results, as ``supervise`` returns them."""
        exit_file, alive = self.control / "exit.json", self.control / "alive"
        began, first_sign = time.monotonic(), start_lost()
        while not exit_file.exists():
            try:
                silent = time.time() - alive.stat().st_mtime
            except FileNotFoundError:
                silent = None
            if (silent is not None and silent > HEARTBEAT_LOST) or (silent is None and time.monotonic() - began > first_sign):
                if exit_file.exists():
                    break
                if silent is None:
                    raise RunError(f"the user container gave no sign of the user supervisor within {first_sign:g} s "
                                   "(did a command given for the base container replace it? see the base container's log)")
                raise RunError(f"the user container stopped {silent:.0f} s ago without reporting (killed whole: out of memory? "
                               "see the pod's status and the base container's log)")
            time.sleep(EXIT_POLL)
        # Written in the user container, where package code could replace it: never through a link, bounded.
        ended = read_untrusted_json(exit_file, EXIT_LIMIT)
        if ended is None:
            raise RunError(f"the user supervisor's exit file {exit_file} is not a JSON object in a regular file of at most "
                           f"{EXIT_LIMIT} bytes (replaced by package code?)")
        self._used(ended.get("resources"))
        self._output_tail(ended)
        if ended.get("status") == "killed":  # the pod's deletion stopped the user container first: this container's
            raise Killed  # own SIGTERM is on its way, and the run was stopped either way, not failed
        if ended.get("status") != "succeeded":
            raise RunError(cap(str(ended.get("cause") or f"the user processes {ended.get('status') or 'failed'}")))
        results = ended.get("results")
        if not isinstance(results, list) or not all(isinstance(r, dict) or r is None for r in results):
            raise RunError(f"the user supervisor's exit file {exit_file} holds no list of results (replaced by package code?)")
        return cast(list[dict[str, Any]], results)

    # -- staging -------------------------------------------------------------------------
    @functools.cached_property
    def blob_cache(self) -> BlobCache | None:
        """The node's blob cache for per-file versions (storage/cache.py), None where there is none or it cannot be made."""
        # a pod: one container's part of a run, or any process Kubernetes started (it sets KUBERNETES_SERVICE_HOST)
        cache = runtime_cache(in_pod=self.mode is not None or "KUBERNETES_SERVICE_HOST" in os.environ)
        if cache is None:
            return None
        try:
            cache.prepare()
        except OSError as exc:  # a cache only saves fetches: a run goes on without one
            log(f"no local blob cache ({cache.root}: {exc.strerror}); package files are fetched from the store")
            return None
        return cache

    def _stage_package(self) -> Path:
        spec = self.spec
        # In a pod package/ is a volume's mount point, which cannot be replaced: the package goes inside it.
        target = self.work / "package" / "root" if self.mode == "stage" else self.work / "package"
        # zip: read in place and verified in the same pass on the file store (no copy of a multi-GB zip), downloaded
        # elsewhere; per-file: each file from the node's blob cache, or fetched once into it. A run whose package
        # folder becomes the next version gets private copies (its code may rewrite them, and no other run shares
        # them); the others get the cache's read-only files linked.
        cache = self.staged_from = self.blob_cache if spec.blob.kind == "files" else None
        root, size = stage_package(self.store, spec.blob, target, self.work / "package.zip", cache=cache,
                                   link=not self.plan.makes_version, placed=self.placed)
        if spec.blob.kind == "files":
            log(f"package staged: {human(size)} fetched from the store, the rest from the local blob cache"
                if cache is not None else f"package staged: {human(size)} fetched from the store")
        self._count("bytes_staged", size)
        validate_package(root, self.plan.contract)
        return root

    def _stage_data(self) -> None:
        spec = self.spec
        data, test = self.dirs["data_directory"], self.dirs["test_data_directory"]
        if spec.dataset_mount:
            if spec.incremental_base:  # never ignored silently: the whole volume would be trained on
                raise DatasetError("incremental=True compares a listed dataset with the parent's snapshot; a mounted volume "
                                   "claim is not staged: give the dataset as an s3:// or file:// URI, or set incremental=False")
            mount = Path(spec.dataset_mount)
            if not mount.is_dir() or not any(mount.iterdir()):
                raise DatasetError(f"mounted dataset {mount} is empty or missing; check the volume claim and sub path")
            with contextlib.suppress(OSError):  # in a pod, data/ is a volume's mount point
                data.rmdir()
            self.dirs["data_directory"] = mount
            log(f"dataset mounted read-only at {mount}")
        if spec.dataset and not spec.dataset_mount:
            usages = INFERENCE if self.plan.serving else TRAINING
            self.entries["data_directory"] = self._download(spec.dataset, data, usages)
        if spec.evaluation_dataset:
            self.entries["test_data_directory"] = self._download(spec.evaluation_dataset, test, EVALUATION)
        elif self.plan.processes_data and spec.dataset and is_manifest_uri(spec.dataset):  # its EVAL and TEST lines
            self.entries["test_data_directory"] = stage_manifest(spec.dataset, EVALUATION, test, required=False,
                                                                 roots=spec.allowed_dataset_roots)
        if self.plan.processes_data and self.entries.get("test_data_directory"):
            shutil.copytree(test, self.dirs["evaluation_data_directory"], dirs_exist_ok=True)

    def _download(self, uri: str, dest: Path, usages: frozenset[str] = TRAINING) -> list[FileEntry]:
        """Stage a dataset: a folder, a manifest's lines of ``usages``, or only what an incremental run needs."""
        began = time.perf_counter()
        if is_manifest_uri(uri):
            if self.spec.incremental_base:
                raise DatasetError(f"incremental training compares folders; {uri} is a manifest: train without "
                                   "incremental=True, or give the dataset as a folder")
            entries = stage_manifest(uri, usages, dest, write_manifest=usages != INFERENCE,
                                     roots=self.spec.allowed_dataset_roots)
        else:
            try:
                source = open_store(uri, create=False)
            except NotFoundError:
                raise DatasetError(f"dataset {uri} does not exist; upload the data there or fix the URI") from None
            if self.spec.incremental_base and usages == TRAINING:
                entries = self._stage_incremental(source, dest, self.spec.incremental_base)
            else:
                if usages == TRAINING and self.spec.save_training_data:
                    self.fingerprints = list_fingerprints(source)
                entries = run(download_tree(source, dest))
        took = time.perf_counter() - began
        size = sum(e.size for e in entries)
        self._count("bytes_staged", size)
        log(f"staged {len(entries)} files ({human(size)}) from {uri} in {took:.2f} s")
        return entries

    # -- user processes ------------------------------------------------------------------
    def user_python(self, root: Path) -> str:
        """The interpreter of the package's environment (the one place that chooses it).

        With ``install_requirements`` the package's own cached environment (runtime/environment.py);
        without, the runtime's interpreter (an image built with the requirements).
        """
        if not self.spec.install_requirements:
            return sys.executable
        if self.environment is None:
            self.environment = prepare_environment(root, self.store, indexes=self.spec.package_indexes, log=log,
                                                   allow_source_builds=self.spec.allow_source_builds,
                                                   package=self.spec.package,
                                                   build_user=(self.run_as["uid"], self.run_as["gid"]) if self.run_as else None,
                                                   defer_build=self.mode == "stage",
                                                   # another user cannot write it: packed while package code runs
                                                   package_code_cannot_write=self.run_as is not None,
                                                   defer_store=self.mode == "stage")
            self.outcome.environment = self.environment.summary()
            if self.environment.build_plan is not None:  # a pod's build container installs it, without credentials
                self.built = self.environment.build_plan
                (self.control / BUILD_PLAN).write_text(json.dumps(self.built))
        return str(self.environment.python)

    def user_env(self, local_rank: int) -> dict[str, str]:
        """A user process's whole environment, built from scratch (DESIGN "Trust boundaries").

        The system's basics (PATH, HOME, locale, temp, time zone, GPU devices), the AI Center
        variables, the user's ``env`` and the secret env values the launcher named in
        ``spec.user_env_names``, the distributed variables. No ``AWS_*`` store keys, no
        ``AIRFLOW_*``, no run spec: nothing else of the agent's environment.
        """
        spec = self.spec
        env = {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}
        env.update(spec.env)
        env.update({name: os.environ[name] for name in spec.user_env_names if name in os.environ})
        env.update({name: str(path) for name, path in self.dirs.items()})
        if os.environ.get("AICENTER_USER_HOME"):  # a pod: the agent's HOME is in a volume the user container lacks
            env["HOME"] = os.environ["AICENTER_USER_HOME"]
        env["artifacts_directory"] = str(self.artifacts_of(self.topology.rank(local_rank)))
        env["save_training_data"] = str(spec.save_training_data)
        env["save_test_data"] = str(spec.save_test_data)
        env["PYTHONUNBUFFERED"] = "1"
        if spec.procs_per_node > 1:
            # As torchrun does: N processes each with one OpenMP thread per core oversubscribe the
            # node (a 2-rank CPU DDP run took > 240 s instead of 10 s); the user's env may say otherwise.
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.topology.env(local_rank, spec.gpu))
        return env

    def artifacts_of(self, rank: int) -> Path:
        """Rank 0 writes the run's ``artifacts/``; rank r > 0 writes ``artifacts/rank-<r>/``."""
        folder = self.dirs["artifacts_directory"]
        return folder if rank == 0 else folder / f"rank-{rank}"

    def start(self, name: str, root: Path, env: dict[str, str], *, module: str = "train",
              steps: list[dict[str, Any]] | None = None, predict: dict[str, Any] | None = None) -> dict[str, Any]:
        """One user process of the supervisor's plan (runtime/supervisor.py): ``root`` as cwd, its instructions."""
        tag = name.replace(" ", "-")
        result_path = self.control / f"{tag}.result.json"
        instructions = self.control / f"{tag}.json"
        script = self._user_script()
        tmp = self.work / "tmp"  # TMPDIR, and its caches (torch, matplotlib) below it: writable, unlike HOME
        tmp.mkdir(exist_ok=True)
        metrics = self._metrics_file()
        env = {**env, METRICS_FILE_ENV: str(metrics), "TMPDIR": str(tmp),
               "XDG_CACHE_HOME": env.get("XDG_CACHE_HOME") or str(tmp / tag / "cache"),
               "MPLCONFIGDIR": env.get("MPLCONFIGDIR") or str(tmp / tag / "matplotlib"),
               "TRITON_CACHE_DIR": env.get("TRITON_CACHE_DIR") or str(tmp / tag / "triton")}
        instructions.write_text(json.dumps({
            "root": str(root), "module": module, "result": str(result_path),
            "parent": None if self.mode == "stage" else os.getpid(), "steps": steps or [], "predict": predict,
            "lib": str(self._user_lib()),
            # Several processes of one run: each is confined to its own share (DESIGN "Distributed training").
            "writable": self.writable(root, env, steps or [], predict) if self.topology.world_size > 1 else None,
        }))
        return {"label": name, "argv": [self.user_python(root), str(script), str(instructions)],
                "cwd": str(root), "env": env, "result": str(result_path)}

    def _user_script(self) -> Path:
        """``user.py`` where the user process can read it.

        In a pod the supervisor (another container) runs it from ``bin/`` (copied there by ``_hand_over``).
        Under ``run_as_user`` a copy in ``bin/`` of the work folder as well: the installed provider lies in
        the worker's venv, which that user cannot read (the local launcher makes sure of it).
        """
        copy = self.work / "bin" / "user.py"
        if self.mode == "stage":
            return copy
        if not self.run_as:
            return USER_SCRIPT
        if not copy.exists():
            copy.parent.mkdir(exist_ok=True)
            copy.parent.chmod(0o755)
            shutil.copyfile(USER_SCRIPT, copy)
            copy.chmod(0o644)
        return copy

    def _metrics_file(self) -> Path:
        """The file ``aicenter.report`` appends to (``AICENTER_METRICS_FILE``), created before any user process starts.

        In ``control/``: a run_as user writes there, and a confined rank is given this one file
        (``writable``). Whatever package code leaves in its place, the agent reads it warily (runtime/progress.py).
        """
        path = self.control / METRICS_FILE
        if not path.exists():
            self.control.mkdir(parents=True, exist_ok=True)
            path.touch(0o644)
        return path

    def _user_lib(self) -> Path:
        """``bin/lib/`` holding a copy of the ``aicenter`` module alone: user.py puts it on the user processes' path.

        Nothing else is there, so package code imports ``aicenter`` and nothing of the agent.
        """
        lib = self.work / "bin" / "lib"
        target = lib / "aicenter.py"
        if not target.exists():
            lib.mkdir(parents=True, exist_ok=True)
            for folder in (lib.parent, lib):
                with contextlib.suppress(OSError):  # a pod's bin/ is a volume's mount point, not ours to chmod
                    folder.chmod(0o755)
            shutil.copyfile(REPORT_MODULE, target)
            target.chmod(0o644)
        return lib

    def writable(self, root: Path, env: dict[str, str], steps: list[dict[str, Any]], predict: dict[str, Any] | None) -> list[str]:
        """The only folders a user process may write (user.py confines it with Landlock), created now.

        Its TMPDIR, its ``artifacts_directory`` (rank r > 0: ``artifacts/rank-<r>/``) and, to train,
        its package folder (rank 0: the new version; rank r > 0: its own copy), the checkpoint
        folder (sharded checkpoints: every rank) and, to run ``process_data``, the training and
        evaluation splits; to predict, its outputs only (the one package folder is shared).
        """
        paths = [Path(env["TMPDIR"]), Path(env["artifacts_directory"])]
        if predict is not None:
            paths.append(Path(predict["out"]))
        else:
            paths += [root, self.dirs["checkpoint_directory"]]
            if any(step.get("call") == "process_data" for step in steps):
                paths += [self.dirs["training_data_directory"], self.dirs["evaluation_data_directory"]]
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
        return [str(path) for path in paths] + [env[METRICS_FILE_ENV], "/dev/null", "/dev/shm"]

    def supervise(self, processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the user processes under the supervisor, in this process (it is their subreaper).

        The first to fail fails the run and the others are stopped; whatever they started ends
        with them. A SIGTERM (``Killed``) stops them all on its way up.
        """
        self._confine(processes)
        ended = supervise(self._supervisor_plan(processes))
        self._used(ended.get("resources"))
        self._output_tail(ended)
        if ended["status"] != "succeeded":
            raise RunError(ended["cause"] or f"the user processes {ended['status']}")
        return cast(list[dict[str, Any]], ended["results"])

    def _output_tail(self, ended: dict[str, Any]) -> None:
        """A run whose user processes failed keeps their last lines of output in its outcome (the run page shows them).

        The supervisor kept them masked and capped; in a pod its exit file comes from the user
        container, so they are checked again here: strings only, as many and as long as it keeps, masked.
        """
        tail = ended.get("output_tail")
        if ended.get("status") == "succeeded" or not isinstance(tail, list):
            return
        lines = [str(line)[:TAIL_LINE + 40] for line in tail[-TAIL_LINES:] if isinstance(line, str)]
        self.outcome.output_tail = [redact(line, self.secrets) for line in lines]

    def _confine(self, processes: list[dict[str, Any]]) -> None:
        """Locally: scratch files in the work folder (removed with it), and under ``run_as`` only its folders writable."""
        tmp = self.work / "tmp"
        tmp.mkdir(exist_ok=True)
        for entry in processes:
            entry["env"]["TMPDIR"] = str(tmp)
            if self.run_as:
                entry["env"]["HOME"] = str(tmp)
        if self.run_as:
            names = ("artifacts_directory", "checkpoint_directory", "training_data_directory", "evaluation_data_directory")
            writable = [self.control, tmp, *(self.dirs[name] for name in names)]
            if self.plan.makes_version:  # the package folder (and each rank's copy) becomes the new version
                writable += [Path(entry["cwd"]) for entry in processes]
            if self.plan.serving:
                writable += [self.work / "predictions", self.work / "parts"]
            with self.placed.handing_over(self.work / "package"):  # the chown moves ctimes: the staged files stay known
                isolation.hand_over(self.work, self.run_as["uid"], self.run_as["gid"], writable)

    def _supervisor_plan(self, processes: list[dict[str, Any]]) -> dict[str, Any]:
        """The user supervisor's plan (runtime/supervisor.py) for these processes."""
        return {
            "processes": processes,
            "secret_env": self.secret_env,
            "prefix_output": self.topology.world_size > 1,
            "line_limit": LINE_LIMIT,
            "grace": USER_GRACE,
            "run_as": self.run_as,
            "exit_file": str(self.control / "exit.json"),
            "gpus": self.spec.gpu,
        }

    # -- the call plans ------------------------------------------------------------------
    def _package_plan(self, root: Path) -> list[list[dict[str, Any]]]:
        """Train, evaluate or full: one user process, or one per rank (DESIGN "Distributed training").

        Groups of processes run one after the other: a node's ``process_data`` before its ranks.
        """
        dirs, topo = {k: str(v) for k, v in self.dirs.items()}, self.topology
        process_data: list[dict[str, Any]] = [
            {"call": "process_data", "args": [dirs["data_directory"]]},
            {"require_files": dirs["training_data_directory"], "message": (
                "Main.process_data() wrote nothing to training_data_directory "
                f"({dirs['training_data_directory']}); write the training split there "
                "(os.environ['training_data_directory'])")},
        ]
        # The plan's calls: every rank trains (head); rank 0 alone evaluates and saves (tail).
        plan = self.plan
        training = dirs["training_data_directory" if plan.processes_data else "data_directory"]
        head: list[dict[str, Any]] = [{"call": "train", "args": [training]}] if "train" in plan.calls else []
        tail: list[dict[str, Any]] = []
        if "evaluate" in plan.calls:
            if plan.makes_version:  # a full run scores the split process_data wrote (or the evaluation dataset)
                evaluation = dirs["evaluation_data_directory"]
                tail.append({"call": "evaluate", "args": [evaluation], "score": True, "unless_empty": evaluation})
            else:
                tail.append({"call": "evaluate", "args": [dirs["test_data_directory"]], "score": True})
        if "save" in plan.calls:
            tail.append({"call": "save"})
        if topo.world_size == 1:
            steps = (process_data if plan.processes_data else []) + head + tail
            return [[self.start("user", root, self.user_env(0), steps=steps)]]
        groups = []
        if plan.processes_data:
            groups.append([self.start(f"node {topo.node_rank} process_data", root, self.user_env(0), steps=process_data)])
        users = []
        for local_rank in range(topo.procs_per_node):
            rank = topo.rank(local_rank)
            users.append(self.start(f"rank {rank}", self._rank_root(root, rank), self.user_env(local_rank),
                                    steps=head + (tail if rank == 0 else [])))
        return [*groups, users]

    def _package_results(self, results: list[dict[str, Any]]) -> None:
        """The lead process's report: the score, and a warning when evaluation had nothing to score."""
        topo = self.topology
        lead = results[0]
        if topo.node_rank != 0:
            return
        if lead.get("score") is not None:
            self.outcome.score = float(lead["score"])
            log(f"score: {self.outcome.score}")
        if "evaluate" in lead.get("skipped", []):
            warning = (
                "evaluation_data_directory is empty, so Main.evaluate() was not called and the score is null; "
                "write the evaluation split there in process_data() or pass evaluation_dataset"
            )
            self.outcome.warnings.append(warning)
            log(f"WARNING: {warning}")

    def _rank_root(self, root: Path, rank: int) -> Path:
        """Rank 0 works in the real package folder (it becomes the new version); the others in a copy."""
        if rank == 0:
            return root
        copy = self.work / "ranks" / str(rank) / root.name
        shutil.copytree(root, copy, symlinks=True)
        return copy

    # -- batch prediction ----------------------------------------------------------------
    def _predict_plan(self, root: Path) -> list[list[dict[str, Any]]]:
        """``procs_per_node`` user processes, each ``Main()`` once, each a contiguous share of the inputs.

        Each process reads its share and writes its own part files (no per-input messages);
        the agent then joins the parts in process order, which is input order.
        """
        spec, data = self.spec, self.dirs["data_directory"]
        out = self.work / "predictions"
        parts = self.work / "parts"
        procs = spec.procs_per_node
        if spec.input_type == "json":
            files = [rel for rel in local_files(data) if rel.endswith(".jsonl")]
            if not any((data / rel).stat().st_size for rel in files):
                raise DatasetError(
                    f"dataset {spec.dataset} has no input lines: input_type='json' reads every line of every *.jsonl "
                    "file; add .jsonl files, or use input_type='file' to predict on each file"
                )
            # One process reads every line as it goes; several need the line counts to share them out.
            counts = [(rel, count_lines(data / rel) if procs > 1 else sys.maxsize) for rel in files]
            shares: list[list[list[Any]]] = split_lines(counts, procs) if procs > 1 else [[[rel, 0, n] for rel, n in counts]]
        else:
            files = local_files(data)
            if not files:
                raise DatasetError(f"dataset {spec.dataset} has no files to predict on; upload the inputs there")
            shares = [[[rel] for rel in files[i * len(files) // procs:(i + 1) * len(files) // procs]] for i in range(procs)]
        users = []
        for index, share in enumerate(shares):
            target = parts / str(index) if spec.input_type == "json" else out
            plan = {"input_type": spec.input_type, "data": str(data), "out": str(target), "inputs": share}
            # Serving writes no version: every process reads the one package folder (no copies of a large model).
            users.append(self.start(f"rank {index}", root, self.user_env(index),
                                    module="main", predict=plan))
        self.predict_parts = (files, len(shares))
        return [users]

    def _predict_results(self, results: list[dict[str, Any]]) -> None:
        """Join the processes' parts in input order; count the predicted and failed inputs."""
        spec, out, parts = self.spec, self.work / "predictions", self.work / "parts"
        assert self.predict_parts is not None
        files, shares = self.predict_parts
        if spec.input_type == "json":
            for rel in files:
                merge_parts([parts / str(i) / rel for i in range(shares)], out / rel)
        self.outcome.predicted = sum(int(r.get("predicted") or 0) for r in results)
        self.outcome.failed = sum(int(r.get("failed") or 0) for r in results)
        self.first_error = next((r["first_error"] for r in results if r.get("first_error")), None)
        inputs, busy = self.outcome.predicted + self.outcome.failed, max(float(r.get("predict_seconds") or 0) for r in results)
        rate = f", {inputs / busy:.0f} inputs/s once loaded" if busy > 0 else ""
        log(f"predicted {self.outcome.predicted} inputs, {self.outcome.failed} failed, over {len(results)} processes{rate}")

    def _check_names(self, root: Path) -> None:
        """Refuse the run's outputs when a file name holds a secret, before any of them is uploaded."""
        folders = {name: self.dirs[name] for name in ("artifacts_directory", "checkpoint_directory")}
        if self.plan.makes_version and self.topology.node_rank == 0:
            folders["the package folder (the new version)"] = root
        for label, folder in folders.items():
            check_names(folder, local_files(folder), secrets=self.secrets, label=label)

    def _upload_predictions(self) -> None:
        folder = self.work / "predictions"
        for rel in local_files(folder):  # outputs and errors may quote the secrets user code knows
            redact_json_lines_file(folder / rel, self.secrets)
        entries = run(upload_tree(folder, self.store, self.key(PREDICTIONS), secrets=self.secrets, label="predictions"))
        self._count("bytes_uploaded", sum(e.size for e in entries))
        log(f"uploaded {len(entries)} prediction files to {self.store.url(self.key(PREDICTIONS))}")

    def _check_failed_inputs(self) -> None:
        failed, allowed = self.outcome.failed or 0, self.spec.max_failed
        if failed > allowed:
            total = failed + (self.outcome.predicted or 0)
            raise RunError(
                f"{failed} of {total} inputs failed, more than max_failed={allowed}; first: {self.first_error}; "
                f"every output and error is in {self.store.url(self.key(PREDICTIONS))}"
            )

    # -- uploads -------------------------------------------------------------------------
    def _store_package(self, root: Path) -> BlobRef:
        """Store the package folder as a per-file version: only the files whose blob the store lacks are written.

        A file staged and untouched since is not hashed again (``placed`` knows its digest by
        inode: in a pod, from stage's state); the parent's file blobs unmodified since its
        manifest are vouched for, not read back (_vouched_package_blobs).
        """
        sealed = self._seal_new_files(root)
        spared: list[int] = []

        def known(path: Path, st: os.stat_result) -> str | None:
            if (digest := self.placed.known(path, st)) is not None:
                spared.append(st.st_size)
            return digest

        put = store_package_files(self.store, root, known=known, stored=self._vouched_package_blobs())
        if spared:
            log(f"{len(spared)} package files ({human(sum(spared))}) untouched since staging: not read again")
        self._count("bytes_uploaded", put.written_bytes)
        if sealed and self.blob_cache is not None:
            kept = sum(self.blob_cache.adopt(root / f.path, f.sha256, f.size, sealed[f.path])
                       for f in put.contents.files if f.path in sealed)
            if kept:
                log(f"{kept} new package files kept in the local blob cache for the next run on this machine")
        blobs = put.blobs
        log(f"new package content: {blobs.files} files ({human(blobs.bytes)}): {blobs.uploaded_files} written "
            f"({human(blobs.uploaded_bytes)}), the rest already stored; manifest sha256:{put.ref.sha256[:12]}"
            f"{'' if put.manifest_written else ' (already stored)'}")
        return put.ref

    def _seal_new_files(self, root: Path) -> dict[str, os.stat_result]:
        """Locally, the files of the new version that the blob cache does not hold yet, sealed where they are.

        Once stored, each still untouched becomes a cache entry by a link (BlobCache.adopt): no
        copy, no second read, and an evaluation of the new version on this machine fetches
        nothing. Package code has ended; the folder is the version's and goes with the work
        folder. Not in a pod (its volumes end with it), nor for files of another user (run_as_user).
        """
        cache = self.blob_cache if self.mode is None else None
        if cache is None:
            return {}
        sealed: dict[str, os.stat_result] = {}
        for rel in iter_package_files(root):
            path = root / rel
            try:
                st = path.lstat()
            except OSError:
                continue
            if self.staged_from is not None and self.placed.known(path, st) is not None:
                continue  # staged from the cache and untouched: its entry is there
            if (done := cache.seal_in_place(path)) is not None:
                sealed[rel.as_posix()] = done
        return sealed

    def _vouched_package_blobs(self) -> frozenset[str]:
        """The parent version's file blobs that are intact without a read-back (snapshot.vouched_by_version).

        A modified one is read back and hashed, a missing or damaged one is left to
        store_package_files to rewrite. Never fails the run: on any error, nothing is vouched for.
        """
        parent = self.spec.blob
        if parent is None:
            return frozenset()
        return vouched_by_version(
            self.store, parent, cache=self.staged_from,
            on_error=lambda exc: log(f"could not check the parent version's file blobs ({exc}); each one stored is read back"),
        )

    def _upload_artifacts(self) -> None:
        entries = run(upload_tree(self.dirs["artifacts_directory"], self.store, self.key(ARTIFACTS), secrets=self.secrets,
                                  label="artifacts_directory"))
        self.outcome.artifacts = len(entries)
        self.outcome.artifacts_bytes = sum(e.size for e in entries)
        self._count("bytes_uploaded", self.outcome.artifacts_bytes)
        log(f"uploaded {len(entries)} artifacts ({human(self.outcome.artifacts_bytes)})")

    def _upload_artifacts_best_effort(self) -> None:
        try:
            if local_files(self.dirs["artifacts_directory"]):
                self._upload_artifacts()
        except Exception as exc:  # noqa: BLE001 - the failure being reported matters more
            log(f"could not upload artifacts of the failed run: {exc}")

    # -- checkpoints and incremental staging (runtime/checkpoint.py, runtime/incremental.py) ----
    def _restore_checkpoint(self, prefix: str) -> None:
        """Restore the task's latest complete checkpoint before ``Main()``; node 0 then syncs it periodically."""
        sync = self._checkpoint_sync(prefix)
        sync.restore()
        self.checkpoints = sync  # only now: a half-restored folder must never be synced
        if self.topology.node_rank == 0 and self.mode is None:  # in a pod, sync runs the periodic syncs
            sync.start()

    def _checkpoint_sync(self, prefix: str) -> CheckpointSync:
        return CheckpointSync(self.store, prefix, self.dirs["checkpoint_directory"], self.spec.checkpoint_interval, log,
                              try_number=try_of(self.spec.run_prefix), secrets=self.secrets)

    def _final_checkpoint(self) -> None:
        """The last sync, after the user processes stopped (run end, failure or SIGTERM); sync's job in a pod."""
        if self.checkpoints is None or self.mode == "stage":
            return
        if self.topology.node_rank == 0:
            problem = self.checkpoints.final()
            if problem:
                self.outcome.warnings.append(problem)
        self.outcome.checkpoint = self.checkpoints.stats()

    def _stage_incremental(self, source: Store, dest: Path, base_uri: str) -> list[FileEntry]:
        base = read_base(self.store, base_uri)
        self.incremental = stage_incremental(source, dest, base, log)
        check_carried(self.store, base, self.incremental.carried, base_uri)
        return self.incremental.staged

    def _snapshot(self, name: str, source: str | None) -> None:
        folder = self.dirs[name]
        entries = self.entries.get(name)
        if entries is None:  # a mounted dataset: hash it in place
            entries = [FileEntry(rel, *_digest(folder / rel)) for rel in local_files(folder)]
        key = self.key(manifest_name(name))
        inc = self.incremental if name == "data_directory" else None  # the unchanged files, carried over
        stats = take_snapshot(self.store, folder, entries, source=source, directory=name, key=key, log=log,
                              carried=inc.carried if inc else (),
                              fingerprints=inc.fingerprints if inc else self.fingerprints if name == "data_directory" else None)
        self.outcome.snapshots[name] = self.store.url(key)
        self._count("bytes_uploaded", stats.uploaded_bytes)
        log(f"snapshot of {name}: {stats.files} files ({human(stats.bytes)}), "
            f"{stats.uploaded_files} new blobs ({human(stats.uploaded_bytes)}) written")


def secret_names(env: dict[str, str]) -> list[str]:
    """The names in ``env`` whose values are secret (as ``Redactor.from_env`` picks them), for the user supervisor."""
    named = {k.strip() for k in str(env.get(SECRET_KEYS_ENV) or "").split(",") if k.strip()}
    return sorted(k for k in env if is_secret_key(k) or k in named)


def _names(variable: str) -> set[str]:
    """A comma-separated list of variable names from this process's environment."""
    return {n.strip() for n in os.environ.get(variable, "").split(",") if n.strip()}


def count_lines(path: Path) -> int:
    """Lines of a file, a last line without newline included, without holding the file in memory."""
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def split_lines(counts: list[tuple[str, int]], procs: int) -> list[list[list[Any]]]:
    """Contiguous shares of all lines of all files: ``[[rel, first, last), ...]`` per process."""
    total = sum(n for _, n in counts)
    shares: list[list[list[Any]]] = []
    for index in range(procs):
        begin, end = index * total // procs, (index + 1) * total // procs
        share, offset = [], 0
        for rel, n in counts:
            first, last = max(begin - offset, 0), min(end - offset, n)
            if first < last:
                share.append([rel, first, last])
            offset += n
        shares.append(share)
    return shares


def merge_parts(parts: list[Path], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as sink:
        for part in parts:
            if part.exists():
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)


def _digest(path: Path) -> tuple[str, int]:
    entry = sha256_file(path)
    return entry.sha256, entry.size


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough: a second must not interrupt the cleanup
    raise Killed


def own_work_folder() -> Path:
    """The work folder of a runtime started without one (``AICENTER_WORKDIR``), locked while it runs.

    The local launcher gives the runtime its own launch folder; started otherwise (by hand, by a
    test), the runtime makes one the same way: named and locked as a launch folder, so a runtime
    killed with SIGKILL, which removes nothing, leaves a folder the next start (or the next local
    launch) sweeps, killing what still runs in it.
    """
    parent = Path(tempfile.gettempdir())
    isolation.sweep(parent, log)
    folder = Path(tempfile.mkdtemp(prefix=isolation.LAUNCH_PREFIX))
    isolation.hold_lock(folder)  # never closed: the kernel drops the lock when this process ends, however it ends
    return folder


def watch_parent() -> None:
    """When the launcher that started this agent dies, stop the run as if killed (SIGTERM to self).

    A pod's agent is its container's first process (parent 0) and needs no watch.
    """
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="aicenter-parent-watch", daemon=True).start()


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's content as the container's termination reason."""
    path = Path(os.environ.get("AICENTER_TERMINATION_LOG", TERMINATION_LOG))
    with contextlib.suppress(OSError):
        if path.parent.is_dir() and (path.exists() or os.access(path.parent, os.W_OK)):
            path.write_text(message[:4000])


def build_main(args: list[str]) -> int:
    """The ``build`` container: install the environment of stage's plan (``control/build.json``), or nothing.

    No run spec, no store: this process holds no credentials, and runs the package's build code
    (DESIGN "Environments").
    """
    plan_path = Path(args[0]) if args else Path(os.environ.get("AICENTER_WORKDIR", ".")) / "control" / BUILD_PLAN
    if not plan_path.exists():
        log("nothing to build: stage found the environment in the local cache or the store")
        write_termination_message("nothing to build")
        return 0
    try:
        said = build_planned(json.loads(plan_path.read_text()), log)
    except AICenterError as exc:
        log(f"FAILED: {exc}")
        write_termination_message(str(exc))
        return 1
    log(said)
    write_termination_message(said)
    return 0


def main(argv: list[str] | None = None) -> int:
    isolation.make_undumpable()  # first: the store's keys in our environment and memory are no one else's to read
    sys.stdout = cast(TextIO, Unbreakable(sys.stdout))
    sys.stderr = cast(TextIO, Unbreakable(sys.stderr))
    args = list(sys.argv[1:] if argv is None else argv)
    phase = None
    if args[:1] == ["--phase"]:
        phase = args[1] if len(args) > 1 else None
        args = args[2:]
        if phase not in PHASES:
            print(f"--phase must be one of {', '.join(PHASES)}", file=sys.stderr)
            return 2
    if phase == "build":
        return build_main(args)
    raw = os.environ.get("AICENTER_RUN_SPEC")
    if args == ["-"]:  # the local launcher: on stdin, in no file
        raw = sys.stdin.read()
    elif args:
        raw = Path(args[0]).read_text()
    if not raw:
        print("usage: python -m airflow_aicenter.runtime [--phase stage|sync] SPEC.json (or set AICENTER_RUN_SPEC); "
              "--phase build PLAN.json",
              file=sys.stderr)
        return 2
    spec = RunSpec.model_validate_json(raw)
    signal.signal(signal.SIGTERM, _on_sigterm)
    watch_parent()
    workdir = Path(os.environ.get("AICENTER_WORKDIR") or own_work_folder())
    workdir.mkdir(parents=True, exist_ok=True)
    state = Path(os.environ.get("AICENTER_STATE") or workdir / ".state")
    try:
        outcome = Agent(spec, open_store(spec.storage), workdir, phase=phase, state=state).run()
    finally:
        if phase is None and not os.environ.get("AICENTER_KEEP_WORKDIR"):  # a pod's volumes go with the pod
            shutil.rmtree(workdir, ignore_errors=True)
    if phase == "stage" and outcome.status == "running":
        write_termination_message("staged")
        return 0
    if outcome.status == "skipped":
        write_termination_message(f"skipped: {outcome.skipped}")
        return 1 if phase == "stage" else 0  # no user code to run: the pod ends at its init container
    if outcome.status != "succeeded":
        write_termination_message(outcome.error or outcome.status)
        return 1
    write_termination_message(f"succeeded in {outcome.execution_time:.1f} s")
    return 0
