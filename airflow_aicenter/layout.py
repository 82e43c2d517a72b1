"""The store layout: every key the product reads or writes, built and parsed here and nowhere else.

```
blobs/sha256/<hex>                               immutable content
envs/<key>.json                                  a cached package environment (names its blob)
envs/<key>.used-<YYYY-MM-DD>                     a day it was used (gc deletes environments unused for long)
snapshots/<sha256 of the source>.json            the last snapshot of a data source (a hint naming its manifest)
triggers/                                        left by earlier versions' dataset triggers (never read: their
                                                 state is in Airflow's asset state store, where runs cannot write)
packages/<name>/versions/<M.m>.json              version records (the commit point)
packages/<name>/aliases/<alias>/<seq>.json       alias history
packages/<name>/hints/<sequence>                 where the next number of a sequence is (a hint)
packages/<name>/evaluations/<M.m>/<name>.json    evaluations of a version
packages/<name>/runs/<sha256>.json               the version a task instance made (sha256 of its runs/ prefix)
runs/<dag_id>/<run_id>/<task>/<try>/             one folder per task try
runs/<dag_id>/<run_id>/<task>/checkpoints/       the task's checkpoints (all tries):
    objects/<sha256>                             their files' content
    manifests/<seq>.json                         one a checkpoint (12 digits)
```

``<task>`` is the task id, or ``<task_id>~<map_index>`` for a mapped task instance: ``~`` cannot
occur in an Airflow task id, so a mapped ``train`` (index 0) and a task named ``train__0`` never
share a folder. No Airflow import: the runtime, the CLI and the UI pages use it too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

RUNS = "runs"
BLOBS = "blobs/sha256/"
ENVS = "envs/"
PACKAGES = "packages/"
SNAPSHOTS = "snapshots/"
TRIGGERS = "triggers/"
#: The top-level folders of a store: a location holding none of them is not an AI Center store.
STORE_FOLDERS = frozenset(p.split("/")[0] for p in (RUNS, BLOBS, ENVS, PACKAGES, SNAPSHOTS, TRIGGERS))

# Files of a run folder.
OUTCOME = "outcome.json"
RESULTS = "_results.json"
REGISTRATION = "registration.json"
ARTIFACTS = "artifacts"
PREDICTIONS = "predictions"
CHECKPOINTS = "checkpoints"
#: The run's live progress (step, total, percent, ETA, latest metrics) and its thinned metric history,
#: written by the agent while package code runs (DESIGN "Progress, metrics and resources").
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
#: The AI Center folders whose content can be snapshotted, and their manifest names.
SNAPSHOT_DIRECTORIES = ("data_directory", "test_data_directory")
MAP_SEPARATOR = "~"
_TRY = re.compile(r"^[1-9][0-9]{0,5}$")
#: A sha256 as the store spells one in a key (a blob, a checkpoint object, an environment key, a
#: hashed name): 64 lowercase hex characters. For patterns over whole keys; ``is_digest`` for one name.
SHA256_HEX = "[0-9a-f]{64}"
_SHA256 = re.compile(SHA256_HEX)


def is_digest(text: str) -> bool:
    """Whether ``text`` is a sha256 as the store names content (exactly 64 lowercase hex characters)."""
    return _SHA256.fullmatch(text) is not None


class LayoutError(ValueError):
    """A path that is not a run folder of this layout (the message says what was expected)."""


def classify_top(folders: Iterable[str], files: Iterable[str]) -> tuple[Literal["store", "empty", "other"], str]:
    """What a listing of a location's top (folder prefixes, file keys) is: an AI Center store (it holds
    one of the store's own folders: S3 has no folders, so a prefix is a store by its content), empty (a
    new store), or other data; with the names shown in a message (at most five folders and five files).
    """
    names = {f.rstrip("/").rsplit("/", 1)[-1] for f in folders}
    keys = list(files)
    shown = ", ".join(sorted(names)[:5] + keys[:5])
    if names & STORE_FOLDERS:
        return "store", shown
    return ("other" if names or keys else "empty"), shown


#: What a location holding other data lacks (the end of a refusal).
NOT_A_STORE = "no packages/, runs/ or blobs/ folder"


def blob_key(sha256: str) -> str:
    return f"{BLOBS}{sha256}"


def env_key(key: str) -> str:
    return f"{ENVS}{key}.json"


def env_used_key(key: str, day: str) -> str:
    """The create-once marker a run leaves on the first day (``YYYY-MM-DD``) it uses environment ``key`` (gc reads it)."""
    return f"{ENVS}{key}.used-{day}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def snapshot_hint_key(source: str) -> str:
    """The hint naming the manifest of the last snapshot of ``source`` (a dataset URI)."""
    return f"{SNAPSHOTS}{_digest(source)}.json"


def package_prefix(package: str) -> str:
    """The folder of everything the registry keeps of ``package``: every key below is built from it."""
    return f"{PACKAGES}{package}/"


def aliases_root(package: str) -> str:
    """The folder of every alias of ``package`` (no trailing ``/``: a directory listing)."""
    return f"{package_prefix(package)}aliases"


def hint_key(package: str, sequence: str) -> str:
    """Where a number sequence of ``package`` (``major``, a major's minors, ``alias-<name>``) keeps its hint."""
    return f"{package_prefix(package)}hints/{sequence}"


def evaluations_prefix(package: str, version: str) -> str:
    return f"{package_prefix(package)}evaluations/{version}/"


def evaluation_key(package: str, version: str, name: str) -> str:
    return f"{evaluations_prefix(package, version)}{name}.json"


def approvals_prefix(package: str) -> str:
    """The folder of every version's approval records (``promote_if="approved"``)."""
    return f"{package_prefix(package)}approvals/"


def approval_key(package: str, version: str, stage: Literal["request", "decision"]) -> str:
    """A version's approval request (created when the run asks) or its one decision (created once)."""
    return f"{approvals_prefix(package)}{version}/{stage}.json"


def versions_prefix(package: str) -> str:
    return f"{package_prefix(package)}versions/"


def version_key(package: str, version: str) -> str:
    return f"{versions_prefix(package)}{version}.json"


def aliases_prefix(package: str, alias: str) -> str:
    return f"{aliases_root(package)}/{alias}/"


def alias_key(package: str, alias: str, seq: int) -> str:
    return f"{aliases_prefix(package, alias)}{seq:010d}.json"


def made_by_key(package: str, task: TaskPath) -> str:
    """The record of the version ``task`` (a task instance: every try of it) committed, if any."""
    return f"{package_prefix(package)}runs/{_digest(task.prefix)}.json"


_P = re.escape(PACKAGES)
#: The records of the store outside run folders, by kind, as whole keys (what the functions above build):
#: for telling them apart in a listing (``aicenter verify``, gc).
RECORD_KEYS: dict[str, re.Pattern[str]] = {
    "version": re.compile(rf"^{_P}[^/]+/versions/[^/]+\.json$"),
    "alias": re.compile(rf"^{_P}[^/]+/aliases/[^/]+/\d+\.json$"),
    "evaluation": re.compile(rf"^{_P}[^/]+/evaluations/[^/]+/[^/]+\.json$"),
    "approval": re.compile(rf"^{_P}[^/]+/approvals/[^/]+/(request|decision)\.json$"),
    "made-by record": re.compile(rf"^{_P}[^/]+/runs/{SHA256_HEX}\.json$"),
    "environment": re.compile(rf"^{re.escape(ENVS)}{SHA256_HEX}\.json$"),
    "snapshot hint": re.compile(rf"^{re.escape(SNAPSHOTS)}{SHA256_HEX}\.json$"),
    "trigger state": re.compile(rf"^{re.escape(TRIGGERS)}{SHA256_HEX}\.json$"),
}


def manifest_name(directory: str) -> str:
    """``data_directory`` -> ``data_directory.manifest.json`` (a snapshot manifest in a run folder)."""
    return f"{directory}.manifest.json"


MANIFEST_NAMES = frozenset(manifest_name(d) for d in SNAPSHOT_DIRECTORIES)


def outcome_name(node_rank: int = 0) -> str:
    """Node 0's ``outcome.json`` (the run's); another node of a multi-node Job writes ``node-<k>.outcome.json``."""
    return OUTCOME if node_rank == 0 else f"node-{node_rank}.{OUTCOME}"


CHECKPOINT_OBJECTS = "objects/"
CHECKPOINT_MANIFESTS = "manifests/"


def checkpoint_object_key(checkpoints: str, sha256: str) -> str:
    """A file's content under a task's checkpoint prefix (``TaskPath.checkpoints``)."""
    return f"{checkpoints.rstrip('/')}/{CHECKPOINT_OBJECTS}{sha256}"


def checkpoint_manifest_key(checkpoints: str, seq: int) -> str:
    return f"{checkpoints.rstrip('/')}/{CHECKPOINT_MANIFESTS}{seq:012d}.json"


def task_folder(task_id: str, map_index: int = -1) -> str:
    return task_id if map_index < 0 else f"{task_id}{MAP_SEPARATOR}{map_index}"


def _component(name: str, value: str) -> str:
    if not value or value in (".", "..") or "/" in value:
        raise LayoutError(f"{name} {value!r} cannot name a folder of the store (empty, '.', '..' or a '/')")
    return value


@dataclass(frozen=True)
class TaskPath:
    """One task instance (any try): ``runs/<dag_id>/<run_id>/<task>``."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def __post_init__(self) -> None:
        _component("dag_id", self.dag_id)
        _component("run_id", self.run_id)
        _component("task_id", self.task_id)

    @property
    def prefix(self) -> str:
        return f"{RUNS}/{self.dag_id}/{self.run_id}/{task_folder(self.task_id, self.map_index)}"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}/{CHECKPOINTS}/"

    def attempt(self, try_number: int) -> RunPath:
        return RunPath(self.dag_id, self.run_id, self.task_id, self.map_index, try_number)


@dataclass(frozen=True)
class RunPath(TaskPath):
    """One task try: ``runs/<dag_id>/<run_id>/<task>/<try>``; its id is that path without ``runs/``."""

    try_number: int = 1

    @property
    def prefix(self) -> str:
        return f"{super().prefix}/{self.try_number}"

    @property
    def task(self) -> TaskPath:
        return TaskPath(self.dag_id, self.run_id, self.task_id, self.map_index)

    @property
    def id(self) -> str:
        return self.prefix.removeprefix(f"{RUNS}/")

    def key(self, name: str) -> str:
        """A file of the run folder: ``key(OUTCOME)``, ``key("artifacts/model.pkl")``."""
        return f"{self.prefix}/{name}"

    @classmethod
    def parse(cls, text: str) -> RunPath:
        """``dag/run/task/try`` or ``runs/dag/run/task/try`` (a trailing file name is not accepted)."""
        parts = text.strip("/").split("/")
        if parts and parts[0] == RUNS:
            parts = parts[1:]
        if len(parts) != 4 or not _TRY.match(parts[3]):
            raise LayoutError(
                f"{text!r} is not a run id; a run id is <dag_id>/<run_id>/<task>/<try> (as `aicenter runs list` shows it)"
            )
        dag_id, run_id, task, try_text = parts
        task_id, map_index = task, -1
        head, sep, tail = task.rpartition(MAP_SEPARATOR)
        if sep and tail.isdigit():
            task_id, map_index = head, int(tail)
        return cls(
            _component("dag_id", dag_id), _component("run_id", run_id), _component("task_id", task_id), map_index, int(try_text)
        )
