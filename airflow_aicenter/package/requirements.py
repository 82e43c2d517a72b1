"""What a package's ``requirements.txt`` may say: requirements only, nothing that reaches outside.

The runtime installs these lines with uv into a cached environment (``runtime/environment.py``)
whose key is the file's content, so a line that pulls from outside the package (another index,
a file elsewhere on the machine, an editable checkout, a URL) would make the environment depend
on something the key does not see, and would let a package pick the indexes a cluster trusts.
Indexes are the deployment's to choose: the connection extra ``package_indexes``.

Refused, each with its line number and the fix (DESIGN "★ Environments"):

- options that reach outside: ``-e``/``--editable``, ``--index-url``/``-i``,
  ``--extra-index-url``, ``--find-links``/``-f``, ``--trusted-host``, ``--no-binary`` (source
  builds are the operator's ``allow_source_builds``), ``--only-binary :none:``, any option not
  known to be harmless, and more than one option on a line;
- ``-r``/``-c`` naming an absolute path, one with ``..``, or a URL (included files are checked
  by these same rules);
- variables (``${VAR}``, ``$VAR``, ``%VAR%``) anywhere, comments included: uv replaces ``${VAR}``
  with the installing machine's value, so a line could send the store's key to any host;
- direct references (``name @ URL``, ``git+...``, ``https://.../x.tar.gz``, ``file:``): their
  content is not pinned by the package index;
- local paths other than a wheel vendored inside the package (``./wheels/x-1.0-py3-none-any.whl``):
  a local project or source archive runs its own build backend during the install;
- control characters and Unicode line separators (uv and this parser would split lines
  differently), and files over :data:`MAX_REQUIREMENTS_BYTES`.

Validation is linear in the file's size: no regular expression here can backtrack over a line
(a 57 KB line of spaces once took 16.7 s), and errors quote at most :data:`SHOWN` characters
of the file. No Airflow import: the runtime validates packages too.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from airflow_aicenter.errors import PackageError

REQUIREMENTS = "requirements.txt"
#: The largest requirements file (and included file) read: a list of requirements is a few KiB.
MAX_REQUIREMENTS_BYTES = 1 << 20
#: The most characters of the file an error message quotes.
SHOWN = 80

#: Flags that only steer how the named requirements are chosen: they reach nothing outside.
HARMLESS_OPTIONS = frozenset({"--pre", "--prefer-binary", "--require-hashes", "--no-index"})
#: Options with a value that only narrow the choice (``:none:`` excepted, see _check_option).
NARROWING_OPTIONS = frozenset({"--only-binary"})
#: Options that bring in another file of the package (checked by these same rules).
INCLUDE_OPTIONS = {"-r": "-r", "--requirement": "-r", "-c": "-c", "--constraint": "-c"}
_INDEXES = "indexes are set by the deployment: put the index in the connection extra package_indexes"
_FIND_LINKS = ("vendor the wheel in the package and name it by relative path (./wheels/x-1.0-py3-none-any.whl), or "
               "use the connection extra package_indexes")
#: Options that reach outside the package (or past the install's rules), with what to do instead.
REFUSED_OPTIONS = {
    "-e": "editable installs point at a checkout outside the package; list the package by name and version",
    "--editable": "editable installs point at a checkout outside the package; list the package by name and version",
    "-i": _INDEXES,
    "--index-url": _INDEXES,
    "--extra-index-url": _INDEXES,
    "-f": _FIND_LINKS,
    "--find-links": _FIND_LINKS,
    "--trusted-host": "hosts are trusted by the deployment: use an https index in the connection extra package_indexes",
    "--no-binary": "the runtime installs wheels only, unless the operator passes allow_source_builds=True; remove the "
                   "line",
}
_OPTIONS_WITH_VALUE = frozenset({*INCLUDE_OPTIONS, *NARROWING_OPTIONS, *REFUSED_OPTIONS})
_PUBLISH = ("publish it to an index named in the connection extra package_indexes and name it by version "
            "(name==1.0), or vendor a wheel of it in the package and name that by relative path "
            "(./wheels/name-1.0-py3-none-any.whl)")
_VCS = ("git+", "hg+", "svn+", "bzr+")
#: File names uv takes for a local archive even without a slash (``pkg-1.0.tar.gz``).
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".tar.lz",
             ".tlz", ".tar.lzma", ".tar.zst", ".tzst")
# Single character classes or anchored literals only: each search is linear in the line.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_VARIABLE = re.compile(r"\$\{[A-Za-z0-9_]*\}?|\$[A-Za-z_][A-Za-z0-9_]*|%[A-Za-z_][A-Za-z0-9_]*%")
_HASH = re.compile(r"[A-Za-z0-9]+:[0-9A-Fa-f]+")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, content) of each non-empty line, comments removed, ``\\`` continuations joined.

    uv's own reading of the format: lines end at ``\\n`` (``\\r\\n`` too); a ``#`` at the start
    or after a space or tab starts a comment, and a ``\\`` that ends a comment continues
    nothing; the line number is where the logical line begins. Linear in ``text``.
    """
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        if not pending:
            start = number
        line = _strip_comment(raw[:-1] if raw.endswith("\r") else raw)
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


def _strip_comment(line: str) -> str:
    """``line`` up to its comment: a ``#`` at the start or after a space or tab (one pass)."""
    at = line.find("#")
    while at > 0 and line[at - 1] not in " \t":
        at = line.find("#", at + 1)
    return line if at < 0 else line[:at]


def check_requirements(text: str, source: str = REQUIREMENTS) -> list[str]:
    """The requirement lines of ``text`` (normalised), or PackageError naming the line and the fix.

    Lines that include other files (``-r``/``-c``) are returned as written; use
    :func:`check_requirements_file` to follow them.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_REQUIREMENTS_BYTES:
        raise PackageError(_too_big(source, size))
    return [line for _, line, _ in _checked(text, source)]


def check_requirements_file(root: Path, name: str = REQUIREMENTS) -> list[str]:
    """Check ``root/name`` and every package file it includes with ``-r``/``-c`` (once each).

    Also checks that each vendored wheel named, where present, is a plain file of the package as
    uv will read it (relative to ``root``, the folder uv runs in).
    """
    seen: set[str] = set()
    lines: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        info = _lstat(root / current)
        if info is None:
            raise PackageError(f"{_show(current)} is missing from the package: add it, or remove the line that includes it")
        if not stat.S_ISREG(info.st_mode):
            raise PackageError(f"{_show(current)} is not a file (a folder or a link): make it a plain text file of "
                               f"requirements inside the package")
        if info.st_size > MAX_REQUIREMENTS_BYTES:
            raise PackageError(_too_big(current, info.st_size))
        try:
            text = (root / current).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PackageError(f"{_show(current)} is not valid UTF-8 text ({exc}): save it with UTF-8 encoding") from exc
        for number, line, include in _checked(text, current):
            if current == name:
                lines.append(line)
            if include is not None:
                pending.append(str(PurePosixPath(current).parent / include))
            elif (wheel := local_path(line)) is not None:
                _check_wheel_file(root, wheel, f"{current}:{number}")
    return lines


def included_files(root: Path, name: str = REQUIREMENTS) -> set[str]:
    """The package files ``root/name`` includes with ``-r``/``-c``, followed through those present.

    Lets a caller that extracted only the contract files of a stored version (``registry.check``)
    fetch the included ones too before :func:`check_requirements_file` reads them.
    """
    found: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        path = root / current
        info = _lstat(path)
        if info is None or not stat.S_ISREG(info.st_mode) or info.st_size > MAX_REQUIREMENTS_BYTES:
            continue  # check_requirements_file says what is wrong with it
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            continue
        for _, _, include in _checked(text, current):
            if include is not None:
                target = str(PurePosixPath(current).parent / include)
                if target not in found:
                    found.add(target)
                    pending.append(target)
    return found


def local_path(line: str) -> str | None:
    """The package file a checked line names (an included file or a vendored wheel), else None."""
    if line.startswith("-"):
        name, value, _ = _split_option(line)
        return value if name in INCLUDE_OPTIONS and value else None
    first = _first_token(line)
    return first if _looks_like_path(first) else None


def _checked(text: str, source: str) -> list[tuple[int, str, str | None]]:
    """Each logical line with the package file it includes (for -r/-c), after the refusals."""
    for number, raw in enumerate(text.split("\n"), start=1):
        _check_characters(raw[:-1] if raw.endswith("\r") else raw, f"{source}:{number}")
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


def _check_characters(line: str, where: str) -> None:
    """Refuse what uv would read differently from this parser, or fill in from the environment."""
    if found := _CONTROL.search(line):
        raise PackageError(
            f"{where}: control character U+{ord(found.group()):04X} in the line: requirements.txt is plain text with "
            f"one requirement a line (uv and the validation could split it differently): remove the character")
    if found := _VARIABLE.search(line):
        shown = _show(found.group())
        raise PackageError(
            f"{where}: {shown} is an environment variable (refused even in a comment): uv would replace it with the "
            f"installing machine's value, which could send a secret to a server or into the log: write the value "
            f"itself, and leave index credentials to the connection extra package_indexes")


def _split_option(line: str) -> tuple[str, str, list[str]]:
    """(option, value, the words after them) of an option line: ``--name value``, ``--name=value``, ``-r value``, ``-rvalue``."""
    words = line.split()
    first, rest = words[0], words[1:]
    if first.startswith("--"):
        name, equals, value = first.partition("=")
        if not equals and name in _OPTIONS_WITH_VALUE and rest:
            value, rest = rest[0], rest[1:]
    else:
        name, value = first[:2], first[2:].lstrip("=")
        if not value and name in _OPTIONS_WITH_VALUE and rest:
            value, rest = rest[0], rest[1:]
    return name, value, rest


def _check_option(line: str, where: str) -> str | None:
    name, value, rest = _split_option(line)
    if name in REFUSED_OPTIONS:
        raise PackageError(f"{where}: {_show(name)} is not allowed in requirements.txt: {REFUSED_OPTIONS[name]}")
    known = name in INCLUDE_OPTIONS or name in NARROWING_OPTIONS or name in HARMLESS_OPTIONS
    if not known:
        raise PackageError(
            f"{where}: option {_show(name)} is not allowed in requirements.txt: it may only name requirements (and "
            f"{', '.join(sorted(HARMLESS_OPTIONS | NARROWING_OPTIONS))}); indexes come from the connection extra "
            f"package_indexes")
    extra = rest[0] if rest else value if name in HARMLESS_OPTIONS and value else None
    if extra is not None:
        raise PackageError(f"{where}: one option a line: {_show(name)} is followed by {_show(extra)!r}: put each option "
                           f"on its own line, and nothing after an option that takes no value")
    if name in INCLUDE_OPTIONS:
        if not value:
            raise PackageError(f"{where}: {name} needs a file name: name a file inside the package (-r extra.txt)")
        if "file:" in value.lower() or "://" in value:
            raise PackageError(f"{where}: {name} {_show(value)} is not a file of the package: copy it into the package "
                               f"and name it by relative path")
        _check_inside(value, where, what=f"{name} {_show(value)}")
        return value
    if name in NARROWING_OPTIONS:
        if not value:
            raise PackageError(f"{where}: {name} needs a value: :all: or package names (--only-binary :all:)")
        if ":none:" in value.lower().split(","):
            raise PackageError(f"{where}: {name} :none: is not allowed: it would let source distributions build; the "
                               f"runtime installs wheels only unless the operator passes allow_source_builds=True")
    return None


def _check_requirement(line: str, where: str) -> None:
    """A requirement by name (with ``--hash`` options after it) or a wheel vendored in the package."""
    words = line.split()
    spec: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("-"):
            if word == "--hash" and index + 1 < len(words):
                index += 1
                value = words[index]
            elif word.startswith("--hash="):
                value = word[len("--hash="):]
            else:
                raise PackageError(f"{where}: {_show(word)} may not follow a requirement: only --hash=sha256:<hex> may; "
                                   f"put options on their own line (and build or index options are not allowed)")
            if not _HASH.fullmatch(value):
                raise PackageError(f"{where}: {_show(word)} is not a hash: write --hash=sha256:<hex digest of the file>")
        else:
            spec.append(word)
        index += 1
    text = " ".join(spec)
    lowered = text.lower()
    if "file:" in lowered:
        raise PackageError(f"{where}: file: URLs reach outside the package: put the file in the package and name it "
                           f"by relative path (./wheels/x.whl), or publish it to an index in package_indexes")
    if "\\" in text:
        raise PackageError(f"{where}: a backslash is allowed only at the end of a line, to continue it: write paths "
                           f"with / and remove the backslash")
    if "@" in text or "://" in text or lowered.startswith(_VCS):
        raise PackageError(
            f"{where}: {_show(text)} is a direct reference (a URL, git+ or name @ ...): its content is not pinned by the "
            f"package index, and a source checkout runs its own build backend at install: {_PUBLISH}")
    first = _first_token(text)
    if _looks_like_path(first):
        _check_inside(first, where, what=_show(first))
        if not first.lower().endswith(".whl"):
            raise PackageError(
                f"{where}: {_show(first)} is a local project or source archive: installing it runs its own build "
                f"backend, and its content is not pinned by an index: build a wheel of it (uv build --wheel) and "
                f"vendor the wheel, or {_PUBLISH}")
    elif not text[:1].isalnum():
        raise PackageError(
            f"{where}: {_show(text)} is not a requirement: a line names a project (numpy==2.1), a wheel vendored in the "
            f"package (./wheels/x-1.0-py3-none-any.whl) or an allowed option: fix or remove the line")


def _first_token(text: str) -> str:
    """The part of a requirement uv reads as its name, path or URL: up to the first space or ``;``."""
    words = text.split(";", 1)[0].split()
    return words[0] if words else ""


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~", "\\")) or "/" in text or "\\" in text
            or (len(text) > 1 and text[1] == ":") or text.lower().endswith(_ARCHIVES))


def _check_inside(value: str, where: str, *, what: str) -> None:
    posix = value.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith(("/", "~")) or ":" in value or ".." in parts:
        raise PackageError(f"{where}: {what} is outside the package: put the file inside the package and name it by a "
                           f"relative path without '..'")


def _check_wheel_file(root: Path, wheel: str, where: str) -> None:
    """A vendored wheel that is there must be a plain file: uv would build a folder named ``x.whl``.

    One that is missing passes: the operator's pre-check extracts only the contract files of a
    stored version, and uv names a missing wheel at install.
    """
    info = _lstat(root / wheel)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise PackageError(f"{where}: {_show(wheel)} is not a file (a folder or a link): vendor the built wheel file "
                           f"itself (uv build --wheel)")


def _lstat(path: Path) -> os.stat_result | None:
    """``path``'s own status (links not followed), or None when it is not there or cannot be named."""
    try:
        return os.lstat(path)
    except (OSError, ValueError):  # missing, a name too long for the file system, a NUL in the name
        return None


def _too_big(source: str, size: int) -> str:
    return (f"{_show(source)} is {size} bytes, over the limit of {MAX_REQUIREMENTS_BYTES} bytes for a requirements "
            f"file (it is read in the Airflow worker before the run): list only requirements, one a line, and split a "
            f"longer list into files included with -r")


def _show(text: str) -> str:
    """``text`` for an error message: at most SHOWN characters, so an error never quotes megabytes back."""
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"
