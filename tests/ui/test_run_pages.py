"""The runs list, a run page of every pipeline, live progress, previews and the package page: the app in process.

The real routes, templates and store reads over a file and an S3 store (the ``pages`` fixture);
``alice`` reads the DAG ``team_a`` only. Browser behaviour (theme, live refresh) is in test_live_ui.py.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

from tests.ui.stores import OURS, OUTPUT_TAIL, PACKAGE, THEIRS, runs_of_every_kind


def quoted(run_id: str) -> str:
    return "/".join(quote(p, safe="") for p in run_id.split("/"))


def rows(text: str) -> list[str]:
    """The run ids the runs list shows, in order."""
    return re.findall(r'<tr class="run" data-run="([^"]+)"', text)


def test_the_runs_list_shows_every_readable_run_newest_first_with_filters_and_pages(pages):
    kinds = runs_of_every_kind(pages.store)
    page = pages.get("/runs")
    assert page.status_code == 200, page.text[-2000:]
    newest_first = [kinds.running, kinds.predict, kinds.evaluate, kinds.failed, kinds.train]
    assert rows(page.text) == newest_first
    assert "team-b-secret" not in page.text and THEIRS not in page.text  # not in rows, not in the DAG filter
    assert f'href="/aicenter/runs/{quoted(kinds.failed)}"' in page.text
    assert page.text.count('class="status status-failed"') == 1
    # filters: status, DAG, package, pipeline, and together
    assert rows(pages.get("/runs?status=failed").text) == [kinds.failed]
    assert rows(pages.get("/runs?pipeline=predict").text) == [kinds.predict]
    assert rows(pages.get(f"/runs?package={PACKAGE}&status=succeeded").text) == [kinds.predict, kinds.evaluate, kinds.train]
    assert rows(pages.get(f"/runs?dag={OURS}").text) == newest_first
    assert rows(pages.get("/runs?package=other").text) == []
    # another team's DAG, asked for by name: no rows and nothing of it, as for a DAG that has no runs
    theirs = pages.get(f"/runs?dag={THEIRS}")
    assert theirs.status_code == 200 and rows(theirs.text) == [] and "team-b-secret" not in theirs.text
    # pages of 2: three pages, links keep the filters
    first = pages.get(f"/runs?per_page=2&package={PACKAGE}")
    assert rows(first.text) == newest_first[:2] and "Page 1 of 3" in first.text
    assert f'href="/aicenter/runs?package={PACKAGE}&amp;per_page=2&amp;page=2"' in first.text
    assert rows(pages.get("/runs?per_page=2&page=3").text) == newest_first[4:]
    # the admin reads every DAG
    assert kinds.theirs in rows(pages.get("/runs", "admin").text)
    # bad filters say what to use
    bad = pages.get("/runs?status=done", html=False)
    assert bad.status_code == 400 and "running, succeeded, failed, killed, skipped" in bad.json()["detail"]
    for query in ("page=0", "per_page=0", "per_page=1000"):
        assert pages.get(f"/runs?{query}", html=False).status_code == 422, query
    # the packages page and every page's navigation lead to it
    assert 'href="/aicenter/runs"' in pages.get("/").text


def test_a_failed_run_shows_its_cause_and_the_last_lines_of_its_output(pages):
    kinds = runs_of_every_kind(pages.store)
    page = pages.get(f"/runs/{quoted(kinds.failed)}")
    assert page.status_code == 200, page.text[-2000:]
    assert "column &#39;age&#39; is missing" in page.text
    output = re.search(r'<pre class="output" id="output">(.*?)</pre>', page.text, re.S)
    assert output, page.text[-3000:]
    assert html.unescape(output.group(1)).splitlines() == OUTPUT_TAIL
    assert "<b>column" not in page.text  # the user's output is text, never markup
    # another team's failed run: refused, and nothing of its output leaks
    refused = pages.get(f"/runs/{quoted(kinds.theirs)}")
    assert refused.status_code == 403 and "team-b-secret" not in refused.text


def dd(text: str, label: str) -> str | None:
    """The value of a ``<dt>label</dt><dd>..</dd>`` pair, tags removed; None when the page has no such row."""
    found = re.search(rf"<dt>{re.escape(label)}</dt>\s*<dd[^>]*>(.*?)</dd>", text, re.S)
    return None if found is None else re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html.unescape(found.group(1)))).strip()


def test_a_run_page_shows_who_what_and_only_the_inputs_of_its_pipeline(pages):
    kinds = runs_of_every_kind(pages.store)
    train = pages.get(f"/runs/{quoted(kinds.train)}").text
    assert dd(train, "Triggered by") == "ada"
    assert dd(train, "Package") == f"{PACKAGE} 1.3 (asked for latest)"  # the resolved version, not "latest"
    assert dd(train, "New version") == "1.4"
    assert dd(train, "Training data") == "s3://team-a-data/train"
    assert dd(train, "Score") is None and dd(train, "Dataset") is None  # a train run scores nothing
    assert dd(train, "Runtime duration") == "30.0 s"
    assert "Duration" not in re.findall(r"<dt>([^<]*)</dt>", train)  # never an unlabelled duration
    # links to the DAG run and the task's log in Airflow's UI, opened in Airflow's own window
    assert 'id="dag-run" href="/dags/team_a/runs/manual__ada" target="_top"' in train
    assert 'id="task-log" href="/dags/team_a/runs/manual__ada/tasks/train?try_number=1" target="_top"' in train
    # resources and cost
    assert dd(train, "CPU time") == "0.6 s" and dd(train, "Peak memory") == "50.0 MiB"
    assert dd(train, "Cost") == "0.0123"
    # env masked
    assert "API_TOKEN" in train and "***" in train
    evaluate = pages.get(f"/runs/{quoted(kinds.evaluate)}").text
    assert dd(evaluate, "Evaluation data") == "s3://team-a-data/holdout" and dd(evaluate, "Score") == "0.8000"
    assert dd(evaluate, "Training data") is None and dd(evaluate, "Dataset") is None and dd(evaluate, "New version") is None
    assert dd(evaluate, "Triggered by") == "schedule"
    assert dd(evaluate, "Package") == f"{PACKAGE} 1.4 (asked for production)"
    predict = pages.get(f"/runs/{quoted(kinds.predict)}").text
    assert dd(predict, "Inference data") == "s3://team-a-data/inbox"
    assert dd(predict, "New version") is None and dd(predict, "Score") is None and dd(predict, "Training data") is None
    assert dd(predict, "Predicted") == "2 (1 failed)"
    # a batch run's predictions, listed
    table = re.search(r'<table class="grid" id="predictions">(.*?)</table>', predict, re.S)
    assert table, predict[-3000:]
    assert "0.91" in table.group(1) and "ValueError: bad input" in table.group(1) and "batch.jsonl" in table.group(1)


def test_live_progress_json_and_charts(pages):
    kinds = runs_of_every_kind(pages.store)
    page = pages.get(f"/runs/{quoted(kinds.running)}").text
    assert 'id="progress"' in page and "40%" in page and 'data-live="/aicenter/runs/' in page
    assert 'class="chart metrics"' in page  # a chart drawn on the server, redrawn by the script while it runs
    live = pages.get(f"/runs/{quoted(kinds.running)}/live", html=False)
    assert live.status_code == 200, live.text
    data = live.json()
    assert data["status"] == "running" and data["ended"] is False
    assert data["progress"]["percent"] == 40.0 and data["progress"]["step"] == 40 and data["progress"]["eta_seconds"] == 90
    assert [p[0] for p in data["series"]["loss"]] == [10, 20, 30, 40]
    assert data["x"] == "step"
    done = pages.get(f"/runs/{quoted(kinds.train)}/live", html=False).json()
    assert done["ended"] is True and set(done["series"]) == {"loss", "accuracy"}
    assert done["resources"]["cpu_seconds"] == 0.6
    # another team's run: refused; a run that does not exist: 404
    assert pages.get(f"/runs/{quoted(kinds.theirs)}/live", html=False).status_code == 403
    assert pages.get(f"/runs/{OURS}/nope/train/1/live", html=False).status_code == 404


def test_a_damaged_metrics_history_is_skipped_line_by_line(pages):
    kinds = runs_of_every_kind(pages.store)
    from airflow_aicenter import layout

    path = layout.RunPath.parse(kinds.running)
    pages.store.put_bytes(path.key(layout.METRICS), b'not json\n[1]\n{"step": "x", "metrics": 5}\n'
                          b'{"step": 1, "metrics": {"loss": "NaN", "acc": 1e400}}\n{"step": 2, "metrics": {"loss": 0.5}}\n'
                          + b"x" * 5_000_000)
    pages.store.put_bytes(path.key(layout.PROGRESS), b"{ damaged")
    live = pages.get(f"/runs/{quoted(kinds.running)}/live", html=False)
    assert live.status_code == 200, live.text
    assert live.json()["series"] == {"loss": [[2, 0.5]]} and live.json()["progress"] is None
    page = pages.get(f"/runs/{quoted(kinds.running)}")
    assert page.status_code == 200 and f"damaged record {path.key(layout.PROGRESS)}" in page.text


def test_markdown_is_rendered_and_sanitised_and_svg_is_an_image(pages):
    kinds = runs_of_every_kind(pages.store)
    run = quoted(kinds.train)
    listing = pages.get(f"/runs/{run}").text
    assert f'href="/aicenter/runs/{run}/preview/report.md"' in listing
    assert f'href="/aicenter/runs/{run}/preview/loss.svg"' in listing
    md = pages.get(f"/runs/{run}/preview/report.md").text
    doc = re.search(r'<article class="markdown" id="artifact-markdown">(.*?)</article>', md, re.S)
    assert doc, md[-3000:]
    assert "<h1>Report</h1>" in doc.group(1) and "<strong>0.88</strong>" in doc.group(1)
    assert "<script>" not in doc.group(1) and "&lt;script&gt;" in doc.group(1)  # raw HTML is text
    assert "javascript:" not in doc.group(1).replace("[click](javascript:alert(2))", "")  # not a link
    assert 'href="https://example.com/docs"' in doc.group(1)
    svg = pages.get(f"/runs/{run}/preview/loss.svg").text
    assert f'<img class="artifact" id="artifact-image" alt="loss.svg" src="/aicenter/runs/{run}/artifacts/loss.svg?inline=true">' in svg
    assert "<rect" not in svg and "alert(3)" not in svg  # never inline markup
    image = pages.get(f"/runs/{run}/artifacts/loss.svg?inline=true", html=False)
    assert image.headers["content-type"] == "image/svg+xml"
    assert image.headers["content-disposition"].startswith("inline")
    policy = image.headers["content-security-policy"]
    assert "sandbox" in policy and "script-src" not in policy.replace("script-src 'none'", "") and "default-src 'none'" in policy
    assert pages.get(f"/runs/{run}/artifacts/loss.svg", html=False).headers["content-disposition"].startswith("attachment")


def test_the_package_page_tells_own_scores_from_evaluations_and_shows_who_and_what_it_cost(pages):
    kinds = runs_of_every_kind(pages.store)
    page = pages.get(f"/packages/{PACKAGE}").text
    row = re.search(r'<tr id="v-1.4">(.*?)</tr>', page, re.S)
    assert row, page[-3000:]
    cells = row.group(1)
    assert "ada" in cells and "0.0123" in cells  # who triggered it, what it cost
    # the evaluation chip links to the evaluation's run page; the snapshot to the run's snapshots
    assert f'href="/aicenter/runs/{quoted(kinds.evaluate)}"' in cells
    assert f'href="/aicenter/runs/{quoted(kinds.train)}#snapshots"' in cells
    chart = re.search(r'<svg class="chart".*?</svg>', page, re.S)
    assert chart, page[-3000:]
    assert chart.group(0).count('class="point own"') == 3 and chart.group(0).count('class="point evaluation"') == 1
    assert "Own score" in page and "Evaluation" in page  # the legend


def test_every_time_is_one_format_in_a_time_element(pages):
    kinds = runs_of_every_kind(pages.store)
    for path in ("/runs", f"/runs/{quoted(kinds.train)}", f"/packages/{PACKAGE}"):
        text = pages.get(path).text
        times = re.findall(r'<time datetime="([^"]+)"[^>]*>([^<]*)</time>', text)
        assert times, path
        for iso, shown in times:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", shown), (path, shown)
            assert iso.endswith("+00:00"), iso
        # no other spelling of a time outside <time> elements (an ISO string, a bare timestamp)
        outside = re.sub(r"<time[^>]*>[^<]*</time>", "", text)
        outside = re.sub(r'<pre class="json".*?</pre>', "", outside, flags=re.S)
        assert not re.search(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d", outside), (path, re.findall(r".{40}\d{4}-\d\d-\d\d[T ]\d\d:\d\d.{20}", outside))


def test_pages_in_airflow_frame_follow_its_theme_and_time_zone(pages):
    text = pages.get("/runs").text
    # the look is set before the first paint, from Airflow's own settings (the parent frame, localStorage)
    head = text.split("</head>")[0]
    assert re.search(r'<script src="/aicenter/static/theme.js"></script>', head)
    assert 'class="top"' in text  # the header shown outside Airflow; hidden inside its frame (theme.js)


def test_the_compare_page_writes_times_as_every_page_does(pages):
    kinds = runs_of_every_kind(pages.store)
    text = pages.get(f"/compare?run={quote(kinds.train, safe='')}&run={quote(kinds.evaluate, safe='')}").text
    row = re.search(r'<tr class="[a-z]+" data-field="start">(.*?)</tr>', text, re.S)
    assert row, text[-3000:]
    shown = re.findall(r'<time datetime="[^"]+\+00:00">([^<]*)</time>', row.group(1))
    assert len(shown) == 2 and all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", s) for s in shown), row.group(1)


def test_the_packages_page_shows_each_packages_last_readable_run(pages):
    kinds = runs_of_every_kind(pages.store)
    row = re.search(rf'<tr>\s*<td><a href="/aicenter/packages/{PACKAGE}">.*?</tr>', pages.get("/").text, re.S)
    assert row, pages.get("/").text[-3000:]
    assert f'href="/aicenter/runs/{quoted(kinds.running)}"' in row.group(0) and "status-running" in row.group(0)
    # a user who reads no DAG is shown no run
    nobody = pages.get("/", "nobody").text
    assert "/aicenter/runs/" not in nobody.replace('href="/aicenter/runs"', "")
