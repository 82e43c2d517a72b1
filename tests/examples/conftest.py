"""Fixtures of the example tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.examples.paths import PACKAGE


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    return Path(shutil.copytree(PACKAGE, tmp_path / "package"))
