"""Finding 4: two task instances never share a run folder (a mapped `train` [0] and a task named `train__0`)."""

from __future__ import annotations

import pytest

from airflow_aicenter.layout import LayoutError, RunPath
from airflow_aicenter.records import RunRef


def test_a_mapped_task_and_a_task_named_like_it_have_their_own_folders():
    mapped = RunRef(dag_id="d", run_id="r", task_id="train", map_index=0)
    named = RunRef(dag_id="d", run_id="r", task_id="train__0")
    assert mapped.prefix != named.prefix
    assert mapped.prefix == "runs/d/r/train~0/1" and named.prefix == "runs/d/r/train__0/1"
    assert mapped.path.task.checkpoints != named.path.task.checkpoints


@pytest.mark.parametrize("ref", [
    RunRef(dag_id="d", run_id="manual__2026-01-01T00:00:00+00:00", task_id="group.train", map_index=12, try_number=3),
    RunRef(dag_id="d", run_id="r", task_id="train__0"),
])
def test_run_ids_parse_back_to_the_same_task_instance(ref: RunRef):
    assert RunPath.parse(ref.path.id) == ref.path
    assert RunPath.parse(ref.prefix) == ref.path


@pytest.mark.parametrize("bad", [".", "..", "d/r/t", "d/r/t/0", "d/../t/1", "d//t/1", "d/r/t/1/extra"])
def test_what_is_not_a_run_id_is_refused(bad: str):
    with pytest.raises(LayoutError):
        RunPath.parse(bad)
