"""Per-file package versions (issue 25): the registry, download, gc and verify on both stores.

A version is a manifest of its files over content-addressed blobs (package/contents.py). These
tests take the user's view: ``Registry.upload_package`` makes per-file versions, a second upload
with an unchanged big file writes only what changed, identical content is still recognised for
both kinds (and re-uploading repairs a damaged or missing file blob, issue 20), ``commit``
refuses a manifest that names a missing blob, ``check`` and ``download`` read a per-file version,
``download`` gives the same deterministic zip as ``write_zip`` of the folder, gc counts a
manifest's file blobs as referenced and keeps everything while a manifest cannot be read, and
verify names a damaged file by version and path and repairs it from the package folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_aicenter import cli, layout
from airflow_aicenter.errors import PackageError, StorageError
from airflow_aicenter.gc import collect
from airflow_aicenter.package import write_zip
from airflow_aicenter.package.contents import PackageContents, PackageFile, decode, encode
from airflow_aicenter.records import BlobRef, VersionRecord
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, transfer
from airflow_aicenter.storage.transfer import blob_state, put_blob, sha256_file
from airflow_aicenter.verify import verify
from tests.conftest import BIG
from tests.packages import write_package


def manifest_of(store: Store, record: VersionRecord) -> PackageContents:
    assert record.blob.kind == "files"
    return decode(store.get_bytes(layout.blob_key(record.blob.sha256)), where=record.blob.sha256)


def file_digest(store: Store, record: VersionRecord, path: str) -> str:
    return next(f.sha256 for f in manifest_of(store, record).files if f.path == path)


def blob_bytes(store: Store) -> int:
    return sum(info.size for info in store.list(layout.BLOBS))


def flip(store: Store, key: str, at: int = 10) -> None:
    raw = bytearray(store.get_bytes(key))
    raw[at] ^= 0xFF
    store.put_bytes(key, bytes(raw))


def zip_version(store: Store, folder: Path, name: str, tmp: Path) -> VersionRecord:
    """A version stored the way every version was before per-file versions: one deterministic zip blob."""
    digest = write_zip(folder, tmp / "legacy.zip")
    put_blob(store, tmp / "legacy.zip", digest.sha256)
    return Registry(store).commit(name, parent=None, blob=BlobRef(sha256=digest.sha256, size=digest.size),
                                  pipeline="upload")


# -- upload --------------------------------------------------------------------------------
def test_an_upload_is_a_per_file_version_whose_files_are_blobs(store: Store, pkg: Path) -> None:
    done = Registry(store).upload_package(pkg, "churn")
    record = done.record
    assert (record.version, record.blob.kind, done.created) == ("1.0", "files", True)
    contents = manifest_of(store, record)
    assert [f.path for f in contents.files] == ["main.py", "meta.json", "requirements.txt", "tools/run.sh",
                                                "train.py", "weights.bin"]
    assert {f.path: f.mode for f in contents.files}["tools/run.sh"] == 0o755
    for f in contents.files:
        assert blob_state(store, f.sha256) == "ok", f.path
    assert (done.files, done.size) == (6, contents.total_size)
    assert done.written_files == 6 and done.written_bytes == contents.total_size


def test_a_second_version_with_an_unchanged_big_file_writes_only_what_changed(store: Store, pkg: Path) -> None:
    registry = Registry(store)
    registry.upload_package(pkg, "churn")
    before = blob_bytes(store)
    (pkg / "meta.json").write_text('{"epoch": 2}')
    second = registry.upload_package(pkg, "churn")
    assert (second.record.version, second.created) == ("2.0", True)
    assert second.written_files == 1 and second.written_bytes == len('{"epoch": 2}')
    grew = blob_bytes(store) - before
    assert grew < BIG / 100, f"the store grew by {grew} bytes for a 12-byte change"
    assert file_digest(store, second.record, "weights.bin") == file_digest(store, registry.get("churn", "1.0"),
                                                                           "weights.bin")


def test_a_new_release_trusts_the_previous_uploads_file_blobs_unmodified_since_its_manifest(
        store: Store, pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new release does not read the unchanged 1.5 GB back from the store to verify it: the previous upload's
    manifest was written only after its blobs were verified, and a blob unmodified since is that one (the rule
    re-snapshots and trainings use). An identical upload still reads every blob back: it is how a repair is found."""
    registry = Registry(store)
    first = registry.upload(pkg, "churn")
    weights = file_digest(store, first, "weights.bin")
    read_back: list[str] = []
    original = transfer._hashes_to

    async def counted(store_: Store, key: str, sha256: str, size: int | None = None) -> bool:
        read_back.append(sha256)
        return await original(store_, key, sha256, size)

    monkeypatch.setattr(transfer, "_hashes_to", counted)
    (pkg / "meta.json").write_text('{"epoch": 2}')
    assert registry.upload_package(pkg, "churn").record.version == "2.0"
    assert weights not in read_back, "the unchanged big file's blob was read back"
    again = registry.upload_package(pkg, "churn")
    assert (again.record.version, again.created) == ("2.0", False) and weights in read_back


def test_identical_content_returns_the_stored_per_file_upload(store: Store, pkg: Path) -> None:
    registry = Registry(store)
    first = registry.upload_package(pkg, "churn")
    again = registry.upload_package(pkg, "churn")
    assert (again.record.version, again.created, again.repaired) == ("1.0", False, None)
    assert again.record.blob == first.record.blob and again.written_bytes == 0 and again.written_files == 0
    forced = registry.upload_package(pkg, "churn", force=True)
    assert (forced.record.version, forced.created, forced.record.blob) == ("2.0", True, first.record.blob)


def test_identical_content_to_a_stored_zip_upload_returns_it(store: Store, pkg: Path, tmp_path: Path) -> None:
    """Versions stored as one zip keep working: an upload identical to one is recognised, and repairs its zip."""
    stored = zip_version(store, pkg, "churn", tmp_path)
    key = layout.blob_key(stored.blob.sha256)
    good = store.get_bytes(key)
    flip(store, key, at=len(good) // 2)
    again = Registry(store).upload_package(pkg, "churn")
    assert (again.record.version, again.record.blob.kind, again.created, again.repaired) == ("1.0", "zip", False,
                                                                                             "damaged")
    assert store.get_bytes(key) == good


@pytest.mark.parametrize("damage", ["damaged", "missing"])
@pytest.mark.parametrize("what", ["weights.bin", "manifest"])
def test_uploading_the_same_package_repairs_a_file_blob_or_the_manifest(store: Store, pkg: Path, damage: str,
                                                                        what: str) -> None:
    """Issue 20's rule for per-file versions: the re-upload the errors advise rewrites what is damaged or missing."""
    registry = Registry(store)
    record = registry.upload_package(pkg, "churn").record
    digest = record.blob.sha256 if what == "manifest" else file_digest(store, record, what)
    key = layout.blob_key(digest)
    good = store.get_bytes(key)
    if damage == "missing":
        store.delete(key)
    else:
        flip(store, key, at=len(good) - 3)
    again = registry.upload_package(pkg, "churn")
    assert (again.record.version, again.created) == ("1.0", False)
    if what == "manifest":  # the version's own blob: how it was found, as for a zip version
        assert (again.repaired, again.repaired_files) == (damage, 0)
    else:  # one of its files: rewritten, and counted
        assert (again.repaired, again.repaired_files, again.written_bytes) == (None, 1, BIG)
    assert store.get_bytes(key) == good
    intact = registry.upload_package(pkg, "churn")
    assert (intact.created, intact.repaired, intact.repaired_files, intact.written_bytes) == (False, None, 0, 0)


# -- commit, check, download ----------------------------------------------------------------
@pytest.mark.parametrize("lookup", ["HEADs", "a listing"])
def test_commit_refuses_a_manifest_that_names_a_missing_file_blob(store: Store, tmp_path: Path, lookup: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if lookup == "a listing":  # what S3 takes for a manifest of LIST_MIN_FILES blobs or more
        monkeypatch.setattr(transfer, "LIST_MIN_FILES", 1)
    registry = Registry(store)
    main = tmp_path / "main.py"
    main.write_text("class Main:\n    pass\n")
    entry = sha256_file(main)
    put_blob(store, main, entry.sha256)
    gone = hashlib.sha256(b"never stored").hexdigest()
    contents = PackageContents(files=[PackageFile(path="main.py", size=entry.size, mode=0o644, sha256=entry.sha256),
                                      PackageFile(path="model/weights.bin", size=12, mode=0o644, sha256=gone)])
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(encode(contents))
    ref = sha256_file(manifest)
    put_blob(store, manifest, ref.sha256)
    blob = BlobRef(sha256=ref.sha256, size=ref.size, kind="files")
    with pytest.raises(StorageError, match=r"model/weights\.bin .*nothing was registered"):
        registry.commit("churn", parent=None, blob=blob, pipeline="upload")
    assert registry.latest_major("churn") is None
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"never stored")
    put_blob(store, weights, gone)
    assert registry.commit("churn", parent=None, blob=blob, pipeline="upload").version == "1.0"
    store.delete(layout.blob_key(ref.sha256))
    with pytest.raises(StorageError, match=r"is no longer in .*nothing was registered"):
        registry.commit("churn", parent=None, blob=blob, pipeline="upload")


def test_a_per_file_version_is_checked_for_its_pipeline(store: Store, pkg: Path, tmp_path: Path) -> None:
    """``Registry.check`` (the operators' pre-check) reads the contract files of a per-file version."""
    (pkg / "requirements.txt").write_text("-r reqs/base.txt\n")
    (pkg / "reqs").mkdir()
    (pkg / "reqs" / "base.txt").write_text("numpy\n")
    registry = Registry(store)
    record = registry.upload(pkg, "churn")
    registry.check(record, "train")
    serving = write_package(tmp_path / "serving", train=None)
    only_serving = registry.upload(serving, "serving")
    assert only_serving.blob.kind == "files"
    registry.check(only_serving, "serve")
    with pytest.raises(PackageError, match=r"package serving:1\.0 cannot run the train pipeline"):
        registry.check(only_serving, "train")
    (pkg / "data").mkdir()  # a big data file that happens to be named like a contract file, in a subfolder
    (pkg / "data" / "main.py").write_bytes(b"#" * (2 * 2**20))
    registry.check(registry.upload(pkg, "churn"), "train")
    store.delete(layout.blob_key(file_digest(store, record, "reqs/base.txt")))
    with pytest.raises(StorageError, match=r"reqs/base\.txt"):
        registry.check(record, "train")


def test_download_of_a_per_file_version_is_the_zip_an_equivalent_zip_version_stores(
        store: Store, pkg: Path, tmp_path: Path) -> None:
    registry = Registry(store)
    per_file = registry.upload(pkg, "churn")
    legacy = zip_version(store, pkg, "legacy", tmp_path)
    record, path = registry.download("churn", "1.0", tmp_path / "out")
    assert record.version == per_file.version
    assert path.read_bytes() == store.get_bytes(layout.blob_key(legacy.blob.sha256))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == legacy.blob.sha256
    _, zipped = registry.download("legacy", "1.0", tmp_path / "out-legacy")
    assert zipped.read_bytes() == path.read_bytes()


# -- gc -------------------------------------------------------------------------------------
def test_gc_keeps_every_blob_two_per_file_versions_share(store: Store, pkg: Path, tmp_path: Path) -> None:
    registry = Registry(store)
    first = registry.upload(pkg, "churn")
    (pkg / "meta.json").write_text('{"epoch": 2}')
    second = registry.upload(pkg, "churn")
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(os.urandom(1000))
    put_blob(store, orphan, sha256_file(orphan).sha256)
    referenced = {r.blob.sha256 for r in (first, second)}
    referenced |= {f.sha256 for r in (first, second) for f in manifest_of(store, r).files}
    report = collect(store, grace=timedelta(0))
    assert report.deleted == [sha256_file(orphan).sha256] and report.held is None
    assert report.referenced == len(referenced) == 9, "2 manifests, 6 files of 1.0, the changed meta.json of 2.0"
    for digest in referenced:
        assert store.exists(layout.blob_key(digest))
    assert report.missing == []


@pytest.mark.parametrize("damage", ["flipped", "missing", "garbage"])
def test_gc_keeps_everything_while_a_manifest_cannot_be_read(store: Store, pkg: Path, tmp_path: Path,
                                                              damage: str) -> None:
    """What a damaged manifest named is unknowable, and it is the only copy of the version: keep, and say why."""
    registry = Registry(store)
    record = registry.upload(pkg, "churn")
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(os.urandom(1000))
    put_blob(store, orphan, sha256_file(orphan).sha256)
    key = layout.blob_key(record.blob.sha256)
    if damage == "missing":
        store.delete(key)
    elif damage == "flipped":
        flip(store, key)
    else:
        store.put_bytes(key, b"not a manifest")
    report = collect(store, grace=timedelta(0))
    assert report.deleted == [] and store.exists(layout.blob_key(sha256_file(orphan).sha256))
    assert report.held is not None and store.url(key) in report.held and "churn:1.0" in report.held
    assert "package upload" in report.held and "verify --repair" in report.held
    for f in [f for f in ("weights.bin",)]:
        assert f  # the file blobs stay (nothing is deleted at all)
    assert all(store.exists(i.key) for i in store.list(layout.BLOBS))


def test_gc_keeps_the_files_of_a_damaged_per_file_version_record_whose_digest_is_readable(
        store: Store, pkg: Path, tmp_path: Path) -> None:
    """Issue 20 keeps every digest still readable in a damaged record; for a per-file version that digest is its
    manifest, and the files it lists are the version's only copy: they are kept too."""
    record = Registry(store).upload(pkg, "churn")
    key = layout.version_key("churn", "1.0")
    raw = store.get_bytes(key)
    store.put_bytes(key, raw[:raw.index(record.blob.sha256.encode()) + 80])  # cut short after its digest
    report = collect(store, grace=timedelta(0))
    assert store.url(key) in report.damaged and report.held is None
    assert report.deleted == []
    for f in manifest_of(store, record).files:
        assert store.exists(layout.blob_key(f.sha256)), f.path
        assert f.sha256 in report.salvaged


# -- verify ---------------------------------------------------------------------------------
def test_verify_names_a_damaged_file_by_version_and_path(store: Store, pkg: Path) -> None:
    registry = Registry(store)
    first = registry.upload(pkg, "churn")
    (pkg / "meta.json").write_text('{"epoch": 2}')
    second = registry.upload(pkg, "churn")
    weights = file_digest(store, first, "weights.bin")
    flip(store, layout.blob_key(weights), at=BIG // 2)
    store.delete(layout.blob_key(file_digest(store, second, "meta.json")))
    report = verify(store)
    found = {d.key: d for d in report.damage}
    assert set(found) == {layout.blob_key(weights), layout.blob_key(file_digest(store, second, "meta.json"))}
    damaged = found[layout.blob_key(weights)]
    assert damaged.state == "damaged"
    assert damaged.referenced_by == ["version churn:1.0 (weights.bin)", "version churn:2.0 (weights.bin)"]
    assert "aicenter package upload" in damaged.fix and "--repair" in damaged.fix
    missing = found[layout.blob_key(file_digest(store, second, "meta.json"))]
    assert (missing.state, missing.referenced_by) == ("missing", ["version churn:2.0 (meta.json)"])
    assert report.blobs == 2 + 7, "2 manifests and the 7 distinct files they name"


def test_verify_names_a_damaged_manifest_and_repairs_it_and_a_file_from_the_folder(store: Store, pkg: Path) -> None:
    registry = Registry(store)
    record = registry.upload(pkg, "churn")
    manifest_key = layout.blob_key(record.blob.sha256)
    weights_key = layout.blob_key(file_digest(store, record, "weights.bin"))
    manifest, weights = store.get_bytes(manifest_key), store.get_bytes(weights_key)
    flip(store, weights_key)
    flip(store, manifest_key)
    report = verify(store)
    found = {d.key: d for d in report.damage}
    assert found[manifest_key].state == "damaged"
    assert found[manifest_key].referenced_by == ["version churn:1.0 (its manifest)"]
    assert "none of them was checked" in found[manifest_key].detail
    assert weights_key not in found, "a file of a manifest that cannot be read cannot be checked yet"
    assert "package upload" in found[manifest_key].fix
    repaired = verify(store, repair=pkg)
    assert {d.key for d in repaired.repaired} == {manifest_key, weights_key} and repaired.remaining == []
    assert store.get_bytes(manifest_key) == manifest and store.get_bytes(weights_key) == weights


# -- the CLI --------------------------------------------------------------------------------
def test_the_upload_command_says_what_was_written_and_what_was_already_stored(
        store: Store, pkg: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if store.uri.startswith("s3://"):
        for key, value in store.options.to_env().items():  # type: ignore[attr-defined]
            monkeypatch.setenv(key, value)
    assert cli.main(["--storage", store.uri, "package", "upload", str(pkg), "--name", "churn"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Uploaded churn version 1.0" in out and "6 files" in out and "6 files (3.0 MiB) written" in out, out
    (pkg / "meta.json").write_text('{"epoch": 2}')
    assert cli.main(["--storage", store.uri, "package", "upload", str(pkg), "--name", "churn"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Uploaded churn version 2.0" in out and "1 file (12 bytes) written" in out and "5 already stored" in out, out
    assert cli.main(["--storage", store.uri, "package", "upload", str(pkg), "--name", "churn", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["version"], done["created"], done["written_files"], done["files"]) == ("2.0", False, 0, 6)
    assert done["blob"]["kind"] == "files"
    assert cli.main(["--storage", store.uri, "package", "show", "churn:2.0"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "6 files" in out, out
