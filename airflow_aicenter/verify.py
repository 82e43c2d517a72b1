"""``aicenter verify``: every record readable, every blob a record names present and intact; repair from a source.

What is checked, by reading the whole store once:

- every record is read and validated: version records, aliases, evaluations and made-by
  records under ``packages/``; environment records (``envs/<key>.json``); snapshot hints
  (``snapshots/``) and the dataset trigger state earlier versions left (``triggers/``); in each run folder its outcomes,
  ``registration.json``, ``_results.json`` and snapshot manifests; each task's checkpoint
  manifests. A record that is not valid is reported by its key (``state`` "damaged"), one whose
  read failed too ("unreadable");
- every blob a version record, a snapshot manifest or an environment record names, and every
  checkpoint object a checkpoint manifest names, is read whole and hashed (whatever its size:
  ``transfer.blob_state``): "missing" or "damaged" (its content hashes to another digest),
  with every record that names it;
- a per-file version names its manifest blob (``referenced_by`` "version NAME:M.m (its
  manifest)"); the manifest is read (once, however many versions name it) and each file blob it
  lists is checked like any blob, named by version and file path ("version NAME:M.m
  (weights.bin)"). A manifest that is missing or damaged is reported as such, and its files
  cannot be listed until it is repaired; one that hashes right but is not a manifest is reported
  "damaged" with why.

``repair`` rewrites each missing or damaged blob (and checkpoint object) whose content is found
in a source: a folder or a zip. A source's candidates are its files, the zip itself, and the
package zip ``aicenter package upload`` builds from the folder (or from the zip's content, or
from a package folder or zip inside the folder): the upload zip is deterministic, so the same
package folder gives the same digest (``package/archive.write_zip``), and, when a per-file
version's manifest is to be repaired, the manifest an upload of that folder writes (also
deterministic: ``package/contents.encode``). Only files of a size some damaged blob has are
hashed. The content is written over the damaged object (an overwrite: a
blob is otherwise created once), its bytes checked against the digest as they are sent: a blob
through ``transfer.store_blob``, the writer that replaces a blob it finds damaged (as a re-upload
does), a checkpoint object through ``transfer.upload_file``. Each is hashed again before it counts
as repaired. Damaged records are never rewritten: what they held is gone; the report says how
to restore each.

No Airflow import: it runs from the CLI against any store.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from airflow_aicenter import layout
from airflow_aicenter.errors import AICenterError, ConfigurationError, NotFoundError, PackageError, StorageError
from airflow_aicenter.package import open_package, write_zip
from airflow_aicenter.package.contents import contents_of, encode
from airflow_aicenter.records import (
    DAMAGED_RECORD_FIX,
    AliasRecord,
    ApprovalRecord,
    BlobRef,
    DamagedRecordError,
    EvaluationRecord,
    Manifest,
    Outcome,
    Registration,
    SnapshotHint,
    VersionRecord,
    oversized,
    read,
)
from airflow_aicenter.runtime.checkpoint import CheckpointManifest
from airflow_aicenter.runtime.environment import EnvironmentRecord
from airflow_aicenter.storage.store import Store, walk_files
from airflow_aicenter.storage.transfer import (
    REPAIR_ADVICE,
    AdaptiveLimit,
    DamagedBlobError,
    _hashes_to,
    blob_state_async,
    gather_limited,
    read_package_contents,
    run,
    sha256_file,
    store_blob_async,
    upload_file,
)

#: Objects read and hashed at once: verification is bound by bytes, not by request latency.
CONCURRENCY = 16
#: Records read at once (small GETs, bound by latency, as runs.READ_CONCURRENCY).
READ_CONCURRENCY = 16
State = Literal["missing", "damaged", "unreadable"]
Kind = Literal["blob", "checkpoint object", "record"]

#: The model each record kind of ``layout.RECORD_KEYS`` is read with (None: only checked to be JSON).
_MODELS: dict[str, type[BaseModel] | None] = {
    "version": VersionRecord,
    "alias": AliasRecord,
    "evaluation": EvaluationRecord,
    "approval": ApprovalRecord,
    "made-by record": Registration,
    "environment": EnvironmentRecord,
    "snapshot hint": SnapshotHint,
    "trigger state": None,
}
_RECORDS = [(pattern, kind, _MODELS[kind]) for kind, pattern in layout.RECORD_KEYS.items()]
_RUN_FILES: dict[str, tuple[str, type[BaseModel] | None]] = {
    **{layout.manifest_name(d): ("snapshot manifest", Manifest) for d in layout.SNAPSHOT_DIRECTORIES},
    layout.OUTCOME: ("outcome", Outcome),
    layout.REGISTRATION: ("registration", Registration),
    layout.RESULTS: ("results", None),
}
#: A per-file version's manifest digest -> (its ref, the versions that name it).
_Manifests = dict[str, tuple[BlobRef, list[str]]]
_NODE_OUTCOME = re.compile(rf"^node-\d+\.{re.escape(layout.OUTCOME)}$")
_CHECKPOINT_MANIFEST = re.compile(
    rf"^({re.escape(layout.RUNS)}/[^/]+/[^/]+/[^/]+/{layout.CHECKPOINTS}/){re.escape(layout.CHECKPOINT_MANIFESTS)}\d+\.json$")


@dataclass
class Damage:
    """One thing found wrong: a blob, a checkpoint object or a record, by its store key."""

    kind: Kind
    key: str
    uri: str
    state: State
    sha256: str | None = None
    size: int | None = None
    referenced_by: list[str] = field(default_factory=list)
    record: str = ""  # a damaged record's kind ("version", "environment", "outcome", ...)
    detail: str = ""
    fix: str = ""
    repaired: bool = False


@dataclass
class VerifyReport:
    """What ``verify`` read, what it found wrong and what it repaired; ``remaining`` is what is still wrong."""

    store: str
    records: dict[str, int] = field(default_factory=dict)  # kind -> records read (valid or not)
    blobs: int = 0  # distinct blobs checked
    checkpoint_objects: int = 0
    bytes: int = 0  # the size the records give the objects checked
    damage: list[Damage] = field(default_factory=list)
    source: str | None = None  # the repair source
    seconds: float = 0.0

    @property
    def remaining(self) -> list[Damage]:
        return [d for d in self.damage if not d.repaired]

    @property
    def repaired(self) -> list[Damage]:
        return [d for d in self.damage if d.repaired]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "repaired": len(self.repaired), "remaining": len(self.remaining)}


@dataclass
class _Ref:
    kind: Kind
    key: str
    sha256: str
    size: int
    referenced_by: list[str] = field(default_factory=list)


def verify(store: Store, *, repair: Path | None = None, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every record and every object a record names; with ``repair``, rewrite damage found there.

    ``progress(done, total)`` is called as objects are hashed. A source that is neither a
    folder nor a zip is a ConfigurationError before anything is read.
    """
    try:
        usable = repair is None or repair.is_dir() or repair.is_file()
    except OSError as exc:  # not even its kind can be seen (permissions)
        raise ConfigurationError(f"cannot read the repair source {repair}: {exc.strerror or exc}; give a folder or zip "
                                 "this user can read") from exc
    if not usable:
        raise ConfigurationError(f"repair source {repair} does not exist or is not a folder or a file: give the "
                                 "folder or the .zip that holds the lost content (a package folder, a package zip, "
                                 "a dataset folder)")
    began = time.perf_counter()
    report = VerifyReport(store=store.uri, source=None if repair is None else str(repair))
    refs: dict[str, _Ref] = {}
    manifests: _Manifests = {}
    _read_records(store, report, refs, manifests)
    _package_files(store, report, refs, manifests)
    report.damage += _check(store, list(refs.values()), progress)
    for damage in report.damage:
        if damage.sha256 in manifests and damage.state in ("missing", "damaged") and not damage.detail:
            damage.detail = ("the files this manifest lists are unknown until it is repaired, so none of them was "
                             "checked; run `aicenter verify` again after the repair")
    if repair is not None:
        _repair(store, report, repair)
        # A manifest repaired just now lists files that could not be checked before: check (and repair) them now.
        again = {d.sha256: manifests[d.sha256] for d in report.repaired if d.sha256 in manifests}
        if again:
            more: dict[str, _Ref] = {}
            _package_files(store, report, more, again)
            fresh = {key: ref for key, ref in more.items() if key not in refs}
            for key, ref in more.items():
                if key in refs:
                    refs[key].referenced_by += ref.referenced_by
            refs |= fresh
            found = _check(store, list(fresh.values()), progress)
            report.damage += found
            _repair(store, report, repair, only=found)
    report.blobs = sum(1 for r in refs.values() if r.kind == "blob")
    report.checkpoint_objects = len(refs) - report.blobs
    report.bytes = sum(r.size for r in refs.values())
    report.damage.sort(key=lambda d: (d.kind != "record", d.kind, d.key))
    report.seconds = round(time.perf_counter() - began, 3)
    return report


# -- records ------------------------------------------------------------------------------
def _classify(key: str) -> tuple[str, type[BaseModel] | None] | None:
    """(kind, model) of a record key (model None: any JSON object), or None for a key that is no record."""
    for pattern, kind, model in _RECORDS:
        if pattern.match(key):
            return kind, model
    if _CHECKPOINT_MANIFEST.match(key):
        return "checkpoint manifest", CheckpointManifest
    if key.startswith(f"{layout.RUNS}/"):
        folder, _, name = key.rpartition("/")
        try:
            layout.RunPath.parse(folder)
        except layout.LayoutError:
            return None
        if name in _RUN_FILES:
            return _RUN_FILES[name]
        if _NODE_OUTCOME.match(name):
            return "outcome", Outcome
    return None


def _read_records(store: Store, report: VerifyReport, refs: dict[str, _Ref], manifests: _Manifests) -> None:
    """Read every record (READ_CONCURRENCY at once: one small GET each, latency-bound) and note what each names.

    ``manifests`` gets each per-file version's manifest (by digest), with the versions that name it.
    """
    keys: list[tuple[str, str, type[BaseModel] | None, int]] = []
    for top in (layout.PACKAGES, layout.ENVS, layout.SNAPSHOTS, layout.TRIGGERS, f"{layout.RUNS}/"):
        for info in store.list(top):
            found = _classify(info.key)
            if found is not None:
                keys.append((info.key, *found, info.size))

    def load(item: tuple[str, str, type[BaseModel] | None, int]) -> Any:
        key, _, model, size = item
        try:
            return oversized(store, key, size) or _read(store, key, model)
        except StorageError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        for (key, kind, _, _), record in zip(keys, pool.map(load, keys), strict=True):
            report.records[kind] = report.records.get(kind, 0) + 1
            if isinstance(record, NotFoundError):  # deleted since it was listed
                continue
            if isinstance(record, StorageError):
                damaged = isinstance(record, DamagedRecordError)
                detail = str(record).removeprefix(f"{store.url(key)} ").removesuffix(f"; {DAMAGED_RECORD_FIX}")
                report.damage.append(Damage(
                    kind="record", key=key, uri=store.url(key), state="damaged" if damaged else "unreadable",
                    record=kind, detail=detail,
                    fix=_record_fix(kind) if damaged else "check access to the store and run `aicenter verify` again"))
                continue
            _refs_of(key, kind, record, refs)
            if isinstance(record, VersionRecord) and record.blob.kind == "files":
                manifests.setdefault(record.blob.sha256, (record.blob, []))[1].append(
                    f"{record.package}:{record.version}")


def _read(store: Store, key: str, model: type[BaseModel] | None) -> Any:
    if model is not None:
        return read(store, key, model)
    raw = store.get_bytes(key)
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise DamagedRecordError(f"{store.url(key)} is not valid JSON ({exc}); {DAMAGED_RECORD_FIX}", key=key, raw=raw) from exc
    if not isinstance(value, dict):
        raise DamagedRecordError(f"{store.url(key)} is not a JSON object; {DAMAGED_RECORD_FIX}", key=key, raw=raw)
    return value


def _refs_of(key: str, kind: str, record: Any, refs: dict[str, _Ref]) -> None:
    """Note the objects ``record`` (read from ``key``) names, with who names them."""
    def add(kind_: Kind, object_key: str, sha256: str, size: int, by: str) -> None:
        ref = refs.setdefault(object_key, _Ref(kind_, object_key, sha256, size))
        ref.referenced_by.append(by)

    if isinstance(record, VersionRecord):
        add("blob", layout.blob_key(record.blob.sha256), record.blob.sha256, record.blob.size,
            f"version {record.package}:{record.version}" + (" (its manifest)" if record.blob.kind == "files" else ""))
    elif isinstance(record, EnvironmentRecord):
        add("blob", layout.blob_key(record.blob.sha256), record.blob.sha256, record.blob.size, f"environment {key}")
    elif isinstance(record, Manifest):
        for entry in record.files:
            add("blob", layout.blob_key(entry.sha256), entry.sha256, entry.size, f"snapshot {key} ({entry.path})")
    elif isinstance(record, CheckpointManifest):
        match = _CHECKPOINT_MANIFEST.match(key)
        assert match is not None
        for cp in record.files:
            add("checkpoint object", layout.checkpoint_object_key(match.group(1), cp.sha256), cp.sha256, cp.size,
                f"checkpoint {key} ({cp.path})")


def _package_files(store: Store, report: VerifyReport, refs: dict[str, _Ref], manifests: _Manifests) -> None:
    """Note the file blobs each per-file version's manifest lists (READ_CONCURRENCY manifests read at once).

    A missing or damaged manifest is left to the object check, which reports it with its state;
    one that hashes right but is not a manifest is reported here.
    """
    def load(ref: BlobRef) -> Any:
        try:
            return read_package_contents(store, ref)[0]
        except (NotFoundError, DamagedBlobError):
            return None
        except (PackageError, StorageError) as exc:
            return exc

    blobs = [manifests[digest][0] for digest in sorted(manifests)]
    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        for blob, contents in zip(blobs, pool.map(load, blobs), strict=True):
            digest, key = blob.sha256, layout.blob_key(blob.sha256)
            if isinstance(contents, PackageError):
                ref = refs[key]
                report.damage.append(Damage(
                    kind="blob", key=key, uri=store.url(key), state="damaged", sha256=digest, size=ref.size,
                    referenced_by=sorted(set(ref.referenced_by)), detail=str(contents), fix=REPAIR_ADVICE))
                refs.pop(key)  # reported: hashing it again would find it intact
            elif isinstance(contents, StorageError):  # unreadable: the object check says so
                continue
            elif contents is not None:
                for version in manifests[digest][1]:
                    for f in contents.files:
                        ref = refs.setdefault(layout.blob_key(f.sha256), _Ref("blob", layout.blob_key(f.sha256),
                                                                               f.sha256, f.size))
                        ref.referenced_by.append(f"version {version} ({f.path})")


def _record_fix(kind: str) -> str:
    fixes = {
        "version": ("restore it from a backup; a version record holds the only link to its content, and `aicenter gc` "
                    "deletes no blob while it names no readable digest"),
        "environment": "remove it: the next run that needs this environment installs it again and stores it anew",
        "snapshot hint": "remove it: the next snapshot of that source copies the data again (a hint only saves work)",
        "trigger state": ("remove it: nothing reads it any more (a dataset trigger keeps what it announced in Airflow's "
                          "asset state store; triggers/ holds what earlier versions left)"),
        "checkpoint manifest": "remove it: a restore then takes the previous checkpoint",
    }
    return fixes.get(kind, DAMAGED_RECORD_FIX)


# -- objects ------------------------------------------------------------------------------
async def _state(store: Store, ref: _Ref) -> tuple[State | None, str]:
    """(None when intact, else its state; the detail of an unreadable one)."""
    try:
        if ref.kind == "blob":
            state = await blob_state_async(store, ref.sha256)
            return (None if state == "ok" else state), ""
        return (None if await _hashes_to(store, ref.key, ref.sha256) else "damaged"), ""
    except NotFoundError:
        return "missing", ""
    except StorageError as exc:
        return "unreadable", str(exc)


def _check(store: Store, refs: list[_Ref], progress: Callable[[int, int], None] | None) -> list[Damage]:
    done = [0]
    if progress:
        progress(0, len(refs))

    async def one(ref: _Ref) -> tuple[State | None, str]:
        result = await _state(store, ref)
        done[0] += 1
        if progress:
            progress(done[0], len(refs))
        return result

    states = run(gather_limited(refs, one, AdaptiveLimit(CONCURRENCY)))
    return [Damage(kind=ref.kind, key=ref.key, uri=store.url(ref.key), state=state, sha256=ref.sha256, size=ref.size,
                   referenced_by=sorted(set(ref.referenced_by)), detail=detail, fix=_object_fix(ref, state))
            for ref, (state, detail) in zip(refs, states, strict=True) if state is not None]


def _object_fix(ref: _Ref, state: State) -> str:
    if state == "unreadable":
        return "check access to the store and run `aicenter verify` again"
    by = " ".join(ref.referenced_by)
    ways = []
    if "version " in by:
        ways.append("upload the package again (`aicenter package upload`: identical content rewrites it)")
    if "environment " in by:
        ways.append("nothing is lost: the next run that needs the environment finds it damaged and rebuilds it")
    if "snapshot " in by:
        ways.append("snapshot the same data again (a run on that dataset rewrites it)")
    if "checkpoint " in by:
        ways.append("nothing to do if the task is done: a restore falls back to the previous checkpoint")
    ways.append("or `aicenter verify --repair SOURCE` with a folder or zip that holds the content")
    return "; ".join(ways)


# -- repair -------------------------------------------------------------------------------
def index_source(source: Path, work: Path, sizes: set[int], *, manifests: bool = False) -> dict[str, Path]:
    """sha256 -> a local file with that content, among what ``source`` offers (see the module docstring).

    Only files whose size is in ``sizes`` are hashed; the package zips ``aicenter package upload``
    would build are made in ``work`` (from the source, and from each package folder or zip in it),
    and with ``manifests`` (a per-file version's manifest is to be repaired) the manifests it
    would store too.
    """
    found: dict[str, Path] = {}

    def offer(path: Path) -> None:
        if path.is_file() and path.stat().st_size in sizes:
            found.setdefault(sha256_file(path).sha256, path)

    made = [0]

    def package_zip(path: Path) -> None:
        """The zip an upload of ``path`` (a folder or a zip) stores and, for a zip, the files in it."""
        made[0] += 1
        try:
            root = open_package(path, work / f"pkg-{made[0]}")
        except (PackageError, OSError):  # not a zip we can open safely: its own digest is offered already
            return
        if not path.is_dir():
            for rel, _ in walk_files(root):
                offer(root / rel)
        if (root / "main.py").is_file():
            zipped = work / f"package-{made[0]}.zip"
            write_zip(root, zipped)
            offer(zipped)
            if manifests:
                manifest = work / f"manifest-{made[0]}.json"
                manifest.write_bytes(encode(contents_of(root)))
                offer(manifest)

    if source.is_dir():
        package_zip(source)
        for rel, _ in walk_files(source, label=str(source)):
            path = source / rel
            offer(path)
            if path.suffix.lower() == ".zip":
                package_zip(path)
        for sub in sorted(p for p in source.iterdir() if p.is_dir() and (p / "main.py").is_file()):
            package_zip(sub)
    else:
        offer(source)
        package_zip(source)
    return found


def _repair(store: Store, report: VerifyReport, source: Path, *, only: list[Damage] | None = None) -> None:
    """Rewrite each missing or damaged object (of ``only``, else of the whole report) whose content ``source`` holds."""
    broken = [d for d in (report.damage if only is None else only)
              if d.kind != "record" and d.state in ("missing", "damaged") and d.sha256]
    if not broken:
        return
    with tempfile.TemporaryDirectory(prefix="aicenter-verify-") as tmp:
        try:
            found = index_source(source, Path(tmp), {d.size for d in broken if d.size is not None},
                                 manifests=any(by.endswith("(its manifest)") for d in broken for by in d.referenced_by))
        except (AICenterError, OSError) as exc:
            raise ConfigurationError(f"cannot read the repair source {source}: {exc}; give a readable folder or zip") \
                from exc
        fixable = [d for d in broken if d.sha256 in found]

        async def rewrite(damage: Damage) -> bool:
            assert damage.sha256 is not None
            if damage.kind == "blob":  # the blob writer of every path: hashes what is there, rewrites what is not intact
                await store_blob_async(store, found[damage.sha256], damage.sha256)
            else:  # a checkpoint object: overwritten in place, the bytes checked against the digest as they go
                await upload_file(store, found[damage.sha256], damage.key, expect_sha256=damage.sha256)
            ref = _Ref(damage.kind, damage.key, damage.sha256, damage.size or 0)
            state, _ = await _state(store, ref)
            return state is None

        results: list[bool] = run(gather_limited(fixable, rewrite, AdaptiveLimit(CONCURRENCY)))
        for damage, ok in zip(fixable, results, strict=True):
            damage.repaired = ok
    for damage in broken:
        if not damage.repaired:
            damage.fix = f"its content is not in {source}; {damage.fix}"

