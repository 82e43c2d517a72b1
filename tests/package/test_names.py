from __future__ import annotations

import pytest

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package import validate_package_name


@pytest.mark.parametrize("name", ["churn", "Churn_Model", "a", "model-2", "x" * 64, "Class", "matcher"])
def test_valid_names(name: str) -> None:
    assert validate_package_name(name) == name


@pytest.mark.parametrize("name", ["class", "import", "None", "True", "lambda"])
def test_keywords_are_refused_with_a_suggestion(name: str) -> None:
    with pytest.raises(PackageError) as e:
        validate_package_name(name)
    assert str(e.value) == (
        f"package name {name!r} is a Python keyword; AI Center uses the name as an identifier: "
        f"pick another name such as '{name}_model'"
    )


@pytest.mark.parametrize("name", ["match", "case"])
def test_soft_keywords_are_refused(name: str) -> None:
    with pytest.raises(PackageError, match="is a Python keyword"):
        validate_package_name(name)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("my model", "my_model"), ("1churn", "pkg_1churn"), ("churn.v2", "churn_v2"), ("", "model"), ("_x", "x")],
)
def test_malformed_names_get_a_valid_suggestion(name: str, suggestion: str) -> None:
    with pytest.raises(PackageError) as e:
        validate_package_name(name)
    message = str(e.value)
    assert repr(name) in message and "letter followed by up to 63 letters" in message
    assert f"such as {suggestion!r}" in message
    assert validate_package_name(suggestion) == suggestion


def test_too_long() -> None:
    with pytest.raises(PackageError, match="up to 63"):
        validate_package_name("x" * 65)
