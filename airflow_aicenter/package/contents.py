"""Per-file package versions: a version's content as a manifest of its files over content-addressed blobs.

A zip version stores the whole package again whenever one byte of it changes; a fine-tune that
leaves a 1.5 GB base file as it was would store it once per run. A per-file version instead
names each file (path, size, mode, sha256); the bytes live as blobs under ``blobs/sha256/``
like snapshot files, so an unchanged file is stored once, and a node that staged it before
links it from its local blob cache instead of fetching it again.

The manifest itself is stored as a blob too, so it must be deterministic: the same files give
the same bytes (``encode``), hence the same digest, and identical content is recognised by the
manifest's ``sha256`` just as an identical zip is by its own.

What a manifest lists is exactly what ``write_zip`` packs (``iter_package_files``: no
``__pycache__``, no ``.pyc``, no links, regular files only), with the mode ``write_zip`` keeps
(0o755 when any executable bit is set, else 0o644), so ``aicenter package download`` of a
per-file version can write the same deterministic zip the folder would have given.

No Airflow and no storage import: this is the format only, and the runtime image uses it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package.validate import iter_package_files

FORMAT: Literal["aicenter-package-files/1"] = "aicenter-package-files/1"
#: The two modes a packaged file can have: write_zip keeps only whether it is executable.
MODES = (0o644, 0o755)
#: Longest path accepted, and longest name of one part: what extract_zip accepts (file systems refuse longer).
MAX_PATH_BYTES = 1024
MAX_PART_BYTES = 255
CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_REMAKE = "upload the package folder again (`aicenter package upload FOLDER --name NAME`) to write a new manifest"

#: ``known(path, stat)``: the digest of ``path`` when the caller already knows it (the file is still
#: the blob cache's unchanged inode), else None and the file is hashed.
KnownDigest = Callable[[Path, os.stat_result], "str | None"]


def check_path(path: str) -> str:
    """Refuse a manifest path that could leave the package folder or is not in normal form; return it.

    Normal form is what ``iter_package_files`` gives: relative, ``/``-separated, no empty,
    ``.`` or ``..`` part, so one file has exactly one spelling (the manifest stays
    deterministic, and ``a/./b`` cannot hide a duplicate of ``a/b``).
    """
    if not path:
        raise ValueError("a package file has an empty path: every file needs its path relative to the package root")
    if "\x00" in path:
        raise ValueError(f"package file path {path!r} holds a NUL character, which no file system accepts")
    if "\\" in path:
        raise ValueError(
            f"package file path {path!r} holds a backslash (a Windows separator, which could escape the package "
            "folder): paths use '/'")
    if path.startswith("/") or _DRIVE_RE.match(path):
        raise ValueError(f"package file path {path!r} is absolute: paths are relative to the package root")
    parts = path.split("/")
    if ".." in parts:
        raise ValueError(f"package file path {path!r} has a '..' part, which would write outside the package folder")
    if any(p in ("", ".") for p in parts):
        raise ValueError(
            f"package file path {path!r} is not in normal form (an empty or '.' part): write it as "
            f"{'/'.join(p for p in parts if p not in ('', '.'))!r}")
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES or any(len(p.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES for p in parts):
        raise ValueError(
            f"package file path {path[:60]!r}... is longer than {MAX_PATH_BYTES} bytes or has a part longer than "
            f"{MAX_PART_BYTES} bytes, which file systems refuse: shorten it")
    return path


class PackageFile(BaseModel):
    """One file of a per-file version: where it goes, how big it is, whether it is executable, its blob."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    mode: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: int) -> int:
        if value not in MODES:
            raise ValueError(
                f"mode {value:#o} is not one a package file can have: 0o644 (0{0o644:o}) or 0o755 (0{0o755:o}) "
                "(only whether the file is executable is kept)")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError(f"sha256 {value[:80]!r} is not 64 lowercase hex digits")
        return value


class PackageContents(BaseModel):
    """A per-file version's manifest: its files, sorted by path, each once, no file where a folder is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["aicenter-package-files/1"] = FORMAT
    files: list[PackageFile]

    @model_validator(mode="after")
    def _files(self) -> PackageContents:
        if not self.files:
            raise ValueError("the manifest lists no file: a package has at least main.py")
        paths = [f.path for f in self.files]
        for before, after in itertools.pairwise(paths):
            if before == after:
                raise ValueError(f"package file {after!r} is listed twice: it is ambiguous which one is meant")
            if before > after:
                raise ValueError(f"package files are not sorted by path ({before!r} before {after!r}): list them sorted")
        names = set(paths)
        for path in paths:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if (folder := "/".join(parts[:i])) in names:
                    raise ValueError(f"{folder!r} is listed as a file and as the folder of {path!r}: it cannot be both")
        return self

    @property
    def total_size(self) -> int:
        """Bytes of all the files (what staging writes, what a zip of them expands to)."""
        return sum(f.size for f in self.files)

    def digests(self) -> set[str]:
        """The distinct blobs the files need (two files with the same bytes share one)."""
        return {f.sha256 for f in self.files}


def file_mode(st_mode: int) -> int:
    """The mode a file is recorded with: what write_zip keeps (executable by anyone: 0o755, else 0o644)."""
    return 0o755 if st_mode & 0o111 else 0o644


def contents_of(root: Path, *, known: KnownDigest | None = None) -> PackageContents:
    """The manifest of the package folder ``root``: the files write_zip would pack, each hashed.

    ``known(path, stat)`` may return a file's digest without reading it (the blob cache knows
    the digest of a file that is still its own unchanged inode: a 1.5 GB base file staged by
    linking is not hashed again at the end of a training); it is asked with the file's lstat.
    A link, or anything but a regular file, is refused by name as write_zip refuses it. Each
    file is opened without following links and hashed through that descriptor, its size and
    mode from the same descriptor, so what is recorded is what was read.
    """
    root = Path(root)
    files: list[PackageFile] = []
    for rel in iter_package_files(root):
        name = rel.as_posix()
        path = root / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise PackageError(f"{name} disappeared from {root} while the package was read: do not change it meanwhile") from None
        if stat.S_ISLNK(st.st_mode):
            raise PackageError(
                f"{name} is a symbolic link; links are not allowed in a package (they could point outside it): "
                "replace it with a copy of the file or folder it points to")
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{name} is not a regular file (a device, socket or pipe): remove it from the package")
        digest = known(path, st) if known is not None else None
        if digest is not None:
            files.append(_entry(name, st.st_size, file_mode(st.st_mode), digest))
            continue
        files.append(_hash(path, name))
    if not files:
        raise PackageError(f"package folder {str(root)!r} is empty: put main.py and requirements.txt in it")
    return PackageContents(files=files)


def _entry(path: str, size: int, mode: int, sha256: str) -> PackageFile:
    try:
        return PackageFile(path=path, size=size, mode=mode, sha256=sha256)
    except ValidationError as exc:
        raise PackageError(f"package file {path[:100]!r} cannot be recorded: {_reasons(exc)}") from None


def _hash(path: Path, name: str) -> PackageFile:
    """Hash one file through one descriptor opened without following links."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise PackageError(f"{name} cannot be read ({exc.strerror}): make it readable, or remove it from the package") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{name} is not a regular file (a device, socket or pipe): remove it from the package")
        digest = hashlib.sha256()
        size = 0
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return _entry(name, size, file_mode(st.st_mode), digest.hexdigest())


def encode(contents: PackageContents) -> bytes:
    """The manifest's stored bytes: canonical JSON (sorted keys, no spaces), so the same files give the same digest."""
    data = {"format": contents.format, "files": [f.model_dump() for f in contents.files]}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def decode(data: bytes, *, where: str) -> PackageContents:
    """Read a stored manifest; a clear PackageError naming ``where`` (its blob) for anything malformed."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"the package manifest {where} is not JSON ({exc}): {_REMAKE}") from None
    if not isinstance(raw, dict):
        raise PackageError(f"the package manifest {where} is not a JSON object: {_REMAKE}")
    if raw.get("format") != FORMAT:
        raise PackageError(
            f"the package manifest {where} has format {str(raw.get('format'))[:80]!r}, not {FORMAT!r} (the one this "
            f"version of airflow-aicenter reads): upgrade airflow-aicenter if it was written by a newer one, else {_REMAKE}")
    try:
        return PackageContents.model_validate(raw)
    except ValidationError as exc:
        raise PackageError(f"the package manifest {where} is malformed: {_reasons(exc)}; {_REMAKE}") from None


def _reasons(exc: ValidationError) -> str:
    """Pydantic's errors as one line: where in the manifest, and what is wrong (our messages unchanged)."""
    out = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - 5
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")
