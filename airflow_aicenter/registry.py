"""The versioned package registry: versions, aliases and evaluations on top of a store.

Everything that must never be lost or duplicated is a numbered, create-once record:
``versions/<M.m>.json`` (the commit point of a version) and ``aliases/<name>/<seq>.json``
(one entry of an alias's history). Allocation is optimistic: take the next number, create
it with If-None-Match (O_EXCL on disk), and on a conflict take the one after. A best-effort
hint per sequence makes "what is the last number" O(1) requests, independent of how many
versions exist; a stale hint costs a few HEADs and is never wrong.

A task instance (dag, run, task, map index: every try of it) makes at most one version. Its
commit leaves ``packages/<name>/runs/<sha256 of the task instance>.json``: an intent before
the version record, completed with the version after it. ``version_made_by`` reads it (one
request), so a retry finds the version an earlier try committed instead of making another.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import obstore

from airflow_aicenter import layout
from airflow_aicenter.errors import (
    AICenterError,
    AlreadyExistsError,
    ArchiveError,
    NotFoundError,
    PackageError,
    StorageError,
    VersionError,
)
from airflow_aicenter.layout import REGISTRATION
from airflow_aicenter.package import (
    MAX_CONTRACT_FILE_BYTES,
    Version,
    extract_zip,
    is_contract_file,
    open_package,
    parse_version_spec,
    validate_alias_name,
    validate_package,
    validate_package_name,
    write_zip,
)
from airflow_aicenter.package.archive import ZipDigest
from airflow_aicenter.package.contents import PackageContents, contents_of, encode
from airflow_aicenter.package.requirements import included_files
from airflow_aicenter.records import (
    AliasRecord,
    ApprovalRecord,
    BlobRef,
    EvaluationRecord,
    Registration,
    RunRef,
    VersionRecord,
    read,
    read_optional,
    write,
)
from airflow_aicenter.runtime.snapshot import vouched_by_version
from airflow_aicenter.storage import Store, transfer
from airflow_aicenter.storage.transfer import (
    blob_state,
    get_blob,
    read_package_contents,
    stage_package,
    store_blob,
    store_package_files,
)

#: Give up after this many lost races in a row (only reachable under pathological contention).
MAX_ATTEMPTS = 10_000


class Sequence:
    """Records numbered 0, 1, 2, ... each created once, plus a hint of the last number."""

    def __init__(self, store: Store, key: Callable[[int], str], hint_key: str) -> None:
        self.store, self.key, self.hint_key = store, key, hint_key

    def _exists(self, n: int) -> bool:
        return self.store.exists(self.key(n))

    def _is(self, n: int, data: bytes) -> bool:
        try:
            return self.store.get_bytes(self.key(n)) == data
        except NotFoundError:
            return False

    def last(self) -> int | None:
        """The highest number in use: hint, then gallop and bisect over HEAD requests."""
        try:
            lo = int(self.store.get_bytes(self.hint_key))
        except (NotFoundError, ValueError):
            lo = 0
        if not self._exists(lo):
            if lo == 0 or not self._exists(0):
                return None
            lo = 0
        step, hi = 1, lo + 1
        while self._exists(hi):
            lo, step = hi, step * 2
            hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._exists(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def append(self, make: Callable[[int, int | None], bytes]) -> int:
        """Create the next free number with ``make(n, previous)``; returns n.

        ``make`` is called again after each lost race, so it can re-check its condition
        against the new latest entry (promotion "if better" does).
        """
        last = self.last()
        n = 0 if last is None else last + 1
        for _ in range(MAX_ATTEMPTS):
            data = make(n, None if n == 0 else n - 1)
            try:
                self.store.put_bytes(self.key(n), data, create=True)
            except AlreadyExistsError:
                # A retried put whose first attempt did land (its answer was lost) also ends
                # here: the record is then ours, byte for byte, and must not be taken twice.
                if not self._is(n, data):
                    n += 1
                    continue
            self.store.put_bytes(self.hint_key, str(n).encode())
            return n
        raise VersionError(f"could not allocate a number under {self.store.url(self.hint_key)} after {MAX_ATTEMPTS} tries")


@dataclass
class PackageSummary:
    """One package as ``aicenter package list`` shows it; ``problems`` names records that could not be read."""

    name: str
    latest: VersionRecord | None = None
    aliases: dict[str, AliasRecord] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Upload:
    """What ``Registry.upload_package`` did, for the CLI to say.

    ``created`` is False when the content is identical to a stored upload (``record``), which is
    then returned instead of a new version. ``repaired`` is what was wrong with the stored blob
    of ``record`` (its zip, or a per-file version's manifest) that this upload rewrote ("missing"
    or "damaged"), or None when it was intact (a new version's blob that was simply not stored
    yet is no repair); ``repaired_files`` how many of an identical per-file upload's file blobs
    were missing or damaged and were rewritten. ``files`` and ``size``: the package's files and
    their bytes; ``written_files`` and ``written_bytes``: the file blobs this upload wrote (the
    rest were stored already, by this package or any other).
    """

    record: VersionRecord
    created: bool
    repaired: Literal["missing", "damaged"] | None = None
    files: int = 0
    size: int = 0
    written_files: int = 0
    written_bytes: int = 0
    repaired_files: int = 0


class Registry:
    """Packages and their versions under ``packages/<name>/`` of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- keys ----------------------------------------------------------------------------
    @staticmethod
    def version_key(name: str, version: Version | str) -> str:
        return layout.version_key(name, str(version))

    def _minors(self, name: str, major: int) -> Sequence:
        return Sequence(self.store, lambda m: self.version_key(name, Version(major, m)), layout.hint_key(name, str(major)))

    def _majors(self, name: str) -> Sequence:
        # Majors start at 1: index n of this sequence is major n+1.
        return Sequence(self.store, lambda n: self.version_key(name, Version(n + 1, 0)), layout.hint_key(name, "major"))

    @staticmethod
    def made_by_key(name: str, run: RunRef) -> str:
        """The record of the version ``run``'s task instance (dag, run, task, map index; any try) made."""
        return layout.made_by_key(name, run.path.task)

    def _aliases(self, name: str, alias: str) -> Sequence:
        return Sequence(
            self.store, lambda n: layout.alias_key(name, alias, n), layout.hint_key(name, f"alias-{alias}")
        )

    # -- reading -------------------------------------------------------------------------
    def packages(self) -> list[str]:
        prefixes, _ = self.store.list_dir(layout.PACKAGES.rstrip("/"))
        return sorted(p.rsplit("/", 1)[-1] for p in prefixes)

    def get(self, name: str, version: Version | str) -> VersionRecord:
        record = read_optional(self.store, self.version_key(name, version), VersionRecord)
        if record is None:
            raise VersionError(self._missing(name, f"version {version}"))
        return record

    def versions(self, name: str) -> list[VersionRecord]:
        """All versions (a listing: for humans and the CLI, never on the hot path)."""
        prefix = layout.versions_prefix(name)
        out = [read(self.store, info.key, VersionRecord) for info in self.store.list(prefix) if info.key.endswith(".json")]
        return sorted(out, key=lambda r: Version.parse(r.version))

    def latest_major(self, name: str) -> int | None:
        n = self._majors(name).last()
        return None if n is None else n + 1

    def latest_minor(self, name: str, major: int) -> int | None:
        return self._minors(name, major).last()

    def resolve(self, name: str, spec: str) -> VersionRecord:
        """``"1.2"``, ``"1"`` (latest minor of 1), ``"latest"`` or an alias -> its record."""
        validate_package_name(name)
        parsed = parse_version_spec(str(spec))
        if parsed.version is not None:  # "exact"
            return self.get(name, parsed.version)
        if parsed.alias is not None:  # "alias"
            current = self.alias(name, parsed.alias)
            if current is None:
                raise VersionError(
                    self._missing(name, f"alias {parsed.alias!r}")
                    + f"; set it with `aicenter package promote {name}:VERSION --alias {parsed.alias}`"
                )
            return self.get(name, current.version)
        major = self.latest_major(name) if parsed.kind == "latest" else parsed.major
        if major is None:
            raise VersionError(self._missing(name, "any version"))
        minor = self.latest_minor(name, major)
        if minor is None:
            raise VersionError(self._missing(name, f"major version {major}"))
        return self.get(name, Version(major, minor))

    def _missing(self, name: str, what: str) -> str:
        if self.latest_major(name) is None:
            close = difflib.get_close_matches(name, self.packages(), n=1, cutoff=0.75)
            return (
                f"package {name!r} has no versions in {self.store.uri}; "
                + (f"did you mean {close[0]!r}? Otherwise " if close else "")
                + f"upload it first with `aicenter package upload PATH --name {name}`"
            )
        return f"package {name!r} has no {what} in {self.store.uri}; `aicenter package show {name}` lists its versions"

    # -- writing -------------------------------------------------------------------------
    def upload(self, path: Path, name: str, *, created_by: str = "", description: str | None = None) -> VersionRecord:
        """Validate a package folder or zip, store its content, and create the next ``N.0`` (always)."""
        return self.upload_package(path, name, force=True, created_by=created_by, description=description).record

    def upload_package(
        self, path: Path, name: str, *, force: bool = False, created_by: str = "", description: str | None = None
    ) -> Upload:
        """Validate and store a package as a per-file version; content identical to a stored upload makes none.

        A new version is a manifest of the package's files over content-addressed blobs
        (transfer.store_package_files): only the file blobs the store lacks are written, so a
        new release that leaves a big file unchanged writes only what changed. The manifest is
        deterministic, so identical content has the same digest: re-uploading an unchanged
        package returns the upload (``N.0``) it equals instead of a new major (``force`` makes
        the new major anyway); an upload stored as one zip before per-file versions is
        recognised by the deterministic zip of the same folder, made only when the package has
        such an upload. Either way every stored blob of that content is hashed in full and
        rewritten from this upload when it is damaged or missing, which is what the corruption
        and missing-blob errors advise: uploading the same package again repairs it. A new
        release reads back only the stored blobs the newest upload does not vouch for
        (``_vouched``): its unchanged big files are hashed locally, never downloaded again.
        """
        validate_package_name(name)
        with tempfile.TemporaryDirectory(prefix="aicenter-upload-") as tmp:
            root = open_package(Path(path), Path(tmp) / "pkg")
            info = validate_package(root, "serve")
            contents = contents_of(root)
            manifest = hashlib.sha256(encode(contents)).hexdigest()
            zipped: list[ZipDigest] = []

            def zip_digest() -> str:  # the zip an upload stored before per-file versions, made once if asked
                if not zipped:
                    zipped.append(write_zip(root, Path(tmp) / "package.zip"))
                return zipped[0].sha256

            stored = None if force else self._identical_upload(name, manifest, zip_digest)
            files, size = len(contents.files), contents.total_size
            if stored is not None and stored.blob.kind == "zip":
                found = store_blob(self.store, Path(tmp) / "package.zip", stored.blob.sha256)
                return Upload(stored, created=False, repaired=None if found == "ok" else found, files=files, size=size,
                              written_bytes=0 if found == "ok" else stored.blob.size)
            before = None if stored is None else blob_state(self.store, manifest)
            by_path = {f.path: f for f in contents.files}

            def known(file: Path, st: os.stat_result) -> str | None:  # hashed just above: not read again
                f = by_path.get(file.relative_to(root).as_posix())
                return f.sha256 if f is not None and f.size == st.st_size else None

            # An identical upload reads every stored blob back (how a repair is found); a new release trusts those of
            # the newest upload unmodified since its manifest, as a training trusts its parent's.
            vouched = self._vouched(name, contents) if stored is None else frozenset()
            put = store_package_files(self.store, root, known=known, stored=vouched)
        written, written_bytes = put.blobs.uploaded_files, put.blobs.uploaded_bytes
        if stored is not None:
            return Upload(stored, created=False, repaired=None if before == "ok" else before, files=files, size=size,
                          written_files=written, written_bytes=written_bytes, repaired_files=written)
        desc = info.metadata.description if description is None else description
        record = self.commit(name, parent=None, blob=put.ref, pipeline="upload", created_by=created_by, description=desc)
        return Upload(record, created=True, files=files, size=size, written_files=written, written_bytes=written_bytes)

    def _vouched(self, name: str, contents: PackageContents) -> frozenset[str]:
        """The file blobs of ``contents`` that the newest upload of ``name`` vouches for (snapshot.vouched_by_version).

        A zip upload, or any error, vouches for nothing: every stored blob is then read back.
        """
        major = self.latest_major(name)
        if major is None:
            return frozenset()
        try:
            newest = self.get(name, f"{major}.0").blob
        except AICenterError:
            return frozenset()
        return vouched_by_version(self.store, newest, {f.sha256: f.size for f in contents.files})

    def _identical_upload(self, name: str, manifest: str, zip_digest: Callable[[], str]) -> VersionRecord | None:
        """The upload (``N.0``) of ``name`` with this content: one read per major, newest first.

        ``manifest`` is the content's per-file manifest digest; ``zip_digest()`` its zip's, asked
        only when an upload stored as one zip is compared.
        """
        for major in range((self.latest_major(name) or 0), 0, -1):
            stored = self.get(name, f"{major}.0")
            if stored.blob.sha256 == (manifest if stored.blob.kind == "files" else zip_digest()):
                return stored
        return None

    def commit(
        self,
        name: str,
        *,
        parent: str | None,
        blob: BlobRef,
        pipeline: str,
        run: RunRef | None = None,
        snapshot: str | None = None,
        score: float | None = None,
        evaluated_on: str | None = None,
        created_by: str = "",
        description: str = "",
        resources: dict[str, Any] | None = None,
        cost: dict[str, Any] | None = None,
    ) -> VersionRecord:
        """Create the next version: ``N.0`` for an upload, the next free minor of the parent's major otherwise."""
        if not self.store.exists(layout.blob_key(blob.sha256)):
            raise StorageError(
                f"the package content sha256:{blob.sha256} is no longer in {self.store.uri} (deleted while the run was "
                "going: `aicenter gc` with a grace period shorter than the run, or by hand); nothing was registered: "
                "run the task again, and keep gc's grace period longer than the longest run"
            )
        if blob.kind == "files":
            self._check_files_stored(blob)
        made: list[VersionRecord] = []

        def make(version: Version) -> bytes:
            record = VersionRecord(
                package=name, version=str(version), blob=blob, parent=parent, pipeline=pipeline,  # type: ignore[arg-type]
                run=run, snapshot=snapshot, score=score, evaluated_on=evaluated_on, created_by=created_by,
                description=description, resources=resources, cost=cost,
            )
            made[:] = [record]
            return record.model_dump_json(indent=2).encode()

        if parent is None:
            self._majors(name).append(lambda n, _: make(Version(n + 1, 0)))
        else:
            major = Version.parse(parent).major
            self._minors(name, major).append(lambda m, _: make(Version(major, m)))
        return made[0]

    def _check_files_stored(self, blob: BlobRef) -> None:
        """Refuse a per-file version whose manifest cannot be read or names a file blob the store lacks.

        The manifest is written after its file blobs, so a lacking one was deleted since (gc, by
        hand): a version naming it would fail every staging. One HEAD per distinct blob, at once
        (on S3, for many blobs, a listing of the blob prefix instead, as ensure_blobs does).
        """
        try:
            contents = read_package_contents(self.store, blob)[0]
        except AICenterError as exc:
            raise type(exc)(f"{exc}; nothing was registered") from None
        paths: dict[str, list[str]] = {}
        for f in contents.files:
            paths.setdefault(f.sha256, []).append(f.path)

        async def absent() -> set[str]:
            wanted, heads = set(paths), set(paths)
            listed: dict[str, Any] = {}
            if self.store.scheme == "s3" and len(wanted) >= transfer.LIST_MIN_FILES:  # a listing: 1,000 a request
                listed, heads = await transfer.stored_digests(self.store, wanted)
            looked = await transfer.gather_limited(
                sorted(heads), lambda d: self.store.head_async(layout.blob_key(d)), transfer.AdaptiveLimit(transfer.CONCURRENCY))
            found = set(listed) | {d for d, info in zip(sorted(heads), looked, strict=True) if info is not None}
            return wanted - found

        gone = [path for digest in sorted(transfer.run(absent())) for path in paths[digest]]
        if gone:
            shown = ", ".join(sorted(gone)[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
            raise StorageError(
                f"the package content sha256:{blob.sha256} names files whose blobs are no longer in {self.store.uri}: "
                f"{shown} (deleted while the run was going: `aicenter gc` with a grace period shorter than the run, or "
                "by hand); nothing was registered: run the task again, and keep gc's grace period longer than the "
                "longest run")

    def version_made_by(self, name: str, run: RunRef) -> VersionRecord | None:
        """The version the task instance of ``run`` (same dag, run, task and map index; any try) committed, or None.

        One GET (two when there is one). Only when an earlier try died between its intent and
        its version record are recent versions searched for the task instance.
        """
        made = read_optional(self.store, self.made_by_key(name, run), Registration)
        if made is None:
            return None
        if made.version is not None:
            return self.get(name, made.version)
        return self._find_by_task(name, run, range(self.latest_major(name) or 0, 0, -1))

    def commit_once(self, name: str, *, run: RunRef, **kwargs: object) -> VersionRecord:
        """Commit the run's version unless its task instance already did, in this try or an earlier one.

        Intents are written before the version record and completed after it: the task
        instance's record (``made_by_key``) and the try's ``registration.json``. A retry that
        finds a completed record returns that version; only when an intent is found (a crash
        came between the two) are the recent versions searched for the task instance, so a
        first attempt costs O(1) requests however many versions exist.
        """
        marker = run.key(REGISTRATION)
        made_key = self.made_by_key(name, run)
        done = read_optional(self.store, marker, Registration)
        if done is not None and done.version:
            return self.get(name, done.version)
        made = read_optional(self.store, made_key, Registration)
        found = None
        if made is not None and made.version:
            found = self.get(name, made.version)
        elif made is not None or done is not None:  # an earlier attempt began: did it commit?
            parent = kwargs.get("parent")
            majors = [Version.parse(str(parent)).major] if parent is not None else range(self.latest_major(name) or 0, 0, -1)
            found = self._find_by_task(name, run, majors)
        if found is not None:
            write(self.store, made_key, Registration(package=name, version=found.version))
            write(self.store, marker, Registration(package=name, version=found.version))
            return found
        if made is None:
            write(self.store, made_key, Registration(package=name, version=None))
        if done is None:
            write(self.store, marker, Registration(package=name, version=None))
        record = self.commit(name, run=run, **kwargs)  # type: ignore[arg-type]
        write(self.store, made_key, Registration(package=name, version=record.version))
        write(self.store, marker, Registration(package=name, version=record.version))
        return record

    def _find_by_task(self, name: str, run: RunRef, majors: Iterable[int], window: int = 50) -> VersionRecord | None:
        """A version among the last ``window`` minors of ``majors`` that ``run``'s task instance made (any try)."""
        instance = (run.dag_id, run.run_id, run.task_id, run.map_index)
        for major in majors:
            last = self.latest_minor(name, major)
            for minor in range(last, max(-1, last - window), -1) if last is not None else ():
                record = read_optional(self.store, self.version_key(name, Version(major, minor)), VersionRecord)
                if record and record.run and (record.run.dag_id, record.run.run_id, record.run.task_id,
                                              record.run.map_index) == instance:
                    return record
        return None

    def check(self, record: VersionRecord, pipeline: str) -> None:
        """Validate a stored version for ``pipeline`` statically, before any compute starts.

        Reads the contract files only (sources, requirements, metadata), never a multi-GB
        model: of a zip, through range requests (the central directory and those entries); of
        a per-file version, its manifest and those files' blobs, each verified by its digest.
        The runtime verifies everything it stages.
        """
        key = layout.blob_key(record.blob.sha256)
        if not self.store.exists(key):  # else the reader's failure would read as "not a zip"
            raise NotFoundError(
                f"version {record.package}:{record.version} names content sha256:{record.blob.sha256}, which is missing "
                f"from {self.store.uri} (deleted by hand, or by gc): upload the package again "
                f"(`aicenter package upload PATH --name {record.package}`) or use another version"
            )
        with tempfile.TemporaryDirectory(prefix="aicenter-check-") as tmp:
            wanted: set[str] = set()

            def selected(name: str) -> bool:
                parts = name.strip("/").split("/")
                return is_contract_file(name) or "/".join(parts) in wanted or "/".join(parts[1:]) in wanted

            def listed(path: str) -> bool:  # a manifest's paths start at the package root: no root folder to allow for
                return path in wanted or ("/" not in path and is_contract_file(path))

            contents = read_package_contents(self.store, record.blob)[0] if record.blob.kind == "files" else None
            # The contract files, then the files requirements.txt includes (-r, -c), followed until none is new.
            for attempt in range(8):
                target = Path(tmp) / f"pkg{attempt}"
                if contents is not None:
                    root = self._fetch_selected(record, contents, listed, target)
                else:
                    reader = obstore.open_reader(self.store.inner, key, size=record.blob.size)
                    root = extract_zip(cast(BinaryIO, reader), target, only=selected,  # seekable reader
                                       max_selected_bytes=MAX_CONTRACT_FILE_BYTES)
                includes = included_files(root)
                if includes <= wanted:
                    break
                wanted |= includes
            try:
                validate_package(root, pipeline)
            except PackageError as exc:  # the run's log and records must say which package cannot do it
                shown = "predict" if pipeline == "serve" else pipeline
                raise PackageError(
                    f"package {record.package}:{record.version} cannot run the {shown} pipeline: {exc}") from exc

    def _fetch_selected(self, record: VersionRecord, contents: PackageContents, selected: Callable[[str], bool],
                        target: Path) -> Path:
        """The files of a per-file version that ``selected`` names, fetched into ``target`` (verified); ``target``.

        A selected file over MAX_CONTRACT_FILE_BYTES is refused from its size in the manifest,
        before it is fetched, as a zip's is from its central directory.
        """
        target.mkdir(parents=True)
        for f in contents.files:
            if not selected(f.path):
                continue
            if f.size > MAX_CONTRACT_FILE_BYTES:
                name = f.path.rsplit("/", 1)[-1]
                raise ArchiveError(
                    f"package file {f.path!r} of {record.package}:{record.version} is {f.size} bytes, over the limit of "
                    f"{MAX_CONTRACT_FILE_BYTES} bytes for a contract file (it is parsed in the Airflow worker before the "
                    f"run): keep {name} small and large data in other files of the package")
            dest = target / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                get_blob(self.store, f.sha256, dest)
            except NotFoundError as exc:
                raise NotFoundError(f"version {record.package}:{record.version} names file {f.path}: {exc}") from None
        return target

    def download(self, name: str, spec: str, dest: Path) -> tuple[VersionRecord, Path]:
        """Fetch a version as its zip into ``dest`` (a folder), verified.

        A zip version's blob, checked against its digest. A per-file version is staged (its
        manifest and every file verified by digest) and zipped by write_zip: the same
        deterministic zip the package folder gives, byte for byte, so a per-file version and a
        zip version of the same files download identically.
        """
        record = self.resolve(name, spec)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"{name}-{record.version}.zip"
        if record.blob.kind == "zip":
            get_blob(self.store, record.blob.sha256, target)
            return record, target
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=dest) as tmp:
            root, _ = stage_package(self.store, record.blob, Path(tmp) / "pkg", Path(tmp) / "scratch", cache=None)
            write_zip(root, target)
        return record, target

    # -- aliases and evaluations ---------------------------------------------------------
    def alias(self, name: str, alias: str) -> AliasRecord | None:
        validate_alias_name(alias)
        last = self._aliases(name, alias).last()
        if last is None:
            return None
        return read(self.store, layout.alias_key(name, alias, last), AliasRecord)

    def alias_history(self, name: str, alias: str) -> list[AliasRecord]:
        prefix = layout.aliases_prefix(name, alias)
        return sorted((read(self.store, i.key, AliasRecord) for i in self.store.list(prefix)), key=lambda r: r.seq)

    def aliases(self, name: str, problems: list[str] | None = None) -> dict[str, AliasRecord]:
        """Each alias's current entry. An unreadable alias raises, or, given ``problems``, is noted there and left out."""
        prefixes, _ = self.store.list_dir(layout.aliases_root(name))
        out = {}
        for prefix in prefixes:
            alias = prefix.rsplit("/", 1)[-1]
            try:
                current = self.alias(name, alias)
            except AICenterError as exc:
                if problems is None:
                    raise
                problems.append(f"alias {alias!r}: {exc}")
                continue
            if current is not None:
                out[alias] = current
        return out

    def summary(self, name: str) -> PackageSummary:
        """Latest version and aliases of one package; a damaged record is a problem of this package only."""
        summary = PackageSummary(name)
        try:
            if self.latest_major(name) is not None:
                summary.latest = self.resolve(name, "latest")
        except AICenterError as exc:
            summary.problems.append(f"latest version: {exc}")
        try:
            summary.aliases = self.aliases(name, summary.problems)
        except AICenterError as exc:  # the aliases folder itself could not be listed
            summary.problems.append(f"aliases: {exc}")
        return summary

    def summaries(self) -> list[PackageSummary]:
        """Every package (``aicenter package list``): one damaged record never hides the other packages."""
        return [self.summary(name) for name in self.packages()]

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        *,
        set_by: str = "",
        reason: str = "",
        condition: Callable[[AliasRecord | None], bool] | None = None,
    ) -> AliasRecord | None:
        """Point ``alias`` at ``version`` atomically, keeping history.

        ``condition(current)`` is re-checked against the latest entry after every lost race;
        when it says no, nothing is written and None is returned.
        """
        validate_alias_name(alias)
        self.get(name, version)  # must exist
        seq = self._aliases(name, alias)
        made: list[AliasRecord | None] = [None]

        class _Declined(Exception):
            pass

        def make(n: int, prev: int | None) -> bytes:
            current = None if prev is None else read(self.store, layout.alias_key(name, alias, prev), AliasRecord)
            if condition is not None and not condition(current):
                raise _Declined
            record = AliasRecord(
                package=name, alias=alias, seq=n, version=version,
                previous=current.version if current else None, reason=reason, set_by=set_by,
            )
            made[0] = record
            return record.model_dump_json(indent=2).encode()

        try:
            seq.append(make)
        except _Declined:
            return None
        return made[0]

    def add_evaluation(self, record: EvaluationRecord) -> str:
        """Keep a score for a version; once per task try (a reattached or retried step adds nothing)."""
        name = f"{record.created_at:%Y%m%dT%H%M%S%fZ}"
        if record.run is not None:
            name = "run-" + hashlib.sha256(record.run.prefix.encode()).hexdigest()[:24]
        key = layout.evaluation_key(record.package, record.version, name)
        try:
            write(self.store, key, record, create=True)
        except AlreadyExistsError:
            pass
        return key

    def evaluations(self, name: str, version: str) -> list[EvaluationRecord]:
        prefix = layout.evaluations_prefix(name, version)
        return sorted((read(self.store, i.key, EvaluationRecord) for i in self.store.list(prefix)), key=lambda r: r.created_at)

    # -- approvals (promote_if="approved") -------------------------------------------------
    def request_approval(self, record: ApprovalRecord) -> ApprovalRecord:
        """Record that ``record.version`` waits for a person's decision; once (a retried task keeps the first request).

        The version must exist: an approval is never the only trace of a version.
        """
        return self._keep_first(record, "request")

    def decide_approval(self, record: ApprovalRecord) -> ApprovalRecord:
        """Keep a version's decision (approved or rejected), created once: the decision already kept wins and is returned."""
        if record.status == "pending":
            raise ValueError("a decision is 'approved' or 'rejected'")
        return self._keep_first(record, "decision")

    def _keep_first(self, record: ApprovalRecord, stage: Literal["request", "decision"]) -> ApprovalRecord:
        """``record`` created once beside its version (which must exist); the one kept first when another came before."""
        self.get(record.package, record.version)
        key = layout.approval_key(record.package, record.version, stage)
        try:
            write(self.store, key, record, create=True)
        except AlreadyExistsError:
            return read(self.store, key, ApprovalRecord)
        return record

    def approval(self, name: str, version: str) -> ApprovalRecord | None:
        """A version's approval: its decision, else its pending request, else None (never asked)."""
        decision = read_optional(self.store, layout.approval_key(name, version, "decision"), ApprovalRecord)
        if decision is not None:
            return decision
        return read_optional(self.store, layout.approval_key(name, version, "request"), ApprovalRecord)

    def pending_approvals(self, name: str) -> list[ApprovalRecord]:
        """The versions of ``name`` that wait for a person's decision, oldest request first."""
        folders, _ = self.store.list_dir(layout.approvals_prefix(name).rstrip("/"))
        pending = []
        for folder in folders:
            record = self.approval(name, folder.rsplit("/", 1)[-1])
            if record is not None and record.status == "pending":
                pending.append(record)
        return sorted(pending, key=lambda r: r.at)
