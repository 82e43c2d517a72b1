"""The AI Center pages: a FastAPI app the api-server mounts at ``/aicenter`` (server-side HTML, no CDN).

Pages: ``/`` packages, ``/packages/<name>``, ``/runs`` every run (filters, pages),
``/runs/<dag_id>/<run_id>/<task>/<try>`` (with artifact previews and downloads, and ``/live``: its
progress as JSON while it runs), ``/compare?run=...&run=...``. The store is the one the
``aicenter_default`` connection names (or the embedded default), read through
:class:`AICenterHook`, so file and S3 stores show the same pages. Every page needs a signed-in
user; a run's pages need read access to its DAG (:mod:`access`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import obstore
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_aicenter import layout
from airflow_aicenter.errors import AICenterError, ConfigurationError, NotFoundError, StorageError, VersionError
from airflow_aicenter.plugins import pages
from airflow_aicenter.plugins.access import AccessDep, UserDep, login_url
from airflow_aicenter.records import DAMAGED_RECORD_FIX, DamagedRecordError, RunRef
from airflow_aicenter.registry import Registry
from airflow_aicenter.runs import RunNotFoundError, find_run, find_runs
from airflow_aicenter.storage import LocalStore

HERE = Path(__file__).resolve().parent
#: The repository's docs/ folder (a link to it in a source tree, its files in an installed package).
DOCS = HERE / "docs"
URL_PREFIX = "/aicenter"
#: Sent with every artifact: the browser must never run an artifact (HTML, SVG) in the Airflow origin.
ARTIFACT_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}
#: An SVG opened on its own: its styles apply, no script runs (sandboxed, and no script source allowed).
SVG_POLICY = "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
#: A compare page shows at most this many runs side by side.
MAX_COMPARED = 12


def registry() -> Registry:
    """The deployment's registry, read fresh per request (a changed connection shows at once)."""
    from airflow_aicenter.hooks.aicenter import AICenterHook

    return AICenterHook().get_registry()


def run_url(base: str, run_id: str) -> str:
    """The run page of ``dag/run/task/try``; each part is quoted (run ids hold ``:`` and ``+``)."""
    return f"{base}/runs/" + "/".join(quote(p, safe="") for p in run_id.split("/"))


def task_instance_url(airflow: str, path: layout.RunPath) -> str:
    """The Airflow UI's page of the task try that made a run."""
    url = f"{airflow}/dags/{quote(path.dag_id, safe='')}/runs/{quote(path.run_id, safe='')}/tasks/{quote(path.task_id, safe='')}"
    if path.map_index >= 0:
        url += f"/mapped/{path.map_index}"
    return f"{url}?try_number={path.try_number}"


def required_actions_url(airflow: str, run: RunRef | None) -> str:
    """Where a person answers an approval: the asking task's Required Actions view, else Browse -> Required Actions.

    Built from the record's run (checked to be a run folder), never from a URL a record holds.
    """
    if run is None:
        return f"{airflow}/required_actions"
    url = f"{airflow}/dags/{quote(run.dag_id, safe='')}/runs/{quote(run.run_id, safe='')}/tasks/{quote(run.task_id, safe='')}"
    if run.map_index >= 0:
        url += f"/mapped/{run.map_index}"
    return f"{url}/required_actions"


def dag_run_url(airflow: str, path: layout.RunPath) -> str:
    """The Airflow UI's page of the DAG run a run belongs to."""
    return f"{airflow}/dags/{quote(path.dag_id, safe='')}/runs/{quote(path.run_id, safe='')}"


def task_duration(path: layout.RunPath) -> float | None:
    """The task try's duration as Airflow recorded it (the task's whole run: its start, the runtime, the
    registration after it), from the api-server's database; None when Airflow has no such try (a CLI run)."""
    try:
        from airflow.models.taskinstance import TaskInstance
        from airflow.models.taskinstancehistory import TaskInstanceHistory
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            for model in (TaskInstance, TaskInstanceHistory):
                found = session.scalar(select(model.duration).where(
                    model.dag_id == path.dag_id, model.run_id == path.run_id, model.task_id == path.task_id,
                    model.map_index == path.map_index, model.try_number == path.try_number))
                if found is not None:
                    return float(found)
    except Exception:  # noqa: BLE001 - a page never fails for this figure: it is left out
        return None
    return None


def when(value: Any) -> Markup:
    """A time as every page writes it: ``<time datetime="ISO">2026-01-01 12:00:00 UTC</time>``.

    The browser rewrites the text in the time zone the user chose in Airflow (static/aicenter.js).
    """
    moment = pages.as_time(value)
    if moment is None:
        return Markup("")
    return Markup('<time datetime="{}">{}</time>').format(moment.isoformat(), moment.strftime(pages.TIME_FORMAT))


def _run_path(dag_id: str, run_id: str, task: str, try_number: int) -> layout.RunPath:
    """The run folder a URL names (``/runs/<dag_id>/<run_id>/<task>/<try>``); a part that leaves ``runs/`` is a 400."""
    return pages.run_path(dag_id, run_id, task, try_number)


RunPathDep = Annotated[layout.RunPath, Depends(_run_path)]


def _base(request: Request) -> str:
    """Where this app is mounted (``/aicenter``, under the api-server's own root path if it has one)."""
    return str(request.scope.get("root_path", "")).rstrip("/") or URL_PREFIX


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


_STATUS = (
    ((layout.LayoutError,), status.HTTP_400_BAD_REQUEST),
    ((RunNotFoundError, NotFoundError, VersionError), status.HTTP_404_NOT_FOUND),
    ((StorageError,), status.HTTP_502_BAD_GATEWAY),
    ((ConfigurationError,), status.HTTP_500_INTERNAL_SERVER_ERROR),
)


def create_app() -> FastAPI:
    app = FastAPI(title="AI Center", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["score"] = pages.score
    templates.env.filters["when"] = when
    templates.env.filters["seconds"] = pages.seconds
    templates.env.filters["size"] = pages.size
    templates.env.filters["money"] = pages.money
    templates.env.filters["resources"] = pages.resource_line
    templates.env.filters["q"] = lambda text: quote(str(text), safe="")
    templates.env.filters["qp"] = lambda text: quote(str(text), safe="/")
    templates.env.globals["damaged_fix"] = DAMAGED_RECORD_FIX

    def render(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        base = _base(request)
        airflow = base.removesuffix(URL_PREFIX)
        user = getattr(request.state, "aicenter_user", None)
        return templates.TemplateResponse(
            request, template, {
                "base": base, "airflow": airflow,
                "required_actions": lambda run=None: required_actions_url(airflow, run),
                "user": user.get_name() if user is not None else None,
                "run_url": lambda run_id: run_url(base, run_id), "set_by_run": pages.set_by_run, **context,
            }, status_code=code,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED and _wants_html(request):
            return RedirectResponse(login_url(str(request.url)), status_code=status.HTTP_307_TEMPORARY_REDIRECT)
        if _wants_html(request):
            return render(request, "error.html", exc.status_code, title=f"{exc.status_code}", message=str(exc.detail))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(layout.LayoutError)  # a URL naming no run folder or artifact (a ValueError)
    @app.exception_handler(AICenterError)
    async def aicenter_error(request: Request, exc: Exception) -> Response:
        code = next((c for kinds, c in _STATUS if isinstance(exc, kinds)), status.HTTP_500_INTERNAL_SERVER_ERROR)
        title, message = type(exc).__name__, str(exc)
        if isinstance(exc, DamagedRecordError):  # what the page needed is damaged in the store: named by key
            title, message = "Damaged record", f"damaged record {exc.key}: {exc}"
        if _wants_html(request):
            return render(request, "error.html", code, title=title, message=message)
        return JSONResponse({"detail": message}, status_code=code)

    @app.middleware("http")
    async def no_store(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if not request.url.path.startswith(f"{_base(request)}/static/"):
            response.headers.setdefault("Cache-Control", "no-store")  # pages show live records and private data
        return response

    @app.get("/docs/", response_class=HTMLResponse)
    def docs_index(request: Request) -> HTMLResponse:
        """The repository's docs/ (shipped in the package): what the Providers page links to. No data, no sign-in."""
        return render(request, "docs.html", title="Documentation", docs=pages.doc_titles(DOCS), html=None)

    @app.get("/docs/{name}", response_class=HTMLResponse)
    def doc_page(request: Request, name: str) -> HTMLResponse:
        title, html = pages.render_doc(DOCS, name)
        return render(request, "docs.html", title=title, docs=pages.doc_titles(DOCS), html=html)

    @app.get("/", response_class=HTMLResponse)
    def packages_page(request: Request, user: UserDep, access: AccessDep) -> HTMLResponse:
        request.state.aicenter_user = user
        reg = registry()
        rows = pages.package_rows(reg)
        last = pages.last_runs(reg.store, access.can_read)  # runs of DAGs the user may read only
        for row in rows:
            row.last_run = last.get(row.name)
        return render(request, "index.html", packages=rows, store=reg.store.uri)

    @app.get("/packages/{name}", response_class=HTMLResponse)
    def package_page(request: Request, name: str, user: UserDep, access: AccessDep) -> HTMLResponse:
        request.state.aicenter_user = user
        reg = registry()
        page = pages.package_page(reg, name)
        # The runs of DAGs this user cannot read are not named (their ids hold the DAG and run ids).
        readable = {d for d in page.dag_ids() if access.can_read(d)}
        return render(request, "package.html", page=page, readable=readable, store=reg.store.uri)

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request, user: UserDep, access: AccessDep, status: str = "", dag: str = "",
                  package: str = "", pipeline: str = "", approval: str = "", page: Annotated[int, Query(ge=1)] = 1,
                  per_page: Annotated[int, Query(ge=1, le=pages.MAX_PER_PAGE)] = pages.PER_PAGE) -> HTMLResponse:
        """Every run of the DAGs the user may read, failed ones included, newest first, filtered, paginated.

        ``approval=pending``: the runs whose candidate waits for a person's decision (``promote_if="approved"``).
        """
        request.state.aicenter_user = user
        store = registry().store
        listing = pages.runs_list(store, access.can_read, status=status, dag=dag, package=package, pipeline=pipeline,
                                  approval=approval, page=page, per_page=per_page)
        return render(request, "runs.html", runs=listing, store=store.uri)

    @app.get("/runs/{dag_id}/{run_id}/{task}/{try_number}", response_class=HTMLResponse)
    def run_page(request: Request, path: RunPathDep, user: UserDep, access: AccessDep) -> HTMLResponse:
        request.state.aicenter_user = user
        access.require(path.dag_id)
        store = registry().store
        page = pages.run_page(store, path)
        airflow = _base(request).removesuffix(URL_PREFIX)
        return render(request, "run.html", page=page, s=page.summary, store=store.uri, task_duration=task_duration(path),
                      task_instance=task_instance_url(airflow, path), dag_run=dag_run_url(airflow, path))

    @app.get("/runs/{dag_id}/{run_id}/{task}/{try_number}/live")
    def run_live(path: RunPathDep, access: AccessDep) -> JSONResponse:
        """What a run page refreshes while the run goes on: status, progress, metric history and charts, resources."""
        access.require(path.dag_id)
        store = registry().store
        record = find_run(store, path.id)
        now = pages.live(store, path)
        return JSONResponse({
            "status": record.status, "ended": record.status != "running", "phase": record.outcome.phase,
            "progress": None if now.progress is None else now.progress.model_dump(mode="json"),
            "progress_error": now.progress_error, "series": now.series, "x": now.x, "charts": now.chart(),
            "resources": record.outcome.resources, "cost": record.outcome.cost, "duration": record.duration,
        })

    @app.get("/runs/{dag_id}/{run_id}/{task}/{try_number}/preview/{relative:path}", response_class=HTMLResponse)
    def preview_page(request: Request, path: RunPathDep, relative: str, user: UserDep, access: AccessDep) -> HTMLResponse:
        request.state.aicenter_user = user
        access.require(path.dag_id)
        return render(request, "preview.html", path=path, run_id=path.id, preview=pages.preview(registry().store, path, relative))

    @app.get("/runs/{dag_id}/{run_id}/{task}/{try_number}/artifacts/{relative:path}")
    def artifact(path: RunPathDep, relative: str, access: AccessDep, inline: bool = False) -> StreamingResponse:
        access.require(path.dag_id)
        key = pages.artifact_key(path, relative)
        store = registry().store
        if store.head(key) is None:
            raise NotFoundError(f"{store.url(key)} does not exist; the run's page lists its artifacts")
        if isinstance(store, LocalStore):
            store.check_readable(key)  # a symbolic link planted in a file store must not serve a file outside it
        try:
            result = obstore.get(store.inner, key)
        except (OSError, ValueError) as exc:  # obstore's errors: the store did not answer as it should
            raise StorageError(f"could not read {store.url(key)}: {exc}") from exc
        name = relative.rsplit("/", 1)[-1]
        kind = pages.artifact_kind(relative)
        disposition = "inline" if inline and kind in ("image", "svg") else "attachment"
        headers = {**ARTIFACT_HEADERS, "Content-Disposition": f"{disposition}; filename*=UTF-8''{quote(name)}",
                   "Content-Length": str(result.meta["size"])}
        if kind == "svg":
            headers["Content-Security-Policy"] = SVG_POLICY
        return StreamingResponse(result.stream(min_chunk_size=256 * 1024), media_type=pages.media_type(relative), headers=headers)

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(request: Request, user: UserDep, access: AccessDep,
                     run: Annotated[list[str] | None, Query()] = None) -> HTMLResponse:
        request.state.aicenter_user = user
        refs = [ref for value in (run or []) for ref in value.split()]  # the form's text box: one id per line
        if len(refs) > MAX_COMPARED:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{len(refs)} runs asked for; compare at most {MAX_COMPARED}")
        for ref in refs:  # a full id names its DAG: refused for that, before the store is asked whether the run exists
            try:
                access.require(layout.RunPath.parse(ref.strip()).dag_id)
            except layout.LayoutError:
                continue  # a part of an id: it is matched among the runs of readable DAGs alone
        store = registry().store
        # Runs of DAGs the user cannot read are left out before matching: no error names one.
        records = find_runs(store, refs, access.can_read)
        rows = pages.compare_rows(store, records) if records else []
        return render(request, "compare.html", records=records, rows=rows, refs=refs, store=store.uri,
                      as_json=lambda v: json.dumps(v, indent=1, sort_keys=True) if isinstance(v, (dict, list)) else v)

    return app
