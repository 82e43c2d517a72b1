"""Run records (airflow_aicenter.runs) over stores filled by real runtime runs, on both backends.

The runs are the runtime as the launchers start it (a child process with a spec): succeeded,
failed and killed runs, so the records show the whole history, not only the successes.
"""

from __future__ import annotations

import pytest

from airflow_aicenter.errors import StorageError
from airflow_aicenter.records import Outcome, write
from airflow_aicenter.runs import RunNotFoundError, compare, find_run, list_runs
from airflow_aicenter.storage import Store


def test_list_find_and_compare_runs(history: Store) -> None:
    """One history of five real runs serves the listing, the lookups and the comparison (the runs take seconds).

    Lookups and the comparison first: the listing part ends by damaging one record."""
    # find by id, URI or an unambiguous part
    assert find_run(history, "nightly/r1/train/1").id == "nightly/r1/train/1"
    assert find_run(history, history.url("runs/adhoc/r2/full/1")).id == "adhoc/r2/full/1"
    assert find_run(history, history.url("runs/adhoc/r2/full/1/_results.json")).id == "adhoc/r2/full/1"
    assert find_run(history, "runs/nightly/r1/evaluate/1/").id == "nightly/r1/evaluate/1"
    assert find_run(history, "nightly/r1/train").id == "nightly/r1/train/2", "a task's last try"
    assert find_run(history, "train").id == "nightly/r1/train/2"
    assert find_run(history, "evaluate").id == "nightly/r1/evaluate/1"
    assert find_run(history, "slow/1").id == "adhoc/r2/slow/1"
    with pytest.raises(RunNotFoundError, match=r"run 'nightly' is ambiguous: it matches 3 runs \(nightly/r1/evaluate/1, "):
        find_run(history, "nightly")
    with pytest.raises(RunNotFoundError, match=r"no run 'nosuch' in .*`aicenter runs list` shows the run ids"):
        find_run(history, "nosuch")
    with pytest.raises(RunNotFoundError, match=r"runs/nightly/r1/train/7/outcome\.json does not exist"):
        find_run(history, "nightly/r1/train/7")
    with pytest.raises(RunNotFoundError, match="empty run id"):
        find_run(history, " ")

    # side by side (``aicenter runs compare``)
    a, b = find_run(history, "full"), find_run(history, "evaluate")
    rows = dict(compare([a, b]))
    assert rows["pipeline"] == ["full", "evaluate"] and rows["status"] == ["succeeded", "failed"]
    assert rows["score"] == [0.7, None] and rows["package"] == ["scored", "scored"] and rows["version"] == ["1.0", "1.0"]
    assert rows["cause"][0] is None and "not a finite number" in rows["cause"][1]
    assert list(rows)[:4] == ["pipeline", "status", "start", "duration_s"]

    # the listing
    seen: list[tuple[int, int]] = []
    records = list_runs(history, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert [r.id for r in records] == ["adhoc/r2/slow/1", "adhoc/r2/full/1", "nightly/r1/evaluate/1",
                                       "nightly/r1/train/2", "nightly/r1/train/1"], "newest first"
    by_id = {r.id: r for r in records}
    failed, killed, full = by_id["nightly/r1/evaluate/1"], by_id["adhoc/r2/slow/1"], by_id["adhoc/r2/full/1"]
    assert failed.status == "failed" and failed.cause is not None
    assert "Main.evaluate() returned nan, which is not a finite number" in failed.cause
    assert failed.summary()["failed_phase"] == "user_code"
    assert killed.status == "killed" and killed.cause == "killed during user_code" and killed.package == "sleepy"
    assert full.status == "succeeded" and full.cause is None and full.outcome.score == 0.7 and full.pipeline == "full"
    assert full.duration is not None and full.duration > 0 and full.summary()["uri"] == history.url("runs/adhoc/r2/full/1")

    assert [r.id for r in list_runs(history, status="failed")] == ["nightly/r1/evaluate/1"]
    assert [r.id for r in list_runs(history, package="sleepy")] == ["adhoc/r2/slow/1"]
    assert list_runs(history, package="nosuch") == []
    with pytest.raises(Exception, match="unknown status 'done': use one of running, succeeded, failed, killed"):
        list_runs(history, status="done")

    # one damaged record: an error by default; reported and left out when the caller asks for that (the CLI does)
    history.put_bytes("runs/broken/r/t/1/outcome.json", b"{not json")
    with pytest.raises(StorageError, match=r"runs/broken/r/t/1/outcome\.json is not a valid Outcome record"):
        list_runs(history)
    skipped: list[str] = []
    assert len(list_runs(history, on_error=lambda run_id, exc: skipped.append(run_id))) == 5
    assert skipped == ["broken/r/t/1"]


# -- hostile run ids and foreign keys under runs/ ----------------------------------------------
def _outcome(store: Store, run_id: str, start_at: float = 1_700_000_000.0) -> None:
    write(store, f"runs/{run_id}/outcome.json",
          Outcome(status="succeeded", pipeline="train", package="p", version="1.0", start_at=start_at))


@pytest.mark.parametrize(("ref", "message"), [
    ("..", r"'\.\.' is not a run id or part of one: a run id has no '\.', '\.\.' or empty parts"),
    ("../..", r"'\.\./\.\.' is not a run id or part of one"),
    (".", r"'\.' is not a run id or part of one"),
    ("a/../b/c", r"'a/\.\./b/c' is not a run id or part of one"),
    ("d/./t/1", r"'d/\./t/1' is not a run id or part of one"),
    ("d//t/1", r"'d//t/1' is not a run id or part of one"),
    ("runs/../../../../etc/passwd", r"'\.\./\.\./\.\./\.\./etc/passwd' is not a run id or part of one"),
    ("a/b/c/d/e", r"'a/b/c/d/e' is not a run id; a run id is <dag_id>/<run_id>/<task>/<try>"),
    ("d/r/t/latest", r"'d/r/t/latest' is not a run id; a run id is <dag_id>/<run_id>/<task>/<try>"),
])
def test_run_ids_that_name_no_folder_are_clear_errors(store: Store, ref: str, message: str) -> None:
    """`aicenter runs show '../..'` and ids with '.' parts reached the store as paths it refuses (a raw ValueError)."""
    _outcome(store, "d/r/t/1")
    with pytest.raises(RunNotFoundError, match=message) as e:
        find_run(store, ref)
    assert "`aicenter runs list` shows the run ids" in str(e.value) or "as `aicenter runs list` shows it" in str(e.value)
    assert find_run(store, "d/r/t/1").id == "d/r/t/1"


def test_only_files_directly_in_a_run_folder_make_runs(store: Store) -> None:
    """The listing is parsed by the layout: artifacts, checkpoints and keys of other tools are not runs."""
    _outcome(store, "d/r/t/1")
    _outcome(store, "d/r/t~3/2", start_at=1_700_000_100.0)
    for key in ("runs/d/r/t/1/artifacts/outcome.json", "runs/d/r/t/1/artifacts/a/b/outcome.json",
                "runs/d/r/t/checkpoints/outcome.json", "runs/d/r/t/checkpoints/manifests/000000000001.json",
                "runs/outcome.json", "runs/d/outcome.json", "runs/d/r/t/0/outcome.json", "runs/d/r/t/x/outcome.json"):
        store.put_bytes(key, b"{not an outcome")
    assert [r.id for r in list_runs(store)] == ["d/r/t~3/2", "d/r/t/1"]
    assert find_run(store, "t~3").id == "d/r/t~3/2"

