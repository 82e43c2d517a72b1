"""Checkpoints: what package code writes to ``checkpoint_directory`` survives preemption and retries.

Layout under the task's checkpoint prefix (``runs/<dag>/<run>/<task>/checkpoints/``, shared by
all tries of the task)::

    objects/<sha256>         file content, content-addressed: a file unchanged since the last
                             sync is never uploaded again
    manifests/<seq>.json     one per sync (path -> sha256, size, mtime; the try that wrote it),
                             created once (If-None-Match / O_EXCL), after every object it names

Objects live beside the task rather than in ``blobs/sha256/``: a checkpoint is working state
replaced every few minutes, so it is pruned here (only the objects of the last KEEP manifests
stay) without teaching ``gc`` about it, and a run's least-privilege credentials may already
write the task's ``checkpoints/``.

Atomicity, with a crash at any point: a sync uploads the objects it needs, then creates the
next manifest. Killed before the manifest, it leaves objects that nothing names (the next sync
prunes them); ``restore`` only ever reads manifests, newest first, and takes the first whose
objects all download and verify, so a half sync is never restored. Create-once manifest keys
mean two writers (a try that was given up on but still runs, and its retry) never overwrite
each other's checkpoint; a manifest naming an object the other writer pruned fails
verification and the previous one is restored.

The sync compares each file with the last manifest by size and mtime first (no read), then by
digest, so a 2 GB model that did not change costs one ``stat``. A file that changes while it is
being synced (the package is writing it) abandons that sync, which never commits a torn file;
the next one, or the final sync after the package stopped, takes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import Field

from airflow_aicenter.crashpoints import crash_point
from airflow_aicenter.errors import AccessDeniedError, AICenterError, AlreadyExistsError, StorageError
from airflow_aicenter.layout import (
    CHECKPOINT_MANIFESTS,
    CHECKPOINT_OBJECTS,
    checkpoint_manifest_key,
    checkpoint_object_key,
    is_digest,
)
from airflow_aicenter.records import Record, read, utcnow, write
from airflow_aicenter.secrets import Redactor
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import (
    BlobStats,
    check_names,
    download_file,
    gather_limited,
    local_files,
    run,
    sha256_file,
    upload_file,
)

#: Manifests kept after a sync (the newest is restored; the one before is its fallback).
KEEP = 2
#: Tries of a create-once manifest write that lost a race to another writer.
_COMMIT_TRIES = 5
#: An object that is not a digest (a put's temporary) is pruned only once this old: it may be
#: another writer's upload in flight.
TEMP_MAX_AGE = timedelta(hours=1)


class CheckpointFile(Record):
    path: str
    sha256: str
    size: int
    mtime_ns: int


class CheckpointManifest(Record):
    """One complete checkpoint: every file of ``checkpoint_directory`` at one sync."""

    seq: int
    try_number: int | None = None
    files: list[CheckpointFile]
    bytes: int
    created_at: datetime = Field(default_factory=utcnow)


class FileChanged(Exception):
    """A checkpoint file changed while it was being synced: this sync is abandoned, the next one takes it."""


class CheckpointSync:
    """Restore before ``Main()``, sync in the background every ``interval`` seconds, and a final sync."""

    def __init__(
        self, store: Store, prefix: str, local_dir: Path, interval: float, log: Callable[[str], None], *,
        try_number: int | None = None, secrets: Redactor | None = None,
    ) -> None:
        self.store = store
        self.secrets = secrets  # a file name holding one is refused (transfer.check_names), never synced
        self.prefix = prefix.rstrip("/") + "/"
        self.local_dir = local_dir
        self.interval = interval
        self.log = log
        self.try_number = try_number
        self.last: CheckpointManifest | None = None  # the latest complete checkpoint this process knows
        self.resumed_from_try: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- keys ----------------------------------------------------------------------------
    def object_key(self, sha256: str) -> str:
        return checkpoint_object_key(self.prefix, sha256)

    def manifest_key(self, seq: int) -> str:
        return checkpoint_manifest_key(self.prefix, seq)

    def manifest_seqs(self) -> list[int]:
        """Sequence numbers of the stored manifests, ascending."""
        seqs = []
        for info in self.store.list(f"{self.prefix}{CHECKPOINT_MANIFESTS}"):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and name[:-5].isdigit():
                seqs.append(int(name[:-5]))
        return sorted(seqs)

    # -- restore -------------------------------------------------------------------------
    def restore(self) -> CheckpointManifest | None:
        """Put the latest complete checkpoint into ``local_dir`` (before ``Main()``); None when there is none."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for seq in reversed(self.manifest_seqs()):
            try:
                manifest = read(self.store, self.manifest_key(seq), CheckpointManifest)
                run(self._download(manifest))
            except AICenterError as exc:
                self.log(f"WARNING: checkpoint {seq} cannot be restored ({exc}); trying the one before")
                _empty(self.local_dir)
                continue
            self.last, self.resumed_from_try = manifest, manifest.try_number
            self.log(f"restored checkpoint of try {manifest.try_number}: {len(manifest.files)} files, "
                     f"{manifest.bytes} bytes")
            return manifest
        self.log(f"no checkpoint to restore under {self.store.url(self.prefix)}; checkpoint_directory starts empty")
        return None

    async def _download(self, manifest: CheckpointManifest) -> None:
        root = self.local_dir.resolve()

        async def one(entry: CheckpointFile) -> None:
            target = (root / entry.path).resolve()
            if not target.is_relative_to(root) or target == root:
                raise StorageError(f"checkpoint {manifest.seq} names {entry.path!r}, outside checkpoint_directory")
            await download_file(self.store, self.object_key(entry.sha256), target, expect_sha256=entry.sha256)
            # The file's mtime as synced: the next sync sees it unchanged without reading it.
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns))

        await gather_limited(manifest.files, one)

    # -- sync ----------------------------------------------------------------------------
    def sync(self) -> BlobStats | None:
        """Upload changed files, then commit them with a new manifest; None when nothing changed."""
        with self._lock:
            return self._sync()

    def _sync(self) -> BlobStats | None:
        previous = {f.path: f for f in self.last.files} if self.last else {}
        stored = {f.sha256 for f in previous.values()}
        entries: list[CheckpointFile] = []
        hashed: list[CheckpointFile] = []
        rels = local_files(self.local_dir) if self.local_dir.is_dir() else []
        check_names(self.local_dir, rels, secrets=self.secrets, label="checkpoint_directory")
        for rel in rels:
            path = self.local_dir / rel
            st = path.stat()
            known = previous.get(rel)
            if known is not None and (known.size, known.mtime_ns) == (st.st_size, st.st_mtime_ns):
                entries.append(known)
                continue
            digest = sha256_file(path)
            entry = CheckpointFile(path=rel, sha256=digest.sha256, size=digest.size, mtime_ns=st.st_mtime_ns)
            entries.append(entry)
            hashed.append(entry)
        if self.last is not None and _content(entries) == _content(self.last.files):
            self.last = self.last.model_copy(update={"files": entries})  # same content; remember the new mtimes
            return None
        if self.last is None and not entries:
            return None
        uploads = {e.sha256: e for e in hashed if e.sha256 not in stored}
        run(gather_limited(list(uploads.values()), self._upload))
        for entry in hashed:  # written to while we read it: never commit a torn file
            st = (self.local_dir / entry.path).stat()
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                raise FileChanged(f"{entry.path} changed while it was being synced")
        crash_point("checkpoint_manifest")
        manifest = self._commit(entries)
        self.last = manifest
        self._ensure_objects(entries)
        self._prune(manifest.seq)
        return BlobStats(seq=manifest.seq, files=len(entries), bytes=manifest.bytes,
                         uploaded_files=len(uploads), uploaded_bytes=sum(e.size for e in uploads.values()))

    def _ensure_objects(self, entries: list[CheckpointFile]) -> None:
        """Every object the new manifest names is there (another writer's prune may have raced ours).

        A try given up on may still be syncing beside its retry; an object one of them skipped as
        "already stored" can be pruned by the other just before this manifest is listed. Missing
        ones are uploaded again from the local files (which the manifest describes).
        """
        present = {info.key.rsplit("/", 1)[-1] for info in self.store.list(f"{self.prefix}{CHECKPOINT_OBJECTS}")}
        missing = list({e.sha256: e for e in entries if e.sha256 not in present}.values())
        if missing:
            run(gather_limited(missing, self._upload))

    async def _upload(self, entry: CheckpointFile) -> None:
        key = self.object_key(entry.sha256)
        try:
            there = await self.store.head_async(key) is not None
        except AccessDeniedError:  # run credentials: S3 answers 403 for an absent key; the create decides
            there = False
        if there:
            return
        try:
            await upload_file(self.store, self.local_dir / entry.path, key, create=True, expect_sha256=entry.sha256)
        except AlreadyExistsError:
            return
        except StorageError as exc:
            if "changed while it was being stored" in str(exc):
                raise FileChanged(f"{entry.path} changed while it was being synced") from exc
            raise

    def _commit(self, entries: list[CheckpointFile]) -> CheckpointManifest:
        seqs = self.manifest_seqs()
        seq = max([*seqs, self.last.seq if self.last else 0]) + 1
        for _ in range(_COMMIT_TRIES):
            manifest = CheckpointManifest(seq=seq, try_number=self.try_number, files=entries,
                                          bytes=sum(e.size for e in entries))
            try:
                write(self.store, self.manifest_key(seq), manifest, create=True)
                return manifest
            except AlreadyExistsError:  # another writer took this number: take the next one
                seq = max([*self.manifest_seqs(), seq]) + 1
        raise StorageError(f"could not commit a checkpoint under {self.store.url(self.prefix)}: "
                           f"{_COMMIT_TRIES} other writers took each sequence number; is another try still running?")

    def _prune(self, newest: int) -> None:
        """Keep the last KEEP manifests and the objects they name; the rest (and half syncs) go."""
        try:
            seqs = self.manifest_seqs()
            # Manifests after ours are another writer's: kept, with their objects.
            kept = [s for s in seqs if s > newest] + [s for s in seqs if s <= newest][-KEEP:]
            old = [s for s in seqs if s not in kept]
            for seq in old:
                self.store.delete(self.manifest_key(seq))
            names = set()
            for seq in kept:
                names |= {f.sha256 for f in read(self.store, self.manifest_key(seq), CheckpointManifest).files}
            stale = datetime.now(UTC) - TEMP_MAX_AGE
            for info in self.store.list(f"{self.prefix}{CHECKPOINT_OBJECTS}"):
                name = info.key.rsplit("/", 1)[-1]
                if not is_digest(name):  # another writer's upload in flight, or one killed long ago
                    if info.last_modified is None or info.last_modified > stale:
                        continue
                elif name in names:
                    continue
                self.store.delete(info.key)
        except AICenterError as exc:  # pruning is housekeeping: the checkpoint is committed
            self.log(f"WARNING: could not prune old checkpoints ({exc}); the next sync tries again")

    # -- background and final syncs ------------------------------------------------------
    def start(self) -> None:
        """Sync every ``interval`` seconds in a background thread until :meth:`final`."""
        self._thread = threading.Thread(target=self._loop, name="aicenter-checkpoint", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._logged_sync("periodic")

    def _logged_sync(self, kind: str) -> str | None:
        """One sync that never raises: a failed sync is retried by the next one. Returns the problem, if any."""
        began = time.perf_counter()
        try:
            stats = self.sync()
        except (AICenterError, OSError, FileChanged) as exc:
            problem = f"{kind} checkpoint sync failed: {exc}"
            self.log(f"WARNING: {problem}")
            return problem
        if stats is not None:
            self.log(f"{kind} checkpoint {stats.seq}: {stats.files} files ({stats.bytes} bytes), "
                     f"{stats.uploaded_files} uploaded ({stats.uploaded_bytes} bytes) in "
                     f"{time.perf_counter() - began:.2f} s")
        return None

    def final(self) -> str | None:
        """Stop the background syncs and sync once more (run end, SIGTERM). Returns a warning, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self._logged_sync("final")

    def stats(self) -> dict[str, int | None]:
        """``_results.json`` ``aicenter.checkpoint``: where this try resumed from, and its latest checkpoint."""
        files = self.last.files if self.last else []
        return {"resumed_from_try": self.resumed_from_try, "files": len(files), "bytes": sum(f.size for f in files)}


def try_of(run_prefix: str) -> int | None:
    """The try number of a run folder (``runs/<dag>/<run>/<task>/<try>``), recorded in its checkpoints."""
    last = run_prefix.rstrip("/").rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None


def _content(files: list[CheckpointFile]) -> list[tuple[str, str]]:
    return sorted((f.path, f.sha256) for f in files)


def _empty(folder: Path) -> None:
    """Remove what a failed restore left, so an older checkpoint is restored alone."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
