"""The package's asset on the operators (airflow_aicenter/operators/package_asset.py), with Airflow's own asset types."""

from __future__ import annotations

from typing import Any, cast

from airflow.sdk import Asset, AssetAlias
from airflow.sdk.execution_time.context import OutletEventAccessors

from airflow_aicenter.operators.package_asset import PACKAGE_ALIAS, declare, publish

CHURN = Asset("aicenter://churn")
OTHER = Asset("s3://bucket/report")


def test_a_task_that_makes_versions_produces_its_package_and_every_task_consumes_it():
    assert declare(True, "churn", None, None) == ([CHURN], [CHURN])
    assert declare(False, "churn", [OTHER], None) == ([OTHER], [CHURN]), "an evaluation makes no version"
    # given as one asset or a tuple (partial() kwargs), kept, with the package's added once
    assert declare(True, "churn", OTHER, (OTHER,)) == ([OTHER, CHURN], [OTHER, CHURN])
    # already declared (a mapped task's partial() did it before __init__): not twice
    assert declare(True, "churn", [CHURN], [CHURN]) == ([CHURN], [CHURN])
    assert declare(True, "churn", [AssetAlias(PACKAGE_ALIAS)], []) == ([AssetAlias(PACKAGE_ALIAS)], [CHURN])


def test_a_package_known_only_at_run_time_goes_through_the_alias_and_is_no_inlet():
    for package in ("{{ params.package }}", None):  # templated, or mapped (partial() without a name)
        assert declare(True, package, None, None) == ([AssetAlias(PACKAGE_ALIAS)], [])


def test_the_event_goes_to_the_package_or_through_the_alias_and_none_without_a_version():
    event = {"package": "churn", "version": "1.1"}
    events = OutletEventAccessors()
    context = cast(Any, {"outlet_events": events})
    publish(context, "churn", [CHURN], event)
    assert events[CHURN].extra == event
    publish(context, "churn", [AssetAlias(PACKAGE_ALIAS)], event)
    [through] = events[AssetAlias(PACKAGE_ALIAS)].asset_alias_events
    assert (through.dest_asset_key.name, through.extra) == ("aicenter://churn", event)
    quiet = OutletEventAccessors()
    publish(cast(Any, {"outlet_events": quiet}), "churn", [CHURN], None)
    assert quiet[CHURN].extra == {} and quiet[AssetAlias(PACKAGE_ALIAS)].asset_alias_events == []
