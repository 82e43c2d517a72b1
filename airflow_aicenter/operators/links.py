"""Extra links on the task: its run's page in the AI Center UI (``/aicenter/runs/...``), and that page's artifacts.

The link is computed from the task instance key alone (dag_id, run_id, task_id, map_index,
try_number -> the run folder, :mod:`airflow_aicenter.layout`): no XCom is read, so the links
show for failed and refused runs too, and a task never logs "XCom not found" for them. The URL
is same-origin, ``http(s)`` under ``[api] base_url`` when that is set, else a path from the
root: the Airflow UI draws only such links (a ``file://`` or console link to another origin
is dropped or opens elsewhere), and the page reads the store through the api-server whatever
the store is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

from airflow_aicenter.layout import RunPath

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

URL_PREFIX = "/aicenter"


def _base_url() -> str:
    """``[api] base_url`` when it is an http(s) URL (a proxy path kept), else "" (a root-relative link)."""
    from airflow.sdk.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").strip().rstrip("/")
    return base if base.startswith(("http://", "https://")) else ""


def run_page_url(ti_key: Any, anchor: str = "") -> str:
    """The AI Center page of the run folder of ``ti_key``'s task try (``#anchor`` for a section of it)."""
    path = RunPath(ti_key.dag_id, ti_key.run_id, ti_key.task_id, getattr(ti_key, "map_index", -1), ti_key.try_number)
    parts = "/".join(quote(p, safe="") for p in path.id.split("/"))
    return f"{_base_url()}{URL_PREFIX}/runs/{parts}" + (f"#{anchor}" if anchor else "")


class ResultsLink(BaseOperatorLink):
    """The run's page: status, phases, inputs, score, ``_results.json``."""

    name = "AI Center run"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return run_page_url(ti_key)


class ArtifactsLink(BaseOperatorLink):
    """The run page's artifacts, with previews and downloads."""

    name = "AI Center artifacts"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return run_page_url(ti_key, "artifacts")
