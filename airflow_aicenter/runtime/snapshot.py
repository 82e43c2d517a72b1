"""Snapshots of data folders: a manifest (path -> digest, size) over the content-addressed blob store.

A blob's key is its digest, so data that is already stored is never written again. What
makes a re-snapshot of a large dataset cheap is knowing *which* digests are stored without
asking the store once per file: after each snapshot of a source (a dataset URI) the runtime
leaves a hint, ``snapshots/<sha256 of the source>.json``, naming that snapshot's manifest.
The next snapshot of the same source reads the hint and the manifest (two GETs) and takes
the digests it lists as stored: a manifest is written only after all its blobs, and ``gc``
never deletes a blob a manifest names. Only the digests the last manifest does not list
(new or changed files) are checked and uploaded.

The hint is never authoritative: a missing or unreadable hint or manifest, a source that
does not match, or one missing blob in a random sample of the vouched-for digests, and the
snapshot falls back to checking every digest (a listing or HEADs, then a full hash of each
blob that is there: ensure_blobs). The vouched-for blobs are not read back: that would read the
whole dataset from the store on every run. A blob damaged after the snapshot that wrote it is
still never used: every download verifies its digest, and `aicenter verify` finds it and, with
`--repair`, rewrites it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from airflow_aicenter.errors import AICenterError
from airflow_aicenter.layout import blob_key, snapshot_hint_key
from airflow_aicenter.records import Manifest, ManifestEntry, SnapshotHint, read_optional, write
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import BlobStats, FileEntry, ensure_blobs, run

#: How many vouched-for digests are checked with a HEAD before the hint is trusted.
SAMPLE = 8


def stored_by_hint(store: Store, source: str | None, digests: set[str], log: Callable[[str], None]) -> set[str]:
    """The digests among ``digests`` that the last snapshot of ``source`` proves stored (maybe none)."""
    if not source or not digests:
        return set()
    try:
        hint = read_optional(store, snapshot_hint_key(source), SnapshotHint)
        if hint is None or hint.source != source:
            return set()
        manifest = read_optional(store, hint.manifest, Manifest)
        if manifest is None:
            return set()
        known = digests & {entry.sha256 for entry in manifest.files}
        sample = random.sample(sorted(known), min(SAMPLE, len(known)))
        if any(not store.exists(blob_key(d)) for d in sample):
            log(f"the last snapshot of {source} names blobs that are gone; checking every file")
            return set()
    except AICenterError as exc:  # a hint must never fail a run
        log(f"snapshot hint for {source} not usable ({exc}); checking every file")
        return set()
    return known


def take_snapshot(
    store: Store, folder: Path, entries: Sequence[FileEntry], *, source: str | None, directory: str, key: str,
    log: Callable[[str], None], carried: Sequence[ManifestEntry] = (), fingerprints: Mapping[str, str] | None = None,
) -> BlobStats:
    """Store the blobs of ``entries`` that are missing, then the manifest at ``key``, then the hint.

    ``carried`` are files of the dataset that were not staged (an incremental run's unchanged
    files): listed in the manifest as they are, their blobs vouched for by the manifest they come
    from. ``fingerprints`` (path -> source ETag or mtime) let the next incremental run compare
    without downloading.
    """
    known = stored_by_hint(store, source, {e.sha256 for e in entries}, log)
    stats = run(ensure_blobs(store, folder, entries, known=known))
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
