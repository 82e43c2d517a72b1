"""Package names: AI Center uses the name as an identifier, so it must look like one."""

from __future__ import annotations

import keyword
import re

from airflow_aicenter.errors import PackageError

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def _suggest(name: str) -> str:
    """A valid name close to ``name``, to put in the error message."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or "model"
    if not cleaned[0].isalpha():
        cleaned = f"pkg_{cleaned}"
    return cleaned[:64]


def validate_package_name(name: str) -> str:
    """Return ``name`` if it is a valid package name, else raise ``PackageError`` saying how to fix it."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        hint = f" such as {_suggest(name)!r}" if isinstance(name, str) else ""
        raise PackageError(
            f"invalid package name {name!r}: a package name is a letter followed by up to 63 letters, "
            f"digits, '_' or '-': pick a name{hint}"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise PackageError(
            f"package name {name!r} is a Python keyword; AI Center uses the name as an identifier: "
            f"pick another name such as '{name}_model'"
        )
    return name
