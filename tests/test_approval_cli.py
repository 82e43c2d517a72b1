"""The CLI and approvals (issue 22): `package promote` refuses a rejected version without --force,
`package show` prints the approval, `package list` and `show` mark the pending ones."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from airflow_aicenter.approval import Decision, apply_decision, pending_request
from airflow_aicenter.records import RunRef
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.packages import TRAIN_ONLY, write_package

AICENTER = str(Path(sys.executable).parent / "aicenter")


def cli(store_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AICENTER, "--storage", store_uri, *args], capture_output=True, text=True, timeout=120,
                          check=False, env={"PATH": "/usr/bin:/bin", "COLUMNS": "250"})


def two_versions(tmp_path: Path) -> tuple[str, Registry]:
    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    first = registry.upload(write_package(tmp_path / "pkg", train=TRAIN_ONLY), "churn")
    registry.commit("churn", parent="1.0", blob=first.blob, pipeline="full", score=0.9, evaluated_on="h")  # 1.1
    registry.commit("churn", parent="1.0", blob=first.blob, pipeline="full", score=0.95, evaluated_on="h")  # 1.2
    registry.set_alias("churn", "production", "1.0")
    return uri, registry


def test_promote_refuses_a_rejected_version_without_force(tmp_path: Path) -> None:
    uri, registry = two_versions(tmp_path)
    request = registry.request_approval(pending_request("churn", "1.1", "production", RunRef(dag_id="d", run_id="r",
                                                                                             task_id="t")))
    apply_decision(registry, request, Decision(False, "ada", datetime(2026, 12, 7, 9, tzinfo=UTC), "leaky feature"))
    refused = cli(uri, "package", "promote", "churn:1.1", "--alias", "production", "--if", "always")
    assert refused.returncode == 3, refused  # refused (docs/cli.md), not an error
    assert "Refused: version 1.1 was rejected for 'production' (rejected by ada: 'leaky feature')" in refused.stderr
    assert "--force" in refused.stderr
    assert registry.alias("churn", "production").version == "1.0"
    as_json = cli(uri, "package", "promote", "churn:1.1", "--alias", "production", "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["promoted"] is False
    forced = cli(uri, "package", "promote", "churn:1.1", "--alias", "production", "--if", "always", "--force")
    assert forced.returncode == 0, forced
    assert registry.alias("churn", "production").version == "1.1"


def test_show_prints_the_approval_and_list_marks_the_pending(tmp_path: Path) -> None:
    uri, registry = two_versions(tmp_path)
    registry.request_approval(pending_request("churn", "1.2", "production", None, "http://airflow/dags/d/runs/r/tasks/t/"
                                                                                   "required_actions"))
    request = registry.request_approval(pending_request("churn", "1.1", "production", None))
    apply_decision(registry, request, Decision(True, "ada", datetime(2026, 12, 7, 9, tzinfo=UTC), "ship it"))

    listed = cli(uri, "package", "list", "--json")
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout)[0]["pending_approval"] == ["1.2 for production"]
    table = cli(uri, "package", "list")
    assert "1.2 for production" in table.stdout and "pending approval" in table.stdout

    shown = cli(uri, "package", "show", "churn:1.1")
    assert shown.returncode == 0, shown
    assert "approved for production (approved by ada) at 2026-12-07 09:00:00: ship it" in " ".join(shown.stdout.split())
    pending = cli(uri, "package", "show", "churn:1.2")
    assert "PENDING for production" in pending.stdout and "Required Actions" in pending.stdout
    overview = json.loads(cli(uri, "package", "show", "churn", "--json").stdout)
    approvals = {v["version"]: v["approval"] and v["approval"]["status"] for v in overview["versions"]}
    assert approvals == {"1.0": None, "1.1": "approved", "1.2": "pending"}
    approved = next(v["approval"] for v in overview["versions"] if v["version"] == "1.1")
    assert approved["by"] == "ada" and approved["comment"] == "ship it"
