"""The ``aicenter`` command: packages, versions, aliases and run records in a store, for people and scripts.

Every read command takes ``--json`` (stdout is then only JSON; progress goes to stderr). The
store comes from ``--storage URI``, else ``AICENTER_STORAGE``, else the ``aicenter_default``
connection read as tasks read it (environment, secrets backends, Airflow's database), else
``$AIRFLOW_HOME/aicenter``: with AIRFLOW_HOME set, the command and the DAGs share one store.
Airflow is only imported for the connection case, so plain store commands stay fast;
``package validate`` needs no store at all. Output is for terminals and pipes alike: run ids
are never broken across lines, and a reader that stops early (``| head``) ends it quietly.

Adding a command: write ``cmd_<group>_<name>(args, registry) -> int`` and register it in that
group's ``add_<group>_commands`` (or add a new ``add_*_commands`` to ``COMMAND_GROUPS``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import getpass
import hashlib
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from airflow_aicenter import layout
from airflow_aicenter.completion import SNAPSHOT_OF
from airflow_aicenter.errors import AICenterError, ConfigurationError, NotFoundError, StorageError, VersionError
from airflow_aicenter.gc import DEFAULT_GRACE_HOURS, collect
from airflow_aicenter.package import Version, open_package, validate_package, validate_package_name
from airflow_aicenter.package.validate import capabilities
from airflow_aicenter.plans import CONTRACTS, PLANS
from airflow_aicenter.process import exit_process
from airflow_aicenter.promotion import PROMOTE_IF, promote, rejected_reason, version_score
from airflow_aicenter.promotion import compare as compare_versions
from airflow_aicenter.records import AliasRecord, ApprovalRecord, Manifest, VersionRecord, read_optional
from airflow_aicenter.registry import Registry
from airflow_aicenter.runs import STATUSES, RunRecord, compare, find_run, find_runs, list_runs
from airflow_aicenter.storage import S3Options, Store, open_store
from airflow_aicenter.storage.transfer import read_package_contents
from airflow_aicenter.verify import verify

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
STATUS_STYLE = {"succeeded": "green", "failed": "red", "killed": "magenta", "running": "yellow"}


FROM_FLAG = "given with --storage"
FROM_ENV = "from $AICENTER_STORAGE"
FROM_CONNECTION = "from the aicenter_default connection's storage extra"
FROM_DEFAULT = "the embedded default, $AIRFLOW_HOME/aicenter"


@dataclass(frozen=True)
class StoreChoice:
    """Which store a command works on, and where that choice came from (errors name both)."""

    uri: str
    source: str
    s3: S3Options | None = None

    def fix(self) -> str:
        """How to point the command elsewhere, for the place the URI came from."""
        if self.source == FROM_FLAG:
            return "fix the URI given with --storage"
        if self.source == FROM_ENV:
            return "fix $AICENTER_STORAGE (or unset it to use the aicenter_default connection)"
        if self.source == FROM_CONNECTION:
            return ("fix the connection's storage extra (`airflow connections get aicenter_default`), "
                    "or give --storage URI / AICENTER_STORAGE=URI")
        home = "" if os.environ.get("AIRFLOW_HOME") else "AIRFLOW_HOME is not set, so ~/airflow was assumed; "
        return (f"{home}point the command at your store: set AIRFLOW_HOME to your Airflow home (its aicenter_default "
                "connection, or its aicenter/ folder, is then used), or give --storage URI or AICENTER_STORAGE=URI")


class LocalPathError(AICenterError):
    """A local path given to a command cannot be used (not there, not a folder, not permitted)."""

    retryable = False


def os_error(exc: OSError, *, named: str = "") -> str:
    """An operating system's refusal in one line: the path (unless ``named`` already holds it), the reason, the fix."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    path = f"{exc.filename}: " if exc.filename and str(exc.filename) not in named else ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (f"this user ({getpass.getuser()}) may not do that there: give a path it can read and write, "
               "or change that path's permissions")
    elif exc.errno == errno.ENOENT:
        fix = "that path, or a folder on the way to it, does not exist or cannot hold new entries: give another path"
    elif exc.errno == errno.ENOTDIR:
        fix = "a part of that path is a file, not a folder: give another path"
    elif exc.errno == errno.EROFS:
        fix = "it is on a read-only file system: give a path on a writable one"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk is full: free some space, or give a path on another disk"
    else:
        fix = "check the path and try again"
    return f"{path}{reason}; {fix}"


@contextlib.contextmanager
def local_path_errors(action: str) -> Iterator[None]:
    """Turn an OSError on a local path into ``cannot <action>: <why>; <fix>`` (LocalPathError)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise LocalPathError(f"cannot {action}: {os_error(exc, named=action)}") from exc


@contextlib.contextmanager
def _metadata_db_lookups() -> Iterator[None]:
    """Let Airflow's connection lookups reach its metadata database, as its own servers' do.

    Outside a task, the Task SDK looks connections up in environment variables and configured
    secrets backends only; the scheduler and the triggerer declare themselves a server process
    to add the metadata database. The command does the same for the length of its lookups, so
    an ``aicenter_default`` (or AWS) connection made with ``airflow connections add`` is the one
    it uses, exactly as tasks do.
    """
    if not _metadata_db_exists():
        yield
        return
    previous = os.environ.get("_AIRFLOW_PROCESS_CONTEXT")
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("_AIRFLOW_PROCESS_CONTEXT", None)
        else:
            os.environ["_AIRFLOW_PROCESS_CONTEXT"] = previous


def _metadata_db_exists() -> bool:
    """False for a SQLite database file that is not there: looking into it would create an empty one."""
    from airflow.configuration import conf

    url = conf.get("database", "sql_alchemy_conn", fallback="")
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0]).exists()
    return bool(url)


def choose_store(flag: str | None) -> StoreChoice:
    """--storage, else $AICENTER_STORAGE, else the aicenter_default connection (as tasks read it), else $AIRFLOW_HOME/aicenter.

    Airflow is imported only in the last two cases, so commands given a store stay fast.
    """
    for uri, source in ((flag, FROM_FLAG), (os.environ.get("AICENTER_STORAGE"), FROM_ENV)):
        if uri:
            return StoreChoice(uri, source, S3Options.from_env() if uri.startswith("s3://") else None)
    try:
        from airflow_aicenter.hooks.aicenter import AICenterHook

        hook = AICenterHook()
        with _metadata_db_lookups():
            uri = hook.settings.storage
            s3 = hook.s3_options if uri.startswith("s3://") else None
    except AICenterError:
        raise
    except Exception as exc:  # Airflow itself could not start (its configuration, its database): re-raised as ours
        first = " ".join(str(exc).split())[:400]
        home = os.environ.get("AIRFLOW_HOME", "~/airflow")
        raise ConfigurationError(
            f"no store was given, and the aicenter_default connection could not be read through Airflow "
            f"({type(exc).__name__}: {first}); fix Airflow's configuration (AIRFLOW_HOME={home}), "
            "or give the store with --storage URI or AICENTER_STORAGE=URI (Airflow is then not needed)") from exc
    if hook.settings.extra.get("storage"):
        return StoreChoice(uri, FROM_CONNECTION, s3)
    return StoreChoice(uri, FROM_DEFAULT, s3)


def resolve_store(flag: str | None, *, create: bool = True) -> tuple[Store, StoreChoice]:
    """The store and where it came from. Read commands (``create=False``) need a store that exists.

    Only commands that write make a missing store: a typo given to a read command, on file://
    or s3://, is an error naming the fix, not an empty listing (S3 has no folders, so a prefix
    is a store when it holds one of the store's own top-level folders).
    """
    choice = choose_store(flag)
    try:
        try:
            store = open_store(choice.uri, choice.s3, create=create)
        except OSError as exc:  # the file store's folder: not there and cannot be made, or not readable
            raise StorageError(f"cannot open the store at {choice.uri} ({choice.source}): {os_error(exc, named=choice.uri)}; "
                               f"or {choice.fix()}") from exc
        if not create:
            folders, files = store.list_dir("")
            kind, shown = layout.classify_top(folders, [f.key for f in files])
            if kind == "other":
                raise StorageError(
                    f"{store.uri} ({choice.source}) is not an aicenter store: it holds other data ({shown}) but "
                    f"{layout.NOT_A_STORE}; {choice.fix()}"
                )
            if kind == "empty":
                raise NotFoundError(store.uri)
    except NotFoundError:
        raise StorageError(
            f"there is no store at {choice.uri} ({choice.source}): nothing was ever stored there; {choice.fix()}; "
            "or start a store there by uploading a package: aicenter package upload PATH --name NAME"
        ) from None
    return store, choice


def split_ref(ref: str, *, need_version: bool) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    if need_version and not version:
        raise VersionError(f"{ref!r} names no version; write NAME:VERSION, e.g. {name}:1.0 or {name}:latest")
    return name, version or None


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "strftime"):
        return str(value.strftime("%Y-%m-%d %H:%M:%S"))
    if isinstance(value, dict):
        return ", ".join(f"{escape(str(k))}={_fmt(v)}" for k, v in value.items()) or "-"
    return escape(str(value))


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _kv_table(title: str | None, rows: list[tuple[str, Any]]) -> Table:
    """Values are shown as text (a run's cause may hold ``[`` and ``]``); a styled value comes as a Text."""
    table = Table(title=title and escape(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else _fmt(value))
    return table


# -- package commands ---------------------------------------------------------------------
def cmd_package_upload(args: argparse.Namespace, registry: Registry) -> int:
    """Content identical to a stored upload makes no new version; its stored blob is checked and repaired."""
    with err_console.status(f"Validating and uploading {args.path} ..."):
        done = registry.upload_package(Path(args.path), args.name, force=args.force, description=args.description,
                                       created_by=f"cli:{getpass.getuser()}")
        with tempfile.TemporaryDirectory(prefix="aicenter-upload-") as tmp:
            cannot = {k: v for k, v in capabilities(open_package(Path(args.path), Path(tmp) / "pkg")).items() if v}
    record = done.record
    if args.json:
        emit_json({**record.model_dump(mode="json"), "created": done.created, "repaired": done.repaired,
                   "files": done.files, "size": done.size, "written_files": done.written_files,
                   "written_bytes": done.written_bytes, "repaired_files": done.repaired_files,
                   "pipelines": {name: name not in cannot for name in PLANS}, "cannot": cannot})
        return 0
    content = f"{_count(done.files, 'file')}, {_bytes(done.size)}"
    if done.created:
        console.print(f"Uploaded [bold]{record.package}[/] version [bold green]{record.version}[/] ({content}) to "
                      f"{registry.store.uri}: {_count(done.written_files, 'file')} ({_bytes(done.written_bytes)}) "
                      f"written, {done.files - done.written_files} already stored", highlight=False)
    elif done.repaired or done.repaired_files:
        rewritten = []
        if done.repaired:
            rewritten.append(f"its blob was {done.repaired} and has been rewritten from this upload "
                             f"(sha256:{record.blob.sha256[:12]}, in {registry.store.uri})")
        if done.repaired_files:
            rewritten.append(f"{_count(done.repaired_files, 'file blob')} ({_bytes(done.written_bytes)}) were missing "
                             "or damaged and have been rewritten from this upload")
        console.print(f"[bold]{record.package} {record.version}[/] already stored; {'; '.join(rewritten)}; "
                      "no new version was made")
    else:
        console.print(f"Already stored: the content is identical to [bold]{record.package} {record.version}[/] "
                      f"({content}, sha256:{record.blob.sha256[:12]}) in {registry.store.uri}, so no new version was made; "
                      "`--force` makes a new major version anyway")
    _print_capabilities(record.package, cannot)
    return 0


def _pipeline_label(name: str) -> str:
    return f"serve ({name})" if PLANS[name].serving else name


def _print_capabilities(package: str, cannot: dict[str, str]) -> None:
    """What the operators can run on the package: a package that cannot be trained is told so at upload, not at its run."""
    can = [_pipeline_label(name) for name in PLANS if name not in cannot]
    console.print(f"  {escape(package)} can: {', '.join(can) or 'nothing'}", highlight=False)
    if cannot and all(why.startswith("package has no train.py") for why in cannot.values()):
        console.print(f"  cannot: {', '.join(map(_pipeline_label, cannot))} (no train.py: add train.py with class Main; "
                      "`aicenter package validate PATH --pipeline train` names the methods each pipeline calls)",
                      highlight=False)
        return
    for name, why in cannot.items():
        console.print(f"  cannot: {_pipeline_label(name)} ({escape(why)})", highlight=False)


def cmd_package_list(args: argparse.Namespace, registry: Registry) -> int:
    """Every package; a damaged record is shown as a problem of its own package, never hides the others."""
    rows: list[dict[str, Any]] = []
    for summary in registry.summaries():
        latest = summary.latest
        pending = _tolerant(summary.problems, "approvals", functools.partial(registry.pending_approvals, summary.name), [])
        rows.append({"package": summary.name, "latest": latest.version if latest else None,
                     "created_at": latest.created_at if latest else None, "score": latest.score if latest else None,
                     "aliases": {a: r.version for a, r in summary.aliases.items()},
                     "pending_approval": [f"{p.version} for {p.alias}" for p in pending], "problems": summary.problems})
    if args.json:
        emit_json(rows)
        return 1 if any(r["problems"] for r in rows) else 0
    table = Table(title=f"Packages in {escape(registry.store.uri)}")
    for col in ("package", "latest", "score", "aliases", "pending approval", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(_fmt(r["package"]), _fmt(r["latest"]), _fmt(r["score"]), _fmt(r["aliases"]),
                      escape(", ".join(r["pending_approval"])) or "-", _fmt(r["created_at"]))
    console.print(table if rows else "No packages yet: `aicenter package upload PATH --name NAME`")
    problems = [(r["package"], p) for r in rows for p in r["problems"]]
    for package, problem in problems:
        err_console.print(f"[red]{escape(package)}[/red]: {escape(problem)}", highlight=False)
    return 1 if problems else 0


def cmd_package_download(args: argparse.Namespace, registry: Registry) -> int:
    name, version = split_ref(args.ref, need_version=True)
    dest = Path(args.dest)
    for part in (dest, *dest.parents):
        if part.exists() and not part.is_dir():
            raise LocalPathError(f"cannot download into {dest}: {part} is a file, not a folder; give a folder "
                                 "(it is made if it does not exist), e.g. the current one: .")
    with console.status(f"Downloading {escape(name)}:{escape(version or '')} ..."), local_path_errors(f"download into {dest}"):
        record, path = registry.download(name, version or "latest", dest)
    per_file = record.blob.kind == "files"  # the zip is made from the files staged: its digest is taken here
    sha256 = record.blob.sha256
    if per_file:
        with path.open("rb") as zipped:
            sha256 = hashlib.file_digest(zipped, "sha256").hexdigest()
    if args.json:
        emit_json({"package": name, "version": record.version, "path": str(path), "sha256": sha256,
                   "kind": record.blob.kind})
    else:
        how = "every file's sha256 verified, zipped as `package upload` zips the folder" if per_file else "sha256 verified"
        console.print(f"Downloaded {escape(name)} version {escape(record.version)} to {escape(str(path))} ({how})")
    return 0


def cmd_package_show(args: argparse.Namespace, registry: Registry) -> int:
    """A damaged record (a version, an alias entry, an evaluation) is a problem on stderr (exit 1), not an end."""
    name, version = split_ref(args.ref, need_version=False)
    with err_console.status(f"Reading {escape(name)} ..."):
        data = _version_detail(registry, name, version) if version else _package_overview(registry, name)
    if args.json:
        emit_json(data)
    elif version:
        _print_version_detail(data)
    else:
        _print_package_overview(data)
    for problem in data["problems"]:
        err_console.print(f"[red]{escape(name)}[/red]: {escape(problem)}", highlight=False)
    return 1 if data["problems"] else 0


def _tolerant(problems: list[str], what: str, read: Callable[[], Any], default: Any) -> Any:
    """``read()``, or ``default`` with the error noted in ``problems``: one damaged record hides only itself."""
    try:
        return read()
    except AICenterError as exc:
        problems.append(f"{what}: {exc}")
        return default


def _alias_history(registry: Registry, name: str, alias: str, current: AliasRecord, problems: list[str]) -> list[dict[str, Any]]:
    history = _tolerant(problems, f"alias {alias!r} history", lambda: registry.alias_history(name, alias), [current])
    return [_alias_entry(h) for h in history]


def _alias_entry(h: AliasRecord) -> dict[str, Any]:
    return {"seq": h.seq, "version": h.version, "previous": h.previous, "set_by": h.set_by, "set_at": h.set_at.isoformat(),
            "reason": h.reason}


def _version_row(registry: Registry, record: VersionRecord, pointed: dict[str, list[str]], problems: list[str]) -> dict[str, Any]:
    evaluations = _tolerant(problems, f"evaluations of {record.version}",
                            lambda: registry.evaluations(record.package, record.version), [])
    judged = _tolerant(problems, f"score of {record.version}", lambda: version_score(
        registry, record.package, record.version, record=record, evaluations=evaluations), None)
    return {
        "version": record.version, "parent": record.parent, "pipeline": record.pipeline, "score": record.score,
        "evaluated_on": record.evaluated_on,
        "evaluations": [{"score": e.score, "dataset": e.dataset, "run": e.run.label if e.run else None,
                         "created_at": e.created_at.isoformat()} for e in evaluations],
        "judged_score": judged.score if judged else None, "judged_by": judged.source if judged else "unknown",
        "created_at": record.created_at.isoformat(), "created_by": record.created_by,
        "run": record.run.label if record.run else None, "snapshot": record.snapshot,
        "aliases": pointed.get(record.version, []),
        "approval": _approval_entry(_tolerant(problems, f"approval of {record.version}",
                                              lambda: registry.approval(record.package, record.version), None)),
    }


def _approval_entry(record: ApprovalRecord | None) -> dict[str, Any] | None:
    """A version's approval (``promote_if="approved"``): status, alias, by, at, comment, reason; None if never asked."""
    if record is None:
        return None
    return {"status": record.status, "alias": record.alias, "by": record.by, "at": record.at.isoformat(),
            "comment": record.comment, "reason": record.reason, "request_url": record.request_url}


def _approval_text(approval: dict[str, Any] | None) -> str | None:
    if approval is None:
        return None
    if approval["status"] == "pending":
        where = f" (answer in Airflow: Browse -> Required Actions, {approval['request_url']})" if approval["request_url"] else ""
        return f"PENDING for {approval['alias']} since {approval['at'][:19].replace('T', ' ')}{where}"
    comment = f": {approval['comment']}" if approval["comment"] else ""
    at = approval["at"][:19].replace("T", " ")
    return f"{approval['status']} for {approval['alias']} ({approval['reason']}) at {at}{comment}"


def _pointed(aliases: dict[str, AliasRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for alias, current in sorted(aliases.items()):
        out.setdefault(current.version, []).append(alias)
    return out


def _versions_of(registry: Registry, name: str, problems: list[str]) -> list[VersionRecord]:
    """Every readable version of ``name``, oldest first; each damaged record is a problem."""
    records = []
    for info in registry.store.list(layout.versions_prefix(name)):
        if info.key.endswith(".json"):
            version = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            record = _tolerant(problems, f"version {version}", functools.partial(registry.get, name, version), None)
            if record is not None:
                records.append(record)

    def order(record: VersionRecord) -> tuple[int, int, str]:
        try:
            parsed = Version.parse(record.version)
        except VersionError:
            return (2**31, 0, record.version)
        return (parsed.major, parsed.minor, "")

    return sorted(records, key=order)


def _package_overview(registry: Registry, name: str) -> dict[str, Any]:
    validate_package_name(name)
    if registry.latest_major(name) is None:
        registry.resolve(name, "latest")  # a clear error for a package without versions
    problems: list[str] = []
    aliases = _tolerant(problems, "aliases", lambda: registry.aliases(name, problems), {})
    pointed = _pointed(aliases)
    return {
        "package": name,
        "versions": [_version_row(registry, r, pointed, problems) for r in _versions_of(registry, name, problems)],
        "aliases": {a: {"version": c.version, "history": _alias_history(registry, name, a, c, problems)}
                    for a, c in sorted(aliases.items())},
        "problems": problems,
    }


def _version_detail(registry: Registry, name: str, spec: str) -> dict[str, Any]:
    record = registry.resolve(name, spec)
    problems: list[str] = []
    lineage, parent = [], record.parent
    while parent is not None:
        ancestor = _tolerant(problems, f"lineage: version {parent}", functools.partial(registry.get, name, parent), None)
        if ancestor is None:
            break
        lineage.append({"version": ancestor.version, "pipeline": ancestor.pipeline, "score": ancestor.score,
                        "created_at": ancestor.created_at.isoformat(), "run": ancestor.run.label if ancestor.run else None})
        parent = ancestor.parent
    aliases = _tolerant(problems, "aliases", lambda: registry.aliases(name, problems), {})
    return {
        "package": name,
        "requested": spec,
        **_version_row(registry, record, _pointed(aliases), problems),
        "blob": record.blob.model_dump(),
        "content": _content(registry, record, problems),
        "description": record.description,
        "lineage": lineage,
        "all_aliases": {a: {"version": c.version, "points_here": c.version == record.version,
                            "history": _alias_history(registry, name, a, c, problems)} for a, c in sorted(aliases.items())},
        "problems": problems,
    }


def _content(registry: Registry, record: VersionRecord, problems: list[str]) -> dict[str, Any]:
    """What a version holds: its kind, and for a per-file version how many files and bytes (its manifest, verified)."""
    if record.blob.kind != "files":
        return {"kind": "zip", "files": None, "size": record.blob.size}
    contents = _tolerant(problems, "content", lambda: read_package_contents(registry.store, record.blob)[0], None)
    return {"kind": "files", "files": len(contents.files) if contents else None,
            "size": contents.total_size if contents else None}


def _content_text(data: dict[str, Any]) -> str:
    content, blob = data["content"], data["blob"]
    if content["kind"] == "zip":
        return f"zip sha256:{blob['sha256'][:16]} ({blob['size']} bytes)"
    if content["files"] is None:
        return f"per-file, manifest sha256:{blob['sha256'][:16]} (not readable: see the problems below)"
    return (f"per-file: {_count(content['files'], 'file')}, {_bytes(content['size'])} "
            f"(manifest sha256:{blob['sha256'][:16]})")


def _print_package_overview(data: dict[str, Any]) -> None:
    versions = data["versions"]
    runs_inline = _fits([v["run"] or "" for v in versions], 90)
    table = Table(title=f"Package {escape(data['package'])}: versions")
    columns = ["version", "parent", "made by", "score", "evaluations", "aliases", "approval", "created"] + (
        ["run"] if runs_inline else [])
    for col in columns:
        table.add_column(col, overflow="fold", no_wrap=col == "run")
    for v in versions:
        evals = ", ".join(_fmt(e["score"]) for e in v["evaluations"]) or "-"
        row = [_fmt(v["version"]), _fmt(v["parent"]), v["pipeline"], _fmt(v["score"]), evals,
               escape(", ".join(v["aliases"])) or "-",
               escape(f"{v['approval']['status']} ({v['approval']['alias']})") if v["approval"] else "-",
               v["created_at"][:19].replace("T", " ")]
        table.add_row(*row, *([_fmt(v["run"])] if runs_inline else []))
    console.print(table)
    if not runs_inline:  # narrow: the runs that made each version below the table, ids whole
        for v in versions:
            if v["run"]:
                console.print(f"{escape(v['version'])} made by run {escape(v['run'])}", overflow="ignore", crop=False,
                              highlight=False)
    _print_aliases(data["aliases"])


def _print_aliases(aliases: dict[str, dict[str, Any]]) -> None:
    if not aliases:
        console.print("No aliases yet: `aicenter package promote NAME:VERSION --alias production`")
        return
    table = Table(title="Aliases (history, oldest first)")
    for col in ("alias", "#", "version", "previous", "set at", "set by", "reason"):
        table.add_column(col, overflow="fold")
    for alias, info in aliases.items():
        for h in info["history"]:
            current = h["seq"] == info["history"][-1]["seq"]
            table.add_row(f"[bold]{escape(alias)}[/]" if current else escape(alias), str(h["seq"]),
                          f"[bold]{_fmt(h['version'])}[/]" if current else _fmt(h["version"]), _fmt(h["previous"]),
                          h["set_at"][:19].replace("T", " "), _fmt(h["set_by"] or None), _fmt(h["reason"] or None))
    console.print(table)


def _print_version_detail(data: dict[str, Any]) -> None:
    console.print(_kv_table(f"{data['package']} {data['version']}", [
        ("version", data["version"]), ("parent", data["parent"]), ("made by", data["pipeline"]),
        ("created", data["created_at"][:19].replace("T", " ")), ("created by", data["created_by"] or None),
        ("run", data["run"]), ("snapshot", data["snapshot"]), ("content", _content_text(data)),
        ("score (its run)", data["score"]), ("judged score", f"{_fmt(data['judged_score'])} ({data['judged_by']})"),
        ("aliases", ", ".join(data["aliases"]) or None), ("approval", _approval_text(data["approval"])),
        ("description", data["description"] or None),
    ]))
    if data["evaluations"]:
        table = Table(title="Evaluations")
        for col in ("when", "score", "dataset", "run"):
            table.add_column(col, overflow="fold")
        for e in data["evaluations"]:
            table.add_row(e["created_at"][:19].replace("T", " "), _fmt(e["score"]), _fmt(e["dataset"]), _fmt(e["run"]))
        console.print(table)
    chain = " <- ".join([data["version"], *(a["version"] for a in data["lineage"])])
    console.print(f"[bold]Lineage:[/] {escape(chain)}")
    _print_aliases(data["all_aliases"])


def _stays_at(registry: Registry, name: str, alias: str, current: str, candidate: str) -> str:
    """The alias's version and the scores the rule of "better" compared (:func:`promotion.compare`).

    Never the current version's latest score on some other data: that number can disagree
    with the decision printed just above it.
    """
    judged = compare_versions(registry, name, candidate, current)
    if judged.comparable and judged.ours is not None and judged.theirs is not None:
        return (f"{alias!r} stays at {current}: its score {judged.theirs.score:.6g} against "
                f"{judged.ours.score:.6g} of {candidate}, {judged.basis}")
    if judged.theirs is None:
        return f"{alias!r} stays at {current} (no score)"
    return f"{alias!r} stays at {current} (score {judged.theirs.describe().partition(': ')[2]})"


def cmd_package_promote(args: argparse.Namespace, registry: Registry) -> int:
    name, spec = split_ref(args.ref, need_version=True)
    record = registry.resolve(name, spec or "latest")
    refused = None if args.force else rejected_reason(registry, name, record.version)
    if refused is not None:  # a person said no: only an explicit --force overrides them
        if args.json:
            emit_json({"package": name, "promoted": False, "alias": args.alias, "to": record.version, "reason": refused})
        else:
            err_console.print(f"Refused: {escape(refused)}. To promote it all the same: aicenter package promote "
                              f"{escape(name)}:{escape(record.version)} --alias {args.alias} --force", highlight=False)
        return EXIT_REFUSED
    judged = version_score(registry, name, record.version)
    decision = promote(registry, name, args.alias, record.version, score=judged.score, evaluated_on=judged.on,
                       promote_if=args.promote_if, set_by=f"cli:{getpass.getuser()}", force=args.force)
    if args.json:
        emit_json({"package": name, "promoted": decision.promoted, **decision.as_dict()})
    elif decision.promoted:
        console.print(f"Promoted [bold]{escape(name)}[/] {escape(repr(args.alias))}: "
                      f"{escape(decision.from_version or '(new alias)')} -> "
                      f"[bold green]{escape(decision.to_version)}[/] ({escape(decision.reason)})")
    else:
        # the decision's reason speaks the operators' language (promote_if='always'); say the command's
        reason = decision.reason.replace("promote_if='always'", "--if always").replace("promote_if='better'", "--if better")
        console.print(f"Not promoted: {escape(reason)}")
        if decision.from_version and decision.from_version != decision.to_version:
            console.print(escape(_stays_at(registry, name, args.alias, decision.from_version, decision.to_version)))
        if args.promote_if == "better" and decision.from_version != decision.to_version:
            console.print(f"To promote it all the same: aicenter package promote {escape(name)}:{escape(record.version)} "
                          f"--alias {args.alias} --if always")
    # the alias already pointing at the version is the state asked for; any other "not promoted" is a refusal
    return EXIT_OK if decision.promoted or decision.from_version == decision.to_version else EXIT_REFUSED


def _public(methods: frozenset[str]) -> list[str]:
    """The methods a pipeline can call (helpers such as ``_report`` are the package's business)."""
    return sorted(m for m in methods if not m.startswith("_") or m == "__init__")


def cmd_package_validate(args: argparse.Namespace, registry: Registry | None) -> int:
    try:
        with tempfile.TemporaryDirectory(prefix="aicenter-validate-") as tmp:
            info = validate_package(open_package(Path(args.path), Path(tmp) / "pkg"), args.pipeline)
            root = str(info.root) if Path(args.path).is_dir() else args.path
            cannot = {k: v for k, v in capabilities(info.root).items() if v}
    except AICenterError as exc:
        if args.json:
            emit_json({"valid": False, "path": args.path, "pipeline": args.pipeline, "error": str(exc)})
        raise
    data = {
        "valid": True, "path": args.path, "root": root, "pipeline": args.pipeline, "has_train": info.has_train,
        "main_methods": _public(info.main_methods), "train_methods": _public(info.train_methods),
        "requirements": info.requirements, "metadata": info.metadata.model_dump(),
        "pipelines": {name: name not in cannot for name in PLANS}, "cannot": cannot,
    }
    if args.json:
        emit_json(data)
        return 0
    console.print(f"[green]valid[/] for the [bold]{args.pipeline}[/] pipeline: {escape(root)}")
    console.print(f"  main.py Main: {escape(', '.join(data['main_methods']))}")
    console.print(f"  train.py Main: {escape(', '.join(data['train_methods'])) or '(no train.py)'}")
    console.print(f"  requirements: {len(info.requirements)} line(s); description: {_fmt(info.metadata.description or '-')}")
    _print_capabilities("the package", cannot)
    return 0


# -- runs commands ------------------------------------------------------------------------
def _read_runs(registry: Registry, args: argparse.Namespace) -> tuple[list[RunRecord], list[str]]:
    """The runs, and the ids of those left out because a record of theirs could not be read (each warned about)."""
    left_out: list[str] = []

    def skipped(run_id: str, exc: StorageError) -> None:
        left_out.append(run_id)
        err_console.print(f"[yellow]warning:[/] run {escape(run_id)} left out: {escape(str(exc))}", highlight=False)

    with Progress(TextColumn("Reading run records"), BarColumn(), MofNCompleteColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("runs", total=None)
        records = list_runs(registry.store, package=args.package, status=args.status,
                            progress=lambda done, total: bar.update(task, completed=done, total=total), on_error=skipped)
    return records, left_out


def _versions(record: RunRecord, *, markup: bool = True) -> str:
    """``1.0 -> 1.1`` (started from, made); escaped for rich markup unless ``markup`` is False."""
    text = record.version + (f" -> {record.new_version}" if record.new_version else "")
    return escape(text) if markup else text


def _fits(ids: Sequence[str], other_columns: int) -> bool:
    """Whether a table with whole run ids (and ``other_columns`` characters of the rest) fits the console."""
    return max(map(len, ids), default=0) + other_columns <= console.width


def cmd_runs_list(args: argparse.Namespace, registry: Registry) -> int:
    """Exit 1 when a run was left out (a damaged record of its own, warned about on stderr), as package list does."""
    records, left_out = _read_runs(registry, args)
    if args.json:
        emit_json([r.summary() for r in records])
    else:
        _print_runs(registry, args, records)
    return 1 if left_out else 0


def _print_runs(registry: Registry, args: argparse.Namespace, records: list[RunRecord]) -> None:
    if not records:
        console.print("No runs" + (" match" if args.package or args.status else " yet") + f" in {escape(registry.store.uri)}")
        return
    console.print(f"Runs in {escape(registry.store.uri)} (newest first)")
    if _fits([r.id for r in records], 100):
        table = Table()
        table.add_column("run", no_wrap=True)  # whole, to copy into `runs show`
        for col in ("pipeline", "status", "package", "version", "score", "started", "duration", "cause"):
            table.add_column(col, overflow="fold", min_width={"pipeline": 8, "status": 9, "version": 6}.get(col))
        for r in records:
            table.add_row(escape(r.id), r.pipeline, _status(r.status), _fmt(r.package), _versions(r), _fmt(r.outcome.score),
                          r.start.strftime("%Y-%m-%d %H:%M:%S"), _duration(r.duration), _fmt(r.cause))
        console.print(table)
        return
    # narrow (a pipe, CI, 80 columns): one block per run, its id on a line of its own, never broken
    for r in records:
        console.print(f"[bold]{escape(r.id)}[/]", overflow="ignore", crop=False)
        console.print(f"  {r.pipeline} {_status(r.status)}  {_fmt(r.package)} {_versions(r)}  score {_fmt(r.outcome.score)}  "
                      f"{r.start:%Y-%m-%d %H:%M:%S}  {_duration(r.duration)}")
        if r.cause:
            console.print(f"  cause: {_fmt(r.cause)}", highlight=False)


def cmd_runs_show(args: argparse.Namespace, registry: Registry) -> int:
    record = find_run(registry.store, args.run)
    data = record.summary()
    if args.json:
        emit_json(data)
        return 0
    promotion = data["promotion"]
    console.print(f"Run [bold]{escape(record.id)}[/]", overflow="ignore", crop=False)
    console.print(_kv_table(None, [
        ("pipeline", data["pipeline"]), ("status", Text.from_markup(_status(data["status"]))), ("cause", data["cause"]),
        ("failed phase", data["failed_phase"]), ("package", data["package"]), ("version", _versions(record, markup=False)),
        ("dataset", data["dataset"]), ("evaluation dataset", data["evaluation_dataset"]), ("env", data["env"]),
        ("score", data["score"]), ("predictions", _predictions(data)),
        ("started", record.start), ("duration", _duration(data["duration"])),
        ("phases", {k: f"{v:.2f}s" for k, v in data["phases"].items()}), ("warnings", "; ".join(data["warnings"]) or None),
        ("artifacts", f"{data['artifacts']['files']} files, {data['artifacts']['bytes']} bytes: {data['artifacts']['uri']}"),
        ("snapshots", data["snapshots"] or None), ("results", data["results_uri"]),
        ("promotion", None if promotion is None else
         f"{'promoted' if promotion['promoted'] else 'not promoted'} to {promotion['alias']!r}: {promotion['reason']}"),
        ("run folder", data["uri"]),
    ]))
    return 0


def _predictions(data: dict[str, Any]) -> str | None:
    """``7 predicted, 2 failed: <uri>`` for a batch prediction (None for other pipelines)."""
    if data["predictions_uri"] is None:
        return None
    counts = "no counts (the run did not finish)" if data["predicted"] is None else (
        f"{data['predicted']} predicted, {data['failed'] or 0} failed")
    return f"{counts}: {data['predictions_uri']}"


def snapshot_summary(store: Store, uri: str | None) -> str | None:
    """``content <digest>, N files, B bytes`` of a snapshot manifest (``runs show`` gives its URI).

    The digest is over the paths and the files' digests: two runs on the same data show the
    same one, and a change of data shows, whatever the dataset URI says.
    """
    if not uri:
        return None
    key = uri[len(store.uri) + 1:] if uri.startswith(store.uri + "/") else uri
    manifest = read_optional(store, key, Manifest)
    if manifest is None:
        return f"missing: {uri}"
    content = hashlib.sha256()
    for entry in sorted(manifest.files, key=lambda e: e.path):
        content.update(f"{entry.path}\0{entry.sha256}\n".encode())
    files = f"{manifest.file_count} file" + ("" if manifest.file_count == 1 else "s")
    return f"content {content.hexdigest()[:12]}, {files}, {manifest.total_bytes} bytes"


#: The snapshot row shown right after each dataset row of ``runs compare`` (its data: ``completion.SNAPSHOT_OF``).
SNAPSHOT_ROWS = {"dataset": "dataset_snapshot", "evaluation_dataset": "evaluation_snapshot"}


def _with_snapshots(store: Store, records: list[RunRecord], rows: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    """The compared rows with each dataset's snapshot right after its URI (None: the run kept no snapshot)."""
    out: list[tuple[str, list[Any]]] = []
    for name, values in rows:
        out.append((name, values))
        if name in SNAPSHOT_ROWS:
            directory = SNAPSHOT_OF[name]
            out.append((SNAPSHOT_ROWS[name], [snapshot_summary(store, r.outcome.snapshots.get(directory)) for r in records]))
    return out


def cmd_runs_compare(args: argparse.Namespace, registry: Registry) -> int:
    records = find_runs(registry.store, args.runs)
    rows = _with_snapshots(registry.store, records, compare(records))
    if args.json:
        emit_json({"runs": [r.id for r in records], "fields": {name: values for name, values in rows},
                   "differs": [name for name, values in rows if len({json.dumps(v, default=str) for v in values}) > 1]})
        return 0
    # runs are numbered in the header; their ids go above the table, whole at any width
    for i, r in enumerate(records, 1):
        console.print(f"#{i} [bold]{escape(r.id)}[/]", overflow="ignore", crop=False)
    table = Table(title="Runs side by side (differing rows in bold)", title_justify="left")
    table.add_column("field", style="bold")
    for i, _ in enumerate(records, 1):
        table.add_column(f"#{i}", overflow="fold")
    for name, values in rows:
        differs = len({json.dumps(v, default=str) for v in values}) > 1
        cells = [_status(v) if name == "status" else _fmt(v) for v in values]
        label = escape(name)
        table.add_row(f"[yellow]{label}[/]" if differs else label, *(f"[bold]{c}[/]" if differs else c for c in cells))
    console.print(table)
    return 0


# -- parser -------------------------------------------------------------------------------
#: A command: ``(args, registry) -> exit code``; the registry is None for commands made with needs_store=False.
Handler = Callable[[argparse.Namespace, Registry], int]


def command(group: Any, name: str, handler: Callable[..., int], help: str, *, needs_store: bool = True,
            writes: bool = False) -> argparse.ArgumentParser:
    """Add one subcommand with ``--json`` (every command can answer scripts); ``writes``: may create the store."""
    p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler, needs_store=needs_store, writes=writes)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p


def add_package_commands(groups: Any) -> None:
    package = groups.add_parser("package", help="ML packages, versions and aliases").add_subparsers(dest="command", required=True)
    p = command(package, "upload", cmd_package_upload, "validate a package folder or zip and create its next major version",
                writes=True)
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--description", default=None)
    p.add_argument("--force", action="store_true",
                   help="make a new major version even when the content is identical to a stored version")
    command(package, "list", cmd_package_list, "packages with their latest version and aliases")
    p = command(package, "show", cmd_package_show,
                "a package's versions and aliases, or one version's record, lineage, scores and aliases")
    p.add_argument("ref", metavar="NAME[:VERSION]", help='e.g. churn, churn:1.2, churn:production')
    p = command(package, "download", cmd_package_download, "download a version's zip (digest verified)")
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("dest")
    p = command(package, "promote", cmd_package_promote, "point an alias (e.g. production) at a version, keeping history",
                writes=True)
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("--alias", required=True)
    p.add_argument("--if", dest="promote_if", choices=PROMOTE_IF, default="better",
                   help="'better' (default, as the operators): only a scored version whose score beats the alias's "
                        "current version's; 'always': unconditionally")
    p.add_argument("--force", action="store_true",
                   help="promote a version a person rejected (promote_if='approved') all the same")
    p = command(package, "validate", cmd_package_validate, "check a package folder or zip statically (no code runs)",
                needs_store=False)
    p.add_argument("path")
    p.add_argument("--pipeline", choices=tuple(dict.fromkeys((*PLANS, *CONTRACTS))), default="train",
                   help="the pipeline as the operators name it (predict: the serving contract, also called serve)")


def add_runs_commands(groups: Any) -> None:
    runs = groups.add_parser("runs", help="run records: every pipeline run, with its status and cause").add_subparsers(
        dest="command", required=True)
    p = command(runs, "list", cmd_runs_list, "runs, newest first")
    p.add_argument("--package", default=None)
    p.add_argument("--status", choices=STATUSES, default=None)
    p = command(runs, "show", cmd_runs_show, "one run in full (RUN: its id dag/run/task/try, an unambiguous part, or its URI)")
    p.add_argument("run", metavar="RUN")
    p = command(runs, "compare", cmd_runs_compare, "runs side by side: type, status, timing, versions, data, env, score")
    p.add_argument("runs", metavar="RUN", nargs="+")


def cmd_gc(args: argparse.Namespace, registry: Registry) -> int:
    """Exit 1 when a record was damaged or unreadable (reported on stderr), even though gc ran."""
    report = collect(registry.store, grace=timedelta(hours=args.grace_hours), dry_run=args.dry_run)
    problems = bool(report.damaged or report.unreadable or report.manifests)
    if args.json:
        emit_json(report.to_dict())
        return 1 if problems else 0
    verb = "would delete" if report.dry_run else "deleted"
    console.print(f"{escape(report.store)}: {report.blobs} blobs ({_mb(report.blob_bytes)}), {report.referenced} referenced, "
                  f"{report.young} unreferenced but younger than {report.grace_hours:g} h (kept); "
                  f"{verb} {len(report.deleted)} ({_mb(report.deleted_bytes)}) in {report.seconds:.1f} s", highlight=False)
    for digest in report.deleted[:50]:
        console.print(f"  {verb} sha256:{digest}", highlight=False)
    if len(report.deleted) > 50:
        console.print(f"  ... and {len(report.deleted) - 50} more")
    if report.missing:
        console.print(f"[yellow]WARNING:[/] {len(report.missing)} referenced blob(s) are missing from the store, "
                      f"e.g. sha256:{report.missing[0]}; `aicenter verify` names them and what refers to them",
                      highlight=False)
    for record, why in report.damaged.items():
        err_console.print(f"[red]damaged record, skipped:[/] {escape(record)}: {escape(why)}", highlight=False)
    for record, why in report.unreadable.items():
        err_console.print(f"[red]unreadable record:[/] {escape(record)}: {escape(why)}", highlight=False)
    for manifest, why in report.manifests.items():
        err_console.print(f"[red]package manifest not readable:[/] {escape(manifest)}: {escape(why)}", highlight=False)
    if report.held:
        err_console.print(f"[red]nothing deleted:[/] {escape(report.held)}", highlight=False)
    return 1 if problems else 0


def hours(text: str) -> float:
    """A number of hours, 0 or more (argparse type: anything else is a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours; give one such as 24 or 0.5")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give 0 or more hours (0: no grace period)")
    return value


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _bytes(n: int) -> str:
    """A size as people read it: bytes below 1 KiB, else KiB, MiB or GiB with one decimal."""
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"  # unreachable


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def add_gc_command(groups: Any) -> None:
    p = command(groups, "gc", cmd_gc, "delete content blobs no version or snapshot references (older than a grace period)")
    p.description = ("Delete blobs under blobs/sha256/ that no version record or run snapshot manifest references "
                     "and that are older than the grace period, so uploads in progress are never harmed.")
    p.add_argument("--grace-hours", type=hours, default=DEFAULT_GRACE_HOURS,
                   help=f"only delete blobs last modified longer ago than this (default {DEFAULT_GRACE_HOURS:g})")
    p.add_argument("--dry-run", action="store_true", help="report what would be deleted; delete nothing")


def cmd_verify(args: argparse.Namespace, registry: Registry) -> int:
    """Exit 0 when every record and object is sound (or was repaired), 1 while any damage remains."""
    source = None if args.repair is None else Path(args.repair)
    with Progress(TextColumn("Hashing stored objects"), BarColumn(), MofNCompleteColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("objects", total=None)
        report = verify(registry.store, repair=source,
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    if args.json:
        emit_json(report.to_dict())
        return 1 if report.remaining else 0
    records = ", ".join(f"{kind} {n}" for kind, n in sorted(report.records.items())) or "none"
    console.print(f"Verified {escape(report.store)}: records read: {records}; {report.blobs} blobs and "
                  f"{report.checkpoint_objects} checkpoint objects ({_mb(report.bytes)}) read and hashed in "
                  f"{report.seconds:.1f} s", highlight=False)
    for d in report.damage:
        what = f"{d.kind} sha256:{d.sha256}" if d.sha256 else f"{d.record} record"
        if d.repaired:
            console.print(f"[green]repaired[/] {what} ({d.state}) at {escape(d.uri)} from {escape(str(source))}",
                          highlight=False)
            continue
        console.print(f"[bold red]{d.state.upper()}[/] {escape(what)}: {escape(d.uri)}", highlight=False)
        for by in d.referenced_by[:10] if d.kind != "record" else []:
            console.print(f"  referenced by {escape(by)}", highlight=False)
        if len(d.referenced_by) > 10 and d.kind != "record":
            console.print(f"  ... and {len(d.referenced_by) - 10} more")
        if d.detail:
            console.print(f"  {escape(d.detail)}", highlight=False)
        console.print(f"  fix: {escape(d.fix)}", highlight=False)
    remaining, repaired = report.remaining, report.repaired
    if not report.damage:
        console.print("[green]No damage found.[/]")
    elif not remaining:
        console.print(f"[green]All {len(repaired)} damaged object(s) repaired.[/]")
    else:
        console.print(f"[red]{len(remaining)} problem(s) remain[/]" + (f", {len(repaired)} repaired" if repaired else "")
                      + ("" if source else "; `aicenter verify --repair SOURCE` rewrites lost content found in a folder "
                         "or zip"), highlight=False)
    return 1 if remaining else 0


def add_verify_command(groups: Any) -> None:
    p = command(groups, "verify", cmd_verify,
                "check every record and every blob a version, snapshot, environment or checkpoint names; repair from a source")
    p.description = ("Read every record of the store and hash every blob (and checkpoint object) a record names, whatever "
                     "its size; report each damaged or missing one by name with what refers to it, and each damaged "
                     "record by key. Exit 0: no damage; 1: damage remains.")
    p.add_argument("--repair", metavar="SOURCE", default=None,
                   help="a folder or zip holding lost content (a package folder or zip, a dataset folder): each missing "
                        "or damaged blob whose content is found there (a file, the zip, or the package zip `aicenter "
                        "package upload` builds from it) is rewritten")


COMMAND_GROUPS: list[Callable[[Any], None]] = [add_package_commands, add_runs_commands, add_gc_command, add_verify_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aicenter", description="AI Center packages and runs in an airflow-aicenter store.",
        epilog="Exit status: 0 done, nothing wrong; 1 an error (the line on stderr says what and how to fix it) or "
               "problems found (damaged records or blobs); 2 a malformed command line; 3 refused (e.g. promote: not "
               "better, or rejected; nothing was changed); 130 interrupted; "
               "141 the reader of the output went away. --debug (or AICENTER_DEBUG=1) adds the traceback to an error.")
    parser.add_argument("--storage", help="storage URI (s3://bucket/prefix or file:///path); default: $AICENTER_STORAGE, "
                        "the aicenter_default connection (as tasks read it), or $AIRFLOW_HOME/aicenter")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: AICENTER_DEBUG=1)")
    groups = parser.add_subparsers(dest="group", required=True)
    for add in COMMAND_GROUPS:
        add(groups)
    return parser


#: Exit statuses (docs/cli.md): done; an error or problems found; a malformed command line (argparse's own);
#: refused: a valid request a rule turned down (``promote`` not better, a rejected version), nothing changed.
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
#: Interrupted (Ctrl-C): 128 + SIGINT, as the shell reports it.
INTERRUPTED = 130


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("AICENTER_DEBUG", "") not in ("", "0", "false", "no")


def _error(message: str, args: argparse.Namespace) -> None:
    """The one line an error gets (rich markup in it is text: it may quote a record or a path)."""
    if _debug(args):
        traceback.print_exc()
    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.splitlines()))}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit status, never a traceback (unless --debug)."""
    args = build_parser().parse_args(argv)
    choice: StoreChoice | None = None
    try:
        registry = None
        if args.needs_store:
            store, choice = resolve_store(args.storage, create=args.writes)
            registry = Registry(store)
        code: int = args.handler(args, registry)
        return code
    except AICenterError as exc:
        _error(str(exc), args)
        if choice is not None and "aicenter package upload" in str(exc) and choice.source not in str(exc):
            # the DAG's tasks and this command must look at one store: say which one this was
            err_console.print(f"(this command used the store {escape(choice.uri)}, {choice.source})", highlight=False)
        return EXIT_PROBLEM
    except BrokenPipeError:
        raise  # script(): the reader went away
    except OSError as exc:  # a local path no command anticipated
        _error(os_error(exc), args)
        return EXIT_PROBLEM
    except Exception as exc:  # noqa: BLE001 -- a bug: one line and the way to see more, not a raw traceback
        _error(f"{type(exc).__name__}: {exc} (unexpected: if the message does not say what to fix, run the command again "
               "with --debug, or AICENTER_DEBUG=1, to see where it happened, and report it with that output)", args)
        return EXIT_PROBLEM


#: The exit status of a command whose reader went away (``| head``): 128 + SIGPIPE, as the shell's own tools.
BROKEN_PIPE = 141


def script() -> None:
    """The ``aicenter`` console script: :func:`main`, then :func:`exit_process` (no teardown abort).

    A reader that stops early (``aicenter runs list --json | head -1``) ends the command quietly
    with status 141, as ``cat`` or ``git log`` end, not with a BrokenPipeError traceback.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush has nowhere to fail
        code = BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = INTERRUPTED
    exit_process(code)


if __name__ == "__main__":
    script()
