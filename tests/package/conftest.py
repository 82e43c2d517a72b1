"""The ``make_package`` fixture: real package folders on disk (sources in tests/packages.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.packages import MakePackage, write_package


@pytest.fixture
def make_package(tmp_path: Path) -> MakePackage:
    counter = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return write_package(tmp_path / f"pkg{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make
