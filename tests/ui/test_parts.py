"""The parts of the AI Center pages that need no server: links, artifact paths, chart, connection test."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from airflow_aicenter import layout
from airflow_aicenter.operators.links import VIEW_ROUTE, ArtifactsLink, ResultsLink, run_page_url
from airflow_aicenter.plugins import AICenterPlugin, pages
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.conftest import EXAMPLE_PACKAGE
from tests.ui.conftest import off_loop


def key(**kw):
    return SimpleNamespace(**{"dag_id": "d", "run_id": "manual__2026-01-01T00:00:00+00:00", "task_id": "train",
                              "map_index": -1, "try_number": 2, **kw})


def test_links_are_same_origin_need_no_xcom_and_stay_in_airflows_shell(monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    page = "/aicenter/runs/d/manual__2026-01-01T00%3A00%3A00%2B00%3A00/train/2"
    assert run_page_url(key()) == page  # the page itself (event extras, messages)
    # the extra links open it inside Airflow's shell: the external view's route, with the page in its frame
    url = ResultsLink().get_link(None, ti_key=key())  # type: ignore[arg-type]
    assert url == f"/plugin/ml-packages{page}"
    assert ArtifactsLink().get_link(None, ti_key=key()) == url + "#artifacts"  # type: ignore[arg-type]
    [view] = AICenterPlugin.external_views
    assert view["url_route"] == VIEW_ROUTE
    # a mapped task instance's folder is <task>~<index>, as the layout names it
    mapped = run_page_url(key(map_index=3))
    assert mapped.endswith("/train~3/2")
    assert layout.RunPath.parse(mapped.removeprefix("/aicenter/runs/").replace("%3A", ":").replace("%2B", "+")).map_index == 3
    # behind a proxy: under [api] base_url, still http(s); the frame's path keeps the proxy path too
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team/")
    assert run_page_url(key()).startswith("https://airflow.example.com/team/aicenter/runs/d/")
    assert ResultsLink().get_link(None, ti_key=key()) == f"https://airflow.example.com/team/plugin/ml-packages/team{page}"  # type: ignore[arg-type]
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "airflow.example.com")  # not http(s): a root-relative path instead
    assert run_page_url(key()).startswith("/aicenter/runs/")


@pytest.mark.parametrize("bad", ["../outcome.json", "a/../../x", "/etc/passwd", "a\\..\\b", "./a", "a//b", "", "dir/", "a\x00b"])
def test_artifact_paths_outside_the_artifacts_folder_are_refused(bad):
    path = layout.RunPath("d", "r", "t", -1, 1)
    with pytest.raises(layout.LayoutError, match="artifact path"):
        pages.artifact_key(path, bad)
    assert pages.artifact_key(path, "plots/chart.png") == "runs/d/r/t/1/artifacts/plots/chart.png"


@pytest.mark.parametrize("parts", [("..", "r", "t", 1), ("d", "..", "t", 1), ("d", "r", ".", 1), ("d", "r", "t", 0)])
def test_run_folders_outside_runs_are_refused(parts):
    with pytest.raises(layout.LayoutError):
        pages.run_path(*parts)


def test_artifact_kinds_never_serve_html_and_svg_only_as_an_image():
    assert [pages.artifact_kind(p) for p in ("a.txt", "b.CSV", "c.png", "d.svg", "e.html", "f.tsv", "g.md")] == [
        "text", "csv", "image", "svg", "binary", "csv", "markdown"]
    assert pages.media_type("report.html") == "application/octet-stream"
    assert pages.media_type("notes.md").startswith("text/plain")
    assert pages.media_type("loss.svg") == "image/svg+xml"  # shown by <img> only, with a policy that blocks scripts


def test_score_chart_and_rounding():
    svg = pages.score_chart(["1.0", "1.1", "1.2"], [None, 0.8133333333333334, 0.79], [[0.7, 0.75], [], []])
    assert svg.startswith("<svg") and "0.8133" in svg and "0.8133333" not in svg
    assert svg.count('class="point own"') == 2 and svg.count('class="point evaluation"') == 2  # two series
    assert "Own score" in svg and "Evaluation" in svg  # and a legend that names them
    assert pages.score_chart(["1.0"], [None], [[]]) == ""
    assert pages.score_chart(["1.0"], [0.5], [[]]).count('class="point own"') == 1  # one point: no division by zero
    assert pages.score(0.8133333333333334) == "0.8133" and pages.score(None) == ""


def test_metric_charts_escape_names_and_draw_one_chart_per_metric():
    svg = pages.metric_charts({"loss": [[1, 0.9], [2, 0.5]], "<b>acc</b>": [[1, 0.5]]}, "step")
    assert svg.count('<svg class="chart metrics"') == 2 and "<b>" not in svg and "&lt;b&gt;acc" in svg
    assert pages.metric_charts({}, "step") == ""


def test_formats_used_on_every_page():
    assert pages.seconds(0.8) == "0.8 s" and pages.seconds(192) == "3m12s" and pages.seconds(3900) == "1h05m"
    assert pages.size(52_428_800) == "50.0 MiB" and pages.size(512) == "512 B"
    assert pages.money(0.0123) == "0.0123" and pages.money(12.5) == "12.5" and pages.money(float("nan")) == ""
    assert pages.as_time(0).isoformat() == "1970-01-01T00:00:00+00:00" and pages.as_time("not a time") is None


def test_plugin_mounts_the_pages_and_adds_the_nav_entry():
    [app] = AICenterPlugin.fastapi_apps
    assert app["url_prefix"] == "/aicenter"
    [view] = AICenterPlugin.external_views
    assert view["name"] == "ML Packages" and view["href"] == "aicenter/" and not view["href"].startswith("/")


def _hook(monkeypatch, extra):
    from airflow_aicenter.hooks.aicenter import AICenterHook

    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_TEST", json.dumps({"conn_type": "aicenter", "extra": extra}))
    return AICenterHook("aicenter_test")


def test_connection_test_on_file_stores(monkeypatch, tmp_path):
    missing = tmp_path / "typo"
    ok, message = _hook(monkeypatch, {"storage": missing.as_uri()}).test_connection()
    assert not ok and "does not exist" in message and not missing.exists()  # the Test button creates nothing

    empty = tmp_path / "empty"
    empty.mkdir()
    ok, message = _hook(monkeypatch, {"storage": empty.as_uri()}).test_connection()
    assert ok and "empty" in message and "typo" in message

    other = tmp_path / "other"
    (other / "photos").mkdir(parents=True)
    ok, message = _hook(monkeypatch, {"storage": other.as_uri()}).test_connection()
    assert not ok and "photos" in message and "not an AI Center store" in message

    store = tmp_path / "store"
    off_loop(Registry(open_store(store.as_uri())).upload, EXAMPLE_PACKAGE, "churn")
    ok, message = _hook(monkeypatch, {"storage": store.as_uri()}).test_connection()
    assert ok and "1 package(s)" in message


def test_connection_test_on_s3(monkeypatch, s3_server):
    bucket = s3_server.create_bucket()
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing-secret",
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"}}))
    off_loop(Registry(open_store(f"s3://{bucket}/aicenter", s3_server.options)).upload, EXAMPLE_PACKAGE, "churn")
    ok, message = _hook(monkeypatch, {"storage": f"s3://{bucket}/aicenter", "aws_conn_id": "aws_moto"}).test_connection()
    assert ok and "1 package(s)" in message
    ok, message = _hook(monkeypatch, {"storage": f"s3://no-such-bucket-{bucket}/x", "aws_conn_id": "aws_moto"}).test_connection()
    assert not ok and "does not exist" in message


def test_the_store_of_each_page_is_opened_without_building_an_s3_client_for_the_region(monkeypatch, s3_server):
    """Every page reads the connection afresh (a changed connection shows at once); building a botocore
    client only to learn the region the connection states cost each page about a quarter of a second."""
    import botocore.session

    made: list[str] = []
    create_client = botocore.session.Session.create_client

    def counted(self, service_name, *args, **kwargs):
        made.append(service_name)
        return create_client(self, service_name, *args, **kwargs)

    bucket = s3_server.create_bucket()
    monkeypatch.setattr(botocore.session.Session, "create_client", counted)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing-secret",
        "extra": {"endpoint_url": s3_server.endpoint, "region_name": "eu-west-3"}}))
    options = _hook(monkeypatch, {"storage": f"s3://{bucket}/aicenter", "aws_conn_id": "aws_moto"}).s3_options
    assert options is not None and options.region == "eu-west-3" and options.endpoint_url == s3_server.endpoint
    assert options.access_key_id == "testing" and options.secret_access_key == "testing-secret"
    assert made == [], f"clients built to read the connection: {made}"
    # no region in the connection: the one botocore resolves (environment, config) as before
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_MOTO", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing-secret", "extra": {"endpoint_url": s3_server.endpoint}}))
    options = _hook(monkeypatch, {"storage": f"s3://{bucket}/aicenter", "aws_conn_id": "aws_moto"}).s3_options
    assert options is not None and options.region == "ap-south-1"
