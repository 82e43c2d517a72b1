from __future__ import annotations

import pytest

from airflow_aicenter.errors import VersionError
from airflow_aicenter.package import Version, VersionSpec, parse_version_spec, validate_alias_name


def test_parse_and_str_round_trip() -> None:
    v = Version.parse("12.3")
    assert (v.major, v.minor) == (12, 3)
    assert str(v) == "12.3"
    assert str(Version(1, 0)) == "1.0"


def test_order_is_numeric_not_lexical() -> None:
    assert Version.parse("1.10") > Version.parse("1.9")
    assert Version.parse("2.0") > Version.parse("1.99")
    assert sorted(map(Version.parse, [
        "1.10", "1.2", "0.9", "2.0"])) == [Version(0, 9), Version(1, 2), Version(1, 10), Version(2, 0)]


def test_versions_are_hashable_and_frozen() -> None:
    assert {Version(1, 2), Version.parse("1.2")} == {Version(1, 2)}
    with pytest.raises(AttributeError):
        Version(1, 2).major = 3  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "1", "1.2.3", "v1.2", "+1.2", "1.-2", " 1.2", "1.2 ", "1.2\n", "1.x", "١.٢"])
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(VersionError, match=r"MAJOR\.MINOR") as e:
        Version.parse(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("1.2", VersionSpec("exact", version=Version(1, 2))),
        ("0.0", VersionSpec("exact", version=Version(0, 0))),
        ("1", VersionSpec("major", major=1)),
        ("10", VersionSpec("major", major=10)),
        ("latest", VersionSpec("latest")),
        ("production", VersionSpec("alias", alias="production")),
        ("staging-2", VersionSpec("alias", alias="staging-2")),
    ],
)
def test_parse_version_spec(text: str, spec: VersionSpec) -> None:
    assert parse_version_spec(text) == spec


@pytest.mark.parametrize("text", ["", "1.2.3", "v1", "1.x", " 1.2", "1.2 ", "Production", "-1", "a" * 64, "prod uction"])
def test_parse_version_spec_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(VersionError) as e:
        parse_version_spec(text)
    message = str(e.value)
    assert repr(text) in message
    assert '"M.m" (e.g. "1.2")' in message
    assert '"M" (latest minor of major M)' in message
    assert '"latest"' in message and "alias name" in message


def test_alias_names() -> None:
    assert validate_alias_name("production") == "production"
    assert validate_alias_name("a" * 63) == "a" * 63


@pytest.mark.parametrize("name", ["", "1.2", "1", "Prod", "a" * 64, "_x", "x y", "x/y"])
def test_alias_names_rejected(name: str) -> None:
    with pytest.raises(VersionError, match="lowercase letter") as e:
        validate_alias_name(name)
    assert repr(name) in str(e.value)


def test_version_like_alias_is_refused() -> None:
    with pytest.raises(VersionError, match=r"looks like a version.*\"2\" or \"2\.0\""):
        validate_alias_name("v2")


def test_latest_is_reserved() -> None:
    with pytest.raises(VersionError, match=r"reserved.*highest version.*pick another name"):
        validate_alias_name("latest")
