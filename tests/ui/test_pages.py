"""The AI Center pages as users meet them: a real api-server, Debian's Chromium, file and S3 stores.

Screenshots of every step are kept under test-output/screenshots/ (and each test's tmp folder).
"""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx
import pytest

from airflow_aicenter.storage import open_store
from tests.ui.conftest import DAG_ID, PACKAGE

pytestmark = pytest.mark.airflow


def quoted(run_id: str) -> str:
    return "/".join(quote(p, safe="") for p in run_id.split("/"))


def test_anonymous_requests_are_refused(ui_server):
    run = quoted(ui_server.run_folder("full"))
    for path in ("/aicenter/", f"/aicenter/packages/{PACKAGE}", f"/aicenter/runs/{run}",
                 f"/aicenter/runs/{run}/artifacts/metrics.txt", f"/aicenter/runs/{run}/preview/metrics.txt", "/aicenter/compare"):
        api = ui_server.get(path, headers={"Accept": "application/json"})
        assert api.status_code == 401, (path, api.status_code, api.text)
        page = ui_server.get(path, headers={"Accept": "text/html"})
        assert page.status_code == 307 and "/auth/login" in page.headers["location"], (path, page.status_code)
        assert "threshold" not in page.text and PACKAGE not in page.text


def test_a_run_needs_read_access_to_its_dag(ui_server):
    run = quoted(ui_server.run_folder("full"))
    # A viewer may read every DAG: the run, its artifacts and a comparison.
    assert ui_server.get(f"/aicenter/runs/{run}", "viewer").status_code == 200
    assert ui_server.get(f"/aicenter/runs/{run}/artifacts/metrics.txt", "viewer").status_code == 200
    # A signed-in user without a role may read no DAG: every page of the run is refused, and says why.
    compare = f"/aicenter/compare?run={quote(ui_server.run_folder('full'), safe='')}"
    for path in (f"/aicenter/runs/{run}", f"/aicenter/runs/{run}/artifacts/metrics.txt",
                 f"/aicenter/runs/{run}/preview/metrics.txt", compare):
        refused = ui_server.get(path, "nobody", headers={"Accept": "text/html"})
        assert refused.status_code == 403, (path, refused.status_code)
        assert DAG_ID in refused.text and "threshold" not in refused.text
    # the package page does not name the runs of DAGs the user cannot read: not as the maker of a
    # version, not as what moved an alias (its history)
    package = ui_server.get(f"/aicenter/packages/{PACKAGE}", "nobody").text
    assert package.count("a run of a DAG you cannot read") == 2 and ui_server.run_id not in package
    assert DAG_ID not in package
    viewer = ui_server.get(f"/aicenter/packages/{PACKAGE}", "viewer").text
    assert viewer.count(ui_server.run_id) >= 2 and "a run of a DAG you cannot read" not in viewer


def test_artifact_paths_cannot_leave_the_run_folder(ui_server):
    run = quoted(ui_server.run_folder("full"))
    for bad in ("%2e%2e/outcome.json", "..%2F..%2F..%2Fpackages", "plots/%2e%2e/%2e%2e/_results.json", "%5C..%5Coutcome.json"):
        response = ui_server.get(f"/aicenter/runs/{run}/artifacts/{bad}", "admin")
        assert response.status_code in (400, 404), (bad, response.status_code)
        assert b'"parameters"' not in response.content and b'"status"' not in response.content
    refused = ui_server.get(f"/aicenter/runs/{run}/artifacts/plots/%2e%2e/%2e%2e/_results.json", "admin",
                            headers={"Accept": "text/html"})
    assert refused.status_code == 400 and "must not contain &#39;..&#39;" in refused.text, refused.text[-500:]
    # a run folder named with '..' is refused before the store is read
    assert ui_server.get(f"/aicenter/runs/{DAG_ID}/%2e%2e/full/1", "admin").status_code in (400, 404)
    # artifacts are never served as HTML in the Airflow origin
    ok = ui_server.get(f"/aicenter/runs/{run}/artifacts/metrics.txt", "admin")
    assert ok.headers["content-security-policy"].startswith("sandbox") and ok.headers["x-content-type-options"] == "nosniff"
    assert ok.headers["content-disposition"].startswith("attachment")


def test_bad_requests_get_errors_that_say_what_to_do(ui_server):
    html = {"Accept": "text/html"}
    missing = ui_server.get("/aicenter/packages/nope", "admin", headers=html)
    assert missing.status_code == 404 and "aicenter package upload PATH --name nope" in missing.text
    no_run = ui_server.get(f"/aicenter/runs/{DAG_ID}/no-such-run/full/1", "admin", headers=html)
    assert no_run.status_code == 404 and "aicenter runs list" in no_run.text
    too_many = ui_server.get("/aicenter/compare?" + "&".join(f"run=r{i}" for i in range(13)), "admin")
    assert too_many.status_code == 400 and "compare at most 12" in too_many.json()["detail"]
    ambiguous = ui_server.get(f"/aicenter/compare?run={DAG_ID}", "admin")
    assert ambiguous.status_code == 404 and "ambiguous" in ambiguous.json()["detail"]


def test_packages_package_run_and_previews_in_the_browser(signed_in, ui_server, shots):
    page = signed_in
    # the packages page: latest version, aliases, best score (rounded)
    row = page.locator("#packages tbody tr", has_text=PACKAGE)
    assert row.locator("td").nth(1).inner_text() == "1.3"
    assert "production → 1.3" in row.inner_text()
    assert "0.8512 (1.3)" in row.inner_text()
    shots(page, "packages")

    page.click(f"text={PACKAGE}")
    page.wait_for_url(f"**/aicenter/packages/{PACKAGE}")
    versions = page.locator("#versions tbody tr")
    assert versions.count() == 4
    trained = page.locator("#v-1\\.1")
    assert trained.locator("td.score").inner_text() == "0.8133"  # not 0.8133333333333334
    assert "1.0" in trained.inner_text() and "full" in trained.inner_text()
    assert page.locator("svg.chart circle.point.own").count() == 3  # 1.1, 1.2, 1.3 are scored; 1.0 is not
    history = page.locator("#alias-production tbody tr")
    assert history.count() == 2 and "0.8512 > 0.8133" in history.first.inner_text()
    assert history.first.locator("td.set-by").inner_text() == "ui-tests"
    assert history.last.locator("td.set-by a.run-link").get_attribute("href").endswith(quoted(ui_server.run_folder("full")))
    shots(page, "package")

    trained.locator("a.run-link").click()
    page.wait_for_url("**/aicenter/runs/**")
    assert page.locator("#status").inner_text() == "succeeded"
    assert page.locator("#score").inner_text() == "0.8133"
    assert page.locator("#new-version").inner_text() == "1.1"
    env = page.locator("#env").inner_text()
    assert "API_TOKEN" in env and "***" in env and "not-for-the-page" not in page.content()
    assert page.locator("#phases tbody tr").count() >= 3
    # two durations, each named for what it measures: the runtime's, and the task try's as Airflow recorded it
    runtime = float(page.locator("#duration").inner_text().removesuffix(" s"))
    task = float(page.locator("#task-duration").inner_text().removesuffix(" s"))
    assert 0 < runtime <= task, (runtime, task)
    files = page.locator("#artifact-list tbody tr td:first-child").all_inner_texts()
    assert files == ["metrics.txt", "plots/chart.png", "plots/loss.svg", "predictions.csv", "report.md"]
    assert "values.csv" not in page.locator("#snapshots").inner_text()  # a summary, not the listing
    assert re.search(r"data_directory\s+\S+\s+1\s+\d+", page.locator("#snapshots").inner_text())
    assert '"train_data"' in page.locator("#results-json").inner_text()
    ti_link = page.locator("#task-log").get_attribute("href")
    assert ti_link.startswith(f"/dags/{DAG_ID}/runs/") and ti_link.endswith("/tasks/full?try_number=1")
    shots(page, "run")

    page.click("a.preview:text('metrics.txt')")
    page.wait_for_url("**/preview/metrics.txt")
    assert "threshold: " in page.locator("#artifact-text").inner_text()
    shots(page, "preview-text")
    page.go_back()

    page.click("a.preview:text('predictions.csv')")
    table = page.locator("#csv-table")
    table.wait_for()  # the click starts a navigation; counting before it lands counts the run page
    assert table.locator("thead th").all_inner_texts() == ["row", "value", "positive"]
    assert table.locator("tbody tr").count() == 6
    shots(page, "preview-csv")
    page.go_back()

    page.click("a.preview:text('plots/chart.png')")
    image = page.locator("#artifact-image")
    image.wait_for()
    page.wait_for_function("document.getElementById('artifact-image').complete")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [24, 16]
    shots(page, "preview-image")

    # a download is the artifact, byte for byte
    href = page.locator("a.download").get_attribute("href")
    body = page.request.get(ui_server.url + href).body()
    assert body == ui_server.store.get_bytes(f"runs/{ui_server.run_folder('full')}/artifacts/plots/chart.png")


def test_ml_packages_in_the_airflow_navigation(signed_in, ui_server, shots):
    page = signed_in
    page.goto("/")
    entry = page.locator("a[href$='plugin/ml-packages'], a[title='ML Packages'], [aria-label='ML Packages']").first
    entry.wait_for(timeout=60_000)
    entry.click()
    page.wait_for_url("**/plugin/ml-packages**")
    frame = page.frame_locator("iframe[title='ML Packages']")
    frame.locator("#packages").wait_for(timeout=60_000)
    assert PACKAGE in frame.locator("#packages").inner_text()
    shots(page, "nav")


def extra_links(ui_server, task: str) -> dict[str, str]:
    response = ui_server.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(ui_server.run_id, safe='')}/taskInstances/{task}/links",
                             "admin")
    assert response.status_code == 200, response.text
    return response.json()["extra_links"]


def test_extra_links_lead_to_the_run_page_for_success_and_failure(signed_in, ui_server, shots):
    for task in ("full", "broken"):
        links = extra_links(ui_server, task)
        assert links == {  # inside Airflow's shell: the external view's route, with the page in its frame
            "AI Center run": f"/plugin/ml-packages/aicenter/runs/{quoted(ui_server.run_folder(task))}",
            "AI Center artifacts": f"/plugin/ml-packages/aicenter/runs/{quoted(ui_server.run_folder(task))}#artifacts",
        }
    # computed from the task instance key: no XCom is read, so a failed task logs no "XCom not found" beside its cause
    assert "failed on purpose" in ui_server.dag_log and "XCom not found" not in ui_server.dag_log
    page = signed_in
    # from the task instance's Details in the Airflow UI, one click to the failed run's page
    page.goto(f"/dags/{DAG_ID}/runs/{quote(ui_server.run_id, safe='')}/tasks/broken/details")
    link = page.get_by_role("link", name="AI Center run")
    link.wait_for(timeout=60_000)
    shots(page, "task-instance")
    link.click()
    page.wait_for_url("**/plugin/ml-packages/aicenter/runs/**/broken/1")
    frame = page.frame_locator("iframe[title='ML Packages']")  # Airflow's navigation stays around the page
    frame.locator("#status").wait_for(timeout=60_000)
    assert frame.locator("#status").inner_text() == "failed"
    assert "failed on purpose" in frame.locator("#cause").inner_text()
    assert not frame.locator("header.top .brand").is_visible()  # no second header inside Airflow's frame
    shots(page, "failed-run")


def test_compare_runs_side_by_side(signed_in, ui_server, shots):
    page = signed_in
    page.goto(f"/aicenter/compare?run={quote(ui_server.run_folder('full'), safe='')}"
              f"&run={quote(ui_server.run_folder('broken'), safe='')}")
    rows = {r.get_attribute("data-field"): r for r in page.locator("#compare tbody tr").all()}
    assert {"status", "version", "new_version", "dataset", "snapshot", "score", "env.API_TOKEN", "env.FAIL_IN"} <= set(rows)
    assert rows["status"].locator("td").all_inner_texts() == ["succeeded", "failed"]
    assert rows["score"].locator("td").first.inner_text() == "0.8133"
    assert "1 files" in rows["snapshot"].locator("td").first.inner_text()
    assert "differs" in rows["status"].get_attribute("class")
    page.check("#only-differences")
    assert not rows["package"].is_visible() and rows["status"].is_visible()
    shots(page, "compare")


def test_the_same_run_page_on_an_s3_store(signed_in, ui_server, s3_server, shots):
    bucket = s3_server.create_bucket()
    s3 = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    for info in ui_server.store.list(""):
        s3.put_bytes(info.key, ui_server.store.get_bytes(info.key))
    ui_server.add_connection({"connection_id": "aws_moto", "conn_type": "aws", "login": "testing",
                              "password": "testing-secret",
                              "extra": f'{{"endpoint_url": "{s3_server.endpoint}", "region_name": "us-east-1"}}'})
    ui_server.set_store({"storage": s3.uri, "aws_conn_id": "aws_moto"})
    try:
        page = signed_in
        page.goto(f"/aicenter/runs/{quoted(ui_server.run_folder('full'))}")
        assert s3.uri in page.locator("footer").inner_text()
        assert page.locator("#status").inner_text() == "succeeded" and page.locator("#score").inner_text() == "0.8133"
        assert page.locator("#artifact-list tbody tr").count() == 5
        shots(page, "s3-run")
        page.click("a.preview:text('plots/chart.png')")
        page.locator("#artifact-image").wait_for()  # the preview page has loaded
        page.wait_for_function("document.getElementById('artifact-image').complete")
        assert page.locator("#artifact-image").evaluate("img => img.naturalWidth") == 24
        # a change in the S3 store shows: the page reads the store, not a copy
        s3.put_bytes(f"runs/{ui_server.run_folder('full')}/artifacts/extra.txt", b"only on s3")
        page.goto(f"/aicenter/runs/{quoted(ui_server.run_folder('full'))}/preview/extra.txt")
        assert page.locator("#artifact-text").inner_text() == "only on s3"
    finally:
        ui_server.set_store({"storage": ui_server.store.uri})
    # static files (CSS, JS, the nav icon) need no sign-in; they hold no data
    assert httpx.get(f"{ui_server.url}/aicenter/static/aicenter.css", timeout=30).status_code == 200


def test_the_providers_page_links_to_documentation_that_exists(ui_server, signed_in, shots):
    providers = ui_server.get("/api/v2/providers", "viewer").json()["providers"]
    [ours] = [p for p in providers if p["package_name"] == "airflow-aicenter"]
    # The UI opens documentation_url relative to itself (else it makes up an airflow.apache.org URL that does not exist)
    assert ours["documentation_url"] == "aicenter/docs/"
    index = httpx.get(f"{ui_server.url}/{ours['documentation_url']}", timeout=30)
    assert index.status_code == 200 and "ui.md" in index.text
    page = signed_in
    page.goto("/providers")
    link = page.locator("a[aria-label='airflow-aicenter']")
    link.wait_for(timeout=60_000)
    with page.context.expect_page() as opened:
        link.click()
    docs = opened.value
    docs.wait_for_load_state()
    assert docs.url == f"{ui_server.url}/aicenter/docs/"
    docs.click("text=The AI Center pages in the Airflow UI")
    assert "From a task to its run" in docs.locator("#doc").inner_text()
    shots(docs, "docs")
    docs.close()
    # only documents of docs/ are served, and their raw HTML is escaped
    for bad in ("..%2Fpyproject.toml", "%2e%2e%2FREADME.md", "missing.md", "ui.txt"):
        assert httpx.get(f"{ui_server.url}/aicenter/docs/{bad}", timeout=30).status_code == 404, bad
