"""Blob integrity at any size: blob_state, repair by re-snapshot (ensure_blobs) and put_blob."""

from __future__ import annotations

import os

import pytest

from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage.transfer import blob_state, put_blob, sha256_file


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
