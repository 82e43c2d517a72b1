"""What a package's ``requirements.txt`` may say: requirements only, nothing that reaches outside.

The runtime installs these lines with uv into a cached environment (``runtime/environment.py``)
whose key is the file's content, so a line that pulls from outside the package (another index,
a file elsewhere on the machine, an editable checkout) would make the environment depend on
something the key does not see, and would let a package pick the indexes a cluster trusts.
Indexes are the deployment's to choose: the connection extra ``package_indexes``.

Refused, each with its line number and the fix (DESIGN "★ Environments"): ``-e``/``--editable``,
``-r``/``-c`` naming an absolute path or one with ``..``, ``file:`` URLs, local paths outside the
package, ``--index-url``/``-i``, ``--extra-index-url``, ``--find-links``/``-f``,
``--trusted-host``, and any other option not known to be harmless. Files included with ``-r``/``-c``
are checked by the same rules. No Airflow import: the runtime validates packages too.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from airflow_aicenter.errors import PackageError

REQUIREMENTS = "requirements.txt"

#: Options that only steer how the named requirements are chosen: they reach nothing outside.
HARMLESS_OPTIONS = frozenset({"--pre", "--prefer-binary", "--only-binary", "--no-binary", "--require-hashes", "--no-index"})
#: Options that bring in another file of the package (checked by these same rules).
INCLUDE_OPTIONS = {"-r": "-r", "--requirement": "-r", "-c": "-c", "--constraint": "-c"}
#: Options that reach outside the package, with what to do instead.
REFUSED_OPTIONS = {
    "-e": "editable installs point at a checkout outside the package; list the package by name and version",
    "--editable": "editable installs point at a checkout outside the package; list the package by name and version",
    "-i": "indexes are set by the deployment: put the index in the connection extra package_indexes",
    "--index-url": "indexes are set by the deployment: put the index in the connection extra package_indexes",
    "--extra-index-url": "indexes are set by the deployment: put the index in the connection extra package_indexes",
    "-f": "put the wheel in the package and name it by relative path (./wheels/x.whl), or use the connection "
          "extra package_indexes",
    "--find-links": "put the wheel in the package and name it by relative path (./wheels/x.whl), or use the "
                    "connection extra package_indexes",
    "--trusted-host": "hosts are trusted by the deployment: use an https index in the connection extra package_indexes",
}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_INLINE_COMMENT = re.compile(r"(^|\s+)#.*$")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, content) of each non-empty line, comments removed, ``\\`` continuations joined.

    pip's own reading of the format: a ``#`` at the start or after whitespace starts a comment;
    the line number is where the logical line begins.
    """
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        line = _INLINE_COMMENT.sub("", raw)
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        joined = " ".join(part.strip() for part in [*pending, line]).strip()
        pending = []
        if joined:
            result.append((start, joined))
    if pending and (joined := " ".join(part.strip() for part in pending).strip()):
        result.append((start, joined))
    return result


def check_requirements(text: str, source: str = REQUIREMENTS) -> list[str]:
    """The requirement lines of ``text`` (normalised), or PackageError naming the line and the fix.

    Lines that include other files (``-r``/``-c``) are returned as written; use
    :func:`check_requirements_file` to follow them.
    """
    return [line for _, line, _ in _checked(text, source)]


def check_requirements_file(root: Path, name: str = REQUIREMENTS) -> list[str]:
    """Check ``root/name`` and every package file it includes with ``-r``/``-c`` (once each)."""
    seen: set[str] = set()
    lines: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        path = root / current
        if not path.is_file():
            raise PackageError(f"{current} is missing from the package: add it, or remove the line that includes it")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PackageError(f"{current} is not valid UTF-8 text ({exc}): save it with UTF-8 encoding") from exc
        for _, line, include in _checked(text, current):
            if current == name:
                lines.append(line)
            if include is not None:
                pending.append(str(PurePosixPath(current).parent / include))
    return lines


def _checked(text: str, source: str) -> list[tuple[int, str, str | None]]:
    """Each logical line with the package file it includes (for -r/-c), after the refusals."""
    checked: list[tuple[int, str, str | None]] = []
    for number, line in logical_lines(text):
        where = f"{source}:{number}"
        include: str | None = None
        if line.startswith("-"):
            include = _check_option(line, where)
        else:
            _check_requirement(line, where)
        checked.append((number, line, include))
    return checked


def local_path(line: str) -> str | None:
    """The package file or folder a checked line names (an included file, a local wheel or project), else None."""
    if line.startswith("-"):
        name, value = _split_option(line)
        return value if name in INCLUDE_OPTIONS and value else None
    target = _target(line)
    return target if target and not _URL.match(target) and _looks_like_path(target) else None


def _split_option(line: str) -> tuple[str, str]:
    if line.startswith("--"):  # --name value, --name=value
        name, value = re.split(r"[\s=]", line, maxsplit=1) if re.search(r"[\s=]", line) else (line, "")
    else:  # -r value, -rvalue
        name, value = line[:2], line[2:]
    return name, value.strip().lstrip("=").strip()


def _target(line: str) -> str:
    """What a requirement line points at: the URL or path of a direct reference, else the line's first word."""
    spec = line.split(";", 1)[0].strip()
    target = spec.split("@", 1)[1].strip() if "@" in spec and not _URL.match(spec) else spec
    return target.split()[0] if target else target


def _check_option(line: str, where: str) -> str | None:
    name, value = _split_option(line)
    if name in REFUSED_OPTIONS:
        raise PackageError(f"{where}: {name} is not allowed in requirements.txt: {REFUSED_OPTIONS[name]}")
    if name in INCLUDE_OPTIONS:
        if not value:
            raise PackageError(f"{where}: {name} needs a file name: name a file inside the package (-r extra.txt)")
        if "file:" in value.lower() or _URL.match(value):
            raise PackageError(f"{where}: {name} {value} is not a file of the package: copy it into the package and "
                               f"name it by relative path")
        _check_path(value, where, what=f"{name} {value}")
        return value
    if name in HARMLESS_OPTIONS:
        return None
    raise PackageError(
        f"{where}: option {name} is not allowed in requirements.txt: it may only name requirements (and "
        f"{', '.join(sorted(HARMLESS_OPTIONS))}); indexes come from the connection extra package_indexes"
    )


def _check_requirement(line: str, where: str) -> None:
    if "file:" in line.lower():
        raise PackageError(f"{where}: file: URLs reach outside the package: put the file in the package and name it "
                           f"by relative path (./wheels/x.whl), or publish it to an index in package_indexes")
    target = _target(line)
    if _URL.match(target):
        return  # a remote direct reference (https://, git+https://): fetched like any index package
    if _looks_like_path(target):
        _check_path(target, where, what=target)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~", "\\")) or "/" in text or "\\" in text or (len(text) > 1 and text[1] == ":")


def _check_path(value: str, where: str, *, what: str) -> None:
    posix = value.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith(("/", "~")) or (len(value) > 1 and value[1] == ":") or ".." in parts:
        raise PackageError(f"{where}: {what} is outside the package: put the file inside the package and name it by a "
                           f"relative path without '..'")
