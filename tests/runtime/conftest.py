"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest

from tests.conftest import free_port


@pytest.fixture
def closed_index(monkeypatch: pytest.MonkeyPatch) -> str:
    """Every index uv could reach by default points at a closed local port: nothing may be downloaded."""
    url = f"http://127.0.0.1:{free_port()}/simple"
    for name in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_INDEX_URL"):
        monkeypatch.setenv(name, url)
    for name in ("UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")  # a try of the closed port fails at once (uv's 3 retries took ~10 s)
    return url
