"""S3 keys ending in '/' in a dataset: an empty one is a folder marker (ignored), one with content is refused by name."""

from __future__ import annotations

import pytest

from airflow_aicenter.errors import DatasetError
from airflow_aicenter.storage.transfer import download_tree, run


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
