"""gc and damaged records: one damaged record is reported by key and skipped, never stops the collection.

Issue 20, finding 3: a garbage ``envs/<64 hex>.json`` (a run's credentials may create one) made
``aicenter gc`` delete nothing. Each record kind gc reads (version records, environment records,
snapshot manifests) and those it does not (aliases, outcomes, checkpoint manifests, trigger
state) is damaged at once: gc still deletes the blob it can prove unreferenced and keeps every
blob a damaged record still names in its bytes.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from airflow_aicenter import cli, layout
from airflow_aicenter.gc import collect
from airflow_aicenter.storage import Store
from tests.store_damage import damaged_store


def test_one_damaged_record_of_each_kind_does_not_stop_gc(store: Store, tmp_path: Path) -> None:
    damage = damaged_store(store, tmp_path)
    report = collect(store, grace=timedelta(0))
    assert report.deleted == [damage.orphan], "the orphan nothing could name is collected"
    assert not store.exists(layout.blob_key(damage.orphan))
    for kept in (damage.package_blob, damage.salvaged, damage.damaged_blob):
        assert store.exists(layout.blob_key(kept))
    # the records gc reads are reported by key, with the fix; the others are not its business
    for kind in ("version", "env", "env (digest readable)", "manifest"):
        why = report.damaged[store.url(damage.records[kind])]
        assert "is not a valid" in why and "aicenter verify" in why, why
    assert report.unreadable == {} and report.held is None
    assert {damage.package_blob, damage.salvaged} <= set(report.salvaged), "digests read from damaged records are kept"


def test_a_garbage_version_record_holds_every_blob(store: Store, tmp_path: Path) -> None:
    """A version record names the only copy of a version's content, and runs cannot write packages/:
    one that names no readable digest holds the collection (fail safe), and says which record and why."""
    damage = damaged_store(store, tmp_path)
    store.put_bytes(damage.records["version"], b"\x00garbage")
    report = collect(store, grace=timedelta(0))
    assert report.deleted == [] and store.exists(layout.blob_key(damage.orphan))
    assert report.held is not None and store.url(damage.records["version"]) in report.held
    store.delete(damage.records["version"])
    assert collect(store, grace=timedelta(0)).deleted == [damage.orphan]


def test_gc_command_reports_damaged_records_and_exits_1(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if store.uri.startswith("s3://"):
        for key, value in store.options.to_env().items():  # type: ignore[attr-defined]
            monkeypatch.setenv(key, value)
    damage = damaged_store(store, tmp_path)
    assert cli.main(["--storage", store.uri, "gc", "--grace-hours", "0", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["deleted"] == [damage.orphan] and store.url(damage.records["env"]) in report["damaged"]
    assert cli.main(["--storage", store.uri, "gc", "--grace-hours", "0"]) == 1
    out, err = capsys.readouterr()
    assert "deleted 0" in out and "Traceback" not in out + err
    assert f"damaged record, skipped: {store.url(damage.records['env'])}" in err, err


def test_an_object_too_large_to_be_a_record_is_not_read(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run credentials may create envs/<hex>.json of any size: gc and verify refuse it by its listed size
    (reading it whole would cost its size in memory), report it, and go on."""
    from airflow_aicenter import records
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.verify import verify
    from tests.conftest import EXAMPLE_PACKAGE

    Registry(store).upload(EXAMPLE_PACKAGE, "churn")
    big = layout.env_key("a" * 64)
    store.put_bytes(big, b"{" + b" " * 5000)
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 4096)
    why = collect(store, grace=timedelta(0)).damaged[store.url(big)]
    assert "is not a record: it holds 5001 bytes, over the 4096 bytes any record takes" in why, why
    [damage] = verify(store).damage
    assert damage.key == big and "holds 5001 bytes" in damage.detail
