"""Approvals on the AI Center pages (issue 22): each version's decision, the pending ones findable.

The app in process over file and S3 stores (the ``pages`` fixture). ``alice`` reads ``team_a``
only: a pending request of a ``team_b`` run is counted and shown as pending on the package
(the approval belongs to the package), but its run, its DAG and its request link are never named.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from airflow_aicenter import layout
from airflow_aicenter.records import ApprovalRecord, RunRef
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from tests.ui.stores import OURS, PACKAGE, SECRETS, THEIRS, two_teams

COMMENT = '<script>alert("x")</script> looks good & ready'


def _ref(run_id: str) -> RunRef:
    path = layout.RunPath.parse(run_id)
    return RunRef(dag_id=path.dag_id, run_id=path.run_id, task_id=path.task_id, try_number=path.try_number)


def _request_url(run_id: str) -> str:
    path = layout.RunPath.parse(run_id)
    return f"/dags/{path.dag_id}/runs/{path.run_id}/tasks/{path.task_id}/required_actions"


def approvals(store: Store) -> dict[str, str]:
    """Version 1.0 approved by ada (a hostile comment), 1.1 (our run's) pending, 1.2 (theirs) pending."""
    teams = two_teams(store)
    registry = Registry(store)
    made = {v.run.path.id: v.version for v in registry.versions(PACKAGE) if v.run}
    ours, theirs = made[teams.ours], made[teams.theirs[0]]
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    registry.request_approval(ApprovalRecord(package=PACKAGE, version="1.0", alias="production", status="pending", at=at))
    registry.decide_approval(ApprovalRecord(package=PACKAGE, version="1.0", alias="production", status="approved",
                                            by="ada", at=at, comment=COMMENT, reason="approved by ada"))
    for version, run_id in ((ours, teams.ours), (theirs, teams.theirs[0])):
        registry.request_approval(ApprovalRecord(package=PACKAGE, version=version, alias="production", status="pending",
                                                 at=at, run=_ref(run_id), request_url=_request_url(run_id)))
    # our run's _results.json names the version it made (the candidate its task asked about)
    results = {"run_summary": {"outputs": {"package": PACKAGE, "version": ours}}, "aicenter": {}}
    store.put_bytes(layout.RunPath.parse(teams.ours).key(layout.RESULTS), json.dumps(results).encode())
    return {"ours": ours, "theirs": theirs, "our_run": teams.ours}


def test_the_package_page_shows_each_versions_approval_and_the_pending_ones(pages):
    found = approvals(pages.store)
    page = pages.get(f"/packages/{PACKAGE}")
    assert page.status_code == 200, page.text
    text = page.text
    for secret in SECRETS:
        assert secret not in text, secret
    # the decision: who, the comment escaped (never markup)
    assert 'id="approval-1.0"' in text and "approved" in text and "ada" in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; looks good &amp; ready" in text
    # waiting for approval, at the top: both pending versions, our run linked with its Required Actions view
    waiting = text[text.index('id="pending"'):text.index('id="versions"')]
    assert found["ours"] in waiting and found["theirs"] in waiting
    our_run = "/".join(quote(p, safe="") for p in found["our_run"].split("/"))
    assert f"/aicenter/runs/{our_run}" in waiting
    assert _request_url(found["our_run"]) in waiting and 'href="/required_actions"' in waiting
    assert "a run of a DAG you cannot read" in waiting
    # the admin reads both DAGs: theirs is linked too
    admin = pages.get(f"/packages/{PACKAGE}", "admin")
    assert f"{THEIRS}/scheduled__1" in admin.text and "/dags/team_b/runs/scheduled__1" in admin.text


def test_the_packages_index_counts_pending_approvals_and_links_to_them(pages):
    approvals(pages.store)
    index = pages.get("/")
    assert index.status_code == 200, index.text
    assert f'href="/aicenter/packages/{PACKAGE}#pending"' in index.text
    assert 'class="pending-count">2 pending<' in index.text
    for secret in SECRETS:
        assert secret not in index.text, secret


def test_the_run_page_shows_the_approval_of_its_candidate(pages):
    found = approvals(pages.store)
    our_run = "/".join(quote(p, safe="") for p in found["our_run"].split("/"))
    page = pages.get(f"/runs/{our_run}")
    assert page.status_code == 200, page.text
    assert 'id="approval"' in page.text and "pending" in page.text and _request_url(found["our_run"]) in page.text
    # decided: the run page shows the decision, by whom and the comment
    registry = Registry(pages.store)
    registry.decide_approval(ApprovalRecord(package=PACKAGE, version=found["ours"], alias="production", status="rejected",
                                            by="grace", comment="<b>worse</b> on holdout", reason="rejected by grace",
                                            run=_ref(found["our_run"])))
    page = pages.get(f"/runs/{our_run}")
    approval = page.text[page.text.index('id="approval"'):]
    assert "rejected" in approval and "grace" in approval and "&lt;b&gt;worse&lt;/b&gt; on holdout" in approval


def test_a_damaged_approval_record_is_named_never_a_server_error(pages):
    found = approvals(pages.store)
    key = layout.approval_key(PACKAGE, found["ours"], "decision")
    pages.store.put_bytes(key, b"{ not a record")
    forged = layout.approval_key(PACKAGE, "1.0", "decision")  # a record of another version under 1.0's key
    pages.store.put_bytes(forged, json.dumps({"package": PACKAGE, "version": "9.9", "alias": "production",
                                              "status": "approved"}).encode())
    for path in (f"/packages/{PACKAGE}", "/"):
        page = pages.get(path)
        assert page.status_code == 200, page.text
        assert f"damaged record {key}" in page.text and f"damaged record {forged}" in page.text
        for secret in SECRETS:
            assert secret not in page.text, secret
    our_run = "/".join(quote(p, safe="") for p in found["our_run"].split("/"))
    page = pages.get(f"/runs/{our_run}")
    assert page.status_code == 200, page.text
    assert f"damaged record {key}" in page.text
    assert OURS in page.text


def test_screenshot_of_a_package_page_with_a_pending_and_an_approved_version(pages, browser, shots):
    """Chromium draws the package page as a person sees it (the app in process, its pages and styles served to the
    browser through the test client): the pending list at the top, and the approved version's comment as text."""
    from concurrent.futures import ThreadPoolExecutor

    def off_loop(fn: Any, *args: Any, **kwargs: Any) -> Any:  # Playwright's sync API runs an event loop in this thread
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    found = off_loop(approvals, pages.store)
    origin = "http://aicenter.test"

    def fetch(url: str) -> Any:
        return off_loop(pages.client.get, url.removeprefix(origin), headers={"Accept": "text/html", "X-Test-User": "alice"})

    def answer(route: Any) -> None:
        response = fetch(route.request.url)
        route.fulfill(status=response.status_code, body=response.content,
                      content_type=response.headers.get("content-type", "text/html"))

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.route(f"{origin}/**", answer)
        page.goto(f"{origin}/aicenter/packages/{PACKAGE}")
        pending = page.locator("#pending-approvals")
        assert pending.locator(f"[id='pending-{found['ours']}']").is_visible()
        assert pending.locator(f"[id='pending-{found['theirs']}']").inner_text().count("a run of a DAG you cannot read") == 1
        comment = page.locator("[id='approval-1.0'] .approval-comment")
        assert comment.inner_text() == COMMENT  # the markup in the comment is text, not an element
        assert page.locator("[id='approval-1.0'] script").count() == 0
        shots(page, "package-approvals")
    finally:
        context.close()


def test_the_decision_on_a_run_of_an_unreadable_dag_shows_its_status_only(pages):
    found = approvals(pages.store)
    Registry(pages.store).decide_approval(ApprovalRecord(
        package=PACKAGE, version=found["theirs"], alias="production", status="rejected", by="team-b-lead",
        comment="see team-b-secret notes", reason="rejected by team-b-lead", run=_ref(f"{THEIRS}/scheduled__1/train/1")))
    page = pages.get(f"/packages/{PACKAGE}")
    assert page.status_code == 200, page.text
    row = page.text[page.text.index(f'id="approval-{found["theirs"]}"'):]
    assert ">rejected</span>" in row.split("</td>", 1)[0]
    for secret in (*SECRETS, "team-b-lead"):
        assert secret not in page.text, secret
    admin = pages.get(f"/packages/{PACKAGE}", "admin")
    assert "team-b-lead" in admin.text and "see team-b-secret notes" in admin.text


def test_the_runs_list_filters_the_runs_waiting_for_approval(pages):
    found = approvals(pages.store)
    listing = pages.get("/runs?approval=pending")
    assert listing.status_code == 200, listing.text
    assert f'data-run="{found["our_run"]}"' in listing.text and listing.text.count('class="run"') == 1
    assert 'class="tag approval approval-pending"' in listing.text
    assert '<option value="pending" selected>' in listing.text
    for secret in SECRETS:
        assert secret not in listing.text, secret
    # the admin sees both waiting runs; once ours is decided, only theirs waits
    assert pages.get("/runs?approval=pending", "admin").text.count('class="run"') == 2
    Registry(pages.store).decide_approval(ApprovalRecord(package=PACKAGE, version=found["ours"], alias="production",
                                                         status="approved", by="ada", run=_ref(found["our_run"])))
    assert pages.get("/runs?approval=pending").text.count('class="run"') == 0
    assert pages.get("/runs?approval=pending", "admin").text.count('class="run"') == 1
    wrong = pages.get("/runs?approval=maybe", html=False)
    assert wrong.status_code == 400 and "pending" in wrong.json()["detail"]
