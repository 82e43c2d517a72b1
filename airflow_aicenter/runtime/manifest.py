"""Manifest datasets (the ModelArts format): a JSON Lines file that lists the samples, not a folder.

A dataset URI ending in ``.manifest`` or ``.jsonl`` is a manifest. Each line is one JSON object
with ``source`` (an ``s3://`` or ``file://`` URI, or a path relative to the manifest's folder)
and an optional ``usage`` (``TRAIN``, ``EVAL``, ``TEST``, ``INFERENCE``, any case); other keys
(``id``, ``annotation``, ...) are kept as they are. Lines are routed by usage:

- training (``data_directory``): ``TRAIN`` and unmarked lines;
- evaluation (``test_data_directory``, and ``evaluation_data_directory`` of full runs): ``EVAL``
  and ``TEST``;
- batch prediction only: ``INFERENCE`` (:func:`stage_inference`).

A staged folder holds the files of its lines, each at its path relative to the manifest's
folder (or ``<bucket>/<key>``, ``<absolute path without its leading />`` when outside it),
and ``manifest.jsonl``: its lines with ``source`` rewritten to that local relative path, so
package code reads the manifest it knows and finds every file beside it. A snapshot of the
folder therefore records the manifest and every staged file.

A bad line (not JSON, not an object, no ``source``, an unknown usage, a source that does not
exist) is a DatasetError naming the line number. :func:`check_manifest` finds all of that
before compute (the operator calls it in the worker: no Airflow import here).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from airflow_aicenter.errors import AICenterError, ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.storage import Store
from airflow_aicenter.storage import open_store as open_any_store
from airflow_aicenter.storage.transfer import FileEntry, download_file, gather_limited, run, sha256_file

#: Opens the store of a folder URI (the runtime reads credentials from its env; the worker uses its hook).
OpenStore = Callable[[str], Store]

SUFFIXES = (".manifest", ".jsonl")
USAGES = ("TRAIN", "EVAL", "TEST", "INFERENCE")
UNMARKED = ""
TRAINING = frozenset({"TRAIN", UNMARKED})
EVALUATION = frozenset({"EVAL", "TEST"})
INFERENCE = frozenset({"INFERENCE"})
#: The rewritten manifest in each staged folder.
STAGED_MANIFEST = "manifest.jsonl"
EXAMPLE_LINE = '{"source": "images/cat.jpg", "usage": "TRAIN"}'


def is_manifest_uri(uri: str | None) -> bool:
    """A dataset URI that names a manifest file rather than a folder."""
    return bool(uri) and urlparse(str(uri)).path.rstrip("/").endswith(SUFFIXES)


@dataclass(frozen=True)
class ManifestLine:
    number: int  # 1-based, as editors count
    record: dict[str, Any]  # the line's object, every key kept
    usage: str  # upper case; "" when the line has none
    root: str  # the URI of the folder the source is read from
    key: str  # the source's key under ``root``
    local: str  # where it is staged, relative to the staged folder

    @property
    def source(self) -> str:
        return f"{self.root.rstrip('/')}/{self.key}"


@dataclass(frozen=True)
class ManifestSummary:
    """What a manifest holds, checked: lines per usage, distinct files and their bytes."""

    uri: str
    lines: int
    usages: dict[str, int] = field(default_factory=dict)  # usage ("" for unmarked) -> lines
    files: int = 0
    bytes: int = 0
    #: The folders the sources are read from (the manifest's own included), for a run's read permissions.
    folders: list[str] = field(default_factory=list)

    def count(self, usages: Collection[str]) -> int:
        return sum(n for usage, n in self.usages.items() if usage in usages)


@dataclass(frozen=True)
class _Folder:
    """The manifest's folder: where relative sources live, and what counts as inside it."""

    uri: str
    scheme: str  # "s3" or "file"
    bucket: str  # s3 only
    path: str  # s3: the key prefix ("" at the bucket root); file: the absolute path


def _split(uri: str) -> tuple[_Folder, str]:
    """A manifest URI -> (its folder, its file name)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        key = parsed.path.strip("/")
        prefix, _, name = key.rpartition("/")
        folder_uri = f"s3://{parsed.netloc}/{prefix}" if prefix else f"s3://{parsed.netloc}"
        return _Folder(folder_uri, "s3", parsed.netloc, prefix), name
    if parsed.scheme in ("file", ""):
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise DatasetError(f"manifest {uri!r} is a relative path; give an s3:// or file:///absolute/path URI")
        return _Folder(path.parent.as_uri(), "file", "", path.parent.as_posix()), path.name
    raise DatasetError(f"manifest {uri!r} has scheme {parsed.scheme!r}; put it on s3:// or file://")


def _bad(uri: str, number: int, problem: str) -> DatasetError:
    return DatasetError(f"line {number} of manifest {uri}: {problem}")


def _locate(uri: str, folder: _Folder, number: int, source: str) -> tuple[str, str, str]:
    """A line's ``source`` -> (root URI, key under it, local relative path)."""
    parsed = urlparse(source)
    if parsed.scheme == "s3":
        bucket, key = parsed.netloc, parsed.path.lstrip("/")
        if not bucket or not key or key.endswith("/"):
            raise _bad(uri, number, f"source {source!r} is not an S3 object; write s3://bucket/key of one file")
        if folder.scheme == "s3" and bucket == folder.bucket and (not folder.path or key.startswith(folder.path + "/")):
            rel = key[len(folder.path) + 1:] if folder.path else key
            return folder.uri, rel, rel
        return f"s3://{bucket}", key, f"{bucket}/{key}"
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise _bad(uri, number, f"source {source!r} names a host; write file:///absolute/path")
        path = posixpath.normpath(unquote(parsed.path))
        if not path.startswith("/") or path == "/":
            raise _bad(uri, number, f"source {source!r} is not a file; write file:///absolute/path/to/file")
        if folder.scheme == "file" and path.startswith(folder.path.rstrip("/") + "/"):
            rel = path[len(folder.path.rstrip("/")) + 1:]
            return folder.uri, rel, rel
        parent, name = posixpath.split(path)
        return Path(parent).as_uri(), name, path.lstrip("/")
    if parsed.scheme or source.startswith("/"):
        raise _bad(uri, number, f"source {source!r} is not supported; use an s3:// or file:// URI, or a path relative "
                                "to the manifest's folder")
    rel = posixpath.normpath(source)
    if rel in (".", "..") or rel.startswith("../"):
        raise _bad(uri, number, f"source {source!r} leaves the manifest's folder; give files outside it as s3:// or "
                                "file:// URIs")
    return folder.uri, rel, rel


def parse_manifest(uri: str, text: str) -> list[ManifestLine]:
    """Every sample line of a manifest, validated (format only: existence is :func:`check_manifest`'s)."""
    folder, _ = _split(uri)
    lines: list[ManifestLine] = []
    taken: dict[str, ManifestLine] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise _bad(uri, number, f"not JSON ({exc}); each line is one JSON object such as {EXAMPLE_LINE}") from None
        if not isinstance(record, dict):
            raise _bad(uri, number, f"a JSON {type(record).__name__}, not an object; write it as {EXAMPLE_LINE}")
        source = record.get("source")
        if not isinstance(source, str) or not source.strip():
            raise _bad(uri, number, f"no \"source\" (the sample's file); write it as {EXAMPLE_LINE}")
        usage = record.get("usage")
        if usage is None:
            usage = UNMARKED
        if not isinstance(usage, str) or usage.strip().upper() not in (*USAGES, UNMARKED):
            raise _bad(uri, number, f"usage {usage!r} is not one of {', '.join(USAGES)} (any case), or left out")
        root, key, local = _locate(uri, folder, number, source.strip())
        if local == STAGED_MANIFEST:
            raise _bad(uri, number, f"source {source!r} would be staged as {STAGED_MANIFEST}, the name of the staged "
                                    "manifest; rename or move the file")
        line = ManifestLine(number, record, usage.strip().upper(), root, key, local)
        other = taken.setdefault(local, line)
        if other.source != line.source:
            raise _bad(uri, number, f"source {line.source} would be staged at {local!r}, where line {other.number} "
                                    f"puts {other.source}; move one of them")
        lines.append(line)
    if not lines:
        raise DatasetError(f"manifest {uri} has no sample lines; write one JSON object per line such as {EXAMPLE_LINE}")
    return lines


#: The connection extra ``allowed_dataset_roots`` as it may be written: a comma-separated string or a list.
Roots = str | Sequence[str] | None


def dataset_roots(roots: Roots) -> list[Path]:
    """The allowed folders for ``file://`` data, links resolved; empty when the deployment sets none."""
    if not roots:
        return []
    items = roots.split(",") if isinstance(roots, str) else roots
    return [Path(str(r).strip()).expanduser().resolve() for r in items if str(r).strip()]


def outside_roots(path: Path, allowed: Sequence[Path]) -> bool:
    """Whether ``path``, every link in it resolved, lies outside all of ``allowed`` (never when none are set)."""
    if not allowed:
        return False
    real = path.resolve()
    return not any(real == root or real.is_relative_to(root) for root in allowed)


def _outside(what: str, allowed: Sequence[Path]) -> str:
    return (f"{what} is outside the folders this deployment allows for file:// datasets "
            f"({', '.join(str(r) for r in allowed)}; the aicenter connection's allowed_dataset_roots): move the "
            "file under one of them, or use an s3:// source")


def check_roots(uri: str, lines: Sequence[ManifestLine], roots: Roots) -> None:
    """With ``allowed_dataset_roots`` set, the manifest and every ``file://`` source it names lie inside
    the roots, links resolved (a relative source through a link that leaves the root is outside).

    The worker checks it before compute; the runtime again right before it reads the files.
    """
    allowed = dataset_roots(roots)
    if not allowed:
        return
    folder, _ = _split(uri)
    if folder.scheme == "file" and outside_roots(Path(unquote(urlparse(uri).path)), allowed):
        raise ConfigurationError(f"manifest {uri}: {_outside('the manifest', allowed)}")
    for line in lines:
        if urlparse(line.root).scheme == "file" and outside_roots(Path(unquote(urlparse(line.source).path)), allowed):
            raise ConfigurationError(f"line {line.number} of manifest {uri}: {_outside(f'source {line.source}', allowed)}")


def read_manifest(uri: str, open_store: OpenStore) -> list[ManifestLine]:
    folder, name = _split(uri)
    try:
        raw = open_store(folder.uri).get_bytes(name)
    except NotFoundError:
        raise DatasetError(f"manifest {uri} does not exist; upload it there or fix the dataset URI") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"manifest {uri} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON Lines") from None
    return parse_manifest(uri, text)


class _Stores:
    """One store per source folder, opened once."""

    def __init__(self, open_store: OpenStore) -> None:
        self._open = open_store
        self._stores: dict[str, Store] = {}

    def __call__(self, root: str) -> Store:
        if root not in self._stores:
            self._stores[root] = self._open(root)
        return self._stores[root]


def _no_lines(uri: str, usages: Collection[str]) -> DatasetError:
    names = " or ".join(sorted(u or "unmarked" for u in usages))
    return DatasetError(f"manifest {uri} has no {names} lines; mark the samples for this step with \"usage\"")


def _missing(uri: str, line: ManifestLine) -> DatasetError:
    return _bad(uri, line.number, f"source {line.source} does not exist; upload it or fix the line")


def _distinct(lines: Sequence[ManifestLine]) -> list[ManifestLine]:
    first: dict[str, ManifestLine] = {}
    for line in lines:
        first.setdefault(line.local, line)
    return list(first.values())


def check_manifest(uri: str, open_store: OpenStore, *, require: Collection[str] = (), roots: Roots = None) -> ManifestSummary:
    """Read and check a manifest before compute: every line well formed, every ``file://`` source
    inside ``roots`` (``allowed_dataset_roots``), every source there, and at least one line of the
    usages ``require`` names (TRAINING for train and full runs, EVALUATION for evaluation runs,
    INFERENCE for batch prediction).

    Sources are found by listing the folders that hold many of them (one request per 1,000
    keys instead of one HEAD per file: 3,000 sources on moto took 43 s with HEADs); the rest,
    and any a listing did not show, are checked with a HEAD.
    """
    lines = read_manifest(uri, open_store)
    check_roots(uri, lines, roots)
    if require and not any(line.usage in require for line in lines):
        raise _no_lines(uri, require)
    stores = _Stores(open_store)
    distinct = _distinct(lines)
    sizes = _listed_sizes(distinct, stores)

    async def size(line: ManifestLine) -> int:
        try:
            info = await stores(line.root).head_async(line.key)
        except NotFoundError:
            info = None
        if info is None:
            raise _missing(uri, line)
        return info.size

    headed = run(gather_limited([line for line in distinct if line.local not in sizes], size))
    total = sum(sizes.values()) + sum(headed)
    usages: dict[str, int] = {}
    for line in lines:
        usages[line.usage] = usages.get(line.usage, 0) + 1
    folders = {uri.rsplit("/", 1)[0]} | {line.source.rsplit("/", 1)[0] for line in lines}
    return ManifestSummary(uri=uri, lines=len(lines), usages=usages, files=len(distinct), bytes=total,
                           folders=sorted(folders))


#: A folder holding at least this many of a manifest's sources is listed rather than HEADed file by file.
LIST_MIN = 16
#: Keys a listing may read per source it looks for (then the rest are HEADed): a huge folder that
#: holds a few sources is not listed whole.
LIST_KEYS_PER_SOURCE = 20


def _listed_sizes(lines: Sequence[ManifestLine], stores: _Stores) -> dict[str, int]:
    """Sizes of the sources that listings of their folders show, by local path (a listing proves presence only)."""
    groups: dict[tuple[str, str], list[ManifestLine]] = {}
    for line in lines:
        groups.setdefault((line.root, posixpath.dirname(line.key)), []).append(line)
    found: dict[str, int] = {}
    for (root, folder), members in groups.items():
        if len(members) < LIST_MIN:
            continue
        wanted = {line.key: line.local for line in members}
        budget = 1000 + LIST_KEYS_PER_SOURCE * len(members)
        try:
            for info in stores(root).list(f"{folder}/" if folder else ""):
                local = wanted.pop(info.key, None)
                if local is not None:
                    found[local] = info.size
                budget -= 1
                if budget <= 0 or not wanted:
                    break
        except AICenterError:  # the HEADs decide
            continue
    return found


def open_dataset(uri: str) -> Store:
    """The runtime's :data:`OpenStore`: an existing folder, S3 credentials from the environment."""
    return open_any_store(uri, create=False)


def stage_manifest(
    uri: str, usages: Collection[str], dest: Path, open_store: OpenStore = open_dataset, *, write_manifest: bool = True,
    required: bool = True, roots: Roots = None,
) -> list[FileEntry]:
    """Download the sources of the lines whose usage is in ``usages`` into ``dest``, plus ``manifest.jsonl``.

    Returns the staged files (the manifest included) with their digests, for the snapshot.
    No such line is an error when ``required``, else nothing is staged (a full run's optional
    evaluation lines). With ``roots`` (``allowed_dataset_roots``) every ``file://`` source is checked
    again before any is read (:func:`check_roots`).
    """
    lines = read_manifest(uri, open_store)
    check_roots(uri, lines, roots)
    chosen = [line for line in lines if line.usage in usages]
    if not chosen and not required:
        return []
    if not chosen:
        raise _no_lines(uri, usages)
    stores = _Stores(open_store)
    root = dest.resolve()
    root.mkdir(parents=True, exist_ok=True)

    async def one(line: ManifestLine) -> FileEntry:
        target = (root / line.local).resolve()
        if not target.is_relative_to(root):
            raise _bad(uri, line.number, f"source {line.source} would be staged outside the data folder; rename it")
        try:
            entry = await download_file(stores(line.root), line.key, target)
        except NotFoundError:
            raise _missing(uri, line) from None
        except IsADirectoryError:
            raise _bad(uri, line.number, f"source {line.source} is a folder; list its files one per line") from None
        return FileEntry(line.local, entry.sha256, entry.size)

    entries = run(gather_limited(_distinct(chosen), one))
    if write_manifest:
        path = root / STAGED_MANIFEST
        with open(path, "w", encoding="utf-8") as fh:
            for line in chosen:
                fh.write(json.dumps({**line.record, "source": line.local}, ensure_ascii=False) + "\n")
        digest = sha256_file(path)
        entries.append(FileEntry(STAGED_MANIFEST, digest.sha256, digest.size))
    return sorted(entries, key=lambda e: e.path)


def stage_inference(uri: str, dest: Path, open_store: OpenStore = open_dataset, *, roots: Roots = None) -> list[FileEntry]:
    """Batch prediction's inputs from a manifest: the files of its INFERENCE lines, without ``manifest.jsonl``

    (a ``.jsonl`` beside them would be taken for inputs by ``input_type="json"``).
    """
    return stage_manifest(uri, INFERENCE, dest, open_store, write_manifest=False, roots=roots)
