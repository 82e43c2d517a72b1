"""Garbage collection of content blobs: ``aicenter gc``.

Blobs (``blobs/sha256/<hex>``) are written before anything refers to them: a run uploads its
new package and its snapshot blobs, and only then is the version record or the manifest
written. A crash in between leaves a blob nothing refers to. ``collect`` deletes such blobs,
and only those:

- a blob is *referenced* when a version record (``packages/<name>/versions/*.json``) names it
  as its content, when the manifest of a per-file version (that content, ``kind`` "files")
  lists it as one of the version's files, or when a run's snapshot manifest lists it: exactly
  ``runs/<dag>/<run>/<task>/<try>/{data_directory,test_data_directory}.manifest.json``
  (``layout.MANIFEST_NAMES`` in a run folder). Anything else that merely ends in
  ``.manifest.json`` (an artifact, say) is user content, not a record. Aliases and evaluations
  point at versions and runs, whose records are never deleted, so what they reach is kept
  through those; outcomes of runs still in flight are protected by the grace period below.
- a stored package environment (``envs/<key>.json``) references its packed blob. Environments
  unused for longer than ``env_grace`` (default 7 days, never less than the blob grace; last use
  = the newest of the record and its daily ``envs/<key>.used-<day>`` markers) are deleted first
  (``collect_environments``), so their blobs go in the same pass.
- a blob is deleted only when it is unreferenced *and* its ``last_modified`` is older than
  the grace period (default 24 h). An upload in progress, or a run between writing its blob
  and writing the record that names it, is never harmed as long as that gap is shorter than
  the grace period.
- references are read twice: before and after the blobs are listed, and a blob is deleted
  only when neither pass found a reference, so a record written while gc runs is seen.
- the runtime's snapshot hints (``snapshots/*.json``) take the blobs a manifest lists as
  stored without checking each one; that holds because a manifest is written only after its
  blobs and gc keeps every blob a manifest names.
- a *damaged* record (read, but not a valid record: bit rot, a hand edit, or garbage that a
  run's credentials wrote under ``envs/`` or its run folder) is reported in
  ``GcReport.damaged`` by its URI, with the fix, and skipped: one such record must not stop the
  collection of the whole store (a run can write one, and would otherwise hold gc hostage).
  Every sha256 digest still readable in its bytes is kept (``GcReport.salvaged``), so a record
  damaged anywhere but in its digest still protects its blob until it is repaired. What a
  damaged record named beyond that is unknowable; dropping it costs: for an environment record,
  a rebuild of that environment (a cache); for a run's snapshot manifest, nothing that manifest
  did not already lose; for a damaged version record, a digest that is an intact per-file
  manifest keeps the file blobs it lists as well. A damaged *version record* is different: only the CLI and the
  operators write ``packages/`` (runs cannot), and its blob is the only copy of a version; one
  that names no readable digest holds the collection (``GcReport.held``): nothing is deleted
  until it is restored or removed (fail safe: keep).
- a per-file version's manifest that is missing, damaged (it hashes to another digest) or not a
  manifest holds the collection too (``GcReport.manifests``, by its URI, with the fix): which
  file blobs it named is unknowable, and they are the only copy of that version's files, so
  nothing is deleted until the same package is uploaded again (identical content rewrites the
  manifest) or ``aicenter verify --repair FOLDER`` restores it. A manifest is read once per pass
  however many versions name it.
- a record that cannot be *read* (the request failed: access denied, the store unreachable) is
  reported in ``GcReport.unreadable``; gc still reports on the whole store, but deletes nothing
  in that pass: what that record names is unknown, and trying again may read it.

Known limit (documented, not closed): a *new* run that finds an old orphan blob already there
(identical content) and reuses it without rewriting it refers to it only once its manifest or
version is written; if gc deletes that blob in between, the new record names a missing blob.
The runtime verifies every staged blob, so this shows as a clear "does not exist" error, never
as wrong data. Run gc when no training is running if that matters to you.

No Airflow import: it runs from the CLI against any store.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow_aicenter.errors import ConfigurationError, NotFoundError, PackageError, StorageError
from airflow_aicenter.layout import (
    BLOBS,
    ENVS,
    MANIFEST_NAMES,
    PACKAGES,
    RECORD_KEYS,
    RUNS,
    SHA256_HEX,
    LayoutError,
    RunPath,
    blob_key,
    is_digest,
)
from airflow_aicenter.records import BlobRef, DamagedRecordError, Manifest, VersionRecord, oversized, read
from airflow_aicenter.runtime.environment import EnvironmentRecord
from airflow_aicenter.storage.store import ObjectInfo, Store
from airflow_aicenter.storage.transfer import MANIFEST_MAX, REPAIR_ADVICE, DamagedBlobError, read_package_contents

DEFAULT_GRACE_HOURS = 24.0
_TEMP = re.compile(rf"^{SHA256_HEX}#\d+$")
#: A sha256 digest anywhere in a damaged record's bytes (not part of a longer hex run).
_DIGEST_IN = re.compile(rb"(?<![0-9a-f])" + SHA256_HEX.encode() + rb"(?![0-9a-f])")
#: Package environments (runtime/environment.py) unused this long are deleted (never sooner than the blob grace):
#: deleting one costs the next run a cold install, keeping one only storage.
DEFAULT_ENV_GRACE_DAYS = 7.0
_ENV_RECORD = re.compile(rf"^{re.escape(ENVS)}({SHA256_HEX})\.json$")
_ENV_USED = re.compile(rf"^{re.escape(ENVS)}({SHA256_HEX})\.used-\d{{4}}-\d{{2}}-\d{{2}}$")


@dataclass
class GcReport:
    """What gc found and did. ``deleted`` lists digests (what would be deleted with ``dry_run``)."""

    store: str
    grace_hours: float
    dry_run: bool
    blobs: int = 0
    blob_bytes: int = 0
    referenced: int = 0
    young: int = 0  # unreferenced but within the grace period: kept
    deleted: list[str] = field(default_factory=list)
    deleted_bytes: int = 0
    missing: list[str] = field(default_factory=list)  # referenced by a record but not in the store
    records: dict[str, int] = field(default_factory=dict)  # kind -> how many were read
    damaged: dict[str, str] = field(default_factory=dict)  # record URI -> why and the fix: reported, skipped
    salvaged: list[str] = field(default_factory=list)  # digests read from damaged records' bytes: kept
    unreadable: dict[str, str] = field(default_factory=dict)  # record URI -> why; while any, nothing is deleted
    manifests: dict[str, str] = field(default_factory=dict)  # per-file version manifest URI -> why; while any, likewise
    held: str | None = None  # why nothing was deleted in this pass (None: the collection ran)
    environments: int = 0  # stored package environments (envs/<key>.json)
    environments_deleted: list[str] = field(default_factory=list)  # keys unused for longer than env_grace
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class References:
    """What the records name: blob digests, how many records of each kind, and the records that failed.

    ``damaged``: records read but not valid (skipped; ``salvaged`` holds the digests in their
    bytes); ``holding``: damaged version records with no readable digest; ``unreadable``:
    records whose reading failed; ``manifests``: per-file version manifests missing, damaged or
    not manifests (URI -> why, with the fix).
    """

    digests: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: {"versions": 0, "manifests": 0})
    damaged: dict[str, str] = field(default_factory=dict)
    salvaged: set[str] = field(default_factory=set)
    holding: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)

    def hold(self) -> str | None:
        """Why nothing may be deleted on what was read, or None when the collection can go on."""
        if self.unreadable:
            return (f"{len(self.unreadable)} record(s) could not be read, so what they name is unknown: "
                    "nothing deleted; run gc again once the store answers")
        if self.holding:
            return (f"version record(s) {', '.join(self.holding)} are damaged and name no readable blob digest: "
                    "a version's content has no other copy, so nothing was deleted; restore each record from a "
                    "backup or remove it, then run gc again")
        if self.manifests:
            return (f"the manifest(s) {', '.join(self.manifests)} of per-file package versions cannot be read, so which "
                    "file blobs they name is unknown and nothing was deleted: "
                    + "; ".join(self.manifests.values()) + "; then run gc again")
        return None


def is_snapshot_manifest(key: str) -> bool:
    """Whether ``key`` is a run folder's snapshot manifest, not user content that happens to look like one."""
    folder, _, name = key.rpartition("/")
    if name not in MANIFEST_NAMES:
        return False
    try:
        RunPath.parse(folder)
    except LayoutError:
        return False
    return folder.startswith(f"{RUNS}/")


def references(store: Store) -> References:
    """Every blob digest a version record or a snapshot manifest names; unreadable records are reported, not fatal."""
    found = References()
    manifests: dict[str, tuple[BlobRef, list[str]]] = {}  # a per-file version's manifest digest -> it, its versions
    for info in store.list(PACKAGES):
        if RECORD_KEYS["version"].match(info.key):
            record = _read(store, info, VersionRecord, found)
            if record is not None:
                found.digests.add(record.blob.sha256)
                found.counts["versions"] += 1
                if record.blob.kind == "files":
                    manifests.setdefault(record.blob.sha256, (record.blob, []))[1].append(
                        f"{record.package}:{record.version}")
    for ref, versions in manifests.values():
        _package_files(store, ref, versions, found)
    for info in store.list(f"{RUNS}/"):
        if is_snapshot_manifest(info.key):
            manifest = _read(store, info, Manifest, found)
            if manifest is not None:
                found.digests.update(entry.sha256 for entry in manifest.files)
                found.counts["manifests"] += 1
    for info in store.list(ENVS):
        if _ENV_RECORD.match(info.key) and (env := _read(store, info, EnvironmentRecord, found)) is not None:
            found.digests.add(env.blob.sha256)
            found.counts["environments"] = found.counts.get("environments", 0) + 1
    return found


def _read(store: Store, info: ObjectInfo, model: type[Any], found: References) -> Any:
    key = info.key
    try:
        if (too_large := oversized(store, key, info.size)) is not None:
            raise too_large
        return read(store, key, model)
    except NotFoundError:  # deleted between listing and reading: it refers to nothing any more
        return None
    except DamagedRecordError as exc:
        digests = {m.decode() for m in _DIGEST_IN.findall(exc.raw)}
        found.damaged[store.url(key)] = f"{exc} (gc skipped it, keeping the {len(digests)} blob digest(s) read in it)"
        found.salvaged |= digests
        if model is VersionRecord:  # a digest it names may be a per-file version's manifest: keep its files too
            for digest in digests:
                _salvage_manifest(store, digest, found)
        if model is VersionRecord and not digests:
            found.holding.append(store.url(key))
        return None
    except StorageError as exc:
        found.unreadable[store.url(key)] = f"{exc}; check access to that record, then run gc again"
        return None


def _salvage_manifest(store: Store, digest: str, found: References) -> None:
    """Keep the file blobs ``digest`` lists when it is an intact per-file manifest; anything else is left as it is.

    What a damaged version record's content was is unknown, so each digest read in it is tried
    as a manifest: a zip (or a blob too large to be a manifest) is not one and names nothing more.
    """
    try:
        info = store.head(blob_key(digest))
        if info is None or info.size > MANIFEST_MAX:
            return
        contents, _ = read_package_contents(store, BlobRef(sha256=digest, size=info.size, kind="files"))
    except (NotFoundError, DamagedBlobError, PackageError):  # not there, not intact, or not a manifest
        return
    except StorageError as exc:  # the read failed: what it lists is unknown until it can be read
        found.unreadable[store.url(blob_key(digest))] = f"{exc}; check access to that blob, then run gc again"
        return
    found.salvaged |= contents.digests()


def _package_files(store: Store, ref: BlobRef, versions: list[str], found: References) -> None:
    """Add the file blobs the manifest ``ref`` of per-file ``versions`` lists; note it when it cannot be read."""
    uri = store.url(blob_key(ref.sha256))
    try:
        contents, _ = read_package_contents(store, ref)
    except (NotFoundError, DamagedBlobError) as exc:  # missing, damaged (the error says how to repair it)
        found.manifests[uri] = f"version(s) {', '.join(versions)}: {exc}"
        return
    except PackageError as exc:  # intact, but not a manifest this version reads
        found.manifests[uri] = f"version(s) {', '.join(versions)}: {exc}; {REPAIR_ADVICE}"
        return
    except StorageError as exc:  # the read failed: trying again may read it
        found.unreadable[uri] = f"the manifest of version(s) {', '.join(versions)}: {exc}; check access to it, then run gc again"
        return
    found.digests |= contents.digests()


def collect(store: Store, *, grace: timedelta = timedelta(hours=DEFAULT_GRACE_HOURS), dry_run: bool = False,
            now: datetime | None = None, env_grace: timedelta = timedelta(days=DEFAULT_ENV_GRACE_DAYS)) -> GcReport:
    """Delete the blobs nothing refers to that are older than ``grace``; see the module docstring."""
    if grace < timedelta(0):
        raise ConfigurationError(
            f"grace period {grace} is negative; give --grace-hours 0 or more (default {DEFAULT_GRACE_HOURS:g})")
    began = time.perf_counter()
    report = GcReport(store=store.uri, grace_hours=grace.total_seconds() / 3600, dry_run=dry_run)
    collect_environments(store, report, cutoff=(now or datetime.now(UTC)) - max(grace, env_grace))  # frees their blobs
    before = references(store)
    first, report.records = before.digests | before.salvaged, before.counts
    _note(report, before)
    cutoff = (now or datetime.now(UTC)) - grace
    candidates: list[tuple[str, int]] = []
    present: set[str] = set()
    for info in store.list(BLOBS):
        digest = info.key[len(BLOBS):]
        if not is_digest(digest):
            if _TEMP.match(digest) and info.last_modified is not None and info.last_modified <= cutoff and not dry_run:
                store.delete(info.key)  # a killed upload's temporary (file store: <hex>#<n>)
            continue  # not ours (a foreign file): leave it alone
        present.add(digest)
        report.blobs += 1
        report.blob_bytes += info.size
        if digest in first:
            report.referenced += 1
        elif info.last_modified is None or info.last_modified > cutoff:
            report.young += 1
        else:
            candidates.append((digest, info.size))
    after = references(store) if candidates and report.held is None else None  # records written while we listed
    if after is not None:
        _note(report, after)
    if after is not None and report.held is None:  # partial knowledge deletes nothing (fail safe: keep)
        for digest, size in candidates:
            if digest in after.digests or digest in after.salvaged:
                report.referenced += 1
                continue
            if not dry_run:
                try:
                    store.delete(blob_key(digest))
                except NotFoundError:
                    continue
            report.deleted.append(digest)
            report.deleted_bytes += size
    report.missing = sorted(before.digests - present)
    report.seconds = round(time.perf_counter() - began, 3)
    return report


def _note(report: GcReport, found: References) -> None:
    """Add what one reading of the records found wrong to the report (the first reason to hold wins)."""
    report.damaged.update(found.damaged)
    report.unreadable.update(found.unreadable)
    report.manifests.update(found.manifests)
    report.salvaged = sorted(set(report.salvaged) | found.salvaged)
    report.held = report.held or found.hold()


def collect_environments(store: Store, report: GcReport, *, cutoff: datetime) -> None:
    """Delete the stored package environments last used before ``cutoff`` (their blobs follow as unreferenced).

    Last use: the newest of the record and its ``envs/<key>.used-<day>`` markers, which the
    runtime writes (create-once) on the first run of each day that uses the environment. A run
    that read a record just before it goes finds its blob gone, installs again and stores it anew.
    """
    last_used: dict[str, datetime] = {}
    unknown: set[str] = set()  # an object without a modification time: its age is unknown, keep
    markers: dict[str, list[str]] = {}
    records: set[str] = set()
    for info in store.list(ENVS):
        match = _ENV_RECORD.match(info.key) or _ENV_USED.match(info.key)
        if match is None:
            continue
        key = match.group(1)
        markers.setdefault(key, []).append(info.key)
        if info.key.endswith(".json"):
            records.add(key)
        if info.last_modified is None:
            unknown.add(key)
        elif key not in last_used or info.last_modified > last_used[key]:
            last_used[key] = info.last_modified
    report.environments = len(records)
    for key, used in sorted(last_used.items()):
        if key in unknown or used > cutoff:
            continue
        if not report.dry_run:
            for name in sorted(markers[key], key=lambda k: not k.endswith(".json")):  # the record first
                try:
                    store.delete(name)
                except NotFoundError:
                    continue
        if key in records:
            report.environments_deleted.append(key)
