"""Builders for real package folders and zips on disk."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

MAIN = """
class Main:
    def __init__(self):
        self.model = None

    def predict(self, input):
        return str(input)
"""

TRAIN = """
class Main:
    def __init__(self):
        self.model = None

    def process_data(self, input_directory):
        pass

    def train(self, training_directory):
        pass

    def evaluate(self, evaluation_directory):
        return 1.0

    def save(self):
        pass
"""

_DEFAULT = object()
MakePackage = Callable[..., Path]


def write_package(root: Path, *, main: str | None = MAIN, train: str | None = TRAIN, requirements: str | None = "", files: dict[str, str | bytes] | None = None) -> Path:
    """A package folder; pass None to leave a contract file out. Sources are dedented."""
    root.mkdir(parents=True, exist_ok=True)
    contents: dict[str, str | bytes | None] = {"main.py": main, "train.py": train, "requirements.txt": requirements, **(files or {})}
    for name, content in contents.items():
        if content is None:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content) if name.endswith(".py") else content, encoding="utf-8")
    return root


@pytest.fixture
def make_package(tmp_path: Path) -> MakePackage:
    counter = iter(range(1000))

    def make(**kwargs: object) -> Path:
        return write_package(tmp_path / f"pkg{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make
