"""Snapshots of data folders: a manifest (path -> digest, size) over the content-addressed blob store.

A blob's key is its digest, so data that is already stored is never written again. What
makes a re-snapshot of a large dataset cheap is not reading back the blobs that are stored:
after each snapshot of a source (a dataset URI) the runtime leaves a hint,
``snapshots/<sha256 of the source>.json``, naming that snapshot's manifest. The next snapshot
of the same source reads the hint and the manifest and takes the digests it lists as
*vouched for*: a manifest is written only after all its blobs were verified (hashed in full
or uploaded, or vouched for in turn; an incremental run's carried-over blobs are checked the
same way before compute: incremental.check_carried), and ``gc`` never deletes a blob a
manifest names.

Vouched for is not trusted blindly: a blob may be deleted, or damaged in place (one byte
flipped keeps its size), after the manifest was written. Blobs are create-once, so an intact
blob is never modified after the manifest that names it: the metadata of each vouched-for blob
is looked up (no bytes: a HEAD each, concurrently, or on S3 for many a listing of the blob
prefix), and one that is missing, of another size, or modified *strictly after* the manifest
(the manifest's own HEAD) is not vouched for. One modified after is read back and hashed (a
repair by `aicenter verify --repair` rewrites a blob intact); one missing or damaged is
rewritten from the staged file by ensure_blobs, and the log names it as repaired. Those and
the digests the last manifest does not list (new or changed files) are checked the full way
(ensure_blobs). Nothing is read back in the usual case: a re-snapshot of unchanged data costs
a HEAD per distinct file (on S3 from 1,000 files on, a listing request per 1,000), not a
download of the dataset.

Both times come from the store's clock (S3 sets Last-Modified, a file system the mtime, when
the bytes are written), so the clocks of the workers do not enter. S3 reports whole seconds
and a file system its clock tick: a change within the same second (tick) as the manifest
write looks no later than it and is let through; so is a modification made with an old time
set on purpose (``touch -d``, ``cp -p``, ``rsync -t`` of damaged bytes on a file store). Such a
blob is still never used: every download verifies its digest, and `aicenter verify` finds it
and, with ``--repair``, rewrites it. A blob rewritten intact after the manifest is hashed once
more by the next snapshot, then vouched for by that snapshot's newer manifest.

The manifest's time is a little later than the checks it records: a blob damaged after it was
checked or uploaded and before the manifest was written looks unmodified to the next
snapshot. So the vouched-for blobs are checked last, after the new and changed files are
uploaded and right before the manifest is written, which keeps that moment to the check itself.

The hint is never authoritative: a missing or unreadable hint or manifest, or a source that
does not match, and the snapshot checks every digest (a listing or HEADs, then a full hash of
each blob that is there: ensure_blobs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from airflow_aicenter.errors import AccessDeniedError, AICenterError, DatasetError
from airflow_aicenter.layout import blob_key, snapshot_hint_key
from airflow_aicenter.records import BlobRef, Manifest, ManifestEntry, SnapshotHint, read_optional, write
from airflow_aicenter.storage import Store, transfer
from airflow_aicenter.storage.cache import BlobCache
from airflow_aicenter.storage.store import ObjectInfo
from airflow_aicenter.storage.transfer import (
    BlobStats,
    FileEntry,
    blob_state_async,
    ensure_blobs,
    gather_limited,
    run,
    stored_digests,
)

#: Damaged or missing blobs named one by one in the log line that reports a repair; the rest are counted.
NAMED = 5


#: What a vouched-for blob was found to be; "refused": its metadata may not be read with these
#: credentials, so it is neither known nor named as broken (ensure_blobs decides).
Found = Literal["ok", "missing", "damaged", "refused"]


@dataclass(frozen=True)
class Vouched:
    """What the last snapshot of a source proves about the digests of a new one.

    ``known``: stored and intact (unmodified since the manifest naming them, or hashed);
    ``broken``: digest -> "missing" or "damaged", left for ensure_blobs to rewrite from the
    staged files; ``manifest``: the vouching manifest's key.
    """

    known: frozenset[str] = frozenset()
    broken: Mapping[str, Found] = field(default_factory=dict)
    manifest: str | None = None


def modified_after(blob: datetime, manifest: datetime, *, whole_seconds: bool) -> bool:
    """Whether a blob's last modification is strictly later than the manifest's.

    With ``whole_seconds`` (S3: Last-Modified is reported in seconds, by HEAD at least) both
    are compared at that precision, so a blob written in the same second as its manifest, the
    normal case for a small snapshot, is not taken as modified after it.
    """
    if whole_seconds:
        blob, manifest = blob.replace(microsecond=0), manifest.replace(microsecond=0)
    return blob > manifest


async def _head(store: Store, key: str) -> ObjectInfo | Literal["refused"] | None:
    """HEAD a blob: its metadata, None when absent, or "refused".

    S3 answers 403 for an absent key to whoever may not list the bucket (run credentials), and
    some servers refuse a HEAD that a GET would be allowed: such a blob is not vouched for, and
    not named as missing either (ensure_blobs looks it up and creates it only where absent).
    """
    try:
        return await store.head_async(key)
    except AccessDeniedError:
        return "refused"


async def check_vouched(store: Store, sizes: Mapping[str, int], since: datetime | None) -> dict[str, Found]:
    """The state of each blob in ``sizes`` (digest -> size) that a manifest written at ``since`` names.

    Its metadata, concurrently: missing; another size (damaged); unmodified since ``since``
    (ok, not read); modified after it, or ``since`` not known: read back and hashed in full
    (ok or damaged). The metadata comes from a HEAD each, or on S3, for LIST_MIN_FILES blobs
    or more, from a listing of the blob prefix (1,000 a request), as ensure_blobs finds blobs;
    run credentials list no blob, and get HEADs.
    """
    whole_seconds = store.scheme != "file"
    listed: dict[str, ObjectInfo] | None = None
    unknown: set[str] = set()
    if store.scheme == "s3" and len(sizes) >= transfer.LIST_MIN_FILES:
        try:
            listed, unknown = await stored_digests(store, set(sizes))
        except AccessDeniedError:
            listed = None

    async def one(digest: str) -> Found:
        info: ObjectInfo | Literal["refused"] | None
        if listed is not None and digest not in unknown:
            info = listed.get(digest)
        else:
            info = await _head(store, blob_key(digest))
        if info is None:
            return "missing"
        if info == "refused":
            return "refused"
        if info.size != sizes[digest]:
            return "damaged"
        if since is not None and info.last_modified is not None and not modified_after(
            info.last_modified, since, whole_seconds=whole_seconds
        ):
            return "ok"
        return await blob_state_async(store, digest)

    digests = sorted(sizes)
    return dict(zip(digests, await gather_limited(digests, one), strict=True))


def vouched_by_version(
    store: Store,
    ref: BlobRef,
    sizes: Mapping[str, int] | None = None,
    *,
    cache: BlobCache | None = None,
    on_error: Callable[[AICenterError], None] | None = None,
) -> frozenset[str]:
    """The file blobs a per-file version's manifest vouches for: intact without a read-back.

    A version's manifest is written only after every blob it names was verified, and blobs are
    create-once, so one of the right size not modified after the manifest is the one that was
    verified (check_vouched, the rule re-snapshots use). ``sizes`` (digest -> size) limits the
    answer to those blobs, else every file the manifest lists. A zip version vouches for nothing,
    and so does any error (``on_error`` hears it): every stored blob is then read back, as before.
    The one rule a new release (the newest upload) and a training (its parent) use.
    """
    if ref.kind != "files":
        return frozenset()
    try:
        written = store.head(blob_key(ref.sha256))
        if written is None or written.last_modified is None:
            return frozenset()
        listed = {f.sha256: f.size for f in transfer.read_package_contents(store, ref, cache=cache)[0].files}
        wanted = listed if sizes is None else {d: size for d, size in sizes.items() if d in listed}
        states = run(check_vouched(store, wanted, written.last_modified))
    except AICenterError as exc:
        if on_error is not None:
            on_error(exc)
        return frozenset()
    return frozenset(digest for digest, state in states.items() if state == "ok")


@dataclass(frozen=True)
class LastSnapshot:
    """The last snapshot of a source, as its hint names it: the manifest, when it was written, what it lists."""

    manifest: str
    written: datetime
    digests: frozenset[str]


def last_snapshot(store: Store, source: str | None, digests: set[str], log: Callable[[str], None]) -> LastSnapshot | None:
    """The last snapshot of ``source`` and which of ``digests`` it lists (None: no usable hint)."""
    if not source or not digests:
        return None
    try:
        hint = read_optional(store, snapshot_hint_key(source), SnapshotHint)
        if hint is None or hint.source != source:
            return None
        # HEAD before GET: a manifest rewritten in between only makes more blobs look modified after it.
        written = store.head(hint.manifest)
        if written is None or written.last_modified is None:
            return None
        manifest = read_optional(store, hint.manifest, Manifest)
        if manifest is None:
            return None
    except AICenterError as exc:  # a hint must never fail a run
        log(f"snapshot hint for {source} not usable ({exc}); checking every file")
        return None
    listed = frozenset({entry.sha256 for entry in manifest.files} & digests)
    return LastSnapshot(manifest=hint.manifest, written=written.last_modified, digests=listed)


def vouched_blobs(store: Store, last: LastSnapshot, sizes: Mapping[str, int], log: Callable[[str], None]) -> Vouched:
    """What ``last`` proves about the blobs it lists (``sizes``: digest -> size): check_vouched."""
    try:
        states = run(check_vouched(store, sizes, last.written))
    except AICenterError as exc:  # the full check (ensure_blobs) decides instead
        log(f"could not check the blobs that the last snapshot {last.manifest} names ({exc}); checking every file")
        return Vouched()
    return Vouched(known=frozenset(d for d, s in states.items() if s == "ok"),
                   broken={d: s for d, s in states.items() if s in ("missing", "damaged")},
                   manifest=last.manifest)


def _repaired(source: str, manifest: str | None, broken: Mapping[str, Found]) -> str:
    """The log line for vouched-for blobs found missing or damaged and rewritten from the staged files."""
    items = sorted(broken.items())
    named = ", ".join(f"sha256:{digest[:12]} ({state})" for digest, state in items[:NAMED])
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return (f"repaired {len(items)} blob{'s' if len(items) != 1 else ''} that the last snapshot of {source} "
            f"({manifest}) names and that were gone or damaged in the store since it was written: "
            f"{named}{more}; rewritten from the staged files")


def _check_carried(store: Store, carried: Sequence[ManifestEntry], sizes: Mapping[str, int], vouched: Vouched) -> None:
    """The carried-over blobs (``sizes``: those not staged too) must still be intact as the manifest is written.

    They were checked before compute (incremental.check_carried), but a run computes for hours:
    one damaged since would be vouched for by this manifest and never repaired by a re-snapshot.
    Those the last snapshot vouches for were just checked with the staged ones; the others are
    hashed in full. They cannot be repaired here (their files were not staged): a DatasetError
    names the file and the full run that rewrites the blob.
    """
    if not sizes:
        return
    states: dict[str, Found] = {d: state for d, state in vouched.broken.items() if d in sizes}
    unchecked = {d: size for d, size in sizes.items() if d not in vouched.known and d not in states}
    if unchecked:
        states |= run(check_vouched(store, unchecked, None))
    bad = sorted((d, state) for d, state in states.items() if state != "ok")
    if bad:
        digest, state = bad[0]
        path = next(e.path for e in carried if e.sha256 == digest)
        what = ("is damaged in the store (its content no longer hashes to its name)" if state == "damaged" else
                "is gone from the store (or, with runtime_role_arn, not readable with the run's credentials)")
        more = f" ({len(bad) - 1} more carried-over blobs too)" if len(bad) > 1 else ""
        raise DatasetError(
            f"{path} (blob sha256:{digest[:12]}...), carried over unchanged from the parent version's training "
            f"snapshot, {what}: it changed while this run computed, after it was checked{more}; no snapshot was "
            "written. Train without incremental=True: its full snapshot rewrites the blob from the data (or "
            "`aicenter verify --repair` rewrites it from a copy of it)"
        )


def take_snapshot(
    store: Store, folder: Path, entries: Sequence[FileEntry], *, source: str | None, directory: str, key: str,
    log: Callable[[str], None], carried: Sequence[ManifestEntry] = (), fingerprints: Mapping[str, str] | None = None,
) -> BlobStats:
    """Store the blobs of ``entries`` that are missing or damaged, then the manifest at ``key``, then the hint.

    ``carried`` are files of the dataset that were not staged (an incremental run's unchanged
    files): listed in the manifest as they are, their blobs vouched for by the manifest they come
    from and checked again here (a damaged one is a DatasetError: without its file it cannot be
    rewritten). ``fingerprints`` (path -> source ETag or mtime) let the next incremental run
    compare without downloading.
    """
    staged = {e.sha256: e.size for e in entries}
    carried_sizes = {e.sha256: e.size for e in carried if e.sha256 not in staged}
    sizes = carried_sizes | staged
    last = last_snapshot(store, source, set(sizes), log)
    listed = last.digests if last else frozenset()
    # New and changed files first (the long part), then the check of the vouched-for blobs, right
    # before the manifest is written: a blob damaged after its check and before the manifest would
    # look unmodified to the next snapshot, so that moment is kept short.
    fresh = run(ensure_blobs(store, folder, [e for e in entries if e.sha256 not in listed]))
    vouched = vouched_blobs(store, last, {d: sizes[d] for d in listed}, log) if last else Vouched()
    again = run(ensure_blobs(store, folder, [e for e in entries if e.sha256 in listed], known=vouched.known))
    repaired = {d: state for d, state in vouched.broken.items() if d in staged}
    if repaired and source:
        log(_repaired(source, vouched.manifest, repaired))
    _check_carried(store, carried, carried_sizes, vouched)
    stats = BlobStats(files=len(entries), bytes=fresh.bytes + again.bytes,
                      uploaded_files=fresh.uploaded_files + again.uploaded_files,
                      uploaded_bytes=fresh.uploaded_bytes + again.uploaded_bytes)
    marks = fingerprints or {}
    files = [ManifestEntry(path=e.path, sha256=e.sha256, size=e.size, etag=marks.get(e.path)) for e in entries]
    files = sorted([*files, *carried], key=lambda e: e.path)
    total = stats.bytes + sum(e.size for e in carried)
    if carried:
        stats = BlobStats(files=len(files), bytes=total, uploaded_files=stats.uploaded_files,
                          uploaded_bytes=stats.uploaded_bytes)
    manifest = Manifest(source=source, directory=directory, files=files, file_count=len(files), total_bytes=total)
    write(store, key, manifest)
    if source:
        try:
            write(store, snapshot_hint_key(source), SnapshotHint(source=source, manifest=key))
        except AICenterError as exc:
            log(f"could not leave a snapshot hint ({exc}); the next snapshot of {source} checks every file")
    return stats
