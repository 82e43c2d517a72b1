"""The AI Center pages in the real api-server with a hostile and damaged store: no leak across DAGs, no 500.

The access decisions here are SimpleAuthManager's own (``viewer`` reads every DAG, ``nobody``
none); tests/ui/test_leaks.py checks a user who reads one DAG of two, in process.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest

from airflow_aicenter import layout
from airflow_aicenter.storage import open_store
from tests.ui.conftest import DAG_ID, off_loop
from tests.ui.stores import PACKAGE, damage, two_teams

pytestmark = pytest.mark.airflow


def quoted(run_id: str) -> str:
    return "/".join(quote(p, safe="") for p in run_id.split("/"))


def test_compare_names_no_run_of_a_dag_the_user_cannot_read(ui_server):
    html = {"Accept": "text/html"}
    # "1" is the try of both tasks of the seeded DAG run; "full" its task: parts of ids nobody may read
    for ref in ("1", "full", ui_server.run_id):
        for headers in (html, {"Accept": "application/json"}):
            response = ui_server.get(f"/aicenter/compare?run={quote(ref, safe='')}", "nobody", headers=headers)
            assert response.status_code == 404, (ref, response.status_code, response.text[-1000:])
            assert DAG_ID not in response.text and "broken" not in response.text
            if ref != ui_server.run_id:
                assert ui_server.run_id not in response.text
    # the viewer may read the DAG: the same parts resolve or are ambiguous among its runs
    ambiguous = ui_server.get("/aicenter/compare?run=1", "viewer")
    assert ambiguous.status_code == 404 and ui_server.run_folder("full") in ambiguous.json()["detail"]
    assert ui_server.get("/aicenter/compare?run=full", "viewer", headers=html).status_code == 200


def test_a_damaged_and_hostile_store_browses_without_a_server_error_or_a_leak(ui_server, signed_in, tmp_path, shots):
    root = tmp_path / "damaged-store"
    store = open_store(root.as_uri())
    teams = off_loop(two_teams, store)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    damaged = off_loop(damage, store, scratch, teams)
    runs = [teams.ours, *teams.theirs, damaged["outcome"], damaged["results_garbage"], damaged["results_list"],
            damaged["results_shapes"], damaged["manifest"], damaged["registration"]]
    pages = ["/aicenter/", f"/aicenter/packages/{PACKAGE}", "/aicenter/packages/otherpkg", "/aicenter/compare?run=1",
             "/aicenter/compare?run=manual", f"/aicenter/compare?run={quote(teams.ours, safe='')}"]
    pages += [f"/aicenter/runs/{quoted(r)}" for r in runs]
    pages += [f"/aicenter/runs/{quoted(teams.ours)}/preview/{name}" for name in ("ok.csv", "big.csv", "wide.csv", "notes.txt")]
    ui_server.set_store({"storage": store.uri})
    try:
        for path in pages:
            for user in ("viewer", "nobody"):
                for accept in ("text/html", "application/json"):
                    response = ui_server.get(path, user, headers={"Accept": accept})
                    assert response.status_code != 500, (path, user, response.text[-2000:])
                    assert "Traceback" not in response.text, (path, user)
                    # another DAG's manifest is never read for a run's page, whoever asks
                    assert "team-b-secret" not in response.text or "/team_b/" in path, (path, user)
                    if user == "nobody":
                        assert "team_a/" not in response.text and "team_b/" not in response.text, (path, response.text)
        own = ui_server.get(f"/aicenter/runs/{quoted(teams.ours)}", "viewer").text
        assert own.count("refused: not in this run&#39;s folder") == 2 and "s3://team-a-data/train" in own
        big = ui_server.get(f"/aicenter/runs/{quoted(teams.ours)}/preview/big.csv", "viewer").text
        assert "preview unavailable: a field is larger than 128 KiB" in big
        outcome = layout.RunPath.parse(damaged["outcome"]).key(layout.OUTCOME)
        assert f"damaged record {outcome}" in ui_server.get(f"/aicenter/runs/{quoted(damaged['outcome'])}", "viewer").text
        # in the browser: the package page names its damaged records and shows the rest
        page = signed_in
        page.goto(f"/aicenter/packages/{PACKAGE}")
        listed = page.locator("#damaged li").all_inner_texts()
        assert any(damaged["alias"] in item for item in listed) and any(damaged["version record"] in item for item in listed)
        assert page.locator("#versions tbody tr").count() == 3
        shots(page, "damaged-package")
        page.goto("/aicenter/")
        assert damaged["alias"] in page.locator("#packages").inner_text()
        shots(page, "damaged-packages")
    finally:
        ui_server.set_store({"storage": ui_server.store.uri})
