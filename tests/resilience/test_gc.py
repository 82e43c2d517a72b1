"""Garbage collection: `aicenter gc` removes blobs nothing references, never one a run is still writing.

gc runs over and over while a real runtime run uploads its new package and snapshot, and
again between the run's outcome and its registration: the run's fresh blobs must survive
(younger than the grace period), an old orphan must go, and every referenced blob must stay.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter import cli
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.gc import GcReport, collect, references
from airflow_aicenter.layout import BLOBS
from airflow_aicenter.records import Outcome, RunRef, RunSpec, read
from airflow_aicenter.storage.transfer import put_blob, read_package_contents, sha256_file
from tests.conftest import RuntimeSpawner
from tests.resilience.support import Setup, check_store, run_runtime

#: Seconds between writing the old orphan and starting the run, by store. Each gc call uses a
#: grace period that makes the orphan just old enough and everything written after orphan + gap/2
#: young, however long the run takes (S3 timestamps may be rounded to the second: > 2 s; a
#: file's modification time is exact to far below the half second the file store waits).
GAPS = {"s3": 2.5, "file": 0.5}


def _orphan(gc_setup: Setup, tmp_path: Path, name: str) -> tuple[str, datetime]:
    path = tmp_path / name
    path.write_bytes(os.urandom(5000))
    digest = sha256_file(path).sha256
    assert put_blob(gc_setup.store, path, digest)
    info = gc_setup.store.head(BLOBS + digest)
    assert info is not None and info.last_modified is not None
    return digest, info.last_modified


def package_blobs(gc_setup: Setup) -> int:
    """The blobs of the uploaded version 1.0: a per-file version's manifest and each distinct file's blob."""
    return 1 + len(read_package_contents(gc_setup.store, gc_setup.base.blob)[0].digests())


def _register(gc_setup: Setup, ref: RunRef, spec: RunSpec) -> str:
    outcome = read(gc_setup.store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.blob is not None
    return gc_setup.registry.commit_once("res", run=ref, parent="1.0", blob=outcome.blob, pipeline="train",
                                      snapshot=outcome.snapshots["data_directory"]).version


def test_gc_during_an_upload_keeps_young_and_referenced_blobs_and_removes_old_orphans(gc_setup: Setup, tmp_path: Path,
                                                                                     spawn_runtime: RuntimeSpawner) -> None:
    # history: a registered training (its package and snapshot blobs are referenced)
    ref1, spec1 = gc_setup.spec(try_number=1)
    assert run_runtime(spec1, tmp_path, gc_setup.env).returncode == 0
    assert _register(gc_setup, ref1, spec1) == "1.1"
    referenced_before = references(gc_setup.store).digests
    assert len(referenced_before) >= 30  # two package zips and the snapshot's files

    orphan, orphan_time = _orphan(gc_setup, tmp_path, "orphan.bin")  # e.g. left by a run that crashed
    gap = GAPS[gc_setup.store.scheme]
    time.sleep(gap)

    def gc_now(**kw: Any) -> GcReport:
        now = datetime.now(UTC)
        return collect(gc_setup.store, grace=now - orphan_time - timedelta(seconds=gap / 2), now=now, **kw)

    ref2, spec2 = gc_setup.spec(try_number=1, task_id="train_again")  # another task: a retry would report 1.1
    proc = spawn_runtime.start(spec2, {**gc_setup.env, "AICENTER_WORKDIR": str(tmp_path / "work2")}, stdout=subprocess.DEVNULL)
    reports = []
    try:
        for _ in range(500):  # bounded; each pass lists and reads the whole store
            reports.append(gc_now())
            if proc.poll() is not None:
                break
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    deleted = [d for r in reports for d in r.deleted]
    assert deleted == [orphan], deleted  # the orphan once, nothing the run was writing
    assert len(reports) >= 2

    # between the outcome and the registration: the new package blob is unreferenced, and young
    new_blob = read(gc_setup.store, f"{spec2.run_prefix}/outcome.json", Outcome).blob
    assert new_blob is not None and new_blob.sha256 not in references(gc_setup.store).digests
    between = gc_now()
    assert between.deleted == [] and between.young >= 1
    assert _register(gc_setup, ref2, spec2) == "1.2"

    assert not gc_setup.store.exists(BLOBS + orphan)
    assert referenced_before <= {i.key[len(BLOBS):] for i in gc_setup.store.list(BLOBS)}
    assert check_store(gc_setup.store) == ["res:1.0", "res:1.1", "res:1.2"]
    # with everything referenced, even a zero grace period deletes nothing
    final = collect(gc_setup.store, grace=timedelta(0))
    assert final.deleted == [] and final.missing == [] and final.young == 0
    assert final.records == {"versions": 3, "manifests": 2}


def test_gc_command_dry_run_json_and_grace(
    gc_setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    if gc_setup.store.uri.startswith("s3://"):
        for key, value in gc_setup.env.items():
            monkeypatch.setenv(key, value)
    orphan, _ = _orphan(gc_setup, tmp_path, "o.bin")
    storage = ["--storage", gc_setup.store.uri]

    assert cli.main([*storage, "gc", "--json"]) == 0  # default grace (24 h): young, kept
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"] == [] and report["young"] == 1 and report["referenced"] == package_blobs(gc_setup)

    assert cli.main([*storage, "gc", "--grace-hours", "0", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == [orphan]
    assert gc_setup.store.exists(BLOBS + orphan)  # a dry run deletes nothing

    assert cli.main([*storage, "gc", "--grace-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "deleted 1" in out and orphan in out
    assert not gc_setup.store.exists(BLOBS + orphan)
    assert check_store(gc_setup.store) == ["res:1.0"]


def test_a_damaged_record_is_reported_and_skipped(gc_setup: Setup, tmp_path: Path) -> None:
    """A damaged snapshot manifest (a run's credentials can write one): gc reports it by URI with the
    fix, skips it and still collects the orphan (issue 20: one damaged record stopped gc for good)."""
    orphan, _ = _orphan(gc_setup, tmp_path, "o.bin")
    damaged = "runs/d/r/t/1/data_directory.manifest.json"
    gc_setup.store.put_bytes(damaged, b"{not json")
    report = collect(gc_setup.store, grace=timedelta(0))
    assert list(report.damaged) == [gc_setup.store.url(damaged)] and report.unreadable == {} and report.held is None
    assert "is not a valid Manifest record" in report.damaged[gc_setup.store.url(damaged)]
    assert "restore it from a backup, or remove it" in report.damaged[gc_setup.store.url(damaged)]
    assert report.deleted == [orphan] and report.blobs == 1 + package_blobs(gc_setup)
    assert report.records == {"versions": 1, "manifests": 0}
    assert not gc_setup.store.exists(BLOBS + orphan)
    with pytest.raises(ConfigurationError, match="negative"):
        collect(gc_setup.store, grace=timedelta(hours=-1))


def test_artifacts_named_like_manifests_are_not_records(gc_setup: Setup, tmp_path: Path) -> None:
    """An artifact ``*.manifest.json`` (even one named ``data_directory.manifest.json``) stopped gc
    for the whole store: only a run folder's own snapshot manifests are records."""
    orphan, _ = _orphan(gc_setup, tmp_path, "o.bin")
    ref, spec = gc_setup.spec(try_number=1)
    assert run_runtime(spec, tmp_path, gc_setup.env).returncode == 0
    _register(gc_setup, ref, spec)
    for name in ("model.manifest.json", "data_directory.manifest.json", "sub/test_data_directory.manifest.json"):
        gc_setup.store.put_bytes(f"{ref.prefix}/artifacts/{name}", b'["user content, not a manifest"]')
    gc_setup.store.put_bytes("runs/notes/data_directory.manifest.json", b"not a run folder")
    report = collect(gc_setup.store, grace=timedelta(0))
    assert report.unreadable == {}
    assert report.deleted == [orphan]
    assert report.records == {"versions": 2, "manifests": 1}
    assert report.missing == [] and check_store(gc_setup.store) == ["res:1.0", "res:1.1"]


def test_gc_leaves_foreign_keys_under_the_blob_prefix_alone(gc_setup: Setup) -> None:
    gc_setup.store.put_bytes(BLOBS + "not-a-digest.tmp", b"x")
    report = collect(gc_setup.store, grace=timedelta(0))
    assert report.deleted == [] and gc_setup.store.exists(BLOBS + "not-a-digest.tmp")
