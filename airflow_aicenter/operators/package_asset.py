"""The package's asset on the pipeline operators: declared when the DAG is parsed, its event published after a run.

A task that makes versions declares ``aicenter://<package>`` as an outlet, and every pipeline
task declares it as an inlet (it runs a version of the package), so Airflow lists the task
among the asset's producers and consumers. A package name that is templated or mapped is only
known at run time: the task declares the shared :data:`PACKAGE_ALIAS` instead and adds its
event through it (an inlet alias would claim events of every package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias

from airflow_aicenter.assets import SCHEME
from airflow_aicenter.operators.checks import is_templated

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Version-producing runs whose package name is only known at run time add their event through this alias.
PACKAGE_ALIAS = "aicenter-package-versions"


def package_asset(package: str) -> Asset:
    """The package's asset, ``aicenter://<package>`` (the scheme of :mod:`airflow_aicenter.assets`)."""
    return Asset(f"{SCHEME}://{package}")


def package_outlet(package: object) -> Asset | AssetAlias:
    """A plain package name declares its own asset (lineage shows who produces it); a templated or
    mapped one is only known at run time and goes through the shared alias."""
    if isinstance(package, str) and not is_templated(package):
        return package_asset(package)
    return AssetAlias(PACKAGE_ALIAS)


def declared_list(value: object) -> list[Any]:
    """Inlets or outlets as given to ``partial()`` (one, a list, a tuple or none), as a list."""
    if not value:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def package_inlets(package: object) -> list[Asset]:
    """Every pipeline runs a version of its package (train and full from a parent): a plain package name declares
    the package's asset as an inlet too, so Airflow lists the task among the asset's consumers. A templated or mapped
    name is only known at run time: no inlet (an alias would claim events of every package)."""
    if isinstance(package, str) and not is_templated(package):
        return [package_asset(package)]
    return []


def declare(makes_version: bool, package: object, outlets: object, inlets: object) -> tuple[list[Any], list[Any]]:
    """``outlets`` and ``inlets`` with the package's own added once (a mapped task's ``partial()`` declared them first).

    ``makes_version``: the task makes versions, so it produces the package's asset (or the alias).
    """
    outlets, inlets = declared_list(outlets), declared_list(inlets)
    outlet = package_outlet(package)
    if makes_version and outlet not in outlets and AssetAlias(PACKAGE_ALIAS) not in outlets:
        outlets.append(outlet)
    return outlets, [*inlets, *(a for a in package_inlets(package) if a not in inlets)]


def publish(context: Context, package: str, outlets: list[Any], event: dict[str, Any] | None) -> None:
    """The package asset's event for a run that made a version (through the alias when the name is templated)."""
    if event is None:
        return
    if is_templated(package) or any(isinstance(o, AssetAlias) for o in outlets):
        context["outlet_events"][AssetAlias(PACKAGE_ALIAS)].add(package_asset(package), extra=event)
    else:
        context["outlet_events"][package_asset(package)].extra = event
