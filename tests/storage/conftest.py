"""Fixtures of the storage tests."""

from __future__ import annotations

import boto3
import pytest

from airflow_aicenter.storage import open_store


@pytest.fixture
def dataset(s3_server):
    bucket = s3_server.create_bucket()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing-secret")
    client.put_object(Bucket=bucket, Key="ds/a.csv", Body=b"a\n1\n")
    client.put_object(Bucket=bucket, Key="ds/empty/", Body=b"")  # what the S3 console's "Create folder" makes
    client.put_object(Bucket=bucket, Key="ds/empty/b.csv", Body=b"b\n2\n")
    return client, bucket, open_store(f"s3://{bucket}", s3_server.options)
