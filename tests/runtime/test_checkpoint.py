"""Checkpoint sync: changed files only, atomic commits (a half sync is never restored), restore on retry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from airflow_aicenter.records import read
from airflow_aicenter.runtime.checkpoint import CheckpointManifest, CheckpointSync
from airflow_aicenter.storage import Store
from tests.conftest import write_files

PREFIX = "runs/d/r/t/checkpoints/"


def sync_for(
    store: Store, folder: Path, try_number: int = 1, interval: float = 300, logs: list[str] | None = None,
) -> CheckpointSync:
    return CheckpointSync(store, PREFIX, folder, interval, (logs if logs is not None else []).append, try_number=try_number)


def objects(store: Store) -> set[str]:
    return {info.key.rsplit("/", 1)[-1] for info in store.list(PREFIX + "objects/")}


def test_only_changed_files_are_uploaded(store: Store, tmp_path: Path) -> None:
    ckpt = write_files(tmp_path / "ckpt", {"model.bin": b"\x01" * 300_000, "state/epoch.txt": "1", "log.txt": "a"})
    sync = sync_for(store, ckpt)
    first = sync.sync()
    assert first is not None and (first.seq, first.uploaded_files, first.files) == (1, 3, 3)

    (ckpt / "state" / "epoch.txt").write_text("2")  # changed
    (ckpt / "new.txt").write_text("new")  # new
    os.utime(ckpt / "log.txt", ns=(1, 1))  # touched, same content: hashed, not uploaded
    second = sync.sync()
    assert second is not None and second.seq == 2
    assert (second.uploaded_files, second.uploaded_bytes, second.files) == (2, 4, 4)

    assert sync.sync() is None  # nothing changed: no new manifest
    manifest = read(store, sync.manifest_key(2), CheckpointManifest)
    assert {f.path for f in manifest.files} == {"model.bin", "state/epoch.txt", "log.txt", "new.txt"}
    assert manifest.try_number == 1 and manifest.bytes == 300_000 + 1 + 1 + 3
    assert sync.stats() == {"resumed_from_try": None, "files": 4, "bytes": 300_005}


def test_a_retry_restores_the_latest_checkpoint_and_logs_it(store: Store, tmp_path: Path) -> None:
    ckpt = write_files(tmp_path / "try1", {"epoch.txt": "1", "w/model.bin": b"\x00\x01" * 1000})
    first = sync_for(store, ckpt, try_number=1)
    first.sync()
    (ckpt / "epoch.txt").write_text("3")
    first.sync()

    logs: list[str] = []
    retry = sync_for(store, tmp_path / "try2", try_number=2, logs=logs)
    restored = retry.restore()
    assert restored is not None and restored.seq == 2
    assert (tmp_path / "try2" / "epoch.txt").read_text() == "3"
    assert (tmp_path / "try2" / "w" / "model.bin").read_bytes() == b"\x00\x01" * 1000
    assert "restored checkpoint of try 1: 2 files, 2001 bytes" in logs
    assert retry.stats() == {"resumed_from_try": 1, "files": 2, "bytes": 2001}
    # restored files keep their synced mtime: the next sync finds nothing to do
    assert retry.sync() is None
    (tmp_path / "try2" / "epoch.txt").write_text("4")
    stats = retry.sync()
    assert stats is not None and stats.seq == 3 and stats.uploaded_files == 1
    assert read(store, retry.manifest_key(3), CheckpointManifest).try_number == 2


def test_no_checkpoint_yet_restores_nothing(store: Store, tmp_path: Path) -> None:
    sync = sync_for(store, tmp_path / "empty")
    assert sync.restore() is None and sync.stats() == {"resumed_from_try": None, "files": 0, "bytes": 0}
    assert sync.sync() is None and not list(store.list(PREFIX))  # an empty folder commits nothing


SYNC_SCRIPT = """
import sys
from pathlib import Path
from airflow_aicenter.runtime.checkpoint import CheckpointSync
from airflow_aicenter.storage import open_store
sync = CheckpointSync(open_store(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), 300, print, try_number=2)
sync.restore()
Path(sys.argv[3], "epoch.txt").write_text("half")
Path(sys.argv[3], "big.bin").write_bytes(b"x" * 100000)
sync.sync()
print("survived")
"""


def test_a_sync_killed_before_its_manifest_is_never_restored(store: Store, tmp_path: Path, request) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    ckpt = write_files(tmp_path / "try1", {"epoch.txt": "complete"})
    sync_for(store, ckpt).sync()

    done = subprocess.run([sys.executable, "-c", SYNC_SCRIPT, store.uri, PREFIX, str(tmp_path / "try2")],
                          env={**os.environ, **env, "AICENTER_TEST_CRASH_AT": "checkpoint_manifest"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9 and "survived" not in done.stdout, done.stderr
    assert len(objects(store)) == 3  # its files are up, its manifest is not

    retry = sync_for(store, tmp_path / "try3", try_number=3)
    restored = retry.restore()
    assert restored is not None and restored.seq == 1
    assert sorted(os.listdir(tmp_path / "try3")) == ["epoch.txt"]
    assert (tmp_path / "try3" / "epoch.txt").read_text() == "complete"
    # the next sync commits and prunes what the half sync left
    (tmp_path / "try3" / "epoch.txt").write_text("again")
    retry.sync()
    assert len(objects(store)) == 2  # "complete" (seq 1, kept as fallback) and "again"


def test_a_damaged_checkpoint_falls_back_to_the_one_before(store: Store, tmp_path: Path) -> None:
    ckpt = write_files(tmp_path / "try1", {"epoch.txt": "1", "other.txt": "same"})
    sync = sync_for(store, ckpt)
    sync.sync()
    (ckpt / "epoch.txt").write_text("2")
    sync.sync()
    latest = read(store, sync.manifest_key(2), CheckpointManifest)
    damaged = next(f for f in latest.files if f.path == "epoch.txt")
    store.put_bytes(sync.object_key(damaged.sha256), b"9")  # bit rot in the store

    logs: list[str] = []
    retry = sync_for(store, tmp_path / "try2", try_number=2, logs=logs)
    restored = retry.restore()
    assert restored is not None and restored.seq == 1
    assert (tmp_path / "try2" / "epoch.txt").read_text() == "1"
    assert any("checkpoint 2 cannot be restored" in line and "corrupt" in line for line in logs)


def test_old_checkpoints_are_pruned(store: Store, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    sync = sync_for(store, ckpt)
    for epoch in range(6):
        (ckpt / "epoch.txt").write_text(str(epoch))
        (ckpt / f"model-{epoch}.bin").write_text(f"weights {epoch}")
        if epoch >= 2:
            (ckpt / f"model-{epoch - 2}.bin").unlink()  # the package keeps its last two models
        sync.sync()
    assert sync.manifest_seqs() == [5, 6]
    assert len(objects(store)) == len({"epoch 4", "epoch 5", "model-3", "model-4", "model-5"})


def test_background_syncs_every_interval_and_a_final_sync(store: Store, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    logs: list[str] = []
    sync = sync_for(store, ckpt, interval=0.2, logs=logs)
    sync.start()
    (ckpt / "epoch.txt").write_text("1")
    deadline = time.time() + 20
    while time.time() < deadline and not sync.manifest_seqs():
        time.sleep(0.05)
    assert sync.manifest_seqs() == [1]
    (ckpt / "epoch.txt").write_text("final!")
    assert sync.final() is None
    latest = read(store, sync.manifest_key(sync.manifest_seqs()[-1]), CheckpointManifest)
    assert [(f.path, f.size) for f in latest.files] == [("epoch.txt", 6)]
    assert any(line.startswith("periodic checkpoint 1") for line in logs)
    assert any(line.startswith("final checkpoint") for line in logs)
