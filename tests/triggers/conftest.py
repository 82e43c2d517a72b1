"""Fixtures of the trigger tests."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from tests.triggers.datasets import Dataset


@pytest.fixture(params=["file", "s3"])
def dataset(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """An existing dataset holding a.csv, and an aicenter_default connection naming a fresh store on the same backend."""
    if request.param == "file":
        root = tmp_path / "inbox"
        data = Dataset(root.as_uri(), root=root)
        data.store_uri = (tmp_path / "aicenter").as_uri()
    else:
        server = request.getfixturevalue("s3_env")
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing-secret")
        bucket = server.create_bucket()
        data = Dataset(f"s3://{bucket}/inbox/", s3=client, bucket=bucket, prefix="inbox")
        data.store_uri = f"s3://{bucket}/aicenter"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": data.store_uri}}))
    data.put("a.csv", b"x,y\n1,2\n")
    return data
