"""Per-file package versions, written and staged (storage/transfer.py), on the file store and the moto S3 server.

A version is a manifest over content-addressed blobs: a second version with an unchanged big
file writes only what changed, a node stages only the blobs its local cache lacks, and a
damaged or missing blob is named by the package file it holds.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from airflow_aicenter import kernel_copy
from airflow_aicenter.errors import NotFoundError, PackageError, StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.package import write_zip
from airflow_aicenter.package.contents import contents_of, decode, encode
from airflow_aicenter.records import BlobRef, Outcome, RunSpec, read
from airflow_aicenter.storage import open_store, transfer
from airflow_aicenter.storage.cache import BlobCache, PlacedFiles
from airflow_aicenter.storage.store import LocalStore, Store
from airflow_aicenter.storage.transfer import (
    DamagedBlobError,
    put_blob,
    put_package_files,
    read_package_contents,
    run,
    stage_package,
    store_package_files,
    upload_tree,
)
from tests.conftest import RuntimeSpawner
from tests.packages import write_package
from tests.runtime.helpers import BIG


def stored_bytes(store: Store) -> int:
    return sum(info.size for info in store.list("blobs/"))


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_version_writes_only_the_changed_file(store: Store, package: Path) -> None:
    first, written = put_package_files(store, package)
    assert first.kind == "files"
    assert written == stored_bytes(store)
    assert written >= BIG
    (package / "meta.json").write_text('{"epoch": 2}')
    before = stored_bytes(store)
    put = store_package_files(store, package)
    second = put.ref
    assert second.sha256 != first.sha256
    grew = stored_bytes(store) - before
    assert grew == put.written_bytes == len('{"epoch": 2}') + second.size, "only meta.json and the manifest are new"
    assert put.blobs.uploaded_files == 1 and put.manifest_written
    # the same folder again: the same manifest digest (identical content is recognised), nothing written
    again, written = put_package_files(store, package)
    assert (again, written) == (second, 0)
    assert stored_bytes(store) - before == grew
    assert decode(store.get_bytes(blob_key(second.sha256)), where="x") == contents_of(package)


def test_staging_twice_fetches_nothing_the_second_time(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    cache = BlobCache(tmp_path / "cache")
    root, fetched = stage_package(store, ref, tmp_path / "a" / "package", tmp_path / "a.zip", cache=cache)
    distinct = sum({f.sha256: f.size for f in contents_of(package).files}.values())
    assert fetched == distinct + ref.size
    assert {k: v[0] for k, v in tree(root).items()} == {k: v[0] for k, v in tree(package).items()}
    assert tree(root)["run.sh"][1] == 0o755
    again, fetched = stage_package(store, ref, tmp_path / "b" / "package", tmp_path / "b.zip", cache=cache)
    assert fetched == 0, "everything (the manifest too) comes from the local blob cache"
    weights = (again / "model" / "weights.bin").stat()
    entry = cache.path(hashlib.sha256((package / "model" / "weights.bin").read_bytes()).hexdigest()).stat()
    assert (weights.st_ino, weights.st_nlink) == (entry.st_ino, 3), "linked, not copied"
    assert stat.S_IMODE(weights.st_mode) == 0o444, "a linked file is the cache's read-only entry"
    assert (again / "run.sh").stat().st_ino != entry.st_ino and stat.S_IMODE((again / "run.sh").stat().st_mode) == 0o755
    assert contents_of(again) == contents_of(package), "a read-only link is recorded with mode 0644"


def test_private_copies_for_a_folder_package_code_writes(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    cache = BlobCache(tmp_path / "cache")
    root, _ = stage_package(store, ref, tmp_path / "w" / "package", tmp_path / "w.zip", cache=cache, link=False)
    assert {k: v for k, v in tree(root).items()} == tree(package)
    weights = root / "model" / "weights.bin"
    assert weights.stat().st_nlink == 1 and stat.S_IMODE(weights.stat().st_mode) == 0o644


def test_staging_without_a_cache(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    root, fetched = stage_package(store, ref, tmp_path / "n" / "package", tmp_path / "n.zip", cache=None)
    assert tree(root) == tree(package)
    assert fetched == ref.size + sum({f.sha256: f.size for f in contents_of(package).files}.values())


def test_a_zip_version_still_stages(store: Store, package: Path, tmp_path: Path) -> None:
    digest = write_zip(package, tmp_path / "p.zip")
    put_blob(store, tmp_path / "p.zip", digest.sha256)
    ref = BlobRef.model_validate({"sha256": digest.sha256, "size": digest.size})  # an old record: no kind
    assert ref.kind == "zip"
    root, size = stage_package(store, ref, tmp_path / "z" / "package", tmp_path / "z.zip", cache=BlobCache(tmp_path / "c"))
    assert size == digest.size
    assert tree(root) == tree(package)


def _flip(store: Store, sha256: str) -> None:
    data = bytearray(store.get_bytes(blob_key(sha256)))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(blob_key(sha256), bytes(data))


def test_a_flipped_byte_in_a_file_blob_is_named_at_staging(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    weights = hashlib.sha256((package / "model" / "weights.bin").read_bytes()).hexdigest()
    _flip(store, weights)
    cache = BlobCache(tmp_path / "cache")
    for use in (cache, None):
        target = tmp_path / f"t{use is None}" / "package"
        with pytest.raises(DamagedBlobError) as err:
            stage_package(store, ref, target, tmp_path / "x.zip", cache=use)
        message = str(err.value)
        assert "package file 'model/weights.bin' is damaged" in message and weights in message
        assert "aicenter verify --repair" in message and "aicenter package upload" in message
        assert not err.value.retryable
        assert not target.exists() and not [p for p in target.parent.iterdir() if ".partial-" in p.name]
    assert not cache.path(weights).exists(), "damaged bytes never become a cache entry"
    assert not any(cache.tmp.iterdir()), "no fetch left behind"
    # uploading the same folder again repairs it (the issue-20 rule), and staging works
    put_package_files(store, package)
    root, _ = stage_package(store, ref, tmp_path / "ok" / "package", tmp_path / "x.zip", cache=cache)
    assert contents_of(root) == contents_of(package)


def test_a_missing_file_blob_is_named_at_staging(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    meta = hashlib.sha256((package / "meta.json").read_bytes()).hexdigest()
    store.delete(blob_key(meta))
    for use in (BlobCache(tmp_path / "cache"), None):
        target = tmp_path / f"t{use is None}" / "package"
        with pytest.raises(NotFoundError, match=r"package file 'meta\.json' is missing from the store") as err:
            stage_package(store, ref, target, tmp_path / "x.zip", cache=use)
        assert "aicenter package upload" in str(err.value)
        assert not target.exists()


def test_a_damaged_or_missing_manifest_is_named(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    _flip(store, ref.sha256)
    with pytest.raises(DamagedBlobError, match=f"package manifest blob sha256:{ref.sha256} .* is damaged"):
        stage_package(store, ref, tmp_path / "t" / "package", tmp_path / "x.zip", cache=BlobCache(tmp_path / "c"))
    store.delete(blob_key(ref.sha256))
    with pytest.raises(NotFoundError, match=f"blob sha256:{ref.sha256} is missing"):
        read_package_contents(store, ref)
    bogus = b"not a manifest"
    bad = BlobRef(sha256=hashlib.sha256(bogus).hexdigest(), size=len(bogus), kind="files")
    store.put_bytes(blob_key(bad.sha256), bogus)
    with pytest.raises(PackageError, match=f"package manifest blob sha256:{bad.sha256} .* is not JSON"):
        read_package_contents(store, bad)


def test_a_hostile_manifest_cannot_write_outside_the_target(store: Store, tmp_path: Path) -> None:
    evil = b'{"files":[{"mode":420,"path":"../escape","sha256":"' + b"a" * 64 + b'","size":1}],"format":"aicenter-package-files/1"}'
    ref = BlobRef(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil), kind="files")
    store.put_bytes(blob_key(ref.sha256), evil)
    with pytest.raises(PackageError, match=r"'\.\.' part"):
        stage_package(store, ref, tmp_path / "t" / "package", tmp_path / "x.zip", cache=None)
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_package_code_writing_a_linked_file_does_not_poison_the_cache(store: Store, package: Path, tmp_path: Path) -> None:
    """A hard link shares the inode: code that writes the staged file writes the cache's entry (root may; others
    chmod first). The next run still gets the version's bytes, and a new version records what was written."""
    ref, _ = put_package_files(store, package)
    cache, placed = BlobCache(tmp_path / "cache"), PlacedFiles()
    root, _ = stage_package(store, ref, tmp_path / "a" / "package", tmp_path / "a.zip", cache=cache, placed=placed)
    weights = root / "model" / "weights.bin"
    original = (package / "model" / "weights.bin").read_bytes()
    digest = hashlib.sha256(original).hexdigest()
    assert weights.stat().st_ino == cache.path(digest).stat().st_ino
    with open(weights, "r+b") as fh:  # in place, same size: what a hostile or careless package does
        fh.seek(100)
        fh.write(b"POISON")
    assert placed.known(weights, weights.stat()) is None, "a written file is hashed again, not taken as staged"
    new = contents_of(root, known=placed.known)
    assert {f.path: f.sha256 for f in new.files}["model/weights.bin"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    again, fetched = stage_package(store, ref, tmp_path / "b" / "package", tmp_path / "b.zip", cache=cache)
    assert (again / "model" / "weights.bin").read_bytes() == original, "the next run gets the version's bytes"
    assert fetched == BIG, "the changed entry was dropped and fetched again"
    # chmod then write (what a non-root owner must do), with the modification time put back: the mode gives it away
    entry = cache.path(digest)
    os.chmod(entry, 0o644)
    with open(entry, "r+b") as fh:
        fh.write(b"X")
    os.utime(entry, ns=(entry.stat().st_atime_ns, 315_532_800 * 10**9))
    third, fetched = stage_package(store, ref, tmp_path / "c" / "package", tmp_path / "c.zip", cache=cache)
    assert (third / "model" / "weights.bin").read_bytes() == original and fetched == BIG


def test_a_training_writes_its_private_copy_and_the_new_version_records_it(
    store: Store, package: Path, tmp_path: Path
) -> None:
    ref, _ = put_package_files(store, package)
    cache, placed = BlobCache(tmp_path / "cache"), PlacedFiles()
    root, _ = stage_package(store, ref, tmp_path / "a" / "package", tmp_path / "a.zip", cache=cache, link=False,
                            placed=placed)
    hashed: list[str] = []

    def known(path: Path, st: os.stat_result) -> str | None:
        digest = placed.known(path, st)
        if digest is None:
            hashed.append(path.relative_to(root).as_posix())
        return digest

    weights = root / "model" / "weights.bin"
    weights.write_bytes(b"fine-tuned" + weights.read_bytes()[10:])
    (root / "new.txt").write_text("new")
    before = stored_bytes(store)
    put = store_package_files(store, root, known=known)
    assert sorted(hashed) == ["model/weights.bin", "new.txt"], "unchanged staged files are not hashed again"
    files = {f.path: f.sha256 for f in put.contents.files}
    assert files["model/weights.bin"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert stored_bytes(store) - before == put.written_bytes == BIG + 3 + put.ref.size
    original, fetched = stage_package(store, ref, tmp_path / "b" / "package", tmp_path / "b.zip", cache=cache)
    assert fetched == 0 and contents_of(original) == contents_of(package), "the cache never saw the training's write"


def test_concurrent_stagings_on_one_node_share_the_cache(store: Store, package: Path, tmp_path: Path) -> None:
    ref, _ = put_package_files(store, package)
    errors: list[BaseException] = []
    roots: list[Path] = []

    def stage(n: int) -> None:
        try:
            root, _ = stage_package(store, ref, tmp_path / f"r{n}" / "package", tmp_path / f"r{n}.zip",
                                    cache=BlobCache(tmp_path / "cache"))
            roots.append(root)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stage, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(tree(root) == {k: (v[0], 0o444 if k != "run.sh" else 0o755) for k, v in tree(package).items()}
               for root in roots)
    assert not any((tmp_path / "cache" / "blobs" / "tmp").iterdir())


def test_the_manifest_bytes_are_canonical(store: Store, package: Path) -> None:
    ref, _ = put_package_files(store, package)
    assert store.get_bytes(blob_key(ref.sha256)) == encode(contents_of(package))
    with pytest.raises(StorageError):
        stage_package(store, BlobRef(sha256="0" * 64, size=10, kind="files"), package.parent / "t", package.parent / "x",
                      cache=None)


# -- through the runtime (a real child process), as the local launcher runs it ----------------------------------
FINE_TUNE = '''
import os

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        with open("meta.json", "w") as fh:  # the base weights stay as they were; a small file changes
            fh.write('{"epoch": 2}')
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        pass
'''


def test_a_training_stores_a_per_file_version_and_an_evaluation_stages_it_from_the_cache(
    store: Store, tmp_path: Path, spawn_runtime: RuntimeSpawner, request: pytest.FixtureRequest,
) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    env["AICENTER_CACHE"] = str(tmp_path / "cache")
    package = write_package(tmp_path / "pkg", train=FINE_TUNE, files={"weights.bin": os.urandom(BIG), "meta.json": "{}"})
    base, _ = put_package_files(store, package)
    run(upload_tree(write_package(tmp_path / "data", main=None, train=None, requirements=None, files={"a.csv": "x\n1\n"}),
                    store, "datasets/d"))
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/train/1", package="ft", version="1.0",
                   blob=base, dataset=store.url("datasets/d"))
    before = stored_bytes(store)
    done = spawn_runtime.run(spec, env)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert trained.blob is not None and trained.blob.kind == "files"
    assert stored_bytes(store) - before < 10_000, "the unchanged weights are not stored again"
    assert trained.resources is not None and trained.resources["bytes_uploaded"] < 10_000
    assert "1 written" in done.stderr + done.stdout
    files = {f.path: f for f in read_package_contents(store, trained.blob)[0].files}
    assert files["meta.json"].sha256 == hashlib.sha256(b'{"epoch": 2}').hexdigest()
    assert files["weights.bin"].sha256 == hashlib.sha256((package / "weights.bin").read_bytes()).hexdigest()
    evaluate = spec.model_copy(update={"pipeline": "evaluate", "run_prefix": "runs/d/r/evaluate/1", "version": "1.1",
                                       "blob": trained.blob, "dataset": None,
                                       "evaluation_dataset": store.url("datasets/d")})
    done = spawn_runtime.run(evaluate, env)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = read(store, f"{evaluate.run_prefix}/outcome.json", Outcome)
    assert evaluated.resources is not None
    staged = evaluated.resources["bytes_staged"] - 4  # the evaluation data: 4 bytes
    assert staged == trained.blob.size, "only the manifest comes from the store: the training kept its new file"


def test_large_files_are_looked_up_then_read_in_ranges(
    store: Store, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_aicenter.storage import transfer

    monkeypatch.setattr(transfer, "RANGED_MIN", 2**20)  # weights.bin (3 MiB) takes the ranged path on S3
    monkeypatch.setattr(transfer, "RANGE_PART", 2**20)
    ref, _ = put_package_files(store, package)
    root, _ = stage_package(store, ref, tmp_path / "a" / "package", tmp_path / "a.zip", cache=None)
    assert tree(root) == tree(package)
    store.delete(blob_key(hashlib.sha256((package / "model" / "weights.bin").read_bytes()).hexdigest()))
    with pytest.raises(NotFoundError, match=r"package file 'model/weights\.bin' is missing from the store"):
        stage_package(store, ref, tmp_path / "b" / "package", tmp_path / "b.zip", cache=BlobCache(tmp_path / "c"))


REWRITE_IN_PLACE = '''
class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        with open("weights.bin", "r+b") as fh:  # in place, through whatever the staged file is
            fh.write(b"TUNED")
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        pass
'''


def test_a_training_that_rewrites_a_staged_file_in_place_leaves_the_cache_intact(
    store: Store, tmp_path: Path, spawn_runtime: RuntimeSpawner, request: pytest.FixtureRequest,
) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    env["AICENTER_CACHE"] = str(tmp_path / "cache")
    weights = os.urandom(BIG)
    package = write_package(tmp_path / "pkg", train=REWRITE_IN_PLACE, files={"weights.bin": weights})
    base, _ = put_package_files(store, package)
    run(upload_tree(write_package(tmp_path / "data", main=None, train=None, requirements=None, files={"a.csv": "x\n"}),
                    store, "datasets/d"))
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/train/1", package="ft", version="1.0",
                   blob=base, dataset=store.url("datasets/d"))
    for n in (1, 2):  # the second training stages the base from the cache the first one filled
        done = spawn_runtime.run(spec.model_copy(update={"run_prefix": f"runs/d/r/train/{n}"}), env)
        assert done.returncode == 0, done.stderr[-3000:]
        trained = read(store, f"runs/d/r/train/{n}/outcome.json", Outcome)
        assert trained.blob is not None and trained.resources is not None
        files = {f.path: f.sha256 for f in read_package_contents(store, trained.blob)[0].files}
        assert files["weights.bin"] == hashlib.sha256(b"TUNED" + weights[5:]).hexdigest(), "the new version has the write"
        every = base.size + sum({f.sha256: f.size for f in contents_of(package).files}.values())  # manifest, blobs
        assert trained.resources["bytes_staged"] == (every + 2 if n == 1 else 2), "the second: the base from the cache"
    root, fetched = stage_package(store, base, tmp_path / "check" / "package", tmp_path / "c.zip",
                                  cache=BlobCache(tmp_path / "cache"))
    assert fetched == 0 and (root / "weights.bin").read_bytes() == weights, "the cache still holds the base's bytes"


def test_storing_a_training_reads_back_none_of_the_parents_unmodified_blobs(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:
    """The parent's file blobs were verified when its manifest was written and are unmodified since: vouched for,
    as a re-snapshot vouches for its last manifest's blobs, so the unchanged 1.5 GB base is not downloaded again."""
    from airflow_aicenter.runtime.agent import Agent
    from airflow_aicenter.storage import transfer

    if store.uri.startswith("s3://"):
        for key, value in request.getfixturevalue("s3_env").env().items():
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AICENTER_CACHE", str(tmp_path / "cache"))
    package = write_package(tmp_path / "pkg", train=FINE_TUNE, files={"weights.bin": os.urandom(BIG), "meta.json": "{}"})
    base, _ = put_package_files(store, package)
    run(upload_tree(write_package(tmp_path / "data", main=None, train=None, requirements=None, files={"a.csv": "x\n"}),
                    store, "datasets/d"))
    read_back: list[str] = []
    hashes_to = transfer._hashes_to

    async def counted(store_: Store, key: str, sha256: str, size: int | None = None) -> bool:
        read_back.append(sha256)
        return await hashes_to(store_, key, sha256, size)

    monkeypatch.setattr(transfer, "_hashes_to", counted)
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/train/1", package="ft", version="1.0",
                   blob=base, dataset=store.url("datasets/d"))
    outcome = Agent(spec, store, tmp_path / "work").run()
    assert outcome.status == "succeeded", outcome.error
    weights = hashlib.sha256((package / "weights.bin").read_bytes()).hexdigest()
    assert weights not in read_back, "the parent's unchanged weights are vouched for, not read back"
    assert outcome.blob is not None and weights in read_package_contents(store, outcome.blob)[0].digests()


def test_a_package_one_folder_down_stages_to_that_folder(store: Store, tmp_path: Path) -> None:
    """As for a zip in AI Center's shape (one root folder): the package root is the folder with main.py."""
    write_package(tmp_path / "outer" / "churn")
    ref, _ = put_package_files(store, tmp_path / "outer")
    root, _ = stage_package(store, ref, tmp_path / "t" / "package", tmp_path / "t.zip", cache=None)
    assert root == tmp_path / "t" / "package" / "churn" and (root / "main.py").is_file()


# -- the blobs of one staging in parallel (issue 25: staging at the disk's speed) ------------------
@pytest.fixture
def many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package of 14 files from 1 byte to 6 MiB, the kernel copier's chunk lowered to 64 KiB and its pipeline
    (the copy a chunk ahead of the hash, on a helper thread) from 128 KiB: every path of a staging runs on small files."""
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 2**16)
    monkeypatch.setattr(kernel_copy, "PIPELINE_MIN", 2**17)
    files: dict[str, str | bytes] = {f"data/part-{i:02d}.bin": os.urandom(2**20 * (i % 4) + i) for i in range(10)}
    files["z/big.bin"] = os.urandom(6 * 2**20 + 5)  # the largest, last by name
    files["meta.json"] = '{"epoch": 1}'
    return write_package(tmp_path / "many", files=files)


def _entries_hash_to_their_names(cache: BlobCache) -> None:
    for entry in cache.entries.iterdir() if cache.entries.exists() else ():
        assert hashlib.sha256(entry.read_bytes()).hexdigest() == entry.name, f"cache entry {entry.name} is not whole"
    assert not cache.tmp.exists() or not any(cache.tmp.iterdir()), "no fetch left behind"


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "nocache"])
def test_a_damaged_blob_among_many_fails_the_staging_and_leaves_nothing(
    store: Store, many: Path, tmp_path: Path, cached: bool,
) -> None:
    """A flipped byte in one file blob among many staged at once: the staging fails naming that file, no package
    folder appears, no partial or damaged cache entry is left, and no copy goes on after the error."""
    ref, _ = put_package_files(store, many)
    damaged = hashlib.sha256((many / "data" / "part-06.bin").read_bytes()).hexdigest()
    _flip(store, damaged)
    cache = BlobCache(tmp_path / "cache") if cached else None
    target = tmp_path / "t" / "package"
    with pytest.raises(DamagedBlobError) as err:
        stage_package(store, ref, target, tmp_path / "x.zip", cache=cache)
    assert "package file 'data/part-06.bin' is damaged" in str(err.value) and damaged in str(err.value)
    assert not target.exists() and not list(target.parent.iterdir()), "no package folder, whole or partial"
    assert "kernel-copy" not in {t.name for t in threading.enumerate()}, "every copy ended with the staging"
    if cache is not None:
        assert not cache.path(damaged).exists()
        _entries_hash_to_their_names(cache)
    put_package_files(store, many)  # the same folder again repairs the blob; then the staging works
    root, _ = stage_package(store, ref, target, tmp_path / "x.zip", cache=cache)
    assert contents_of(root) == contents_of(many)


def test_the_file_store_stages_the_largest_blobs_first_a_few_at_a_time(
    many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copies are bound by hashing (a core each): a few at once, the largest first so it is not the tail."""
    store = open_store((tmp_path / "store").as_uri())
    ref, _ = put_package_files(store, many)
    sizes = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stat().st_size for p in many.rglob("*") if p.is_file()}
    started: list[int] = []
    running = [0, 0]  # now, most at once
    lock = threading.Lock()
    real = LocalStore.read_into

    def observed(self: LocalStore, key: str, dest: Path, **kwargs: object) -> tuple[str, int]:
        with lock:
            started.append(sizes.get(key.rsplit("/", 1)[-1], -1))
            running[0] += 1
            running[1] = max(running)
        try:
            return real(self, key, dest, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(LocalStore, "read_into", observed)
    for cache in (BlobCache(tmp_path / "cache"), None):
        started.clear()
        running[1] = 0
        target = tmp_path / f"t{cache is None}" / "package"
        root, _ = stage_package(store, ref, target, tmp_path / "x.zip", cache=cache)
        assert contents_of(root) == contents_of(many)
        assert started[0] == max(sizes.values()), "the largest blob starts first"
        assert 2 <= running[1] <= transfer.LOCAL_FILES_IN_FLIGHT


def test_a_failed_blob_stops_the_other_copies_in_flight(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staging is lost once a blob is damaged: the large copy running beside it stops between two chunks."""
    store = open_store((tmp_path / "store").as_uri())
    ref, _ = put_package_files(store, many)
    big = (many / "z" / "big.bin").stat().st_size
    _flip(store, hashlib.sha256((many / "data" / "part-07.bin").read_bytes()).hexdigest())  # 3 MiB: beside the big one
    real = os.copy_file_range
    copied = [0]

    def slow(src: int, *args: int) -> int:  # 2 ms a 64 KiB chunk of the big file: it is still running when part-07 fails
        if os.fstat(src).st_size == big:
            time.sleep(0.002)
            copied[0] += (n := real(src, *args))
            return n
        return real(src, *args)

    monkeypatch.setattr(os, "copy_file_range", slow)
    with pytest.raises(DamagedBlobError):
        stage_package(store, ref, tmp_path / "t" / "package", tmp_path / "x.zip", cache=None)
    assert copied[0] < big, "the large copy went on after the staging had failed"
    assert not list((tmp_path / "t").iterdir())
