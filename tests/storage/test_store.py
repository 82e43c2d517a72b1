"""The store interface on both backends: create-once, copy, listing, errors, transfers."""

from __future__ import annotations

import hashlib
import os

import pytest

from airflow_aicenter.errors import AlreadyExistsError, ConfigurationError, DatasetError, NotFoundError, StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import (
    FileEntry,
    download_tree,
    ensure_blobs,
    get_blob,
    put_blob,
    run,
    sha256_file,
    upload_tree,
)


def test_create_once_refuses_second_writer(store):
    store.put_bytes("a/record.json", b"first", create=True)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        store.put_bytes("a/record.json", b"second", create=True)
    assert store.get_bytes("a/record.json") == b"first"


def test_overwrite_copy_list_delete(store):
    store.put_bytes("x/1", b"one")
    store.put_bytes("x/1", b"uno")
    store.copy("x/1", "y/2")
    assert store.get_bytes("y/2") == b"uno"
    assert sorted(i.key for i in store.list("")) == ["x/1", "y/2"]
    dirs, objs = store.list_dir("")
    assert sorted(dirs) == ["x", "y"] and objs == []
    store.delete("x/1")
    assert not store.exists("x/1") and store.head("y/2").size == 3


def test_missing_object_is_a_clear_error(store):
    with pytest.raises(NotFoundError, match=r"nope\.json does not exist"):
        store.get_bytes("nope.json")
    assert store.head("nope.json") is None


def test_tree_roundtrip_with_digests(store, tmp_path):
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 3}" / f"f{i}.bin").write_bytes(os.urandom(100 + i))
    uploaded = run(upload_tree(src, store, "data"))
    assert len(uploaded) == 40
    entries = run(download_tree(store, tmp_path / "dst", prefix="data"))
    assert len(entries) == 40
    for entry in entries:
        original = (src / entry.path).read_bytes()
        assert (tmp_path / "dst" / entry.path).read_bytes() == original
        assert entry.sha256 == hashlib.sha256(original).hexdigest()


def test_empty_dataset_prefix_is_an_error(store, tmp_path):
    with pytest.raises(DatasetError, match="empty or does not exist"):
        run(download_tree(store, tmp_path / "dst", prefix="datasets/none"))


def test_blobs_are_written_once_and_verified(store, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"weights" * 1000)
    digest = sha256_file(f).sha256
    assert put_blob(store, f, digest) is True
    assert put_blob(store, f, digest) is False  # already there: nothing written
    got = get_blob(store, digest, tmp_path / "back.bin")
    assert got.sha256 == digest and (tmp_path / "back.bin").read_bytes() == f.read_bytes()
    # damage the stored object: the download must refuse it and leave no file behind
    store.put_bytes(blob_key(digest), b"tampered")
    with pytest.raises(StorageError, match="is corrupt"):
        get_blob(store, digest, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists()


def test_ensure_blobs_uploads_only_missing(store, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    entries = []
    for i in range(20):
        p = root / f"{i}.txt"
        p.write_text(f"row {i}")
        e = sha256_file(p)
        entries.append(FileEntry(p.name, e.sha256, e.size))
    first = run(ensure_blobs(store, root, entries))
    assert first.uploaded_files == 20
    second = run(ensure_blobs(store, root, entries))
    assert second.uploaded_files == 0 and second.uploaded_bytes == 0
    (root / "0.txt").write_text("changed")
    e = sha256_file(root / "0.txt")
    entries[0] = FileEntry("0.txt", e.sha256, e.size)
    third = run(ensure_blobs(store, root, entries))
    assert third.uploaded_files == 1


@pytest.mark.parametrize(
    "uri, message",
    [
        ("", "storage URI is empty"),
        ("gs://bucket/x", "not supported"),
        ("file://host/abs", "names a host"),
        ("relative/path", "is relative"),
        ("s3:///nobucket", "not an S3 URI"),
    ],
)
def test_bad_storage_uris(uri, message):
    with pytest.raises(ConfigurationError, match=message):
        open_store(uri)


def test_a_missing_bucket_names_the_fix(s3_server):
    from airflow_aicenter.storage import S3Options

    bucket = s3_server.create_bucket()
    options = S3Options(endpoint_url=s3_server.endpoint, region="us-east-1", access_key_id="x", secret_access_key="y")
    store = open_store(f"s3://{bucket}-missing/p", options)
    for request in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"), lambda: list(store.list(""))):
        with pytest.raises(StorageError, match=f"bucket '{bucket}-missing' does not exist .*create it, or fix the bucket name"):
            request()


def test_large_objects_download_through_the_pipeline_and_are_verified(store, tmp_path):
    from airflow_aicenter.storage.transfer import PIPELINE_MIN

    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(PIPELINE_MIN + 3 * 2**20 + 17))  # pipelined path, several chunks, odd tail
    digest = sha256_file(f).sha256
    put_blob(store, f, digest)
    got = get_blob(store, digest, tmp_path / "back.bin")
    assert (got.sha256, got.size) == (digest, f.stat().st_size)
    assert (tmp_path / "back.bin").read_bytes() == f.read_bytes()
    # one flipped byte in the stored object: refused, no file left
    damaged = bytearray(f.read_bytes())
    damaged[PIPELINE_MIN + 5] ^= 0xFF
    store.put_bytes(blob_key(digest), bytes(damaged))
    with pytest.raises(StorageError, match="is corrupt"):
        get_blob(store, digest, tmp_path / "bad.bin")
    assert not (tmp_path / "bad.bin").exists() and not list(tmp_path.glob(".bad.bin.part"))


def test_reading_a_missing_local_folder_never_creates_it(tmp_path):
    missing = tmp_path / "typo" / "dataset"
    with pytest.raises(NotFoundError, match="does not exist"):
        open_store(missing.as_uri(), create=False)
    assert not (tmp_path / "typo").exists(), "a typo in a dataset URI must not leave a folder behind"
    a_file = tmp_path / "rows.csv"
    a_file.write_text("a\n1\n")
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        open_store(a_file.as_uri(), create=False)
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        open_store(a_file.as_uri())
    assert list(open_store((tmp_path / "new-root").as_uri()).list("")) == [] and (tmp_path / "new-root").is_dir()


def test_a_download_that_fails_midway_leaves_no_partial_file(store, tmp_path, monkeypatch):
    from airflow_aicenter.storage import transfer

    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(3 * 2**20 + 17))  # pipelined: several chunks
    store.put_bytes("data/weights.bin", f.read_bytes())
    calls = []

    def failing_write(chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    if store.scheme == "file":  # the file store copies in the kernel, COPY_CHUNK at a time (LocalStore.read_into)
        from airflow_aicenter import kernel_copy

        real_copy = os.copy_file_range
        monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 2**20)

        def failing_copy(src, dst, count, offset_src=None, offset_dst=None):
            failing_write(b"x" * count)
            return real_copy(src, dst, count, offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", failing_copy)
    else:
        real_pipelined = transfer._pipelined
        monkeypatch.setattr(transfer, "_pipelined", lambda stream, sink: real_pipelined(stream, failing_write))
    with pytest.raises(StorageError, match="No space left on device"):
        run(transfer.download_file(store, "data/weights.bin", tmp_path / "out" / "weights.bin"))
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == [], "no .part file is left behind"
    with pytest.raises(NotFoundError):
        run(transfer.download_file(store, "data/missing.bin", tmp_path / "out" / "missing.bin"))
    assert list((tmp_path / "out").iterdir()) == []


def test_large_objects_are_read_as_concurrent_ranges_and_written_as_multipart(store, tmp_path, monkeypatch):
    """Above RANGED_MIN an S3 object is read as RANGE_PART ranges (a few in flight, each written at its
    offset), and the digest still covers every byte in order; a file store reads one stream."""
    import obstore

    from airflow_aicenter.storage import transfer

    monkeypatch.setattr(transfer, "RANGED_MIN", 4 * 2**20)
    monkeypatch.setattr(transfer, "RANGE_PART", 2**20)
    ranges: list[tuple[int, int]] = []
    real_get = obstore.get_async

    async def spy(inner, key, *, options=None):
        if options and "range" in options:
            ranges.append(tuple(options["range"]))
        return await real_get(inner, key, options=options)

    monkeypatch.setattr(obstore, "get_async", spy)
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(transfer.SINGLE_PUT_MAX + 5 * 2**20 + 99))  # multipart upload: 2 parts
    digest = sha256_file(f).sha256
    assert put_blob(store, f, digest) is True
    assert store.head(blob_key(digest)).size == f.stat().st_size
    got = get_blob(store, digest, tmp_path / "back.bin")
    assert (got.sha256, got.size) == (digest, f.stat().st_size)
    assert (tmp_path / "back.bin").read_bytes() == f.read_bytes()
    if store.scheme == "s3":
        size = f.stat().st_size
        assert sorted(ranges) == [(s, min(s + 2**20, size)) for s in range(0, size, 2**20)]
    else:
        assert ranges == []


def test_a_file_or_folder_removed_during_a_listing_is_left_out_not_an_error(tmp_path):
    """A writer renames its temporary into place and gc deletes while another process lists:
    what vanished between reading a folder and looking at an entry is simply not listed (as
    on S3), instead of failing the listing (seen in CI: gc during an upload hit a
    ``*.json#1`` temporary that its writer had just renamed)."""
    import shutil

    from airflow_aicenter.storage.store import LocalStore

    root = tmp_path / "store"
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.txt").write_text("one")
    (root / "a" / "2.txt#1").write_text("temporary")
    (root / "a" / "3.txt").write_text("three")
    (root / "z").mkdir()
    (root / "z" / "late.txt").write_text("late")
    store = LocalStore(root.as_uri())

    listing = store.list()
    first = next(listing)
    assert first.key == "a/1.txt"
    (root / "a" / "2.txt#1").rename(root / "a" / "2.txt")  # the writer publishes its temporary
    shutil.rmtree(root / "z")  # and gc removes a whole folder
    assert [o.key for o in listing] == ["a/3.txt"]
    assert sorted(o.key for o in store.list()) == ["a/1.txt", "a/2.txt", "a/3.txt"]



def _create_race(store, key: str, writers: int) -> tuple[list[int], list[int], list[BaseException]]:
    """``writers`` threads create ``key`` at the same moment: (winners, losers, other errors)."""
    import threading

    barrier = threading.Barrier(writers)
    won: list[int] = []
    lost: list[int] = []
    other: list[BaseException] = []

    def write(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            store.put_bytes(key, f"writer {i}".encode() * 2_000, create=True)
            won.append(i)
        except AlreadyExistsError:
            lost.append(i)
        except BaseException as exc:
            other.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, lost, other


def test_create_once_has_one_winner_among_concurrent_writers(store):
    """Version records, checkpoint manifests and run markers rely on it: of many writers creating
    one key at the same moment exactly one succeeds, the others get AlreadyExistsError, and the
    key holds the winner's bytes. (On the S3 side this also checks the test server: moto alone
    let two conditional PUTs of one key both succeed under load; tests/conftest.py fixes that.)"""
    writers = 12
    for round_ in range(15):
        key = f"race/{round_}.json"
        won, lost, other = _create_race(store, key, writers)
        assert not other, other
        assert len(won) == 1 and len(lost) == writers - 1, (round_, won)
        assert store.get_bytes(key) == f"writer {won[0]}".encode() * 2_000
