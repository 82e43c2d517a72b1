"""What each AI Center page shows, read from the store: packages, versions, runs, artifacts, comparisons.

No FastAPI and no Airflow here: the routes (``app.py``) check access and render; this module
turns the registry and the run records (``runs.py``, ``layout.py``) into plain values for the
templates, so the same pages work on ``file://`` and ``s3://`` stores alike.
"""

from __future__ import annotations

import csv
import io
import json
import mimetypes
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import obstore
from pydantic import BaseModel

from airflow_aicenter import layout
from airflow_aicenter.errors import AICenterError, NotFoundError, StorageError
from airflow_aicenter.package import Version
from airflow_aicenter.package.names import validate_package_name
from airflow_aicenter.records import (
    DAMAGED_RECORD_FIX,
    AliasRecord,
    DamagedRecordError,
    EvaluationRecord,
    Manifest,
    RunRef,
    VersionRecord,
    read,
)
from airflow_aicenter.registry import Registry
from airflow_aicenter.runs import RunRecord, compare, find_run
from airflow_aicenter.storage import Store

M = TypeVar("M", bound=BaseModel)

#: Reads of many small records go this many at once (each is one GET, latency-bound).
READ_CONCURRENCY = 16
#: A text or CSV preview reads at most this much of an artifact.
PREVIEW_BYTES = 256 * 1024
#: A CSV preview shows at most this many rows, this many columns, and this many characters of a cell.
PREVIEW_ROWS = 200
PREVIEW_COLUMNS = 100
PREVIEW_CELL = 1000
SCORE_DIGITS = 4

TEXT_SUFFIXES = frozenset({".txt", ".md", ".log", ".json", ".jsonl", ".yaml", ".yml", ".py", ".cfg", ".ini", ".toml", ".xml"})
CSV_SUFFIXES = frozenset({".csv", ".tsv"})
#: Raster images only: an SVG can carry script, so it is offered for download, never shown inline.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})


def score(value: float | None) -> str:
    """Scores as people read them: 4 decimal places (``0.8133``), or an empty cell."""
    return "" if value is None else f"{value:.{SCORE_DIGITS}f}"


def run_id_of(record: VersionRecord) -> str | None:
    """The run id (``dag/run/task/try``) that created a version, if a run did."""
    return None if record.run is None else record.run.path.id


def damaged(key: str, what: str = "it is not a valid record") -> str:
    """How a page names a record it could not use: by key, never by its content (which may name anything).

    What to do about it (``DAMAGED_RECORD_FIX``) is said once, beside the list of them.
    """
    return f"damaged record {key}: {what}"


def _read_each(store: Store, keys: Iterable[str], model: type[M], problems: list[str]) -> list[tuple[str, M]]:
    """(key, record) of each of ``keys`` that reads as a ``model``; a damaged one is noted in ``problems`` and left out.

    One damaged record never takes a page down. A record that vanished since the listing is
    skipped; a store that fails to answer still fails the page (nothing here could be trusted).
    """

    def one(key: str) -> M | str | None:
        try:
            return read(store, key, model)
        except DamagedRecordError:
            return damaged(key)
        except NotFoundError:
            return None

    keys = list(keys)
    with ThreadPoolExecutor(max_workers=max(1, min(READ_CONCURRENCY, len(keys)))) as pool:
        found = list(pool.map(one, keys))
    out = []
    for key, record in zip(keys, found, strict=True):
        if isinstance(record, str):
            problems.append(record)
        elif record is not None:
            out.append((key, record))
    return out


def run_path_of(run: RunRef | None) -> layout.RunPath | None:
    """The run folder a record's ``run`` names; a ``layout.LayoutError`` when it names none (a forged record)."""
    return None if run is None else run.path


def set_by_run(entry: AliasRecord) -> layout.RunPath | None:
    """The run that moved an alias (``set_by`` ``run <dag>/<run>/<task>/<try>``), else None (a CLI user)."""
    if not entry.set_by.startswith("run "):
        return None
    try:
        return layout.RunPath.parse(entry.set_by.removeprefix("run "))
    except layout.LayoutError:
        return None


# -- packages ----------------------------------------------------------------------------------
@dataclass
class PackageRecords:
    """What the package pages read of one package: versions in order, evaluations, aliases with history.

    Only records that are what their key says are kept; every other one is in ``problems``
    (``damaged record <key>``), so the pages show the rest.
    """

    versions: list[VersionRecord]
    evaluations: dict[str, list[EvaluationRecord]]
    aliases: dict[str, AliasRecord]
    history: dict[str, list[AliasRecord]]
    problems: list[str]


def _check_version(name: str, key: str, record: VersionRecord) -> str | None:
    """Why a version record that parsed is still not the version its key names, if it is not."""
    if record.package != name or layout.version_key(name, record.version) != key:
        return damaged(key, "it records another package or version than its key")
    try:
        Version.parse(record.version)
        run_path_of(record.run)
    except (AICenterError, layout.LayoutError):
        return damaged(key, "it names a version or a run that cannot exist")
    return None


def package_records(registry: Registry, name: str) -> PackageRecords:
    """Every record of package ``name`` the pages show; one listing each of versions, evaluations and aliases."""
    store = registry.store
    problems: list[str] = []
    versions = []
    keys = [i.key for i in store.list(layout.versions_prefix(name)) if i.key.endswith(".json")]
    for key, record in _read_each(store, keys, VersionRecord, problems):
        problem = _check_version(name, key, record)
        if problem:
            problems.append(problem)
        else:
            versions.append(record)
    versions.sort(key=lambda r: Version.parse(r.version))
    known = {v.version for v in versions}
    keys = [i.key for i in store.list(f"{layout.package_prefix(name)}evaluations/") if i.key.endswith(".json")]
    evaluations: dict[str, list[EvaluationRecord]] = {v.version: [] for v in versions}
    for key, evaluation in sorted(_read_each(store, keys, EvaluationRecord, problems), key=lambda kr: kr[1].created_at):
        try:
            run_path_of(evaluation.run)
        except layout.LayoutError:
            problems.append(damaged(key, "it names a run that cannot exist"))
            continue
        if evaluation.version in known:  # an evaluation of a version that is not (or no longer) there is not shown
            evaluations[evaluation.version].append(evaluation)
    aliases, history = {}, {}
    prefixes, _ = store.list_dir(layout.aliases_root(name))
    for prefix in sorted(prefixes):
        alias = prefix.rsplit("/", 1)[-1]
        keys = sorted(i.key for i in store.list(layout.aliases_prefix(name, alias)) if i.key.endswith(".json"))
        entries = dict(_read_each(store, keys, AliasRecord, problems))
        if keys and keys[-1] in entries:  # the highest entry is the alias's current target
            aliases[alias] = entries[keys[-1]]
        history[alias] = sorted(entries.values(), key=lambda e: e.seq, reverse=True)
    return PackageRecords(versions, evaluations, aliases, history, sorted(problems))


@dataclass
class PackageRow:
    name: str
    latest: str | None
    versions: int
    aliases: dict[str, str]
    best_score: float | None
    best_version: str | None
    problems: list[str] = field(default_factory=list)


def _best(versions: list[VersionRecord], evaluations: dict[str, list[EvaluationRecord]]) -> tuple[float | None, str | None]:
    scored = [(v.score, v.version) for v in versions if v.score is not None]
    scored += [(e.score, e.version) for evs in evaluations.values() for e in evs if e.score is not None]
    if not scored:
        return None, None
    best = max(scored, key=lambda s: (s[0], Version.parse(s[1])))
    return best[0], best[1]


def package_rows(registry: Registry) -> list[PackageRow]:
    """The packages page: one row per package (latest version, aliases, best score, damaged records)."""

    def row(name: str) -> PackageRow:
        found = package_records(registry, name)
        best, best_version = _best(found.versions, found.evaluations)
        return PackageRow(
            name=name, latest=found.versions[-1].version if found.versions else None, versions=len(found.versions),
            aliases={a: r.version for a, r in found.aliases.items()}, best_score=best, best_version=best_version,
            problems=found.problems,
        )

    names = registry.packages()
    with ThreadPoolExecutor(max_workers=min(READ_CONCURRENCY, max(1, len(names)))) as pool:
        return list(pool.map(row, names))


@dataclass
class VersionRow:
    record: VersionRecord
    run_id: str | None
    evaluations: list[EvaluationRecord]
    aliases: list[str]

    @property
    def version(self) -> str:
        return self.record.version


@dataclass
class PackagePage:
    name: str
    versions: list[VersionRow]
    aliases: dict[str, AliasRecord]
    history: dict[str, list[AliasRecord]]
    chart: str
    description: str = ""
    problems: list[str] = field(default_factory=list)

    def dag_ids(self) -> set[str]:
        """Every DAG whose runs this page names: made a version, evaluated one, or moved an alias."""
        made = {r.record.run.dag_id for r in self.versions if r.record.run}
        evaluated = {e.run.dag_id for r in self.versions for e in r.evaluations if e.run}
        moved = {run.dag_id for entries in self.history.values() for e in entries if (run := set_by_run(e))}
        return made | evaluated | moved


def package_page(registry: Registry, name: str) -> PackagePage:
    """A package: its versions (newest first), aliases with their history, the score chart, and its damaged records."""
    try:
        validate_package_name(name)
    except AICenterError as exc:
        raise NotFoundError(f"there is no package {name!r}: {exc}") from None
    found = package_records(registry, name)
    versions, evaluations = found.versions, found.evaluations
    if not versions and not found.problems:
        raise NotFoundError(f"package {name!r} has no versions in {registry.store.uri}; "
                            f"upload it with `aicenter package upload PATH --name {name}`")
    by_version: dict[str, list[str]] = {}
    for alias, current in sorted(found.aliases.items()):
        by_version.setdefault(current.version, []).append(alias)
    rows = [VersionRow(v, run_id_of(v), evaluations.get(v.version, []), by_version.get(v.version, [])) for v in versions]
    points = [(v.version, v.score) for v in versions]
    for i, v in enumerate(versions):  # a version without its own score is drawn with its latest evaluation
        if v.score is None and evaluations.get(v.version):
            points[i] = (v.version, evaluations[v.version][-1].score)
    return PackagePage(
        name=name, versions=list(reversed(rows)), aliases=dict(sorted(found.aliases.items())), history=found.history,
        chart=score_chart(points), description=versions[-1].description if versions else "", problems=found.problems,
    )


def score_chart(points: list[tuple[str, float | None]], width: int = 640, height: int = 220) -> str:
    """An inline SVG line chart of score by version (versions in order; unscored ones are skipped).

    Drawn on the server: the page needs no charting library and no network.
    """
    scored = [(i, v, s) for i, (v, s) in enumerate(points) if s is not None]
    if not scored:
        return ""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 16, 40
    lo, hi = min(s for _, _, s in scored), max(s for _, _, s in scored)
    if hi == lo:
        lo, hi = lo - 0.5 if lo else -0.5, hi + 0.5 if hi else 0.5
    n = max(1, len(points) - 1)

    def x(i: int) -> float:
        return pad_l + (width - pad_l - pad_r) * (i / n if len(points) > 1 else 0.5)

    def y(s: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - (s - lo) / (hi - lo))

    parts = [f'<svg class="chart" role="img" aria-label="score by version" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg">']
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        parts.append(f'<line class="grid" x1="{pad_l}" x2="{width - pad_r}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="axis" x="{pad_l - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{score(value)}</text>')
    parts.append('<polyline class="line" points="' + " ".join(f"{x(i):.1f},{y(s):.1f}" for i, _, s in scored) + '"/>')
    for i, version, s in scored:
        parts.append(f'<circle class="point" cx="{x(i):.1f}" cy="{y(s):.1f}" r="4"><title>{_xml(version)}: {score(s)}</title>'
                     "</circle>")
    step = max(1, len(points) // 12)  # at most ~12 labels on the version axis
    for i, (version, _) in enumerate(points):
        if i % step == 0 or i == len(points) - 1:
            parts.append(f'<text class="axis" x="{x(i):.1f}" y="{height - pad_b + 18}" text-anchor="middle">'
                         f"{_xml(version)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- runs --------------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: str  # relative to artifacts/
    size: int

    @property
    def kind(self) -> str:
        return artifact_kind(self.path)


@dataclass
class Snapshot:
    directory: str
    uri: str | None  # None when the record names a place the page does not follow
    manifest: Manifest | None
    error: str | None = None


@dataclass
class RunPage:
    run: RunRecord
    path: layout.RunPath
    summary: dict[str, Any]
    results_json: str | None
    artifacts: list[Artifact]
    snapshots: list[Snapshot] = field(default_factory=list)
    artifacts_error: str | None = None


def run_path(dag_id: str, run_id: str, task: str, try_number: int) -> layout.RunPath:
    """The run folder named by a URL's parts; a part that would leave ``runs/`` is a ``layout.LayoutError``."""
    return layout.RunPath.parse(f"{dag_id}/{run_id}/{task}/{try_number}")


def _key_of(store: Store, uri: str) -> str | None:
    prefix = store.uri + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else None


#: Why a page does not follow a key a run's record names.
NOT_ITS_OWN = "refused: not in this run's folder"


def own_key(store: Store, path: layout.RunPath, uri: str) -> str | None:
    """The store key of ``uri`` when it is a file inside the run folder ``path``, else None.

    A run's records are written with the run's credentials: a key they name is followed only
    inside the run's own folder, never into another run's (another DAG's) folder or up with ``..``.
    """
    key = _key_of(store, uri)
    inside = f"{path.prefix}/"
    if key is None or not key.startswith(inside):
        return None
    if any(part in ("", ".", "..") for part in key[len(inside):].split("/")):
        return None
    return key


def _snapshot(store: Store, path: layout.RunPath, directory: str, uri: str) -> Snapshot:
    """One snapshot of a run, its manifest read only from the run's own folder."""
    key = own_key(store, path, uri)
    if key is None:
        return Snapshot(directory, None, None, NOT_ITS_OWN)
    try:
        return Snapshot(directory, uri, read(store, key, Manifest))
    except DamagedRecordError:
        return Snapshot(directory, uri, None, f"{damaged(key)}; {DAMAGED_RECORD_FIX}")
    except StorageError as exc:  # missing, or a link in a file store that leaves it
        return Snapshot(directory, uri, None, str(exc))


def run_page(store: Store, path: layout.RunPath) -> RunPage:
    """A run: its record, ``_results.json``, artifacts and snapshot summaries (from its own folder only)."""
    record = find_run(store, path.id)
    artifacts_prefix = path.key(layout.ARTIFACTS) + "/"
    artifacts, artifacts_error = [], None
    try:
        artifacts = sorted(
            (Artifact(i.key[len(artifacts_prefix):], i.size) for i in store.list(artifacts_prefix)), key=lambda a: a.path
        )
    except StorageError as exc:  # a file store's link that leaves the store: named, and the rest of the page shown
        artifacts_error = str(exc)
    snapshots = [_snapshot(store, path, directory, uri) for directory, uri in sorted(record.outcome.snapshots.items())]
    results = None if record.results is None else json.dumps(record.results, indent=2, sort_keys=False)
    return RunPage(record, path, record.summary(), results, artifacts, snapshots, artifacts_error)


def artifact_key(path: layout.RunPath, relative: str) -> str:
    """The store key of an artifact; a path that could leave the run's ``artifacts/`` folder is a ``layout.LayoutError``."""
    if not relative or "\\" in relative or "\x00" in relative or relative.startswith("/"):
        raise layout.LayoutError(f"artifact path {relative!r} is not a relative path inside the run's artifacts folder")
    if any(part in ("..", ".", "") for part in relative.split("/")):  # PurePosixPath would hide "./" and "//"
        raise layout.LayoutError(f"artifact path {relative!r} must not contain '..' or '.' parts; give a file inside artifacts/")
    return path.key(f"{layout.ARTIFACTS}/{relative}")


def artifact_kind(relative: str) -> str:
    """How an artifact is previewed: ``text``, ``csv``, ``image`` or ``binary`` (download only)."""
    suffix = PurePosixPath(relative).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "binary"


def media_type(relative: str) -> str:
    kind = artifact_kind(relative)
    if kind == "image":
        return mimetypes.guess_type(relative)[0] or "application/octet-stream"
    if kind in ("text", "csv"):
        return "text/plain; charset=utf-8"  # never text/html: an artifact must not run in the page's origin
    return "application/octet-stream"


@dataclass
class Preview:
    relative: str
    kind: str
    size: int
    truncated: bool
    text: str | None = None
    rows: list[list[str]] | None = None
    #: Why there is no preview of a file that has a kind we preview (the file can still be downloaded).
    unavailable: str | None = None
    #: Columns left out of the widest row (a CSV preview shows ``PREVIEW_COLUMNS``).
    more_columns: int = 0


def _csv_rows(text: str, dialect: str) -> tuple[list[list[str]], int, bool]:
    """Up to ``PREVIEW_ROWS`` rows of ``PREVIEW_COLUMNS`` cells of ``PREVIEW_CELL`` characters; columns and rows left out.

    A preview is bounded in every direction: the page of a 256 KiB line of commas is not 256 K cells.
    """
    rows: list[list[str]] = []
    more, cut = 0, False
    for row in csv.reader(io.StringIO(text), dialect=dialect):
        if len(rows) == PREVIEW_ROWS:
            cut = True
            break
        more = max(more, len(row) - PREVIEW_COLUMNS)
        rows.append([c if len(c) <= PREVIEW_CELL else c[:PREVIEW_CELL] + "…" for c in row[:PREVIEW_COLUMNS]])
    return rows, more, cut


def preview(store: Store, path: layout.RunPath, relative: str) -> Preview:
    """The first ``PREVIEW_BYTES`` of a text or CSV artifact (CSV parsed into rows); images are linked."""
    key = artifact_key(path, relative)
    info = store.head(key)
    if info is None:
        raise NotFoundError(f"{store.url(key)} does not exist; the run's page lists its artifacts")
    kind = artifact_kind(relative)
    if kind in ("image", "binary") or info.size == 0:
        return Preview(relative, kind, info.size, False, text="" if info.size == 0 else None)
    length = min(info.size, PREVIEW_BYTES)
    data = bytes(obstore.get_range(store.inner, key, start=0, length=length))
    truncated = info.size > length
    text = data.decode("utf-8", errors="replace")
    if "\x00" in text:
        return Preview(relative, "binary", info.size, False)
    if kind == "csv":
        if truncated:  # a cut line would be a broken row
            text = text.rsplit("\n", 1)[0]
        dialect = "excel-tab" if relative.lower().endswith(".tsv") else "excel"
        try:
            rows, more, cut = _csv_rows(text, dialect)
        except csv.Error as exc:  # a field over the csv module's limit (128 KiB), a NUL, a stray quote at the end
            limit = csv.field_size_limit()
            why = f"a field is larger than {limit // 1024} KiB" if "field limit" in str(exc) else f"not readable as CSV ({exc})"
            return Preview(relative, "csv", info.size, truncated, unavailable=f"preview unavailable: {why}; download the file")
        return Preview(relative, "csv", info.size, truncated or cut, rows=rows, more_columns=max(0, more))
    return Preview(relative, "text", info.size, truncated, text=text)


# -- docs ------------------------------------------------------------------------------------
_DOC_NAME = re.compile(r"^[A-Za-z0-9_-]+\.md$")


def doc_titles(folder: Path) -> list[tuple[str, str]]:
    """(file name, first heading) of every Markdown document in ``folder``."""
    out = []
    for path in sorted(folder.glob("*.md")) if folder.is_dir() else ():
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("# ")), path.stem)
        out.append((path.name, first.removeprefix("# ").strip()))
    return out


def render_doc(folder: Path, name: str) -> tuple[str, str]:
    """A document of ``folder`` as HTML (raw HTML in it is escaped, not passed through); only plain file names."""
    if not _DOC_NAME.match(name) or not (folder / name).is_file():
        raise NotFoundError(f"there is no document {name!r}; the documentation index lists them")
    from markdown_it import MarkdownIt

    text = (folder / name).read_text(encoding="utf-8")
    title = next((line.removeprefix("# ").strip() for line in text.splitlines() if line.startswith("# ")), name)
    return title, MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


# -- compare -----------------------------------------------------------------------------------
def snapshot_summary(store: Store, record: RunRecord) -> str | None:
    """One line per snapshot: files, bytes and the manifest, so a change of data shows beside the dataset URI.

    Manifests are read from the run's own folder only (:func:`own_key`), as on the run's page.
    """
    lines = []
    path = layout.RunPath.parse(record.id)
    for directory, uri in sorted(record.outcome.snapshots.items()):
        snap = _snapshot(store, path, directory, uri)
        if snap.manifest is None:
            lines.append(f"{directory}: {snap.error}")
        else:
            lines.append(f"{directory}: {snap.manifest.file_count} files, {snap.manifest.total_bytes} bytes")
    return "\n".join(lines) or None


def compare_rows(store: Store, records: list[RunRecord]) -> list[tuple[str, list[Any], bool]]:
    """Rows of (field, value per run, differs): ``runs.compare`` plus the data snapshots; scores rounded."""
    rows: list[tuple[str, list[Any]]] = []
    for name, values in compare(records):
        if name == "score":
            values = [score(v) if isinstance(v, float) else v for v in values]
        rows.append((name, values))
        if name == "evaluation_dataset":
            rows.append(("snapshot", [snapshot_summary(store, r) for r in records]))
    return [(name, values, len({json.dumps(v, default=str) for v in values}) > 1) for name, values in rows]
