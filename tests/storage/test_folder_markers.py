"""S3 keys ending in '/' in a dataset: an empty one is a folder marker (ignored), one with content is refused by name."""

from __future__ import annotations

import boto3
import pytest

from airflow_aicenter.errors import DatasetError
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import download_tree, run


@pytest.fixture
def dataset(s3_server):
    bucket = s3_server.create_bucket()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing-secret")
    client.put_object(Bucket=bucket, Key="ds/a.csv", Body=b"a\n1\n")
    client.put_object(Bucket=bucket, Key="ds/empty/", Body=b"")  # what the S3 console's "Create folder" makes
    client.put_object(Bucket=bucket, Key="ds/empty/b.csv", Body=b"b\n2\n")
    return client, bucket, open_store(f"s3://{bucket}", s3_server.options)


def test_an_empty_folder_marker_is_still_ignored(dataset, tmp_path):
    _, _, store = dataset
    entries = run(download_tree(store, tmp_path / "dst", prefix="ds"))
    assert [e.path for e in entries] == ["a.csv", "empty/b.csv"]


@pytest.mark.parametrize("below", [False, True], ids=["alone", "with-files-below"])
def test_a_folder_marker_with_content_is_refused_by_name(dataset, tmp_path, below):
    """Issue 20, finding 4: a non-empty ``x/`` failed the staging with a misleading "…/x does not exist"
    (or, with files below it, "has both an object 'x' and an object 'x/y'")."""
    client, bucket, store = dataset
    client.put_object(Bucket=bucket, Key="ds/x/", Body=b"not empty")
    if below:
        client.put_object(Bucket=bucket, Key="ds/x/y.csv", Body=b"y\n")
    with pytest.raises(DatasetError) as info:
        run(download_tree(store, tmp_path / "dst", prefix="ds"))
    message = str(info.value)
    assert f"'x/' in s3://{bucket}/ds" in message and "ends in '/'" in message and "9 bytes" in message, message
    assert f"s3://{bucket}/ds/x/" in message and "does not exist" not in message, message
