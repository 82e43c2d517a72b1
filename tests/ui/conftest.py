"""A real ``airflow api-server`` with the AI Center plugin, a seeded store, and Debian's Chromium driven by Playwright;
and (``pages``) the same pages' app in process, for the access and damage checks of the fast tier.

One session: a temp AIRFLOW_HOME (``airflow db migrate``), SimpleAuthManager with known users
(admin, viewer, and ``nobody`` without a role), the ``aicenter_ui`` DAG run once with
``airflow dags test`` (a full run that succeeds, one that fails) so task instances, extra-link
XComs and run folders are real, then the api-server on a free port. The plugin is found
through the installed distribution's entry points, as in a deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from fastapi import Request

from airflow_aicenter.plugins.access import DagAccess, UserDep
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store, open_store
from tests.conftest import BIN, free_port
from tests.ui.stores import OURS

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
PASSWORDS = {"admin": "admin-pass-1", "viewer": "viewer-pass-1", "nobody": "nobody-pass-1"}
#: The in-process app's users and the DAGs each may read (None: every DAG), as an auth manager with DAG permissions decides.
READS: dict[str, set[str] | None] = {"alice": {OURS}, "nobody": set(), "admin": None}
PACKAGE = "uipkg"
DAG_ID = "aicenter_ui"
T = TypeVar("T")
SCREENSHOTS = Path(os.environ.get("AICENTER_TEST_OUTPUT", HERE.parents[1] / "test-output")) / "screenshots"


@dataclass
class UIServer:
    url: str
    home: Path
    store: Store
    run_id: str  # the DAG run's id
    process: subprocess.Popen[bytes]
    dag_log: str  # what `airflow dags test` printed

    def token(self, user: str) -> str:
        response = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=30)
        response.raise_for_status()
        return str(response.json()["access_token"])

    def get(self, path: str, user: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if user:
            headers["Authorization"] = f"Bearer {self.token(user)}"
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=60, follow_redirects=False, **kwargs)

    def set_store(self, extra: dict[str, Any], user: str = "admin") -> None:
        """Point the ``aicenter_default`` connection (in Airflow's database) at another store; the pages follow at once."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        body = {"connection_id": "aicenter_default", "conn_type": "aicenter", "extra": json.dumps(extra)}
        response = httpx.patch(f"{self.url}/api/v2/connections/aicenter_default", json=body, headers=headers, timeout=30)
        if response.status_code == 404:
            response = httpx.post(f"{self.url}/api/v2/connections", json=body, headers=headers, timeout=30)
        assert response.status_code in (200, 201), response.text

    def add_connection(self, body: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {self.token('admin')}"}
        response = httpx.post(f"{self.url}/api/v2/connections", json=body, headers=headers, timeout=30)
        assert response.status_code in (201, 409), response.text

    def run_folder(self, task: str) -> str:
        """The run id (``dag/run/task/try``) of a task of the seeded DAG run."""
        return f"{DAG_ID}/{self.run_id}/{task}/1"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(home / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin,viewer:viewer,nobody:",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
        AIRFLOW__API_AUTH__JWT_SECRET="aicenter-ui-tests-secret-0123456789abcdef",
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def _seed(home: Path, env: dict[str, str], store: Store) -> tuple[str, str]:
    """Upload the test package, run the DAG once (one success, one failure), add scored versions and an alias."""
    registry = Registry(store)
    off_loop(registry.upload, HERE / "package", PACKAGE, created_by="ui-tests")
    data = home / "dataset"
    data.mkdir()
    (data / "values.csv").write_text("row,value\n" + "".join(f"{i},{v}\n" for i, v in enumerate([0.1, 0.4, 0.35, 0.8, 0.9, 0.2])))
    inbox = home / "inbox"
    inbox.mkdir()
    (inbox / "inputs.jsonl").write_text("0.1\n0.9\nnot a number\n0.7\n")
    run_env = {
        **env, "UI_TEST_DATASET": data.as_uri(), "UI_TEST_INBOX": inbox.as_uri(),
        "AIRFLOW_CONN_AICENTER_DEFAULT": json.dumps({"conn_type": "aicenter", "extra": {"storage": store.uri}}),
    }
    done = subprocess.run([str(BIN / "airflow"), "dags", "test", DAG_ID], env=run_env, capture_output=True, text=True,
                          timeout=300, check=False)
    runs = [p.name for p in (Path(store.uri.removeprefix("file://")) / "runs" / DAG_ID).iterdir()]
    assert len(runs) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    trained = registry.resolve(PACKAGE, "latest")
    assert trained.version == "1.1" and trained.score is not None, done.stdout[-3000:] + done.stderr[-3000:]
    # Two more scored versions (as later runs would make them) so the chart has a line, and an alias with history.
    for score in (0.79, 0.8512345):
        # off the loop: a per-file version's commit checks its file blobs with a transfer (asyncio.run)
        off_loop(registry.commit, PACKAGE, parent="1.0", blob=trained.blob, pipeline="train", score=score,
                 created_by="ui-tests")
    registry.set_alias(PACKAGE, "production", "1.1", set_by=f"run {trained.run.path.id}", reason="first")  # as a promotion
    registry.set_alias(PACKAGE, "production", "1.3", set_by="ui-tests", reason="better: 0.8512 > 0.8133")
    return runs[0], done.stdout + done.stderr


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"airflow api-server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"airflow api-server did not become healthy in {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIServer]:
    home = tmp_path_factory.mktemp("ui-airflow-home")
    (home / "dags").mkdir()
    shutil.copy(HERE / "ui_dag.py", home / "dags" / "ui_dag.py")
    (home / "passwords.json").write_text(json.dumps(PASSWORDS))
    env = _env(home)
    done = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    store = open_store((home / "aicenter").as_uri())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "api-server.log"
    # The api-server boots while the DAG runs: the two together take the time of the longer one.
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run_id, dag_log = _seed(home, env, store)
        _wait_healthy(url, process, log)
        server = UIServer(url, home, store, run_id, process, dag_log)
        server.set_store({"storage": store.uri})
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its workers (its own session)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``shots(page, "name")`` saves a full-page screenshot under test-output/screenshots/ (and the test's tmp folder),
    and prints its path (kept as a test artifact)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page: Any, name: str) -> Path:
        target = SCREENSHOTS / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(target), full_page=True)
        shutil.copy(target, tmp_path / target.name)
        print(f"screenshot: {target}")
        return target

    return take


@pytest.fixture(scope="session")
def admin_context(browser: Any, ui_server: UIServer) -> Iterator[Any]:
    """A browser context signed in once as admin, through the Airflow login form (the ``_token`` cookie)."""
    context = browser.new_context(base_url=ui_server.url, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto("/aicenter/")
    page.wait_for_url("**/auth/login**")  # anonymous: sent to the sign-in page, coming back afterwards
    page.locator("input[name=username], #username").first.fill("admin")
    page.locator("input[name=password], #password").first.fill(PASSWORDS["admin"])
    page.locator("button[type=submit]").first.click()
    page.wait_for_url("**/aicenter/")
    page.close()
    yield context
    context.close()


@pytest.fixture
def signed_in(admin_context: Any) -> Iterator[Any]:
    """A new page of the signed-in admin, on the packages page."""
    page = admin_context.new_page()
    page.goto("/aicenter/")
    yield page
    page.close()


def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in another thread: Playwright's sync API keeps an event loop running in this one,
    and the store's transfers start their own (``asyncio.run``)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _test_user(request: Request) -> SimpleAuthManagerUser:
    """The signed-in user of an in-process request (FastAPI reads this signature: module-level names only)."""
    return SimpleAuthManagerUser(username=request.headers["X-Test-User"], role=None)


def _test_access(user: UserDep) -> DagAccess:
    reads = READS[user.get_name()]
    return DagAccess(lambda dag_id: reads is None or dag_id in reads)


@dataclass
class Pages:
    """The AI Center app in process over a file store: the real routes, templates and store reads.

    Only the two answers Airflow's api-server gives the app are stood in for: who is signed in
    (the ``X-Test-User`` header instead of a JWT) and which DAGs that user may read (:data:`READS`
    instead of an auth manager's database). Server errors come back as 500 responses, not raised.
    """

    client: Any
    store: Store
    root: Path | None  # a file store's folder; None on S3

    def get(self, path: str, user: str = "alice", *, html: bool = True) -> httpx.Response:
        accept = "text/html" if html else "application/json"
        return self.client.get(path, headers={"Accept": accept, "X-Test-User": user}, follow_redirects=False)


@pytest.fixture
def pages(request: pytest.FixtureRequest, store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pages]:
    """The app over the ``store`` fixture's empty store (file and S3), read through the ``aicenter_default`` connection."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    from airflow_aicenter.plugins.access import dag_access
    from airflow_aicenter.plugins.app import create_app

    extra: dict[str, Any] = {"storage": store.uri}
    root = None
    if store.uri.startswith("file://"):
        root = Path(store.uri.removeprefix("file://"))
    else:
        s3 = request.getfixturevalue("s3_server")
        monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({
            "conn_type": "aws", "login": "testing", "password": "testing-secret",
            "extra": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"}}))
        extra["aws_conn_id"] = "aws_moto"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": extra}))

    app = create_app()
    app.dependency_overrides[get_user] = _test_user
    app.dependency_overrides[dag_access] = _test_access
    with TestClient(app, root_path="/aicenter", raise_server_exceptions=False) as client:
        yield Pages(client, store, root)
