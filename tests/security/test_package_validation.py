"""Hostile package sources: validation runs in the Airflow worker, so its cost is bounded and its
failures are ``PackageError`` s that name the file and the fix, never a raw traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package import validate_package, write_zip
from airflow_aicenter.package.validate import MAX_BASE_DEPTH, MAX_CONTRACT_FILE_BYTES
from airflow_aicenter.records import BlobRef
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import put_blob
from tests.packages import MAIN, TRAIN, write_package


def error(root: Path, pipeline: str = "serve") -> str:
    with pytest.raises(PackageError) as e:
        validate_package(root, pipeline)
    return str(e.value)


def test_a_large_train_py_is_refused_from_its_size_before_parsing(tmp_path: Path) -> None:
    """A 5 MB train.py took 17 s and 2.4 GB to parse in the worker: refused from its size, in a
    fresh process whose peak memory and time show it was never parsed."""
    table = "WEIGHTS = [" + ", ".join(f"{i}.5" for i in range(700_000)) + "]\n"
    root = write_package(tmp_path / "pkg", train=table + textwrap.dedent(TRAIN))
    size = (root / "train.py").stat().st_size
    assert size > 5_000_000
    script = textwrap.dedent(f"""
        import resource, sys, time
        from airflow_aicenter.errors import PackageError
        from airflow_aicenter.package import validate_package, write_zip
        began = time.perf_counter()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            validate_package({str(root)!r}, "train")
        except PackageError as e:
            print(e)
        print(time.perf_counter() - began, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120).stdout
    message, numbers = out.rstrip("\n").rsplit("\n", 1)
    seconds, grew_mib = float(numbers.split()[0]), int(numbers.split()[1])
    assert message == (
        f"train.py is {size} bytes, over the limit of {MAX_CONTRACT_FILE_BYTES} bytes for a contract file "
        "(it is parsed in the Airflow worker before the run): move large data such as tables or weights into a "
        "data file of the package that the code loads at run time, or split the code into modules that train.py imports"
    )
    assert seconds < 2 and grew_mib < 16, (seconds, grew_mib)


@pytest.mark.parametrize(("name", "fix"), [
    ("main.py", "or split the code into modules that main.py imports"),
    ("aicenter.json", "aicenter.json holds only package metadata: keep data in other files"),
    ("requirements.txt", "requirements.txt holds only requirements: keep data in other files"),
])
def test_every_contract_file_has_the_size_limit(tmp_path: Path, name: str, fix: str) -> None:
    padding = "#" * (MAX_CONTRACT_FILE_BYTES + 1) + "\n"
    content = {"main.py": padding + textwrap.dedent(MAIN), "requirements.txt": padding + "numpy\n",
               "aicenter.json": '{"description": "' + "x" * MAX_CONTRACT_FILE_BYTES + '"}'}[name]
    root = write_package(tmp_path / "pkg", files={name: content})
    message = error(root)
    size = (root / name).stat().st_size
    assert message.startswith(f"{name} is {size} bytes, over the limit of {MAX_CONTRACT_FILE_BYTES} bytes")
    assert message.endswith(fix)


def test_a_source_at_the_limit_is_validated(tmp_path: Path) -> None:
    source = textwrap.dedent(TRAIN)
    padded = source + "#" * (MAX_CONTRACT_FILE_BYTES - len(source) - 1) + "\n"
    assert len(padded.encode()) == MAX_CONTRACT_FILE_BYTES
    assert validate_package(write_package(tmp_path / "pkg", train=padded), "full").has_train


def _chain(depth: int) -> str:
    """class C0 with the contract's methods, C1(C0), ..., Main(C<depth-1>): Main is ``depth`` levels above C0."""
    head = "class C0:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
    chain = "".join(f"class C{i}(C{i - 1}):\n    pass\n" for i in range(1, depth))
    return head + chain + f"class Main(C{depth - 1}):\n    pass\n"


def test_a_3000_deep_class_chain_is_a_package_error_not_a_recursion_error(tmp_path: Path) -> None:
    message = error(write_package(tmp_path / "pkg", main=_chain(3000)))
    too_deep = 3000 - MAX_BASE_DEPTH - 1  # C<i> starts on line 6 + 2 (i - 1)
    assert message.startswith(f"main.py:{6 + 2 * (too_deep - 1)}: class Main derives from same-file classes more than "
                              f"{MAX_BASE_DEPTH} levels deep (class C{too_deep} is level {MAX_BASE_DEPTH + 1})")
    assert message.endswith("flatten the class hierarchy")


def test_a_chain_within_the_depth_limit_finds_inherited_methods(tmp_path: Path) -> None:
    info = validate_package(write_package(tmp_path / "pkg", main=_chain(MAX_BASE_DEPTH)))
    assert {"__init__", "predict"} <= info.main_methods


def test_a_long_chain_of_main_aliases_is_followed_without_recursion(tmp_path: Path) -> None:
    names = "".join(f"A{i} = A{i + 1}\n" for i in range(3000))
    main = "class A3000:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
    root = write_package(tmp_path / "pkg", main=main + names + "Main = A0\n")
    assert validate_package(root).main_methods == {"__init__", "predict"}


@pytest.mark.parametrize("expression", ["-" * 100_000 + "1", "not " * 100_000 + "x"])
def test_deeply_nested_expressions_are_a_package_error(tmp_path: Path, expression: str) -> None:
    root = write_package(tmp_path / "pkg", train=f"X = {expression}\n" + textwrap.dedent(TRAIN))
    message = error(root)
    assert message.startswith("train.py nests expressions or blocks too deeply to be parsed")
    assert message.endswith("split the deeply nested expression into separate statements")


def test_a_wrong_signature_with_a_deeply_nested_default_is_still_reported(tmp_path: Path) -> None:
    main = "class Main:\n    def __init__(self): pass\n    def predict(self, input, extra, y=" + "-" * 900 + "1): pass\n"
    assert error(write_package(tmp_path / "pkg", main=main)).startswith(
        "main.py:3: Main.predict(...) has the wrong parameters: AI Center calls Main().predict(input)")


def test_checking_a_stored_version_refuses_a_large_contract_file_before_fetching_it(store: Store, tmp_path: Path) -> None:
    """A trained version's content is whatever save() left: a huge main.py is refused from the zip's
    central directory, not downloaded into the worker first."""
    registry = Registry(store)
    base = registry.upload(write_package(tmp_path / "pkg"), "big")
    big = write_package(tmp_path / "trained", main=textwrap.dedent(MAIN) + "#" * (2 * MAX_CONTRACT_FILE_BYTES) + "\n")
    digest = write_zip(big, tmp_path / "trained.zip")
    put_blob(store, tmp_path / "trained.zip", digest.sha256)
    trained = registry.commit("big", parent="1.0", blob=BlobRef(sha256=digest.sha256, size=digest.size), pipeline="train")
    registry.check(base, "train")
    with pytest.raises(PackageError) as e:
        registry.check(trained, "train")
    size = (big / "main.py").stat().st_size
    assert str(e.value) == (
        f"zip entry 'main.py' is {size} bytes, over the limit of {MAX_CONTRACT_FILE_BYTES} bytes for a contract file "
        "(it is parsed in the Airflow worker before the run): keep main.py small and large data in other files of the package"
    )
