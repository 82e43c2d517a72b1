"""Issue 13, findings 6, 13 and 14: damaged blobs are repaired when their content is put again, a
missing blob is reported as missing, and a killed upload leaves nothing that gc cannot see."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest

from airflow_aicenter.errors import NotFoundError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import FileEntry, ensure_blobs, get_blob, put_blob, run, sha256_file


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied"])
def test_putting_content_again_repairs_a_damaged_blob(store, tmp_path, damage):
    f = tmp_path / "package.zip"
    f.write_bytes(os.urandom(300_000))
    digest = sha256_file(f).sha256
    assert put_blob(store, f, digest) is True
    good = f.read_bytes()
    bad = {"flipped byte": good[:1000] + bytes([good[1000] ^ 1]) + good[1001:], "truncated": good[:-10], "emptied": b""}[damage]
    store.put_bytes(blob_key(digest), bad)
    assert put_blob(store, f, digest) is True, "the damaged blob must be rewritten"
    assert store.get_bytes(blob_key(digest)) == good
    assert put_blob(store, f, digest) is False, "an intact blob is not written again"


def test_a_snapshot_repairs_damaged_blobs(store, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    entries = []
    for i in range(8):  # every same-size blob is hashed, whatever its size
        (root / f"{i}.csv").write_bytes(os.urandom(2000 + i))
        e = sha256_file(root / f"{i}.csv")
        entries.append(FileEntry(f"{i}.csv", e.sha256, e.size))
    run(ensure_blobs(store, root, entries))
    store.put_bytes(blob_key(entries[3].sha256), b"short")  # size differs
    same_size = bytearray((root / "7.csv").read_bytes())
    same_size[5] ^= 0xFF
    store.put_bytes(blob_key(entries[7].sha256), bytes(same_size))  # same size, wrong content
    stats = run(ensure_blobs(store, root, entries))
    assert stats.uploaded_files == 2
    for e in entries:
        assert hashlib.sha256(store.get_bytes(blob_key(e.sha256))).hexdigest() == e.sha256


def test_downloading_a_missing_blob_says_it_is_missing(store, tmp_path):
    digest = "ab" * 32
    with pytest.raises(NotFoundError, match=rf"sha256:{digest}.*missing.*(upload|gc)"):
        get_blob(store, digest, tmp_path / "package.zip")
    assert [p.name for p in tmp_path.iterdir()] == (["store"] if store.scheme == "file" else [])


def test_a_killed_upload_leaves_a_temporary_that_the_file_store_lists_and_gc_removes(tmp_path):
    """obstore's local backend writes ``<key>#<n>`` then renames; a process killed in between leaves
    that file. It must be visible (listed) and removed by gc once older than the grace period."""
    from airflow_aicenter.gc import collect

    store = open_store((tmp_path / "store").as_uri())
    digest = hashlib.sha256(b"x").hexdigest()
    leftover = tmp_path / "store" / "blobs" / "sha256" / f"{digest}#1"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    old = (datetime.now(UTC) - timedelta(days=30)).timestamp()
    os.utime(leftover, (old, old))
    assert f"blobs/sha256/{digest}#1" in [i.key for i in store.list("blobs/")]
    collect(store, grace=timedelta(hours=1))
    assert not leftover.exists()
