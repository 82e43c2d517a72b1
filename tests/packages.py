"""Package sources and builders shared by the tests: one definition of a valid package.

``MAIN`` serves, ``TRAIN`` supports every pipeline, ``TRAIN_ONLY`` only the train pipeline.
Sources are written dedented, so they may be indented in the test that defines a variant.
"""

from __future__ import annotations

import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

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

TRAIN_ONLY = """
class Main:
    def __init__(self):
        pass

    def train(self, training_directory):
        pass

    def save(self):
        pass
"""

MakePackage = Callable[..., Path]


def write_package(
    root: Path,
    *,
    main: str | None = MAIN,
    train: str | None = TRAIN,
    requirements: str | None = "",
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """A package folder; pass None to leave a contract file out. ``.py`` sources are dedented."""
    root.mkdir(parents=True, exist_ok=True)
    contents: dict[str, str | bytes | None] = {"main.py": main, "train.py": train,
        "requirements.txt": requirements, **(files or {})}
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


def make_zip(path: Path, entries: dict[str, bytes | str], *, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of exactly these entries (names as given, no checks): for hostile archives too."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path

#: The smallest serving half: ``Main()`` and a ``predict`` that echoes its input (shared by the tests that train).
ECHO_MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"

#: A train.py that counts the files of its training dataset and saves the count (lineage and dataset-root tests).
COUNTING_TRAIN = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.n = len(os.listdir(training_directory))
    def save(self):
        open("model.txt", "w").write(str(self.n))
'''

FAILING_TRAIN = '''
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.helper()
    def helper(self):
        raise ValueError("labels column 'churned' is missing")
    def save(self):
        pass
'''

#: A serving class doubling {"x": n}, refusing negative inputs (batch prediction tests).
DOUBLING_MAIN = '''
import json
class Main:
    def __init__(self):
        self.factor = 2
    def predict(self, input):
        value = json.loads(input)["x"]
        if value < 0:
            raise ValueError(f"negative input {value}")
        return json.dumps({"y": value * self.factor})
'''

#: A training that writes model.txt and touches none of the staged files (the known-digest tests).
SAVES_WITHOUT_TOUCHING = """
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        pass
    def save(self):
        open("model.txt", "w").write("trained")
"""
