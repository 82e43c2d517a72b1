"""`aicenter verify [--repair SOURCE]` on both stores: every damage named, lost content rewritten from a source.

Issue 20: "an `aicenter verify` command that checks every blob a version, snapshot, environment
or checkpoint references, reports damage by name, and repairs from a given folder or zip".
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from airflow_aicenter import cli, layout
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import blob_state, put_blob, read_package_contents, sha256_file
from airflow_aicenter.verify import verify
from tests.conftest import EXAMPLE_PACKAGE
from tests.store_damage import damaged_store


def _flip(store: Store, key: str, at: int = 10) -> None:
    raw = bytearray(store.get_bytes(key))
    raw[at] ^= 0xFF
    store.put_bytes(key, bytes(raw))


def test_verify_names_every_damage_and_what_refers_to_it(store: Store, tmp_path: Path) -> None:
    damage = damaged_store(store, tmp_path)
    report = verify(store)
    found = {(d.kind, d.key): d for d in report.damage}
    blob = found[("blob", layout.blob_key(damage.damaged_blob))]
    assert blob.state == "damaged" and blob.referenced_by == [
        f"snapshot {layout.RunPath('dag', 'run1', 'train', try_number=1).key('data_directory.manifest.json')} (b.csv)"]
    assert "--repair SOURCE" in blob.fix and "snapshot the same data again" in blob.fix
    assert found[("blob", layout.blob_key(damage.missing_blob))].state == "missing"
    assert found[("checkpoint object", damage.checkpoint_object)].state == "missing"
    for kind, key in damage.records.items():
        record = found[("record", key)]
        assert record.state == "damaged" and record.fix, (kind, record)
    assert ("blob", layout.blob_key(damage.package_blob)) not in found, "an intact blob is no damage"
    assert len(report.damage) == 3 + len(damage.records)
    package = Registry(store).get("churn", "1.0").blob  # a per-file version: its manifest, then each file's blob
    package_blobs = 1 + len(read_package_contents(store, package)[0].digests())
    assert report.records["version"] == 2 and report.records["environment"] == 2
    assert report.blobs == 3 + package_blobs, "the snapshot's three files and the package's blobs"


def test_repair_from_a_dataset_folder(store: Store, tmp_path: Path) -> None:
    damage = damaged_store(store, tmp_path / "build")
    source = tmp_path / "data"
    source.mkdir()
    for name, data in damage.files.items():
        (source / name).write_bytes(data)
    report = verify(store, repair=source)
    assert {d.sha256 for d in report.repaired} == {damage.damaged_blob, damage.missing_blob}
    assert blob_state(store, damage.damaged_blob) == "ok" and blob_state(store, damage.missing_blob) == "ok"
    unfixed = [d for d in report.remaining if d.kind != "record"]
    assert [d.key for d in unfixed] == [damage.checkpoint_object] and f"not in {source}" in unfixed[0].fix
    assert all(d.kind == "record" for d in verify(store).damage[:-1]), "only the records and the checkpoint object remain"


@pytest.mark.parametrize("source_kind", ["folder", "zip", "downloaded zip", "folder holding a zip"])
def test_repair_a_package_blob(store: Store, tmp_path: Path, source_kind: str) -> None:
    """A package's blob is the upload zip, not any file of the source: found by rebuilding it as upload does."""
    registry = Registry(store)
    record = registry.upload(EXAMPLE_PACKAGE, "churn")
    key = layout.blob_key(record.blob.sha256)
    downloaded = registry.download("churn", "1.0", tmp_path / "dl")[1]
    if source_kind == "folder":
        source = EXAMPLE_PACKAGE
    elif source_kind == "downloaded zip":
        source = downloaded
    else:
        source = tmp_path / "mine.zip"  # zipped by hand: another digest than the stored one
        with zipfile.ZipFile(source, "w") as zf:
            for path in sorted(EXAMPLE_PACKAGE.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    zf.write(path, f"churn/{path.relative_to(EXAMPLE_PACKAGE)}")
        assert sha256_file(source).sha256 != record.blob.sha256
        if source_kind == "folder holding a zip":
            (tmp_path / "holder").mkdir()
            source = Path(shutil.move(source, tmp_path / "holder" / "mine.zip")).parent
    _flip(store, key)
    found = verify(store)
    assert [(d.state, d.referenced_by) for d in found.damage] == [("damaged", ["version churn:1.0 (its manifest)"])]
    assert "upload the package again" in found.damage[0].fix
    store.delete(key)
    report = verify(store, repair=source)
    assert [d.repaired for d in report.damage] == [True], report.damage
    assert blob_state(store, record.blob.sha256) == "ok"
    assert verify(store).damage == []


def test_a_large_blob_with_one_byte_flipped_is_found(store: Store, tmp_path: Path) -> None:
    """Detection does not depend on size (issue 20, finding 2: above 16 MiB nothing was hashed)."""
    registry = Registry(store)
    record = registry.upload(EXAMPLE_PACKAGE, "churn")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(17 * 2**20))
    digest = sha256_file(big).sha256
    put_blob(store, big, digest)
    from airflow_aicenter.records import Manifest, ManifestEntry, write

    write(store, layout.RunPath("d", "r", "t", try_number=1).key("data_directory.manifest.json"),
          Manifest(source=None, directory="data_directory", files=[ManifestEntry(path="big.bin", sha256=digest,
                   size=big.stat().st_size)], file_count=1, total_bytes=big.stat().st_size))
    _flip(store, layout.blob_key(digest), at=9 * 2**20)
    report = verify(store)
    assert [(d.sha256, d.state) for d in report.damage] == [(digest, "damaged")]
    assert verify(store, repair=tmp_path).remaining == []
    assert record.blob.sha256 != digest


def test_verify_command(store_env: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = store_env
    damage = damaged_store(store, tmp_path / "build")
    storage = ["--storage", store.uri]
    assert cli.main([*storage, "verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED blob sha256:{damage.damaged_blob}" in out and f"MISSING blob sha256:{damage.missing_blob}" in out
    assert f"DAMAGED environment record: {store.url(damage.records['env'])}" in out
    assert f"DAMAGED trigger state record: {store.url(damage.records['trigger state'])}" in out
    assert "referenced by snapshot runs/dag/run1/train/1/data_directory.manifest.json (b.csv)" in out
    for key in damage.records.values():
        store.delete(key)
    store.delete(layout.checkpoint_manifest_key(layout.TaskPath("dag", "run1", "train").checkpoints, 1))
    source = tmp_path / "data"
    source.mkdir()
    for name, data in damage.files.items():
        (source / name).write_bytes(data)
    assert cli.main([*storage, "verify", "--repair", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repaired"] == 2 and report["remaining"] == 0
    assert cli.main([*storage, "verify"]) == 0
    assert "No damage found." in capsys.readouterr().out
    assert cli.main([*storage, "verify", "--repair", str(tmp_path / "nothere")]) == 1
    assert "repair source" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="does not exist"):
        verify(store, repair=tmp_path / "nothere")


def test_a_store_with_every_kind_of_damage_is_listed_verified_and_collected(store: Store, tmp_path: Path) -> None:
    """Issue 20, "done when": one of each damage (blob, version record, alias, environment record, trigger
    state, outcome, manifest, checkpoint) is listed, shown, verified and collected by the installed
    command on both stores: each damage named, exit 1, never a traceback; gc still collects."""
    import subprocess
    import sys

    damage = damaged_store(store, tmp_path / "build")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    env.update({"AICENTER_STORAGE": store.uri, "COLUMNS": "250"})
    if store.uri.startswith("s3://"):
        env.update(store.options.to_env())  # type: ignore[attr-defined]

    def aicenter(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(Path(sys.executable).parent / "aicenter"), *args], capture_output=True, text=True,
                              env=env, timeout=120, check=False)
        assert "Traceback" not in done.stdout + done.stderr, (args, done.stderr)
        return done

    version, alias = store.url(damage.records["version"]), store.url(damage.records["alias"])
    listed = aicenter("package", "list")
    assert listed.returncode == 1 and "churn" in listed.stdout and version in listed.stderr and alias in listed.stderr
    shown = aicenter("package", "show", "churn")
    assert shown.returncode == 1 and "1.0" in shown.stdout and version in shown.stderr and alias in shown.stderr
    detail = aicenter("package", "show", "churn:1.0")
    assert detail.returncode == 1 and "Lineage: 1.0" in detail.stdout and alias in detail.stderr
    runs = aicenter("runs", "list")
    assert runs.returncode == 1 and "dag/run1/train/1" in runs.stdout
    assert f"run dag/run2/train/1 left out: {store.url(damage.records['outcome'])}" in runs.stderr
    verified = aicenter("verify")
    assert verified.returncode == 1
    for key in damage.records.values():
        assert store.url(key) in verified.stdout, key
    assert f"DAMAGED blob sha256:{damage.damaged_blob}" in verified.stdout
    collected = aicenter("gc", "--grace-hours", "0", "--json")
    assert collected.returncode == 1 and json.loads(collected.stdout)["deleted"] == [damage.orphan]
    assert store.url(damage.records["env"]) in json.loads(collected.stdout)["damaged"]
