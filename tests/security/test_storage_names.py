"""Issue 13, findings 11 and 12: names the store cannot hold, S3 folder markers, names that collide
with staging's temporaries, and a key that is also a folder."""

from __future__ import annotations

import os

import boto3
import pytest

from airflow_aicenter.errors import DatasetError, StorageError
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import download_tree, run, upload_tree


@pytest.mark.parametrize(
    "name, shown",
    [
        ("line\nbreak.txt", r"line\\nbreak"),
        ("bell\x07.txt", r"bell\\x07"),
        (os.fsdecode(b"caf\xe9.txt"), r"caf\\udce9|caf\\xe9"),
        ("model.bin#1", r"model\.bin#1"),
    ],
    ids=["newline", "control", "non-utf8", "hash-digits"],
)
def test_an_artifact_name_the_store_cannot_hold_is_refused_before_any_upload(store, tmp_path, name, shown):
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "a-first.txt").write_text("ok")
    with open(os.path.join(os.fsencode(art), os.fsencode(name)), "wb") as fh:
        fh.write(b"data")
    with pytest.raises(StorageError, match=rf"(?s)artifacts.*({shown}).*rename"):
        run(upload_tree(art, store, "runs/r/artifacts"))
    assert list(store.list("runs/")) == [], "nothing is uploaded when one name is refused"


def test_a_hash_in_an_artifact_name_is_fine(store, tmp_path):
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "run#2 notes.txt").write_text("ok")
    run(upload_tree(art, store, "runs/r/artifacts"))
    assert [i.key for i in store.list("runs/")] == ["runs/r/artifacts/run#2 notes.txt"]


def test_a_file_dataset_name_ending_in_hash_digits_is_an_error_not_skipped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("a")
    (data / "part#1").write_text("b")
    with pytest.raises(DatasetError, match=r"part#1.*rename"):
        run(download_tree(open_store(data.as_uri(), create=False), tmp_path / "staged"))


def test_dataset_files_named_like_staging_temporaries_are_staged(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(b"the real x" * 1000)
    (src / ".x.part").write_bytes(b"a file that happens to look like a temp")
    (src / "big").write_bytes(os.urandom(600_000))  # pipelined path
    (src / ".big.part").write_bytes(b"another")
    run(upload_tree(src, store, "ds"))
    entries = run(download_tree(store, tmp_path / "staged", prefix="ds"))
    assert sorted(e.path for e in entries) == [".big.part", ".x.part", "big", "x"]
    for rel in (".big.part", ".x.part", "big", "x"):
        assert (tmp_path / "staged" / rel).read_bytes() == (src / rel).read_bytes()
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == [".big.part", ".x.part", "big", "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "staged"] + (["store"] if store.scheme == "file" else [])


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing-secret")


def test_a_key_that_is_also_a_folder_is_a_clear_dataset_error(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    client = _client(s3_server)
    client.put_object(Bucket=bucket, Key="ds/x", Body=b"a file")
    client.put_object(Bucket=bucket, Key="ds/x/y", Body=b"a file below it")
    store = open_store(f"s3://{bucket}", s3_server.options)
    with pytest.raises(DatasetError, match=r"'x'.*'x/y'|'x/y'.*'x'"):
        run(download_tree(store, tmp_path / "staged", prefix="ds"))


def test_s3_folder_markers_are_skipped(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    client = _client(s3_server)
    for key, body in [("ds/", b""), ("ds/train/", b""), ("ds/train/a.csv", b"1,2"), ("ds/empty/", b""),
                      ("ds/_SUCCESS", b"")]:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    store = open_store(f"s3://{bucket}", s3_server.options)
    entries = run(download_tree(store, tmp_path / "staged", prefix="ds"))
    assert sorted(e.path for e in entries) == ["_SUCCESS", "train/a.csv"]
    assert (tmp_path / "staged" / "_SUCCESS").read_bytes() == b""
    assert (tmp_path / "staged" / "train" / "a.csv").read_bytes() == b"1,2"
