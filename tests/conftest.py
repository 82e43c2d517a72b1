"""Shared fixtures: a real S3 protocol server (moto, HTTP on 127.0.0.1) and both store backends."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_aicenter.storage import S3Options, Store, open_store

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PACKAGE = REPO / "examples" / "packages" / "churn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto in server mode: real HTTP, real S3 protocol, on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.options = S3Options(endpoint_url=self.endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing-secret")

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing-secret",
        ).create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        return self.options.to_env()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty storage root on each backend."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    server: S3Server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.create_bucket()}/aicenter", server.options)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Credentials in the environment, as the runtime reads them in a pod or child process."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def example_package() -> Path:
    assert (EXAMPLE_PACKAGE / "main.py").exists(), "examples/packages/churn is missing"
    return EXAMPLE_PACKAGE


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
