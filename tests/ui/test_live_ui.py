"""The runs list, a failed run's last output, a run page that follows a training live, and Airflow's look.

A real api-server and Debian's Chromium (tests/ui/conftest.py). Screenshots of each page are kept
under test-output/screenshots/ (their paths are printed).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from urllib.parse import quote

import pytest

from airflow_aicenter.records import RunSpec
from tests.conftest import RuntimeSpawner
from tests.ui.conftest import DAG_ID, PACKAGE, off_loop

pytestmark = pytest.mark.airflow


def quoted(run_id: str) -> str:
    return "/".join(quote(p, safe="") for p in run_id.split("/"))


def test_a_failed_run_is_found_from_the_runs_list_and_shows_its_last_output(signed_in, ui_server, shots):
    page = signed_in
    page.goto("/aicenter/runs")
    rows = page.locator("#runs tbody tr.run")
    assert rows.count() >= 2
    failed = page.locator(f"#runs tr.run[data-run='{ui_server.run_folder('broken')}']")
    assert failed.locator(".status").inner_text() == "failed"
    assert "failed on purpose" in failed.locator("td.cause").inner_text()
    shots(page, "runs")
    page.select_option("select[name=status]", "failed")
    page.click("#run-filters button[type=submit]")
    page.wait_for_url("**/aicenter/runs?status=failed**")
    assert [r.get_attribute("data-run") for r in page.locator("#runs tr.run").all()] == [ui_server.run_folder("broken")]
    shots(page, "runs-failed")
    page.click("#runs tr.run a.run-link")
    page.wait_for_url("**/aicenter/runs/**/broken/1")
    assert "failed on purpose" in page.locator("#cause").inner_text()
    output = page.locator("#output").inner_text()
    assert "training on" in output and "RuntimeError: train failed on purpose" in output  # the user's output and traceback
    assert page.locator("#task-log").get_attribute("target") == "_top"
    shots(page, "failed-run-output")


def _start_slow_training(ui_server, tmp_path, run_prefix: str, epochs: int, seconds: float):
    from airflow_aicenter.registry import Registry

    base = off_loop(Registry(ui_server.store).resolve, PACKAGE, "1.0")
    spec = RunSpec(pipeline="train", storage=ui_server.store.uri, run_prefix=run_prefix, package=PACKAGE, version="1.0",
                   blob=base.blob, dataset=(ui_server.home / "dataset").as_uri(), progress_interval=0.5,
                   env={"SLOW_EPOCHS": str(epochs), "EPOCH_SECONDS": str(seconds)})
    spawner = RuntimeSpawner(tmp_path / "specs")
    return spawner, spawner.start(spec, {"SLOW_EPOCHS": str(epochs)})


def test_a_run_page_follows_a_training_while_it_reports_progress(signed_in, ui_server, tmp_path, shots):
    run_id = f"{DAG_ID}/manual__live/train/1"
    spawner, process = _start_slow_training(ui_server, tmp_path, f"runs/{run_id}", epochs=12, seconds=1.0)
    try:
        page = signed_in
        deadline = time.monotonic() + 60
        while not ui_server.store.exists(f"runs/{run_id}/progress.json"):  # the first report is written
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.3)
        page.goto(f"/aicenter/runs/{quoted(run_id)}")
        assert page.locator("#status").inner_text() == "running"
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads
        first = page.locator("#progress-percent").inner_text()
        shots(page, "live-run-start")
        # the page's progress changes without a reload, as the training reports
        page.wait_for_function(f"document.getElementById('progress-percent').textContent !== {first!r}", timeout=30_000)
        assert page.evaluate("window.__sameDocument") is True
        assert page.locator("#charts svg.chart.metrics").count() == 2  # loss and accuracy, redrawn from the JSON
        step = page.locator("#progress-step").inner_text()
        assert step.startswith("step ") and step.endswith("/12")
        shots(page, "live-run-progress")
        # when the run ends the page shows the final record
        page.wait_for_function("document.getElementById('status') && document.getElementById('status').textContent === 'succeeded'",
                               timeout=90_000)
        assert page.locator("#progress-percent").inner_text() == "100%"
        shots(page, "live-run-done")
    finally:
        spawner.close()


def test_the_pages_follow_airflows_dark_theme_and_time_zone(admin_context, ui_server, shots):
    page = admin_context.new_page()
    try:
        # Airflow's UI keeps the choice in localStorage ("theme"; "timezone" as JSON), same origin as the pages
        page.goto("/aicenter/runs")
        page.evaluate("localStorage.setItem('theme', 'dark'); localStorage.setItem('timezone', JSON.stringify('Asia/Tokyo'))")
        page.goto(f"/aicenter/runs/{quoted(ui_server.run_folder('full'))}")
        assert page.evaluate("document.documentElement.classList.contains('dark')")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(0, 0, 0)", background
        started = page.locator("#summary time").first
        assert started.get_attribute("data-zone") == "Asia/Tokyo"
        utc = datetime.fromisoformat(started.get_attribute("datetime"))
        shown = started.inner_text()  # one format, in the zone the user chose in Airflow
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+", shown), shown
        assert shown[:16] == (utc + timedelta(hours=9)).strftime("%Y-%m-%d %H:%M"), (shown, utc)
        font = page.evaluate("getComputedStyle(document.body).fontFamily")
        assert font.startswith("Inter"), font
        shots(page, "dark-run")
        # inside Airflow's shell, framed: no second header, and the frame follows Airflow's own theme class
        page.goto(f"/plugin/ml-packages/aicenter/runs/{quoted(ui_server.run_folder('full'))}")
        frame = page.frame_locator("iframe[title='ML Packages']")
        frame.locator("#status").wait_for(timeout=60_000)
        assert frame.locator("html").evaluate("el => el.classList.contains('framed')")
        assert not frame.locator("header.top .brand").is_visible()
        assert frame.locator("html").evaluate("el => el.classList.contains('dark')")
        page.evaluate("document.documentElement.classList.replace('dark', 'light')")  # the user switches in Airflow
        page.wait_for_function("() => !document.querySelector(\"iframe[title='ML Packages']\").contentDocument"
                               ".documentElement.classList.contains('dark')", timeout=10_000)
        page.evaluate("localStorage.setItem('theme', 'dark')")
        page.reload()
        frame.locator("#status").wait_for(timeout=60_000)
        shots(page, "dark-framed-run")
        page.goto("/plugin/ml-packages/aicenter/runs")
        frame.locator("#runs").wait_for(timeout=60_000)
        shots(page, "dark-framed-runs")
        page.goto(f"/plugin/ml-packages/aicenter/packages/{PACKAGE}")
        frame.locator("#versions").wait_for(timeout=60_000)
        shots(page, "dark-framed-package")
    finally:
        page.evaluate("localStorage.removeItem('theme'); localStorage.removeItem('timezone')")
        page.close()


def test_markdown_is_rendered_and_svg_shown_as_an_image_with_no_script_run(signed_in, ui_server, shots):
    page = signed_in
    page.goto(f"/aicenter/runs/{quoted(ui_server.run_folder('full'))}")
    page.click("a.preview:text('report.md')")
    doc = page.locator("#artifact-markdown")
    assert doc.locator("h1").inner_text() == "Training report"
    assert doc.locator("table tbody tr").count() == 6  # a Markdown table, rendered
    assert "<script>" in doc.inner_text()  # raw HTML shown as text, never run
    assert doc.locator("a").count() == 0  # the javascript: link stays text
    assert page.evaluate("window.__markdownScript === undefined && window.__markdownLink === undefined")
    shots(page, "preview-markdown")
    page.go_back()
    page.click("a.preview:text('plots/loss.svg')")
    image = page.locator("#artifact-image")
    image.wait_for()
    page.wait_for_function("document.getElementById('artifact-image').complete")
    assert image.evaluate("img => img.naturalWidth") == 120
    assert page.locator("svg polyline").count() == 0  # an image, not inline markup
    assert page.evaluate("window.__svgScript === undefined")
    shots(page, "preview-svg")


def test_a_batch_runs_predictions_are_listed_on_its_page(signed_in, ui_server, shots):
    page = signed_in
    page.goto(f"/aicenter/runs/{quoted(ui_server.run_folder('score'))}")
    assert page.locator("#status").inner_text() == "succeeded"
    inputs = page.locator("#inputs").inner_text()
    assert "Inference data" in inputs and "Training data" not in inputs
    assert page.locator("#new-version").count() == 0 and page.locator("#score").count() == 0  # a prediction makes neither
    assert page.locator("#predicted").inner_text() == "3 (1 failed)"
    rows = page.locator("#predictions tbody tr")
    assert rows.count() == 4
    assert '"positive": true' in rows.nth(1).inner_text().replace("\\", "")
    assert "not a number" in rows.nth(2).inner_text() or "could not convert" in rows.nth(2).inner_text()
    shots(page, "predict-run")
