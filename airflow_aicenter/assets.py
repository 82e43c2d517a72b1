"""The ``aicenter`` asset URI scheme: ``aicenter://<package>`` names an ML package in Airflow.

Registered through the provider info (``asset-uris``), so Airflow validates every
``Asset("aicenter://...")`` when a DAG is parsed (a typo in a package name fails the DAG file,
not the first run), builds assets from keyword arguments (``factory``), and the OpenLineage
provider reports the package as a dataset of its own namespace (``to_openlineage_converter``).

One asset per package, not per version: a new version is an *event* on the package's asset
(its ``extra`` names the version), which is what lets a DAG be scheduled on "a new version of
churn". The package name is kept as written: names are case-sensitive in the registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package.names import validate_package_name

if TYPE_CHECKING:
    from airflow.sdk import Asset

    from airflow_aicenter.completion import LineageDataset

SCHEME = "aicenter"
#: The OpenLineage namespace of every package dataset (the name is the package).
OPENLINEAGE_NAMESPACE = "aicenter"


def package_uri(package: str) -> str:
    """``aicenter://<package>`` for a valid package name: the form DAGs and the operators write (the asset's name;
    Airflow stores its URI normalised, ``aicenter://<package>/``)."""
    return f"{SCHEME}://{validate_package_name(package)}"


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Airflow's normaliser for ``aicenter://<package>``; a ValueError (Airflow's convention) names the fix.

    Airflow has already lower-cased the scheme and dropped a trailing slash and the fragment.
    """
    example = "write it as aicenter://<package>, e.g. aicenter://churn"
    if not uri.netloc:
        raise ValueError(f"asset URI {uri.geturl()!r} names no package; {example}")
    if uri.path not in ("", "/"):
        raise ValueError(
            f"asset URI {uri.geturl()!r} has a path ({uri.path!r}); an aicenter asset is a whole package "
            f"(versions are events on it, their number in the event's extra): {example}"
        )
    if uri.query:
        raise ValueError(f"asset URI {uri.geturl()!r} has a query ({uri.query!r}); {example}")
    if "@" in uri.netloc or ":" in uri.netloc:
        raise ValueError(f"asset URI {uri.geturl()!r} has user info or a port; {example}")
    try:
        validate_package_name(uri.netloc)
    except PackageError as exc:
        raise ValueError(f"asset URI {uri.geturl()!r}: {exc}") from None
    # Airflow's own form for a URI without a path keeps one slash (``aicenter://churn/``), as s3://bucket/ does.
    return uri._replace(scheme=SCHEME, path="/", query="", fragment="")


def create_asset(*, package: str, extra: dict[str, Any] | None = None) -> Asset:
    """The asset of a package (Airflow's ``factory`` for the scheme)."""
    from airflow.sdk import Asset

    return Asset(uri=package_uri(package), extra=extra or {})


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any = None) -> Any:
    """The package as an OpenLineage dataset: namespace ``aicenter``, name = the package.

    Called by the OpenLineage provider only, which brings the OpenLineage client: imported here
    so that it stays an optional dependency.
    """
    return openlineage_dataset(OPENLINEAGE_NAMESPACE, sanitize_uri(urlsplit(asset.uri)).netloc)


def openlineage_dataset(namespace: str, name: str, version: str | None = None) -> Any:
    """An OpenLineage ``Dataset``; a package version carries its version as the dataset's version facet."""
    from openlineage.client.event_v2 import Dataset
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet

    if version is None:
        return Dataset(namespace=namespace, name=name)
    return Dataset(namespace=namespace, name=name, facets={"version": DatasetVersionDatasetFacet(datasetVersion=version)})


def operator_lineage(inputs: Iterable[LineageDataset], outputs: Iterable[LineageDataset]) -> Any:
    """A task's lineage (:func:`airflow_aicenter.completion.lineage`) as the OpenLineage provider's ``OperatorLineage``.

    Called from the operator's OpenLineage hook only: the provider is optional.
    """
    from airflow.providers.openlineage.extractors import OperatorLineage

    return OperatorLineage(
        inputs=[openlineage_dataset(d.namespace, d.name, d.version) for d in inputs],
        outputs=[openlineage_dataset(d.namespace, d.name, d.version) for d in outputs],
    )
