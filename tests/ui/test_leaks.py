"""The AI Center pages leak nothing across DAGs and never answer 500: the app in process over a real file store.

``alice`` may read the DAG ``team_a`` only; ``team_b``'s runs, their ids and the records they
wrote must never reach her, not in a page, not in an error. Records are followed only inside
the run's own folder, previews are bounded, and a damaged record is named, not a server error.
"""

from __future__ import annotations

import os
from urllib.parse import quote

import pytest

from airflow_aicenter import layout
from airflow_aicenter.runs import RunNotFoundError, find_run
from tests.store_damage import RUN, damaged_store
from tests.ui.stores import BIG_FIELD, OURS, PACKAGE, SECRETS, THEIRS, damage, two_teams


def quoted(run_id: str) -> str:
    return "/".join(quote(p, safe="") for p in run_id.split("/"))


def assert_no_leak(response, *, allowed: tuple[str, ...] = ()) -> None:
    """Not a server error, no traceback, and nothing of team_b's (except what the request itself named)."""
    assert response.status_code < 500 or response.status_code == 502, (response.status_code, response.text[-2000:])
    assert "Traceback" not in response.text and "Internal Server Error" not in response.text, response.text[-2000:]
    for secret in SECRETS:
        if secret not in allowed:
            assert secret not in response.text, (secret, response.text[-3000:])


def test_compare_errors_name_no_run_of_an_unreadable_dag(pages):
    teams = two_teams(pages.store)
    # "1" matches the three runs of team_b (all try 1) and none of team_a's (try 2)
    for user in ("alice", "nobody"):
        for html in (True, False):
            response = pages.get("/compare?run=1", user, html=html)
            assert response.status_code == 404, response.text
            assert_no_leak(response)
            assert "no run '1'" in response.text or "no run &#39;1&#39;" in response.text
    # the same part resolves among the runs she can read: "train" names team_a's run alone for her
    response = pages.get("/compare?run=train")
    assert response.status_code == 200, response.text
    assert teams.ours in response.text
    assert_no_leak(response)
    # for the admin, who reads both DAGs, it is ambiguous, and the message lists the runs
    ambiguous = pages.get("/compare?run=1", "admin", html=False)
    assert ambiguous.status_code == 404 and "ambiguous" in ambiguous.json()["detail"]
    assert all(run_id in ambiguous.json()["detail"] for run_id in teams.theirs)
    # a full id of team_b is refused for naming the DAG the request named, whether the run exists or not
    for run_id in (teams.theirs[0], f"{THEIRS}/no_such_run/train/1"):
        refused = pages.get(f"/compare?run={quote(run_id, safe='')}", html=False)
        assert refused.status_code == 403, refused.text
        assert_no_leak(refused, allowed=(THEIRS, *run_id.split("/")))
    # mixing a readable run with an unreadable part still names nothing of team_b's
    mixed = pages.get(f"/compare?run={quote(teams.ours, safe='')}&run=scheduled")
    assert mixed.status_code == 404 and "scheduled__" not in mixed.text


def test_a_run_page_follows_no_record_outside_its_own_folder(pages):
    teams = two_teams(pages.store)
    page = pages.get(f"/runs/{quoted(teams.ours)}")
    assert page.status_code == 200, page.text
    assert_no_leak(page)
    # its own snapshot is summarised; the one naming team_b's manifest, and the one climbing out with '..', are refused
    assert "s3://team-a-data/train" in page.text
    assert page.text.count("refused: not in this run&#39;s folder") == 2, page.text
    compare = pages.get(f"/compare?run={quote(teams.ours, safe='')}")
    assert compare.status_code == 200 and "7 files" in compare.text
    assert_no_leak(compare)
    # the package page: versions made by team_b's runs do not name the run, its snapshot or its maker
    package = pages.get(f"/packages/{PACKAGE}")
    assert package.status_code == 200 and "a run of a DAG you cannot read" in package.text
    assert_no_leak(package)
    assert "team-b-bot" not in package.text and teams.ours in package.text


def test_previews_are_bounded_and_never_a_server_error(pages):
    teams = two_teams(pages.store)
    run = quoted(teams.ours)
    big = pages.get(f"/runs/{run}/preview/big.csv")
    assert big.status_code == 200, big.text[-2000:]
    assert "preview unavailable: a field is larger than" in big.text and "x" * 1000 not in big.text
    wide = pages.get(f"/runs/{run}/preview/wide.csv")
    assert wide.status_code == 200 and "c99<" in wide.text and "c100<" not in wide.text and "4900 more columns" in wide.text
    ok = pages.get(f"/runs/{run}/preview/ok.csv")
    assert ok.status_code == 200 and "<td>3</td>" in ok.text
    # the download is the whole file, byte for byte
    download = pages.get(f"/runs/{run}/artifacts/big.csv")
    assert download.status_code == 200 and len(download.content) > BIG_FIELD


def test_a_store_with_one_of_each_damage_browses_without_a_server_error_or_a_leak(pages, tmp_path):
    teams = two_teams(pages.store)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    damaged = damage(pages.store, scratch, teams)
    if pages.root is not None:  # a link planted in the file store's run folder, pointing outside the store
        secret_file = tmp_path / "outside.txt"
        secret_file.write_text("team-b-secret outside the store")
        link = pages.root / layout.RunPath.parse(teams.ours).key("artifacts/link.txt")
        link.symlink_to(secret_file)
        os.mkfifo(link.with_name("pipe.txt"))  # reading a FIFO would block a server thread for good

    seen: dict[str, str] = {}

    def browse(path: str, user: str = "alice") -> str:
        for html in (True, False):
            response = pages.get(path, user, html=html)
            assert_no_leak(response)
            if html:
                seen[path] = response.text
        return seen[path]

    index = browse("/")
    assert "otherpkg" in index and PACKAGE in index
    assert f"damaged record {layout.alias_key(PACKAGE, 'staging', 0)}" in index
    package = browse(f"/packages/{PACKAGE}")
    for what in ("version record", "version record of another shape", "version record naming a run outside the layout",
                 "version record with another version", "alias", "alias history entry", "evaluation"):
        assert f"damaged record {damaged[what]}" in package, (what, package[-4000:])
    assert 'id="v-1.0"' in package and 'id="v-1.1"' in package  # the readable versions are all still shown
    browse("/packages/otherpkg")
    listing = browse("/runs")  # every run of her DAG, the damaged ones named by key beside the list
    assert f"damaged record {layout.RunPath.parse(damaged['outcome']).key(layout.OUTCOME)}" in listing, listing[-3000:]
    assert teams.ours in listing and damaged["manifest"] in listing
    runs = [teams.ours, damaged["outcome"], damaged["results_garbage"], damaged["results_list"],
            damaged["results_shapes"], damaged["manifest"], damaged["registration"]]
    damaged_key = {damaged["outcome"]: layout.OUTCOME, damaged["results_garbage"]: layout.RESULTS,
                   damaged["results_list"]: layout.RESULTS, damaged["registration"]: layout.REGISTRATION,
                   damaged["manifest"]: layout.manifest_name("data_directory")}
    for run_id in runs:
        page = browse(f"/runs/{quoted(run_id)}")
        if run_id in damaged_key:
            assert f"damaged record {layout.RunPath.parse(run_id).key(damaged_key[run_id])}" in page, page[-3000:]
        browse(f"/compare?run={quote(run_id, safe='')}")
    # a manifest is one part of its run's page: the rest of the run is shown
    assert 'id="status"' in seen[f"/runs/{quoted(damaged['manifest'])}"]
    # the planted link: listed runs pages still show, and it is never served
    assert "team-b-secret" not in browse(f"/runs/{quoted(teams.ours)}/preview/link.txt")
    assert "team-b-secret" not in browse(f"/runs/{quoted(teams.ours)}/artifacts/link.txt")
    if pages.root is not None:
        assert "not a regular file" in browse(f"/runs/{quoted(teams.ours)}/artifacts/pipe.txt")
    for name in ("ok.csv", "big.csv", "wide.csv", "notes.txt", "pipe.txt"):
        browse(f"/runs/{quoted(teams.ours)}/preview/{name}")
    browse("/compare?" + "&".join(f"run={quote(r, safe='')}" for r in runs if r != damaged["outcome"]))
    browse("/compare?run=manual")
    # the admin sees the same store without a server error, team_b's runs included
    for path_ in ("/", f"/packages/{PACKAGE}", f"/runs/{quoted(teams.theirs[0])}", "/compare?run=1"):
        response = pages.get(path_, "admin")
        assert response.status_code < 500 or response.status_code == 502, (path_, response.text[-2000:])
        assert "Traceback" not in response.text


@pytest.mark.parametrize("name", ["a b", "%2e%2e", "..x", "x" * 300, "class"])
def test_a_package_name_that_is_no_package_is_a_clear_error(pages, name):
    two_teams(pages.store)
    response = pages.get(f"/packages/{quote(name, safe='')}")
    assert response.status_code in (400, 404), response.text[-2000:]
    assert_no_leak(response)


def test_the_shared_damaged_store_browses_without_a_server_error(pages, tmp_path):
    """The store gc, verify and the CLI are tested on (one of each damage), through every page, as the admin."""
    damage_ = damaged_store(pages.store, tmp_path / "scratch")
    paths = ["/", "/packages/churn", f"/runs/{quoted(RUN.id)}", "/runs/dag/run2/train/1", "/compare?run=dag",
             f"/compare?run={quote(RUN.id, safe='')}", "/docs/"]
    for path in paths:
        for html in (True, False):
            response = pages.get(path, "admin", html=html)
            assert response.status_code < 500 or response.status_code == 502, (path, response.text[-2000:])
            assert "Traceback" not in response.text
    package = pages.get("/packages/churn", "admin").text
    for kind in ("version", "alias"):
        assert f"damaged record {damage_.records[kind]}" in package, package[-3000:]
    assert f"damaged record {damage_.records['outcome']}" in pages.get("/runs/dag/run2/train/1", "admin").text
    # the run's snapshot still reads: its manifest is intact, only the blobs it names are damaged or missing
    assert "3</td>" in pages.get(f"/runs/{quoted(RUN.id)}", "admin").text


def test_find_run_matches_among_visible_dags_only(store):
    """The rule the compare page relies on, at its source: runs.find_run(visible=) never names a refused DAG's run."""
    teams = two_teams(store)

    def mine(dag_id: str) -> bool:
        return dag_id == OURS

    with pytest.raises(RunNotFoundError) as missing:
        find_run(store, "1", mine)
    assert not any(secret in str(missing.value) for secret in SECRETS)
    assert find_run(store, "train", mine).id == teams.ours  # ambiguous without the filter: four runs
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        find_run(store, "train")
    with pytest.raises(RunNotFoundError) as full:  # an exact id of a refused DAG reads as absent, exists or not
        find_run(store, teams.theirs[0], mine)
    assert "does not exist" in str(full.value)
