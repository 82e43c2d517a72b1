"""``MAJOR.MINOR`` versions and the version arguments users pass (``"1.2"``, ``"1"``, ``"latest"``, aliases)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from airflow_aicenter.errors import VersionError

_VERSION_RE = re.compile(r"[0-9]+\.[0-9]+")
_MAJOR_RE = re.compile(r"[0-9]+")
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_VERSIONISH_RE = re.compile(r"v[0-9]+")  # "v1" reads as a version, not a name: refuse it as an alias
_SPEC_HELP = 'use "M.m" (e.g. "1.2"), "M" (latest minor of major M), "latest", or an alias name'
_ALIAS_HELP = "an alias is a lowercase letter followed by up to 62 lowercase letters, digits, '_' or '-' (e.g. 'production')"


@dataclass(frozen=True, order=True)
class Version:
    """A package version; ordering is numeric (``1.10 > 1.9``), which string keys would get wrong."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """Exactly ``"M.m"`` with ASCII digits: no sign, no spaces, no third part."""
        if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
            raise VersionError(f'invalid version {text!r}: a version is "MAJOR.MINOR" (e.g. "1.2")')
        major, minor = text.split(".")
        return cls(int(major), int(minor))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class VersionSpec:
    """What a ``version`` argument asks for, before the registry resolves it to one ``Version``."""

    kind: Literal["exact", "major", "latest", "alias"]
    version: Version | None = None
    major: int | None = None
    alias: str | None = None


def parse_version_spec(text: str) -> VersionSpec:
    """``"1.2"`` -> exact, ``"1"`` -> latest minor of major 1, ``"latest"``, or an alias name."""
    if isinstance(text, str):
        if _VERSION_RE.fullmatch(text):
            return VersionSpec("exact", version=Version.parse(text))
        if _MAJOR_RE.fullmatch(text):
            return VersionSpec("major", major=int(text))
        if text == "latest":
            return VersionSpec("latest")
        if _ALIAS_RE.fullmatch(text) and not _VERSIONISH_RE.fullmatch(text):
            return VersionSpec("alias", alias=text)
    raise VersionError(f"invalid version {text!r}: {_SPEC_HELP}")


def validate_alias_name(name: str) -> str:
    """Aliases share the ``version`` argument with versions, so they must not look like one or like ``latest``."""
    if not isinstance(name, str) or not _ALIAS_RE.fullmatch(name):
        raise VersionError(f"invalid alias name {name!r}: {_ALIAS_HELP}")
    if name == "latest":
        raise VersionError(
            "alias name 'latest' is reserved (it always means the highest version): pick another name such as 'production'")
    if _VERSIONISH_RE.fullmatch(name):
        raise VersionError(
            f"alias name {name!r} looks like a version: pick a name such as 'production'; a version is written \"{name[1:]}\" or "
            f"\"{name[1:]}.0\"")
    return name
