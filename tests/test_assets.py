"""The aicenter asset URI scheme as Airflow uses it: registered by the provider, applied to every Asset."""

from __future__ import annotations

import pytest
from airflow.sdk import Asset
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

from airflow_aicenter.assets import convert_asset_to_openlineage, create_asset, package_uri


def test_airflow_normalises_aicenter_uris_through_the_provider() -> None:
    assert ProvidersManagerTaskRuntime().asset_uri_handlers["aicenter"].__module__ == "airflow_aicenter.assets"
    assert Asset("aicenter://churn").uri == "aicenter://churn/"
    assert Asset("AICENTER://churn/").uri == "aicenter://churn/", "scheme lower-cased, one form"
    assert Asset("aicenter://Churn_v2").uri == "aicenter://Churn_v2/", "package names are case-sensitive: kept as written"
    assert Asset(package_uri("churn")) == Asset("aicenter://churn"), "the asset the operators and DAGs name"


@pytest.mark.parametrize("uri, message", [
    ("aicenter://churn/1.2", "has a path ('/1.2'); an aicenter asset is a whole package (versions are events on it"),
    ("aicenter://churn?version=1.2", "has a query ('version=1.2')"),
    ("aicenter://1churn", "invalid package name '1churn': a package name is a letter followed by"),
    ("aicenter://class", "package name 'class' is a Python keyword"),
    ("aicenter:///churn", "names no package; write it as aicenter://<package>, e.g. aicenter://churn"),
    ("aicenter://user@churn", "has user info or a port"),
])
def test_a_bad_aicenter_uri_fails_the_dag_file_with_the_fix(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match="aicenter://") as info:
        Asset(uri)
    assert message in str(info.value)


def test_the_factory_builds_the_package_asset() -> None:
    factory = ProvidersManagerTaskRuntime().asset_factories["aicenter"]
    asset = factory(package="churn", extra={"team": "risk"})
    assert (asset.uri, asset.extra) == ("aicenter://churn/", {"team": "risk"})
    assert create_asset(package="churn") == Asset("aicenter://churn")
    with pytest.raises(Exception, match="invalid package name 'no way'"):
        factory(package="no way")


def test_openlineage_sees_a_package_as_a_dataset_of_the_aicenter_namespace() -> None:
    from openlineage.client.event_v2 import Dataset

    converter = ProvidersManagerTaskRuntime().asset_to_openlineage_converters["aicenter"]
    dataset = converter(Asset("aicenter://churn"), None)
    assert isinstance(dataset, Dataset) and (dataset.namespace, dataset.name) == ("aicenter", "churn")
    assert convert_asset_to_openlineage(Asset("aicenter://Churn_v2"), None).name == "Churn_v2"

    # what the OpenLineage provider's listener does with an inlet or outlet asset
    from airflow.providers.openlineage.utils.utils import translate_airflow_asset

    translated = translate_airflow_asset(Asset("aicenter://churn"), None)
    assert translated is not None and (translated.namespace, translated.name) == ("aicenter", "churn")
