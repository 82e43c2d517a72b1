"""The file store's own write path (LocalStore.put_file): a local file copied in the kernel, same guarantees.

upload_file (artifacts, package and snapshot blobs, checkpoints, repairs) writes to a file
store with plain file I/O instead of obstore: a temporary beside the key, fsync, then a link
(create-once) or a rename (overwrite). These tests hold it to the store's rules: no partial
object is ever visible, a process killed mid-copy leaves no object, bytes that do not match the
expected digest store nothing, a create-once put of any size refuses an existing key.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from airflow_aicenter import kernel_copy
from airflow_aicenter.errors import AlreadyExistsError, StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import SINGLE_PUT_MAX, put_blob, run, sha256_file, upload_file, upload_tree

BIG = SINGLE_PUT_MAX + 3 * 2**20 + 17  # a multipart upload on S3


def _file(tmp_path: Path, size: int, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "#" in p.name)


@pytest.mark.parametrize("size", [0, 5, BIG])
def test_a_file_store_put_stores_the_exact_bytes(tmp_path, size):
    store = open_store((tmp_path / "store").as_uri())
    src = _file(tmp_path, size)
    run(upload_file(store, src, "a/b/c.bin"))
    assert (tmp_path / "store" / "a/b/c.bin").read_bytes() == src.read_bytes()
    assert _leftovers(tmp_path / "store") == []


def test_a_create_once_put_of_a_large_file_refuses_an_existing_key(tmp_path):
    """A large create-once put to the file store is create-once too (S3's multipart cannot be: the blob rule there)."""
    store = open_store((tmp_path / "store").as_uri())
    first, second = _file(tmp_path, BIG, "first.bin"), _file(tmp_path, BIG, "second.bin")
    run(upload_file(store, first, "k.bin", create=True, expect_sha256=sha256_file(first).sha256))
    with pytest.raises(AlreadyExistsError, match=r"k\.bin already exists"):
        run(upload_file(store, second, "k.bin", create=True, expect_sha256=sha256_file(second).sha256))
    assert store.get_bytes("k.bin") == first.read_bytes()


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("size", [5, BIG])
def test_bytes_that_do_not_match_the_digest_store_nothing(store, tmp_path, size):
    src = _file(tmp_path, size)
    wrong = "0" * 64
    with pytest.raises(StorageError, match=f"changed while it was being stored.*not sha256:{wrong}"):
        run(upload_file(store, src, blob_key(wrong), create=True, expect_sha256=wrong))
    assert store.head(blob_key(wrong)) is None
    if store.scheme == "file":
        assert _leftovers(tmp_path / "store") == []


def test_an_overwrite_replaces_whole_and_readers_never_see_a_partial_file(tmp_path, monkeypatch):
    """While a large put copies, the key still holds the old bytes; then the new ones, never a mix."""
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 2**20)  # many chunks: a reader has time to look between them
    store = open_store((tmp_path / "store").as_uri())
    old, new = _file(tmp_path, BIG, "old.bin"), _file(tmp_path, BIG, "new.bin")
    run(upload_file(store, old, "m.bin"))
    target = tmp_path / "store" / "m.bin"
    seen: set[bytes] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(target.read_bytes())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run(upload_file(store, new, "m.bin"))
    finally:
        stop.set()
        watcher.join()
    seen.add(target.read_bytes())
    assert seen <= {old.read_bytes(), new.read_bytes()} and new.read_bytes() in seen
    assert _leftovers(tmp_path / "store") == []


def test_a_process_killed_mid_copy_leaves_no_object(tmp_path):
    """SIGKILL after the first chunk is copied: the key does not exist; only a ``#<n>`` temporary that gc removes."""
    root = tmp_path / "store"
    src = _file(tmp_path, 3 * 2**20 + 5)
    digest = sha256_file(src).sha256
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from airflow_aicenter import kernel_copy
        from airflow_aicenter.storage import open_store
        from airflow_aicenter.storage.transfer import put_blob
        kernel_copy.COPY_CHUNK = 2**20
        real = os.copy_file_range
        def copy_then_die(*args, **kwargs):
            n = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # the machine or the pod dies with the copy half done
            return n
        os.copy_file_range = copy_then_die
        put_blob(open_store({root.as_uri()!r}), Path({str(src)!r}), {digest!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    store = open_store(root.as_uri())
    assert store.head(blob_key(digest)) is None
    leftovers = _leftovers(root)
    assert len(leftovers) == 1 and leftovers[0].startswith(blob_key(digest) + "#"), leftovers
    assert put_blob(store, src, digest)  # still missing: stored now
    assert store.get_bytes(blob_key(digest)) == src.read_bytes()


def test_a_cancelled_put_stores_nothing(tmp_path, monkeypatch):
    """An upload cancelled mid-copy (a task killed, a sibling failed) neither lands later nor leaves a temporary."""
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", 2**20)
    store = open_store((tmp_path / "store").as_uri())
    src = _file(tmp_path, 64 * 2**20)
    real = os.copy_file_range
    started = threading.Event()

    def slow_copy(*args: int) -> int:
        started.set()
        threading.Event().wait(0.02)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", slow_copy)

    async def cancel_mid_copy() -> None:
        task = asyncio.ensure_future(upload_file(store, src, "c.bin"))
        while not started.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_mid_copy())
    assert store.head("c.bin") is None
    assert _leftovers(tmp_path / "store") == []


def test_a_tree_uploads_to_the_file_store_with_names_kept(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big.bin").write_bytes(os.urandom(BIG))
    (src / "small.txt").write_text("x")
    store = open_store((tmp_path / "store").as_uri())
    run(upload_tree(src, store, "out"))
    assert (tmp_path / "store/out/d/big.bin").read_bytes() == (src / "d" / "big.bin").read_bytes()
    assert (tmp_path / "store/out/small.txt").read_text() == "x"
    assert _leftovers(tmp_path / "store") == []


@pytest.mark.parametrize("verified", [False, True])
def test_a_put_where_the_kernel_refuses_the_copy_goes_through_a_buffer(tmp_path, monkeypatch, verified):
    """Another file system on an old kernel (EXDEV): the same bytes, verified where a digest is expected."""
    import errno

    def refused(*args: int) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refused)
    store = open_store((tmp_path / "store").as_uri())
    src = _file(tmp_path, BIG)
    digest = sha256_file(src).sha256 if verified else None
    run(upload_file(store, src, "v.bin", create=True, expect_sha256=digest))
    assert store.get_bytes("v.bin") == src.read_bytes()
    if verified:
        with pytest.raises(StorageError, match="changed while it was being stored"):
            run(upload_file(store, src, "w.bin", expect_sha256="1" * 64))
        assert store.head("w.bin") is None
