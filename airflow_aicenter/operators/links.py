"""Extra links on the task: the run's ``_results.json`` and its artifacts folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.execution_time.comms import TIKey


class _BrowseLink(BaseOperatorLink):
    key: str

    def get_link(self, operator: BaseOperator, *, ti_key: TIKey) -> str:
        links = XCom.get_value(ti_key=ti_key, key="browse") or {}
        return links.get(self.key, "")


class ResultsLink(_BrowseLink):
    name = "AI Center results"
    key = "results"


class ArtifactsLink(_BrowseLink):
    name = "AI Center artifacts"
    key = "artifacts"
