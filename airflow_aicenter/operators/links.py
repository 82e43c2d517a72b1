"""Extra links on the task: its run's page in the AI Center UI, and that page's artifacts, inside Airflow's shell.

The links go to the external view's route (``/plugin/ml-packages/aicenter/runs/...``): the Airflow
UI opens the page in its frame there, with its navigation around it, instead of the bare page.

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
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink

from airflow_aicenter.layout import RunPath

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator

URL_PREFIX = "/aicenter"
#: The "ML Packages" external view's ``url_route`` (plugins/__init__.py): Airflow shows ``/plugin/<route>/<path>``
#: as its shell with ``/<path>`` in the view's frame.
VIEW_ROUTE = "ml-packages"


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


def in_airflow(url: str) -> str:
    """A page of the AI Center app (``run_page_url``) as the route that shows it inside Airflow's shell.

    The frame loads the path after ``/plugin/<route>`` from the site's root, so a proxy path of
    ``[api] base_url`` is in it twice: once for the shell, once for the page.
    """
    base = _base_url()
    page = url.removeprefix(base)
    return f"{base}/plugin/{VIEW_ROUTE}{urlsplit(base).path}{page}"


class ResultsLink(BaseOperatorLink):
    """The run's page: status, phases, inputs, score, ``_results.json``."""

    name = "AI Center run"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return in_airflow(run_page_url(ti_key))


class ArtifactsLink(BaseOperatorLink):
    """The run page's artifacts, with previews and downloads."""

    name = "AI Center artifacts"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        return in_airflow(run_page_url(ti_key, "artifacts"))
