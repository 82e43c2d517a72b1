"""requirements.txt may only name requirements: each refusal names its line and the fix (DESIGN "★ Environments")."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package import validate_package
from airflow_aicenter.package.requirements import check_requirements, check_requirements_file, logical_lines
from tests.conftest import write_files
from tests.packages import ECHO_MAIN

MAIN = ECHO_MAIN


def test_requirements_and_harmless_options_pass() -> None:
    text = (
        "# pinned\n"
        "numpy==2.1.0  # the array library\n"
        "\n"
        "pandas>=2 ; python_version >= '3.10'\n"
        "scikit-learn[all] @ https://example.org/scikit_learn-1.5-py3-none-any.whl\n"
        "tool @ git+https://github.com/org/tool.git@v1#egg=tool\n"
        "./wheels/aicenter_tiny-0.1-py3-none-any.whl\n"
        "local @ ./vendor/local\n"
        "--pre\n"
        "--only-binary :all:\n"
        "--no-index\n"
        "requests==2.32.0 \\\n"
        "    --hash=sha256:abc\n"
    )
    assert check_requirements(text) == [
        "numpy==2.1.0",
        "pandas>=2 ; python_version >= '3.10'",
        "scikit-learn[all] @ https://example.org/scikit_learn-1.5-py3-none-any.whl",
        "tool @ git+https://github.com/org/tool.git@v1#egg=tool",
        "./wheels/aicenter_tiny-0.1-py3-none-any.whl",
        "local @ ./vendor/local",
        "--pre",
        "--only-binary :all:",
        "--no-index",
        "requests==2.32.0 --hash=sha256:abc",
    ]


def test_logical_lines_number_from_the_first_physical_line() -> None:
    assert logical_lines("\n# c\na \\\n  b\n\nc # note\n") == [(3, "a b"), (6, "c")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("-e ../mylib", "requirements.txt:3: -e is not allowed in requirements.txt: editable installs"),
        ("--editable=git+https://x/y.git#egg=y", "requirements.txt:3: --editable is not allowed"),
        ("-r ../other.txt", "requirements.txt:3: -r ../other.txt is outside the package"),
        ("--requirement /etc/reqs.txt", "requirements.txt:3: --requirement /etc/reqs.txt is outside the package"),
        ("-c/abs/constraints.txt", "requirements.txt:3: -c /abs/constraints.txt is outside the package"),
        ("--constraint=sub/../../c.txt", "requirements.txt:3: --constraint sub/../../c.txt is outside the package"),
        ("-r file:///tmp/r.txt", "requirements.txt:3: -r file:///tmp/r.txt is not a file of the package"),
        ("pkg @ file:///home/me/pkg.whl", "requirements.txt:3: file: URLs reach outside the package"),
        ("/opt/wheels/pkg-1.0-py3-none-any.whl", "requirements.txt:3: /opt/wheels/pkg-1.0-py3-none-any.whl is outside"),
        ("../sibling/pkg", "requirements.txt:3: ../sibling/pkg is outside the package"),
        ("pkg @ ../pkg", "requirements.txt:3: ../pkg is outside the package"),
        ("~/wheels/pkg.whl", "requirements.txt:3: ~/wheels/pkg.whl is outside the package"),
        ("--index-url https://private.example/simple", "requirements.txt:3: --index-url is not allowed"),
        ("-i https://private.example/simple", "requirements.txt:3: -i is not allowed"),
        ("--extra-index-url=https://private.example/simple", "requirements.txt:3: --extra-index-url is not allowed"),
        ("--find-links ./wheels", "requirements.txt:3: --find-links is not allowed"),
        ("-f https://example.org/wheels/", "requirements.txt:3: -f is not allowed"),
        ("--trusted-host private.example", "requirements.txt:3: --trusted-host is not allowed"),
        ("--proxy http://proxy:3128", "requirements.txt:3: option --proxy is not allowed in requirements.txt"),
    ],
)
def test_each_refusal_names_its_line_and_the_fix(line: str, expected: str) -> None:
    with pytest.raises(PackageError) as info:
        check_requirements(f"numpy\n# comment\n{line}\n")
    message = str(info.value)
    assert message.startswith(expected), message
    assert ":" in message.split("requirements.txt:3: ", 1)[1]  # then the fix


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ("--index-url https://x/simple", "connection extra package_indexes"),
        ("--find-links ./wheels", "name it by relative path (./wheels/x.whl)"),
        ("-e ../mylib", "list the package by name and version"),
        ("pkg @ file:///x.whl", "put the file in the package"),
    ],
)
def test_refusals_say_the_fix(line: str, fix: str) -> None:
    with pytest.raises(PackageError, match=fix.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_requirements(line)


def test_included_files_are_checked_by_the_same_rules(tmp_path: Path) -> None:
    write_files(tmp_path, {
        "requirements.txt": "numpy\n-r extra/more.txt\n",
        "extra/more.txt": "pandas\n-c pins.txt\n",
        "extra/pins.txt": "pandas==2.2\n\n--extra-index-url https://private.example/simple\n",
    })
    with pytest.raises(PackageError, match=r"^extra/pins.txt:3: --extra-index-url is not allowed"):
        check_requirements_file(tmp_path)
    (tmp_path / "extra/pins.txt").write_text("pandas==2.2\n")
    assert check_requirements_file(tmp_path) == ["numpy", "-r extra/more.txt"]


def test_an_included_file_that_is_missing_is_named(tmp_path: Path) -> None:
    write_files(tmp_path, {"requirements.txt": "-r more.txt\n"})
    with pytest.raises(PackageError, match=r"^more.txt is missing from the package: add it, or remove the line"):
        check_requirements_file(tmp_path)


def test_requirements_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PackageError, match=r"requirements.txt is not valid UTF-8 text .*save it with UTF-8 encoding"):
        check_requirements_file(tmp_path)


def test_validation_refuses_a_package_whose_requirements_reach_outside(tmp_path: Path) -> None:
    root = write_files(tmp_path / "pkg", {"main.py": MAIN, "requirements.txt": "numpy\n--index-url https://evil.example/simple\n"})
    with pytest.raises(PackageError, match=r"^requirements.txt:2: --index-url is not allowed"):
        validate_package(root)
    (root / "requirements.txt").write_text("numpy  # arrays\n\n# nothing else\n")
    assert validate_package(root).requirements == ["numpy"]
