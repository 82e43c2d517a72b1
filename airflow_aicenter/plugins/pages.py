"""What each AI Center page shows, read from the store: packages, versions, runs, artifacts, comparisons.

No FastAPI and no Airflow here: the routes (``app.py``) check access and render; this module
turns the registry and the run records (``runs.py``, ``layout.py``) into plain values for the
templates, so the same pages work on ``file://`` and ``s3://`` stores alike.
"""

from __future__ import annotations

import csv
import io
import json
import math
import mimetypes
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import obstore
from pydantic import BaseModel

from airflow_aicenter import layout
from airflow_aicenter.errors import AICenterError, NotFoundError, StorageError
from airflow_aicenter.package import Version
from airflow_aicenter.package.names import validate_package_name
from airflow_aicenter.plans import PLANS, PipelinePlan
from airflow_aicenter.records import (
    DAMAGED_RECORD_FIX,
    AliasRecord,
    ApprovalRecord,
    DamagedRecordError,
    EvaluationRecord,
    Manifest,
    Progress,
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

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
TEXT_SUFFIXES = frozenset({".txt", ".log", ".json", ".jsonl", ".yaml", ".yml", ".py", ".cfg", ".ini", ".toml", ".xml"})
CSV_SUFFIXES = frozenset({".csv", ".tsv"})
#: Raster images, shown in an ``<img>``.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp"})
#: SVG can carry script: it is shown only as an ``<img>`` (no script runs in an image), served as
#: image/svg+xml with a policy that blocks scripts when opened on its own, never inlined in a page.
SVG_SUFFIXES = frozenset({".svg"})
#: Every run status a record can hold, in the order the runs list offers them.
RUN_STATUSES = ("running", "succeeded", "failed", "killed", "skipped")
#: Runs on one page of the runs list by default, and at most.
PER_PAGE = 50
MAX_PER_PAGE = 200
#: The most of metrics.jsonl a page or the live endpoint reads (the agent keeps at most 2,000 points).
METRICS_BYTES = 4 << 20
#: Metric series charted; lines of metrics.jsonl longer than this are skipped.
MAX_SERIES = 12
METRICS_LINE = 64 << 10
#: A batch run's predictions listed on its page: files, rows, bytes read per file, characters of a cell.
PREDICTION_FILES = 5
PREDICTION_ROWS = 100
PREDICTION_BYTES = 64 * 1024
PREDICTION_CELL = 300
#: The one way every time is written on the pages (the browser rewrites it in the user's time zone).
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def score(value: float | None) -> str:
    """Scores as people read them: 4 decimal places (``0.8133``), or an empty cell."""
    return "" if value is None else f"{value:.{SCORE_DIGITS}f}"


def as_time(value: datetime | float | str | None) -> datetime | None:
    """A record's time (a datetime, a Unix timestamp or an ISO string) as an aware UTC datetime; None if it is none."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def seconds(value: float | None) -> str:
    """A duration as the pages write it: ``0.8 s``, ``42.0 s``, ``3m12s``, ``1h05m``."""
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f} s"
    whole = round(value)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def size(value: float | None) -> str:
    """Bytes as people read them: ``512 B``, ``2.0 KiB``, ``50.0 MiB``, ``1.5 GiB``."""
    if value is None:
        return ""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{int(value)} B"


def money(value: Any) -> str:
    """A cost in the prices' currency: at most 4 decimals, no trailing zeros (``0.0123``, ``12.5``)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    if value and abs(value) < 0.0001:
        return f"{value:.2g}"
    return f"{value:,.4f}".rstrip("0").rstrip(".")


#: What the pages call each figure of ``resources`` and how they write it, in the order they show them.
RESOURCE_FIGURES: tuple[tuple[str, str, Any], ...] = (
    ("wall_seconds", "Wall time", seconds),
    ("cpu_seconds", "CPU time", seconds),
    ("peak_memory_bytes", "Peak memory", size),
    ("gpu_seconds", "GPU time", seconds),
    ("gpu_utilization", "GPU utilisation", lambda v: f"{v:.0f}%"),
    ("gpu_memory_peak_bytes", "Peak GPU memory", size),
    ("bytes_staged", "Staged", size),
    ("bytes_uploaded", "Uploaded", size),
)


def resource_rows(resources: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) of each figure a run recorded; figures it could not measure (None) are left out."""
    rows = []
    for key, label, shown in RESOURCE_FIGURES:
        value = (resources or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            if key == "gpu_seconds" and not value:
                continue  # a run without a GPU
            rows.append((label, shown(value)))
    return rows


def resource_line(resources: dict[str, Any] | None) -> str:
    """One line for a table cell: wall time and peak memory (the figures every run has)."""
    return ", ".join(v for label, v in resource_rows(resources) if label in ("Wall time", "Peak memory", "GPU time"))


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
    #: Each version's approval (``promote_if="approved"``): its decision, else its pending request.
    approvals: dict[str, ApprovalRecord] = field(default_factory=dict)


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
    approvals = package_approvals(store, name, known, problems)
    return PackageRecords(versions, evaluations, aliases, history, sorted(problems), approvals)


def _check_approval(name: str, key: str, record: ApprovalRecord) -> str | None:
    """Why an approval record that parsed is still not the one its key names (a forged or misplaced record)."""
    stage = key.rsplit("/", 1)[-1].removesuffix(".json")
    if record.package != name or stage not in ("request", "decision") \
            or layout.approval_key(name, record.version, stage) != key:  # type: ignore[arg-type]
        return damaged(key, "it records another package or version than its key")
    if (stage == "decision") == (record.status == "pending"):
        return damaged(key, f"a {stage} cannot be {record.status!r}")
    try:
        run_path_of(record.run)
    except layout.LayoutError:
        return damaged(key, "it names a run that cannot exist")
    return None


def package_approvals(store: Store, name: str, known: set[str] | None, problems: list[str]) -> dict[str, ApprovalRecord]:
    """Each version's approval, read as :meth:`Registry.approval` does (the decision, else the request), in one listing.

    A damaged approval record is named in ``problems``: a damaged decision leaves the version's
    approval unknown rather than shown as the request (which would say pending when it is not).
    """
    keys = [i.key for i in store.list(layout.approvals_prefix(name)) if layout.RECORD_KEYS["approval"].match(i.key)]
    found: dict[str, dict[str, ApprovalRecord | None]] = {}
    for key in keys:
        version, stage = key.rsplit("/", 2)[-2:]
        found.setdefault(version, {})[stage.removesuffix(".json")] = None
    for key, record in _read_each(store, keys, ApprovalRecord, problems):
        problem = _check_approval(name, key, record)
        version, stage = key.rsplit("/", 2)[-2:]
        if problem:
            problems.append(problem)
        else:
            found[version][stage.removesuffix(".json")] = record
    out = {}
    for version, stages in found.items():
        if known is not None and version not in known:
            continue  # an approval of a version that is not (or no longer) there is not shown
        chosen = stages["decision"] if "decision" in stages else stages.get("request")
        if chosen is not None:
            out[version] = chosen
    return out


@dataclass
class PackageRow:
    name: str
    latest: str | None
    versions: int
    aliases: dict[str, str]
    best_score: float | None
    best_version: str | None
    problems: list[str] = field(default_factory=list)
    #: The newest run of the package among the DAGs the user may read (``last_runs``), if any.
    last_run: RunRecord | None = None
    #: How many versions wait for a person's decision (``promote_if="approved"``).
    pending: int = 0


def last_runs(store: Store, can_read: Any) -> dict[str, RunRecord]:
    """Each package's newest run among the DAGs ``can_read`` allows (damaged runs are the runs list's to name)."""
    last: dict[str, RunRecord] = {}
    for record in readable_runs(store, can_read, []):  # newest first
        last.setdefault(record.package, record)
    return last


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
            problems=found.problems, pending=sum(a.status == "pending" for a in found.approvals.values()),
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
    approval: ApprovalRecord | None = None

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

    @property
    def pending(self) -> list[ApprovalRecord]:
        """The versions waiting for a person's decision, oldest request first: what the page lists at the top."""
        return sorted((r.approval for r in self.versions if r.approval and r.approval.status == "pending"),
                      key=lambda a: a.at)

    def dag_ids(self) -> set[str]:
        """Every DAG whose runs this page names: made a version, evaluated one, moved an alias, or asked for approval."""
        made = {r.record.run.dag_id for r in self.versions if r.record.run}
        evaluated = {e.run.dag_id for r in self.versions for e in r.evaluations if e.run}
        moved = {run.dag_id for entries in self.history.values() for e in entries if (run := set_by_run(e))}
        asked = {r.approval.run.dag_id for r in self.versions if r.approval and r.approval.run}
        return made | evaluated | moved | asked


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
    rows = [VersionRow(v, run_id_of(v), evaluations.get(v.version, []), by_version.get(v.version, []),
                       found.approvals.get(v.version)) for v in versions]
    chart = score_chart([v.version for v in versions], [v.score for v in versions],
                        [[e.score for e in evaluations.get(v.version, []) if e.score is not None] for v in versions])
    return PackagePage(
        name=name, versions=list(reversed(rows)), aliases=dict(sorted(found.aliases.items())), history=found.history,
        chart=chart, description=versions[-1].description if versions else "", problems=found.problems,
    )


def score_chart(versions: list[str], own: list[float | None], evaluations: list[list[float]],
                width: int = 640, height: int = 240) -> str:
    """An inline SVG chart of score by version: each version's own score (a line) and its evaluations (dots).

    ``own[i]`` and ``evaluations[i]`` belong to ``versions[i]`` (in order). Two series with a
    legend, so a version's own score (measured by the run that made it) is never read as an
    evaluation made later on other data. Drawn on the server: no charting library, no network.
    """
    values = [s for s in own if s is not None] + [s for scores in evaluations for s in scores]
    if not values:
        return ""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 28, 40
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5 if lo else -0.5, hi + 0.5 if hi else 0.5
    n = max(1, len(versions) - 1)

    def x(i: int) -> float:
        return pad_l + (width - pad_l - pad_r) * (i / n if len(versions) > 1 else 0.5)

    def y(s: float) -> float:
        return pad_t + (height - pad_t - pad_b) * (1 - (s - lo) / (hi - lo))

    parts = [f'<svg class="chart" role="img" aria-label="score by version: own scores and evaluations" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    for frac in (0.0, 0.5, 1.0):
        value = lo + (hi - lo) * frac
        parts.append(f'<line class="grid" x1="{pad_l}" x2="{width - pad_r}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
                     f'<text class="axis" x="{pad_l - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{score(value)}</text>')
    scored = [(i, s) for i, s in enumerate(own) if s is not None]
    if len(scored) > 1:
        parts.append('<polyline class="line own" points="' + " ".join(f"{x(i):.1f},{y(s):.1f}" for i, s in scored) + '"/>')
    for i, s in scored:
        parts.append(f'<circle class="point own" cx="{x(i):.1f}" cy="{y(s):.1f}" r="4">'
                     f"<title>{_xml(versions[i])}: own score {score(s)}</title></circle>")
    for i, scores in enumerate(evaluations):
        for s in scores:
            parts.append(f'<circle class="point evaluation" cx="{x(i):.1f}" cy="{y(s):.1f}" r="4">'
                         f"<title>{_xml(versions[i])}: evaluation {score(s)}</title></circle>")
    step = max(1, len(versions) // 12)  # at most ~12 labels on the version axis
    for i, version in enumerate(versions):
        if i % step == 0 or i == len(versions) - 1:
            parts.append(f'<text class="axis" x="{x(i):.1f}" y="{height - pad_b + 18}" text-anchor="middle">'
                         f"{_xml(version)}</text>")
    parts.append(_legend([("own", "Own score"), ("evaluation", "Evaluation")], pad_l))
    parts.append("</svg>")
    return "".join(parts)


def _legend(entries: list[tuple[str, str]], left: float) -> str:
    out, at = [], left
    for css, label in entries:
        out.append(f'<g class="legend"><circle class="key {css}" cx="{at + 5:.0f}" cy="12" r="4"/>'
                   f'<text class="axis" x="{at + 14:.0f}" y="16">{_xml(label)}</text></g>')
        at += 24 + 7 * len(label)
    return "".join(out)


def metric_charts(series: dict[str, list[list[float]]], x_name: str, width: int = 360, height: int = 160) -> str:
    """One small SVG line chart per metric (names escaped), x the step or the seconds since the first report."""
    charts = []
    pad_l, pad_r, pad_t, pad_b = 52, 10, 22, 28
    for name, points in series.items():
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(ys), max(ys)
        if x_hi == x_lo:
            x_lo, x_hi = x_lo - 1, x_hi + 1
        if y_hi == y_lo:
            y_lo, y_hi = y_lo - (abs(y_lo) or 1) * 0.1, y_hi + (abs(y_hi) or 1) * 0.1

        def px(v: float, lo: float = x_lo, hi: float = x_hi) -> float:
            return pad_l + (width - pad_l - pad_r) * (v - lo) / (hi - lo)

        def py(v: float, lo: float = y_lo, hi: float = y_hi) -> float:
            return pad_t + (height - pad_t - pad_b) * (1 - (v - lo) / (hi - lo))

        label = _xml(name)
        body = [f'<svg class="chart metrics" role="img" aria-label="{label} by {x_name}" data-metric="{label}" '
                f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
                f'<text class="title" x="{pad_l}" y="14">{label} <tspan class="axis">{_number(ys[-1])}</tspan></text>']
        for v in (y_lo, y_hi):
            body.append(f'<line class="grid" x1="{pad_l}" x2="{width - pad_r}" y1="{py(v):.1f}" y2="{py(v):.1f}"/>'
                        f'<text class="axis" x="{pad_l - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{_number(v)}</text>')
        for v in (x_lo, x_hi):
            body.append(f'<text class="axis" x="{px(v):.1f}" y="{height - 8}" text-anchor="middle">{_number(v)}</text>')
        body.append('<polyline class="line" points="' + " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in points) + '"/>')
        if len(points) == 1:
            body.append(f'<circle class="point" cx="{px(xs[0]):.1f}" cy="{py(ys[0]):.1f}" r="3"/>')
        body.append(f'<text class="axis" x="{(pad_l + width - pad_r) / 2:.0f}" y="{height - 8}" text-anchor="middle">'
                    f"{x_name}</text></svg>")
        charts.append("".join(body))
    return "".join(charts)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# -- the runs list ---------------------------------------------------------------------------
@dataclass
class RunRow:
    """One run of the runs list."""

    record: RunRecord
    trigger: str | None
    start: datetime | None
    #: The approval this run asked for that still waits for a person's decision, if any.
    waiting: ApprovalRecord | None = None

    @property
    def id(self) -> str:
        return self.record.id


@dataclass
class RunsList:
    """A page of the runs list: rows, where it is in the whole, the filters and what each can be set to."""

    rows: list[RunRow]
    total: int
    page: int
    pages: int
    per_page: int
    filters: dict[str, str]
    options: dict[str, list[str]]
    problems: list[str] = field(default_factory=list)

    def url(self, base: str, page: int) -> str:
        """This list's URL (its filters kept) at ``page``."""
        from urllib.parse import urlencode

        query = {k: v for k, v in self.filters.items() if v}
        if self.per_page != PER_PAGE:
            query["per_page"] = str(self.per_page)
        query["page"] = str(page)
        return f"{base}/runs?{urlencode(query)}"


#: What the runs list's ``approval`` filter can be set to.
APPROVAL_FILTERS = ("pending",)


def waiting_runs(store: Store, packages: Iterable[str], problems: list[str]) -> dict[tuple[str, str, str, int], ApprovalRecord]:
    """The pending approvals of ``packages`` by the task that asked (dag, run, task, map index): the runs waiting for a person."""
    waiting = {}
    for name in sorted(set(packages)):
        for approval in package_approvals(store, name, None, problems).values():
            if approval.status == "pending" and (run := approval.run) is not None:
                waiting[(run.dag_id, run.run_id, run.task_id, run.map_index)] = approval
    return waiting


def triggered_by(record: RunRecord) -> str | None:
    """Who or what started the run's DAG run (the person, ``schedule``, an asset), when recorded."""
    trigger = record.outcome.trigger
    return None if trigger is None else trigger.by


def _run_ids(store: Store, dag_prefix: str) -> list[str]:
    """The run ids (folders with an outcome.json) under one DAG's folder.

    One recursive listing; where it fails (a file store's link that leaves the store, somewhere
    in an artifacts folder) the folders are walked level by level, so one planted link does not
    hide the DAG's runs, and nothing below a run folder's own files is read.
    """
    found = set()
    try:
        for info in store.list(dag_prefix + "/"):
            folder, _, name = info.key.rpartition("/")
            if name == layout.OUTCOME:
                found.add(folder)
    except StorageError:
        level = [dag_prefix]
        for _ in range(3):  # run, task, try
            level = [p for prefix in level for p in store.list_dir(prefix + "/")[0]]
        for folder in level:
            try:
                if any(i.key.rsplit("/", 1)[-1] == layout.OUTCOME for i in store.list_dir(folder + "/")[1]):
                    found.add(folder)
            except StorageError:
                continue
    ids = []
    for folder in found:
        try:
            ids.append(layout.RunPath.parse(folder.removeprefix(f"{layout.RUNS}/")).id)
        except layout.LayoutError:
            continue  # not a run folder of the layout (another tool's key)
    return ids


def readable_runs(store: Store, can_read: Any, problems: list[str]) -> list[RunRecord]:
    """Every run of the DAGs ``can_read`` allows, newest first; only those DAGs' folders are listed or read.

    A run whose records cannot be read is named in ``problems`` by the key at fault and left out.
    """
    dags, _ = store.list_dir(f"{layout.RUNS}/")
    ids = [run_id for prefix in sorted(dags) if can_read(prefix.rsplit("/", 1)[-1]) for run_id in _run_ids(store, prefix)]

    def one(run_id: str) -> RunRecord | str | None:
        try:
            return find_run(store, run_id)
        except DamagedRecordError as exc:
            return damaged(exc.key or layout.RunPath.parse(run_id).key(layout.OUTCOME))
        except StorageError as exc:
            return f"run {run_id}: {exc}"
        except AICenterError:
            return None  # gone since the listing

    with ThreadPoolExecutor(max_workers=max(1, min(READ_CONCURRENCY, len(ids)))) as pool:
        found = list(pool.map(one, ids))
    records = [r for r in found if isinstance(r, RunRecord)]
    problems.extend(r for r in found if isinstance(r, str))
    return sorted(records, key=lambda r: (r.outcome.start_at, r.id), reverse=True)


def runs_list(store: Store, can_read: Any, *, status: str = "", dag: str = "", package: str = "", pipeline: str = "",
              approval: str = "", page: int = 1, per_page: int = PER_PAGE) -> RunsList:
    """Every run of the DAGs ``can_read`` allows, newest first, filtered, one page of it.

    Runs of other DAGs are left out before anything is said of them: not a row, not a filter
    option, not a damaged record. A run whose records are damaged is named by its key beside the list.
    """
    if status and status not in RUN_STATUSES:
        raise layout.LayoutError(f"unknown status {status!r}: use one of {', '.join(RUN_STATUSES)}")
    if approval and approval not in APPROVAL_FILTERS:
        raise layout.LayoutError(f"unknown approval {approval!r}: use {' or '.join(APPROVAL_FILTERS)} (the runs waiting "
                                 "for a person's decision), or leave it out")
    problems: list[str] = []
    records = readable_runs(store, can_read, problems)
    waiting = waiting_runs(store, (r.package for r in records), problems)

    def waits(record: RunRecord) -> ApprovalRecord | None:
        path = layout.RunPath.parse(record.id)
        return waiting.get((path.dag_id, path.run_id, path.task_id, path.map_index))

    options = {
        "status": [s for s in RUN_STATUSES if any(r.status == s for r in records)],
        "dag": sorted({r.dag_id for r in records}),
        "package": sorted({r.package for r in records}),
        "pipeline": [p for p in PLANS if any(r.pipeline == p for r in records)],
        "approval": [a for a in APPROVAL_FILTERS if any(waits(r) for r in records)],
    }
    chosen = [r for r in records if (not status or r.status == status) and (not dag or r.dag_id == dag)
              and (not package or r.package == package) and (not pipeline or r.pipeline == pipeline)
              and (not approval or waits(r) is not None)]
    pages = max(1, -(-len(chosen) // per_page))
    page = min(page, pages)
    shown = chosen[(page - 1) * per_page: page * per_page]
    rows = [RunRow(r, triggered_by(r), as_time(r.outcome.start_at), waits(r)) for r in shown]
    filters = {"status": status, "dag": dag, "package": package, "pipeline": pipeline, "approval": approval}
    return RunsList(rows, len(chosen), page, pages, per_page, filters, options, sorted(problems))


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
class Live:
    """What a run page shows of a run in progress, and what its live endpoint answers: progress and metric history."""

    progress: Progress | None
    series: dict[str, list[list[float]]]
    x: str  # "step" when every point has one, else "seconds" since the first point
    progress_error: str | None = None

    def chart(self) -> str:
        return metric_charts(self.series, self.x)


@dataclass
class PredictionRow:
    file: str
    line: Any
    output: str | None
    error: str | None


@dataclass
class RunPage:
    run: RunRecord
    path: layout.RunPath
    summary: dict[str, Any]
    results_json: str | None
    artifacts: list[Artifact]
    snapshots: list[Snapshot] = field(default_factory=list)
    artifacts_error: str | None = None
    plan: PipelinePlan | None = None
    #: (label, URI) of each dataset the pipeline reads, as its plan says ("Training data", "Evaluation data", ...).
    inputs: list[tuple[str, str | None]] = field(default_factory=list)
    live: Live | None = None
    #: The last lines of the user's output when the run did not succeed (outcome.json ``output_tail``).
    output_tail: list[str] = field(default_factory=list)
    predictions: list[PredictionRow] = field(default_factory=list)
    predictions_note: str | None = None
    #: The approval this run asked for (``promote_if="approved"``), and a damaged approval record's name.
    approval: ApprovalRecord | None = None
    approval_error: str | None = None

    @property
    def started(self) -> datetime | None:
        return as_time(self.run.outcome.start_at)

    @property
    def ended(self) -> datetime | None:
        return as_time(self.run.outcome.end_at)

    @property
    def trigger(self) -> str | None:
        return triggered_by(self.run)

    @property
    def requested(self) -> str | None:
        """What the task asked for when it is not what ran (``latest``, ``production``)."""
        requested = self.run.outcome.requested_version
        return requested if requested and requested != self.run.version else None

    @property
    def resources(self) -> list[tuple[str, str]]:
        return resource_rows(self.run.outcome.resources)

    @property
    def cost(self) -> str:
        return money((self.run.outcome.cost or {}).get("total"))


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


#: How a run page names each dataset argument of a pipeline, by whether the pipeline serves.
INPUT_LABELS = {"dataset": "Training data", "evaluation_dataset": "Evaluation data"}
SERVING_LABELS = {"dataset": "Inference data"}


def run_inputs(record: RunRecord, plan: PipelinePlan | None) -> list[tuple[str, str | None]]:
    """(label, URI) of each dataset the run's pipeline reads: what ``_results.json`` recorded, else the outcome.

    Only the datasets of the run's plan: an evaluation shows no training data, a prediction its inference data.
    """
    if plan is None:
        return [("Dataset", record.dataset)]
    labels = SERVING_LABELS if plan.serving else INPUT_LABELS
    recorded = record.results.get("parameters", {}) if isinstance(record.results, dict) else {}
    given = recorded.get("inputs") if isinstance(recorded, dict) else None
    out = []
    for results_key, argument in plan.input_keys:
        value = given.get(results_key) if isinstance(given, dict) else None
        if not isinstance(value, str):
            value = getattr(record.outcome, argument, None)
        if value or argument in plan.datasets:
            out.append((labels.get(argument, argument), value))
    return out


def output_tail(record: RunRecord) -> list[str]:
    """The last lines of the user's output the runtime kept for a run that did not succeed (masked, capped)."""
    tail = getattr(record.outcome, "output_tail", None)
    if not isinstance(tail, list) or record.status == "succeeded":
        return []
    return [str(line) for line in tail if isinstance(line, str)]


def live(store: Store, path: layout.RunPath) -> Live:
    """The run's ``progress.json`` and ``metrics.jsonl`` (both optional; a damaged one is named, never a 500)."""
    progress, error = None, None
    try:
        progress = read(store, path.key(layout.PROGRESS), Progress)
    except DamagedRecordError as exc:
        error = damaged(exc.key or path.key(layout.PROGRESS))
    except (NotFoundError, StorageError):
        progress = None
    series, x = metric_series(store, path)
    return Live(progress, series, x, error)


def metric_series(store: Store, path: layout.RunPath) -> tuple[dict[str, list[list[float]]], str]:
    """Each metric's ``[x, value]`` points from ``metrics.jsonl``, read warily: it was written with the run's credentials.

    At most :data:`METRICS_BYTES` are read; a line that is not a JSON object, a value that is not a
    finite number, a name past :data:`MAX_SERIES` are skipped. x is the step when every point has
    one, else the seconds since the first point.
    """
    key = path.key(layout.METRICS)
    try:
        info = store.head(key)
        if info is None or info.size == 0:
            return {}, "step"
        data = bytes(obstore.get_range(store.inner, key, start=0, length=min(info.size, METRICS_BYTES)))
    except (StorageError, OSError, ValueError):
        return {}, "step"
    if info.size > METRICS_BYTES:
        data = data.rsplit(b"\n", 1)[0]  # a cut line would be garbage
    points: list[tuple[float | None, float | None, dict[str, float]]] = []
    for raw in data.splitlines():
        if len(raw) > METRICS_LINE:
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("metrics"), dict):
            continue
        at, step = _finite(line.get("time")), _finite(line.get("step"))
        values = {str(k)[:64]: v for k, value in line["metrics"].items() if (v := _finite(value)) is not None}
        if (at is not None or step is not None) and values:
            points.append((step, at, values))
    x = "step" if points and all(step is not None for step, _, _ in points) else "seconds"
    if x == "seconds":
        points = [p for p in points if p[1] is not None]
    first = points[0][1] if points and points[0][1] is not None else 0.0
    series: dict[str, list[list[float]]] = {}
    for step, at, values in points:
        where = step if x == "step" and step is not None else round((at or 0.0) - first, 3)
        for name, value in values.items():
            if name in series or len(series) < MAX_SERIES:
                series.setdefault(name, []).append([where, value])
    return series, x


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def predictions(store: Store, path: layout.RunPath) -> tuple[list[PredictionRow], str | None]:
    """The first outputs of a batch run (bounded: files, rows, bytes, cell), and a note on what is left out."""
    prefix = path.key(layout.PREDICTIONS) + "/"
    try:
        files = sorted((i for i in store.list(prefix)), key=lambda i: i.key)
    except StorageError as exc:
        return [], f"predictions unavailable: {exc}"
    rows: list[PredictionRow] = []
    cut = len(files) > PREDICTION_FILES
    for info in files[:PREDICTION_FILES]:
        name = info.key[len(prefix):]
        try:
            store.check_readable(info.key)
            data = bytes(obstore.get_range(store.inner, info.key, start=0, length=min(info.size, PREDICTION_BYTES)))
        except (StorageError, OSError, ValueError) as exc:
            rows.append(PredictionRow(name, None, None, f"not readable: {exc}"))
            continue
        cut = cut or info.size > PREDICTION_BYTES
        lines = data.splitlines() if name.endswith(".jsonl") else [data]
        for raw in lines:
            if len(rows) >= PREDICTION_ROWS:
                return rows, f"the first {PREDICTION_ROWS} predictions; download the files for all of them"
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(item, dict):
                item = {"output": item}
            value = item.get("output")  # a string as predict() returned it, anything else as JSON
            shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            output = None if "output" not in item else _cell(shown)
            error = None if item.get("error") is None else _cell(str(item["error"]))
            rows.append(PredictionRow(name, item.get("line"), output, error))
    return rows, ("the first predictions only; download the files for all of them" if cut else None)


def _cell(text: str) -> str:
    return text if len(text) <= PREDICTION_CELL else text[:PREDICTION_CELL] + "…"


def _asked_by(approval: ApprovalRecord, path: layout.RunPath) -> bool:
    """Whether ``approval`` was asked by the task of run folder ``path`` (any try: a retried task keeps the first request)."""
    run = approval.run
    return run is not None and (run.dag_id, run.run_id, run.task_id, run.map_index) == \
        (path.dag_id, path.run_id, path.task_id, path.map_index)


def run_approval(store: Store, record: RunRecord, path: layout.RunPath) -> tuple[ApprovalRecord | None, str | None]:
    """The approval of the version this run asked a person about, and a damaged record's name, if any.

    The candidate is the version the run made (full) or scored (evaluate). Its approval is shown
    only when this run's task asked for it, or its ``_results.json`` keeps the decision: another
    run of the same version (another DAG's) is not named here.
    """
    candidate = record.new_version or record.version
    if not candidate:
        return None, None
    noted = isinstance(record.results, dict) and isinstance(record.results.get("aicenter"), dict) \
        and "approval" in record.results["aicenter"]
    found: dict[str, ApprovalRecord | None] = {}
    error = None
    for stage in ("decision", "request"):
        key = layout.approval_key(record.package, candidate, stage)
        try:
            found[stage] = read(store, key, ApprovalRecord)
        except NotFoundError:
            found[stage] = None
        except DamagedRecordError:
            found[stage], error = None, error or damaged(key)
            continue
        kept = found[stage]
        if kept is not None and (problem := _check_approval(record.package, key, kept)):
            found[stage], error = None, error or problem
    ours = noted or any(a is not None and _asked_by(a, path) for a in found.values())
    if not ours:
        return None, None
    approval = found["decision"] or (None if error and found["request"] else found["request"])
    return approval, error


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
    plan = PLANS.get(record.pipeline)
    page = RunPage(record, path, record.summary(), results, artifacts, snapshots, artifacts_error, plan=plan,
                   inputs=run_inputs(record, plan), live=live(store, path), output_tail=output_tail(record))
    if plan is not None and plan.serving:
        page.predictions, page.predictions_note = predictions(store, path)
    if plan is None or plan.makes_version or plan.scored:
        page.approval, page.approval_error = run_approval(store, record, path)
    return page


def artifact_key(path: layout.RunPath, relative: str) -> str:
    """The store key of an artifact; a path that could leave the run's ``artifacts/`` folder is a ``layout.LayoutError``."""
    if not relative or "\\" in relative or "\x00" in relative or relative.startswith("/"):
        raise layout.LayoutError(f"artifact path {relative!r} is not a relative path inside the run's artifacts folder")
    if any(part in ("..", ".", "") for part in relative.split("/")):  # PurePosixPath would hide "./" and "//"
        raise layout.LayoutError(f"artifact path {relative!r} must not contain '..' or '.' parts; give a file inside artifacts/")
    return path.key(f"{layout.ARTIFACTS}/{relative}")


def artifact_kind(relative: str) -> str:
    """How an artifact is previewed: ``text``, ``markdown``, ``csv``, ``image``, ``svg`` or ``binary`` (download only)."""
    suffix = PurePosixPath(relative).suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in SVG_SUFFIXES:
        return "svg"
    if suffix in MARKDOWN_SUFFIXES:
        return "markdown"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return "binary"


def media_type(relative: str) -> str:
    kind = artifact_kind(relative)
    if kind == "image":
        return mimetypes.guess_type(relative)[0] or "application/octet-stream"
    if kind == "svg":
        return "image/svg+xml"
    if kind in ("text", "csv", "markdown"):
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
    #: A Markdown artifact rendered (raw HTML escaped, only safe link schemes).
    html: str | None = None


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
    if kind in ("image", "svg", "binary") or info.size == 0:
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
    if kind == "markdown":
        return Preview(relative, "markdown", info.size, truncated, text=text, html=markdown(text))
    return Preview(relative, "text", info.size, truncated, text=text)


def markdown(text: str) -> str:
    """Markdown as HTML that is safe in the Airflow origin: raw HTML is escaped as text, and a link or image
    whose scheme is not safe (``javascript:``, ``vbscript:``, ``file:``, ``data:`` other than images)
    stays text (markdown-it's link validation). Links open outside the frame, to no referrer.
    """
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])

    def link_open(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        tokens[idx].attrSet("rel", "noopener noreferrer")
        tokens[idx].attrSet("target", "_blank")
        return str(renderer.renderToken(tokens, idx, options, env))

    md.add_render_rule("link_open", link_open)
    return str(md.render(text))


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
        if name == "start":  # a time, written as every page writes one (the template makes it a <time>)
            values = [as_time(r.outcome.start_at) for r in records]
        rows.append((name, values))
        if name == "evaluation_dataset":
            rows.append(("snapshot", [snapshot_summary(store, r) for r in records]))
    return [(name, values, len({json.dumps(v, default=str) for v in values}) > 1) for name, values in rows]
