"""Fixtures of the runtime tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.runtime import user
from airflow_aicenter.storage import Store
from tests.conftest import free_port
from tests.packages import write_package
from tests.runtime.helpers import BIG, put
from tests.runtime.predict_bytes import outputs, small_batches


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


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = write_package(tmp_path / "pkg", files={
        "model/weights.bin": os.urandom(BIG),
        "model/copy.bin": b"same bytes",
        "other/copy.bin": b"same bytes",  # two files, one blob
        "meta.json": '{"epoch": 1}',
        "run.sh": "#!/bin/sh\necho hi\n",
    })
    (root / "run.sh").chmod(0o755)
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    closed = f"http://127.0.0.1:{free_port()}/simple"
    # uv's own setting: a closed index fails at once instead of after 3 retries with backoff (~10 s)
    return {"UV_INDEX_URL": closed, "UV_DEFAULT_INDEX": closed, "PIP_INDEX_URL": closed, "UV_HTTP_RETRIES": "0"}


@pytest.fixture(scope="module", params=["as shipped", "97-byte batches"])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("predict-bytes")
    return outputs(tmp, Path(user.__file__) if request.param == "as shipped" else small_batches(tmp))


@pytest.fixture
def dataset(store: Store) -> tuple[Store, str]:
    """A manifest in datasets/m/ whose sources are relative, absolute inside its folder, and outside it."""
    put(store, {
        "datasets/m/images/a.jpg": "A", "datasets/m/images/b.jpg": "BB", "other/c.jpg": "CCC",
        "datasets/m/images/d.jpg": "DDDD", "datasets/m/e.jpg": "EEEEE", "datasets/m/f.jpg": "FFFFFF",
    })
    lines = [
        {"id": "1", "source": "images/a.jpg", "usage": "TRAIN", "annotation": [{"name": "cat", "type": "label"}]},
        {"id": "2", "source": store.url("datasets/m/images/b.jpg")},
        {"id": "3", "source": store.url("other/c.jpg"), "usage": "train"},
        {"id": "4", "source": "images/d.jpg", "usage": "eval"},
        {"id": "5", "source": "./e.jpg", "usage": "Test"},
        {"id": "6", "source": "f.jpg", "usage": "INFERENCE"},
    ]
    put(store, {"datasets/m/train.manifest": "\n".join(json.dumps(line) for line in lines) + "\n\n"})
    return store, store.url("datasets/m/train.manifest")
