"""Incremental training: stage only the files that are new or changed since the parent's training snapshot.

The operator resolves ``incremental=True`` to the parent version's training-data snapshot (a
manifest: path -> sha256, size, and the source object's ETag when it was staged) and passes
its URI as ``RunSpec.incremental_base``. Staging lists the dataset and compares each object:

- not in the base, or another size: new or changed, downloaded;
- same size and the same fingerprint as recorded (the S3 ETag; on a file store, which lists
  no ETag, the modification time): unchanged, not downloaded;
- otherwise (another fingerprint, or none recorded: a snapshot older than fingerprints, a
  mounted dataset): downloaded and hashed; the same digest as the base means unchanged, and
  the copy is removed.

A full staging records fingerprints too (:func:`list_fingerprints`, listed before the
download), so the first incremental run after it compares without downloading.

``data_directory`` then holds only the new and changed files. The snapshot of the run (with
``save_training_data``) is the whole dataset as of now: the staged files plus the unchanged ones
carried over from the base manifest, whose blobs the base manifest vouches for (each checked
before compute as a re-snapshot checks them: check_carried), so they are neither downloaded
nor uploaded. It records every file's fingerprint, so the next incremental run compares
without downloading.

Nothing new or changed: :class:`NothingNew` with the reason; the agent reports the run as
``skipped`` and the operator skips the task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from airflow_aicenter.errors import AICenterError, ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.records import Manifest, ManifestEntry, VersionRecord, read
from airflow_aicenter.runtime.snapshot import check_vouched
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.store import ObjectInfo
from airflow_aicenter.storage.transfer import FileEntry, download_file, gather_limited, run


class NothingNew(Exception):
    """The dataset has no file that is new or changed since the base snapshot; ``str()`` is the reason."""


@dataclass
class IncrementalStaging:
    """What an incremental staging found: the staged (new, changed) files and the carried-over ones."""

    staged: list[FileEntry] = field(default_factory=list)
    carried: list[ManifestEntry] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)  # path -> fingerprint, for the staged files
    new: int = 0
    changed: int = 0
    removed: int = 0
    compared_by_digest: int = 0  # downloaded only to find them unchanged (no matching fingerprint to go by)

    def summary(self) -> str:
        return (f"{self.new} new, {self.changed} changed, {len(self.carried)} unchanged (not staged), "
                f"{self.removed} removed since the base snapshot")


def fingerprint(info: ObjectInfo) -> str | None:
    """What tells a changed object from an unchanged one without reading it: the ETag, else the mtime."""
    if info.etag:
        return info.etag
    if info.last_modified is not None:
        return f"mtime:{info.last_modified.isoformat()}"
    return None


def list_fingerprints(source: Store) -> dict[str, str]:
    """Every object's fingerprint, listed BEFORE a full staging so its snapshot lets the next incremental run
    compare without downloading.

    Listed before the download, a fingerprint is never newer than the content staged: an object
    rewritten in between shows a fingerprint that no longer matches, and is compared by digest.
    """
    return {info.key: mark for info in source.list("") if not info.key.endswith("/") and (mark := fingerprint(info))}


def require_base(version: VersionRecord) -> str:
    """The operator's check before compute: ``incremental=True`` needs the parent version's training snapshot.

    Returns the snapshot manifest URI to pass as ``RunSpec.incremental_base``.
    """
    if not version.snapshot:
        raise ConfigurationError(
            f"incremental=True needs the training-data snapshot of {version.package} {version.version}, and it has none "
            f"(it was {'uploaded' if version.pipeline == 'upload' else 'trained without save_training_data=True'}); "
            "train it once with save_training_data=True, or run without incremental=True"
        )
    return version.snapshot


def read_base(store: Store, uri: str) -> Manifest:
    """The base snapshot manifest, by URI (normally under ``store``)."""
    try:
        if uri.startswith(store.uri + "/"):
            return read(store, uri[len(store.uri) + 1:], Manifest)
        folder, _, name = uri.rstrip("/").rpartition("/")
        return read(open_store(folder, create=False), name, Manifest)
    except NotFoundError:
        raise DatasetError(
            f"the parent version's training snapshot {uri} does not exist; train without incremental=True "
            "(or from a version trained with save_training_data=True)"
        ) from None


def base_written(store: Store, uri: str) -> datetime | None:
    """When the base snapshot manifest was written, by the store's clock (None: not known)."""
    try:
        if uri.startswith(store.uri + "/"):
            info = store.head(uri[len(store.uri) + 1:])
        else:
            folder, _, name = uri.rstrip("/").rpartition("/")
            info = open_store(folder, create=False).head(name)
    except AICenterError:
        return None
    return None if info is None else info.last_modified


def check_carried(store: Store, base: Manifest, carried: list[ManifestEntry], uri: str) -> None:
    """Every carried-over blob must be stored intact: they go into the new snapshot without being uploaded.

    The rule of a re-snapshot (snapshot.check_vouched): blobs are create-once, so one unmodified
    since the base manifest was written is intact; one modified after it is hashed in full. A
    manifest that carried a damaged blob would vouch for it, and the next re-snapshot of the
    dataset would trust it instead of repairing it; so a missing or damaged one stops the run
    before compute, naming the full run that stores it again.
    """
    sizes = {e.sha256: e.size for e in carried}
    if not sizes:
        return
    states = run(check_vouched(store, sizes, base_written(store, uri)))
    paths = {e.sha256: e.path for e in carried}
    for digest, state in sorted(states.items()):
        if state in ("missing", "refused"):  # run credentials get 403 for an absent blob
            raise DatasetError(
                f"the parent version's training snapshot {uri} names blob sha256:{digest[:12]}..., which is gone from "
                "the store (or, with runtime_role_arn, not readable with the run's credentials); train without "
                "incremental=True to take a full snapshot again"
            )
        if state == "damaged":
            raise DatasetError(
                f"the parent version's training snapshot {uri} names {paths[digest]} as blob sha256:{digest[:12]}..., "
                "which is damaged in the store (its content no longer hashes to its name); train without "
                "incremental=True: its full snapshot rewrites the blob from the data (or `aicenter verify --repair` "
                "from a copy of it)"
            )


def stage_incremental(
    source: Store, dest: Path, base: Manifest, log: Callable[[str], None],
) -> IncrementalStaging:
    """Download into ``dest`` the objects of ``source`` that are new or changed since ``base``."""
    known = {entry.path: entry for entry in base.files}
    listing = [info for info in source.list("") if not info.key.endswith("/")]
    if not listing:
        raise DatasetError(f"dataset {source.uri} is empty or does not exist; upload the data there or fix the dataset URI")
    result = IncrementalStaging()
    to_fetch: list[tuple[ObjectInfo, ManifestEntry | None]] = []
    for info in listing:
        before = known.get(info.key)
        mark = fingerprint(info)
        if before is not None and before.size == info.size and before.etag is not None and before.etag == mark:
            result.carried.append(before)
        else:
            to_fetch.append((info, before))
    listed = {info.key for info in listing}
    result.removed = sum(1 for path in known if path not in listed)
    root = dest.resolve()

    async def one(item: tuple[ObjectInfo, ManifestEntry | None]) -> None:
        info, before = item
        target = (root / info.key).resolve()
        if not target.is_relative_to(root):
            raise DatasetError(f"dataset object {info.key!r} would be written outside the data folder; rename it")
        got = await download_file(source, info.key, target, size=info.size, etag=info.etag)
        mark = fingerprint(info)
        if before is not None and before.sha256 == got.sha256:  # same content, another fingerprint: unchanged
            result.compared_by_digest += 1
            target.unlink()
            result.carried.append(before.model_copy(update={"etag": mark}))
            return
        if before is None:
            result.new += 1
        else:
            result.changed += 1
        result.staged.append(FileEntry(info.key, got.sha256, got.size))
        if mark is not None:
            result.fingerprints[info.key] = mark

    run(gather_limited(to_fetch, one))
    _prune_empty_dirs(root)
    result.staged.sort(key=lambda e: e.path)
    result.carried.sort(key=lambda e: e.path)
    log(f"incremental staging of {source.uri}: {result.summary()}"
        + (f"; {result.compared_by_digest} unchanged files downloaded to compare by digest"
           if result.compared_by_digest else ""))
    if not result.staged:
        raise NothingNew(f"no new or changed files in {source.uri} since the parent's training snapshot "
                         f"({len(result.carried)} unchanged, {result.removed} removed)")
    return result


def _prune_empty_dirs(root: Path) -> None:
    """Folders that held only unchanged files (downloaded to compare, then removed) go too."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
