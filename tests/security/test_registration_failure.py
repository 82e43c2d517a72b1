"""Finding 7: a run whose version could not be registered is a failed run, with a cause that applies.

The runtime succeeds and uploads the new package content; the content then disappears before
the worker registers it (gc with a grace period shorter than the run). The run record must
say failed, in phase "register", and the error must say what happened and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_aicenter.errors import StorageError
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.records import Outcome, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runs import list_runs
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import small_dataset, upload_package
from tests.operators.kube_api import make_context
from tests.packages import COUNTING_TRAIN as TRAIN


def test_a_version_that_cannot_be_registered_is_a_failed_run_with_its_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = (tmp_path / "aicenter").as_uri()
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "rows", TRAIN)
    launch = LocalLauncher.launch

    def launch_then_gc(self, context, spec, run):  # the runtime finished; gc deletes the new content meanwhile
        finished = launch(self, context, spec, run)
        (tmp_path / "aicenter" / "blobs" / "sha256" / finished.outcome.blob.sha256).unlink()
        return finished

    monkeypatch.setattr(LocalLauncher, "launch", launch_then_gc)
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=small_dataset(tmp_path).as_uri())
    with pytest.raises(StorageError, match=r"no longer in .*deleted while the run was going.*run the task again") as failed:
        op.execute(make_context())
    assert "upload the content before committing" not in str(failed.value)
    assert [r.version for r in registry.versions("rows")] == ["1.0"]
    outcome = read(registry.store, "runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/train/1/outcome.json", Outcome)
    assert (outcome.status, outcome.phase) == ("failed", "register")
    assert outcome.error and outcome.error.startswith("registering the new version failed: the package content")
    [record] = list_runs(registry.store)
    assert record.outcome.status == "failed"
