"""The ``aicenter`` command: packages and runs in a store, for people and for scripts (``--json``).

The store comes from ``--storage URI``, else ``AICENTER_STORAGE``, else the ``aicenter_default``
connection, else ``$AIRFLOW_HOME/aicenter``. Airflow is only imported for the connection case,
so plain store commands stay fast.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from airflow_aicenter.errors import AICenterError, VersionError
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import S3Options, Store, open_store

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def resolve_store(uri: str | None) -> Store:
    uri = uri or os.environ.get("AICENTER_STORAGE")
    if uri:
        return open_store(uri, S3Options.from_env() if uri.startswith("s3://") else None)
    from airflow_aicenter.hooks.aicenter import AICenterHook

    return AICenterHook().get_store()


def split_ref(ref: str, *, need_version: bool) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    if need_version and not version:
        raise VersionError(f"{ref!r} names no version; write NAME:VERSION, e.g. {name}:1.0 or {name}:latest")
    return name, version or None


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- package commands ---------------------------------------------------------------------
def cmd_package_upload(args: argparse.Namespace, registry: Registry) -> int:
    with console.status(f"Validating and uploading {args.path} ..."):
        record = registry.upload(Path(args.path), args.name, created_by=f"cli:{getpass.getuser()}", description=args.description)
    if args.json:
        emit_json(record.model_dump(mode="json"))
    else:
        console.print(f"Uploaded [bold]{record.package}[/] version [bold green]{record.version}[/] "
                      f"(sha256:{record.blob.sha256[:12]}, {record.blob.size} bytes) to {registry.store.uri}")
    return 0


def cmd_package_list(args: argparse.Namespace, registry: Registry) -> int:
    rows = []
    for name in registry.packages():
        latest = registry.resolve(name, "latest") if registry.latest_major(name) is not None else None
        aliases = registry.aliases(name)
        rows.append({"package": name, "latest": latest.version if latest else None,
                     "created_at": latest.created_at if latest else None, "score": latest.score if latest else None,
                     "aliases": {a: r.version for a, r in aliases.items()}})
    if args.json:
        emit_json(rows)
        return 0
    table = Table(title=f"Packages in {registry.store.uri}")
    for col in ("package", "latest", "score", "aliases", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["package"], r["latest"] or "-", _fmt(r["score"]),
                      ", ".join(f"{a}={v}" for a, v in r["aliases"].items()) or "-", _fmt(r["created_at"]))
    console.print(table if rows else "No packages yet: `aicenter package upload PATH --name NAME`")
    return 0


def cmd_package_download(args: argparse.Namespace, registry: Registry) -> int:
    name, version = split_ref(args.ref, need_version=True)
    with console.status(f"Downloading {name}:{version} ..."):
        record, path = registry.download(name, version or "latest", Path(args.dest))
    if args.json:
        emit_json({"package": name, "version": record.version, "path": str(path), "sha256": record.blob.sha256})
    else:
        console.print(f"Downloaded {name} version {record.version} to {path} (sha256 verified)")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


# -- parser -------------------------------------------------------------------------------
Handler = Callable[[argparse.Namespace, Registry], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aicenter", description="AI Center packages and runs in an airflow-aicenter store.")
    parser.add_argument("--storage", help="storage URI (s3://bucket/prefix or file:///path); default: $AICENTER_STORAGE, "
                        "the aicenter_default connection, or $AIRFLOW_HOME/aicenter")
    groups = parser.add_subparsers(dest="group", required=True)

    package = groups.add_parser("package", help="ML packages and their versions").add_subparsers(dest="command", required=True)
    p = package.add_parser("upload", help="validate a package folder or zip and create its next major version")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--description", default=None)
    p.set_defaults(handler=cmd_package_upload)
    p = package.add_parser("list", help="packages with their latest version and aliases")
    p.set_defaults(handler=cmd_package_list)
    p = package.add_parser("download", help="download a version's zip (digest verified)")
    p.add_argument("ref", metavar="NAME:VERSION")
    p.add_argument("dest")
    p.set_defaults(handler=cmd_package_download)

    for sub in package.choices.values():
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = resolve_store(args.storage)
        return args.handler(args, Registry(store))
    except AICenterError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
