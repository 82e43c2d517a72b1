"""Blob integrity at any size: blob_state, repair by re-snapshot (ensure_blobs) and put_blob."""

from __future__ import annotations

import os

import pytest

from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage.transfer import FileEntry, blob_state, ensure_blobs, put_blob, run, sha256_file


def test_blob_state_hashes_the_whole_object(store, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(300_000))
    digest = sha256_file(f).sha256
    assert blob_state(store, digest) == "missing"
    put_blob(store, f, digest)
    assert blob_state(store, digest) == "ok"
    flipped = bytearray(f.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # same size, one bit
    store.put_bytes(blob_key(digest), bytes(flipped))
    assert blob_state(store, digest) == "damaged"
    store.put_bytes(blob_key(digest), f.read_bytes()[:-1])  # truncated
    assert blob_state(store, digest) == "damaged"
    store.delete(blob_key(digest))
    assert blob_state(store, digest) == "missing"


@pytest.mark.parametrize("stored", [b"", b"abc\0"], ids=["empty", "padded"])
def test_blob_state_of_an_empty_or_padded_object(store, tmp_path, stored):
    f = tmp_path / "small.txt"
    f.write_bytes(b"abc")
    digest = sha256_file(f).sha256
    store.put_bytes(blob_key(digest), stored)
    assert blob_state(store, digest) == "damaged"


def _large_blob_flipped(store, tmp_path):
    """A 17 MiB file stored as a blob, then one byte of the stored copy flipped (same size)."""
    f = tmp_path / "large.bin"
    f.write_bytes(os.urandom(17 * 2**20))
    digest = sha256_file(f).sha256
    assert put_blob(store, f, digest) is True
    damaged = bytearray(f.read_bytes())
    damaged[9 * 2**20 + 3] ^= 0x01
    store.put_bytes(blob_key(digest), bytes(damaged))
    assert blob_state(store, digest) == "damaged"
    return f, digest


def test_put_blob_repairs_a_large_blob_with_one_byte_flipped(store, tmp_path):
    """Above the old 16 MiB limit a same-size blob was trusted without a look (issue 20, finding 2)."""
    f, digest = _large_blob_flipped(store, tmp_path)
    assert put_blob(store, f, digest) is True, "the damaged blob must be rewritten"
    assert blob_state(store, digest) == "ok"
    assert put_blob(store, f, digest) is False, "an intact blob is not written again"


def test_a_snapshot_repairs_a_large_blob_with_one_byte_flipped(store, tmp_path):
    f, digest = _large_blob_flipped(store, tmp_path)
    small = tmp_path / "small.csv"
    small.write_bytes(b"a,b\n1,2\n")
    entries = [FileEntry(f.name, digest, f.stat().st_size), FileEntry(small.name, *_digest_size(small))]
    stats = run(ensure_blobs(store, tmp_path, entries))
    assert (stats.uploaded_files, stats.uploaded_bytes) == (2, f.stat().st_size + small.stat().st_size)
    assert blob_state(store, digest) == "ok"
    again = run(ensure_blobs(store, tmp_path, entries))
    assert again.uploaded_files == 0


def _digest_size(path):
    entry = sha256_file(path)
    return entry.sha256, entry.size
