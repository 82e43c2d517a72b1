"""The file store's own read path (LocalStore.read_into, LocalStore.head): plain file I/O, same guarantees.

Staging from the file store copies in the kernel and hashes the copy instead of reading
through obstore; these tests hold it to what the obstore path guaranteed, on both stores: a
flipped byte is found, a missing blob is named, and the staged file is a copy of its own, so
user code writing it cannot change the store.
"""

from __future__ import annotations

import errno
import hashlib
import os

import obstore
import pytest

from airflow_aicenter import kernel_copy
from airflow_aicenter.errors import NotFoundError, StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage import store as store_module
from airflow_aicenter.storage.transfer import WHOLE_MAX, download_tree, get_blob, put_blob, run, sha256_file


def _stored(store, tmp_path, content: bytes) -> str:
    src = tmp_path / "source.bin"
    src.write_bytes(content)
    digest = sha256_file(src).sha256
    put_blob(store, src, digest)
    return digest


def test_staging_finds_a_flipped_byte(store, tmp_path):
    content = os.urandom(3 * 2**20 + 123)
    digest = _stored(store, tmp_path, content)
    flipped = bytearray(content)
    flipped[len(flipped) // 2] ^= 0x01  # same size, one bit
    store.put_bytes(blob_key(digest), bytes(flipped))
    dest = tmp_path / "stage" / "package.zip"
    with pytest.raises(StorageError, match=f"is corrupt: its content hashes to sha256:(?!{digest}).*expected sha256:{digest}"):
        get_blob(store, digest, dest)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []  # no partial file left behind


def test_staging_a_missing_blob_names_it(store, tmp_path):
    digest = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(NotFoundError, match=f"blob sha256:{digest} is missing from the store.*aicenter verify --repair"):
        get_blob(store, digest, tmp_path / "package.zip")
    assert not (tmp_path / "package.zip").exists()


def test_the_staged_file_is_a_copy_user_code_may_write(store, tmp_path):
    content = os.urandom(2**20 + 5)
    digest = _stored(store, tmp_path, content)
    dest = tmp_path / "work" / "package.zip"
    entry = get_blob(store, digest, dest)
    assert (entry.sha256, entry.size) == (digest, len(content))
    assert dest.read_bytes() == content
    st = dest.stat()
    assert st.st_nlink == 1  # not a hard link to the store's blob
    with open(dest, "r+b") as fh:  # what user code may do to its package folder
        fh.write(b"overwritten by user code")
    with open(dest, "ab") as fh:
        fh.write(b"appended")
    assert store.get_bytes(blob_key(digest)) == content
    get_blob(store, digest, tmp_path / "again.zip")  # the store's blob still verifies
    if store.scheme == "file":
        assert st.st_ino != os.stat(store.root / blob_key(digest)).st_ino


@pytest.mark.parametrize("chunk", [kernel_copy.COPY_CHUNK, 100_000], ids=["default-chunk", "unaligned-chunk"])
def test_download_tree_hashes_every_size(store, tmp_path, monkeypatch, chunk):
    """Sizes around the chunk (the file store maps each copied chunk at an aligned offset to hash it)."""
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", chunk)
    files = {
        "empty": b"",
        "one": b"x",
        "a/around-chunk": os.urandom(chunk + 7),
        "a/b/several-chunks": os.urandom(3 * chunk - 1),
        "small.txt": b"hello\n",
    }
    for rel, data in files.items():
        store.put_bytes(f"data/{rel}", data)
    entries = run(download_tree(store, tmp_path / "out", prefix="data"))
    assert {e.path: (e.sha256, e.size) for e in entries} == {
        rel: (hashlib.sha256(data).hexdigest(), len(data)) for rel, data in files.items()
    }
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data


def test_a_refused_kernel_copy_goes_through_a_buffer(tmp_path, monkeypatch):
    """copy_file_range refused after the first chunk (another file system on an old kernel): the rest is read and hashed."""
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 65536)
    content = os.urandom(5 * 65536 + 11)
    digest = _stored(store, tmp_path, content)
    real = os.copy_file_range
    calls = []

    def refuse_after_one(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", refuse_after_one)
    entry = get_blob(store, digest, tmp_path / "out.bin")
    assert (entry.sha256, entry.size) == (digest, len(content))
    assert (tmp_path / "out.bin").read_bytes() == content
    assert len(calls) == 2


def test_a_failed_kernel_copy_is_a_storage_error_and_leaves_nothing(tmp_path, monkeypatch):
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    digest = _stored(store, tmp_path, b"payload" * 1000)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", disk_full)
    (tmp_path / "stage").mkdir()
    with pytest.raises(StorageError, match="No space left on device"):
        get_blob(store, digest, tmp_path / "stage" / "out.bin")
    assert os.listdir(tmp_path / "stage") == []


def test_file_store_head_is_a_stat_with_obstores_answers(tmp_path):
    """head() answers as obstore's HEAD did (size, Last-Modified, etag), from one os.stat."""
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    store.put_bytes("blobs/ab/cdef", b"12345")
    ours = store.head("blobs/ab/cdef")
    theirs = obstore.head(store.inner, "blobs/ab/cdef")
    assert ours is not None
    assert (ours.key, ours.size, ours.etag) == (theirs["path"], theirs["size"], theirs["e_tag"])
    assert abs((ours.last_modified - theirs["last_modified"]).total_seconds()) < 1e-3
    assert run(store.head_async("blobs/ab/cdef")) == ours
    assert store.head("blobs/ab/missing") is None
    assert store.head("blobs/ab") is None  # a folder is not an object
    assert store.head("blobs/ab/cdef/below-a-file") is None


def test_file_store_head_refuses_a_link_out_of_the_store(tmp_path):
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    outside = tmp_path / "secret"
    outside.write_text("not yours")
    (store.root / "blobs").mkdir()
    os.symlink(outside, store.root / "blobs" / "link")
    with pytest.raises(StorageError, match="outside"):
        store.head("blobs/link")
    with pytest.raises(StorageError, match="outside"):
        store.read_into("blobs/link", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_read_into_replaces_what_the_destination_held(tmp_path):
    """A shorter file read into an existing destination leaves none of its old tail."""
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    store.put_bytes("k", b"a" * 100)
    hexdigest, size = store.read_into("k", tmp_path / "copy")
    assert (hexdigest, size) == (hashlib.sha256(b"a" * 100).hexdigest(), 100)
    store.put_bytes("k", b"b" * 50)
    assert store.read_into("k", tmp_path / "copy") == (hashlib.sha256(b"b" * 50).hexdigest(), 50)
    assert (tmp_path / "copy").read_bytes() == b"b" * 50  # truncated, not left with the old tail


# -- extraction: stored entries copied in the kernel, CRC checked on the copy -------------------
def _package_zip(tmp_path, weights: bytes):
    from airflow_aicenter.package.archive import write_zip

    folder = tmp_path / "pkg"
    (folder / "model").mkdir(parents=True)
    (folder / "main.py").write_text("class Main:\n    pass\n")
    (folder / "requirements.txt").write_text("")
    (folder / "model" / "weights.bin").write_bytes(weights)  # random: incompressible, so stored
    (folder / "run.sh").write_text("#!/bin/sh\n")
    (folder / "run.sh").chmod(0o755)
    write_zip(folder, tmp_path / "pkg.zip")
    return tmp_path / "pkg.zip"


def _stored_weights(zip_path):
    import zipfile

    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo("model/weights.bin")
        assert info.compress_type == zipfile.ZIP_STORED
        header = zip_path.read_bytes()[info.header_offset:info.header_offset + 30]
        return info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


@pytest.mark.parametrize("chunk", [16 << 20, 100_000], ids=["default-chunk", "unaligned-chunk"])
def test_extract_copies_a_stored_entry_exactly(tmp_path, monkeypatch, chunk):
    from airflow_aicenter.package import archive

    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", chunk)
    weights = os.urandom(3 * 2**20 + 5)
    root = archive.extract_zip(_package_zip(tmp_path, weights), tmp_path / "out")
    assert (root / "model" / "weights.bin").read_bytes() == weights
    assert (root / "model" / "weights.bin").stat().st_nlink == 1
    assert (root / "run.sh").stat().st_mode & 0o111
    assert (root / "main.py").read_text() == "class Main:\n    pass\n"


def test_extract_finds_a_flipped_byte_in_a_stored_entry(tmp_path):
    """A zip not verified by digest (a user's own zip): the CRC of the copy is still checked."""
    from airflow_aicenter.package import archive

    zip_path = _package_zip(tmp_path, os.urandom(2**20 + 3))
    data = bytearray(zip_path.read_bytes())
    data[_stored_weights(zip_path) + 1000] ^= 0x01
    zip_path.write_bytes(bytes(data))
    with pytest.raises(archive.ArchiveError, match=r"zip entry 'model/weights\.bin' is corrupt"):
        archive.extract_zip(zip_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no partial folder left


def test_extract_refuses_a_local_header_naming_another_file(tmp_path):
    from airflow_aicenter.package import archive

    zip_path = _package_zip(tmp_path, os.urandom(2**20 + 3))
    data = zip_path.read_bytes()
    first = data.index(b"model/weights.bin")  # the local header's name comes first, the central directory's last
    zip_path.write_bytes(data[:first] + b"model/WEIGHTS.bin" + data[first + len(b"model/weights.bin"):])
    with pytest.raises(archive.ArchiveError, match=r"zip entry 'model/weights\.bin' .*corrupt"):
        archive.extract_zip(zip_path, tmp_path / "out")


def test_extract_through_a_buffer_where_the_kernel_refuses_the_copy(tmp_path, monkeypatch):
    """kernel_copy's buffered path: the entry is read once, its CRC checked, written."""
    from airflow_aicenter.package import archive

    weights = os.urandom(2**20 + 3)
    zip_path = _package_zip(tmp_path, weights)

    def refused(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    root = archive.extract_zip(zip_path, tmp_path / "out")
    assert (root / "model" / "weights.bin").read_bytes() == weights


# -- extract_blob: the package zip read in place on the file store, verified in the same pass -----
def _stored_package(store, tmp_path, weights: bytes):
    zip_path = _package_zip(tmp_path, weights)
    digest = sha256_file(zip_path).sha256
    put_blob(store, zip_path, digest)
    return zip_path, digest


@pytest.mark.parametrize("where", ["stored-entry", "central-directory", "end"])
def test_staging_a_package_finds_a_flipped_byte(store, tmp_path, where):
    """In a stored entry (hashed from its copy), in the zip's structure (fails as a zip first), or past the entries."""
    from airflow_aicenter.storage.transfer import extract_blob

    zip_path, digest = _stored_package(store, tmp_path, os.urandom(2**20 + 3))
    data = bytearray(zip_path.read_bytes())
    at = {"stored-entry": _stored_weights(zip_path) + 10, "central-directory": data.rindex(b"PK\x01\x02") + 4,
          "end": len(data) - 2}[where]
    data[at] ^= 0x01
    store.put_bytes(blob_key(digest), bytes(data))
    (tmp_path / "work").mkdir()
    with pytest.raises(StorageError, match=f"is corrupt: its content hashes to sha256:(?!{digest}).*expected sha256:{digest}"):
        extract_blob(store, digest, tmp_path / "work" / "package", tmp_path / "work" / "package.zip")
    assert os.listdir(tmp_path / "work") == []  # no package folder, no zip, no partial folder


def test_staging_a_missing_package_blob_names_it(store, tmp_path):
    from airflow_aicenter.storage.transfer import extract_blob

    digest = hashlib.sha256(b"gone").hexdigest()
    with pytest.raises(NotFoundError, match=f"blob sha256:{digest} is missing from the store"):
        extract_blob(store, digest, tmp_path / "package", tmp_path / "package.zip")
    assert not (tmp_path / "package").exists()


def test_a_package_staged_in_place_is_a_copy_user_code_may_write(store, tmp_path):
    """Extracted from the blob read in place: every file is new, so writing it leaves the store's blob intact."""
    from airflow_aicenter.storage.transfer import extract_blob

    weights = os.urandom(2**20 + 3)
    zip_path, digest = _stored_package(store, tmp_path, weights)
    (tmp_path / "work").mkdir()
    root, size = extract_blob(store, digest, tmp_path / "work" / "package", tmp_path / "work" / "package.zip")
    assert size == zip_path.stat().st_size
    assert sorted(os.listdir(tmp_path / "work")) == ["package"]  # no zip left behind
    staged = root / "model" / "weights.bin"
    assert staged.read_bytes() == weights and staged.stat().st_nlink == 1
    assert (root / "run.sh").stat().st_mode & 0o111
    staged.write_bytes(b"retrained")
    (root / "main.py").write_text("changed by user code\n")
    assert hashlib.sha256(store.get_bytes(blob_key(digest))).hexdigest() == digest


def test_extract_zip_verifies_a_digest_in_the_same_pass(tmp_path, monkeypatch):
    from airflow_aicenter.package import archive

    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 100_000)
    weights = os.urandom(3 * 2**20 + 1)
    zip_path = _package_zip(tmp_path, weights)
    digest = sha256_file(zip_path).sha256
    root = archive.extract_zip(zip_path, tmp_path / "ok", expect_sha256=digest)
    assert (root / "model" / "weights.bin").read_bytes() == weights
    with pytest.raises(StorageError, match=f"hashes to sha256:{digest}, expected sha256:{'0' * 64}"):
        archive.extract_zip(zip_path, tmp_path / "bad", expect_sha256="0" * 64)
    assert not (tmp_path / "bad").exists()


def test_file_store_get_bytes_reads_plainly_and_answers_as_before(tmp_path):
    """get_bytes (records, small dataset files) is one read: missing and folder keys are NotFoundError, links stay inside."""
    store = store_module.LocalStore((tmp_path / "store").as_uri())
    store.put_bytes("records/a.json", b'{"a": 1}')
    store.put_bytes("records/big.bin", payload := os.urandom(300_000))
    assert store.get_bytes("records/a.json") == b'{"a": 1}'
    assert store.get_bytes("records/big.bin") == payload
    store.put_bytes("records/empty", b"")
    assert store.get_bytes("records/empty") == b""
    with pytest.raises(NotFoundError):
        store.get_bytes("records/missing.json")
    with pytest.raises(NotFoundError):
        store.get_bytes("records")
    (tmp_path / "secret").write_text("not yours")
    os.symlink(tmp_path / "secret", store.root / "records" / "link.json")
    with pytest.raises(StorageError, match="outside"):
        store.get_bytes("records/link.json")
    os.mkfifo(store.root / "records" / "pipe.json")
    with pytest.raises(StorageError, match="not a regular file"):
        store.get_bytes("records/pipe.json")


def test_staging_into_a_data_folder_that_is_a_mount_of_its_own(store, tmp_path, monkeypatch):
    """In a pod data/ and test_data/ are mounts of their own: nothing renames into them from beside (EXDEV).

    The mount is faked: a rename into ``data`` from outside it fails as the kernel fails it. A file
    large enough to go through a temporary still lands, and no temporary is left in either folder.
    """
    big = os.urandom(WHOLE_MAX + 1)
    store.put_bytes("ds/big.bin", big)
    store.put_bytes("ds/sub/small.csv", b"a,b\n1,2\n")
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    data = data.resolve()
    real_replace = os.replace

    def mounted(src, dst, **kwargs):
        inside = [os.path.commonpath([str(data), os.path.abspath(p)]) == str(data) for p in (src, dst)]
        if inside == [False, True]:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", mounted)
    entries = run(download_tree(store, data, prefix="ds"))
    assert [(e.path, e.size) for e in entries] == [("big.bin", len(big)), ("sub/small.csv", 8)]
    assert (data / "big.bin").read_bytes() == big
    assert sorted(os.listdir(data)) == ["big.bin", "sub"]
    assert os.listdir(data.parent) == ["data"]
