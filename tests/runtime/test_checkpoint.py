"""Checkpoint sync: changed files only, atomic commits (a half sync is never restored), restore on retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.checkpoint import CheckpointManifest, CheckpointSync
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.conftest import REPO, RuntimeSpawner, make_dataset, write_files
from tests.packages import MAIN

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
    logs: list[str] = []
    sync = sync_for(store, tmp_path / "empty", logs=logs)
    assert sync.restore() is None and sync.stats() == {"resumed_from_try": None, "files": 0, "bytes": 0}
    assert logs == [f"no checkpoint to restore under {store.url(PREFIX)}; checkpoint_directory starts empty"]
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


def test_an_object_pruned_by_another_writer_before_the_commit_is_uploaded_again(store: Store, tmp_path: Path) -> None:
    """Issue 20, finding 9: the re-check after a commit was caught only by a two-thread race test.

    One writer, made deterministic: after its first sync one object is deleted from the store, as
    a concurrent writer's prune would between this writer's "already stored" and its commit. The
    next sync skips that unchanged file's upload (the last manifest names it), commits, re-checks
    the objects of its manifest and uploads the missing one: a retry restores the checkpoint whole.
    """
    ckpt = write_files(tmp_path / "try1", {"model.bin": b"\x07" * 50_000, "epoch.txt": "1"})
    sync = sync_for(store, ckpt)
    sync.sync()
    model = next(f for f in read(store, sync.manifest_key(1), CheckpointManifest).files if f.path == "model.bin")
    store.delete(sync.object_key(model.sha256))  # pruned by another writer
    (ckpt / "epoch.txt").write_text("2")
    stats = sync.sync()
    assert stats is not None and stats.seq == 2
    assert model.sha256 in objects(store), "the object the new manifest names must be in the store"

    logs: list[str] = []
    retry = sync_for(store, tmp_path / "try2", try_number=2, logs=logs)
    restored = retry.restore()
    assert restored is not None and restored.seq == 2, logs
    assert (tmp_path / "try2" / "epoch.txt").read_text() == "2"
    assert (tmp_path / "try2" / "model.bin").read_bytes() == b"\x07" * 50_000
    assert not any("cannot be restored" in line for line in logs), logs


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


# -- end to end: the runtime as the launchers start it, killed and retried -------------------
# A package that resumes from checkpoint_directory: state.json holds the epochs done (written
# atomically at the end of each epoch); MARKERS gets one file per finished epoch.
RESUMING_TRAIN = '''
import json, os, time

class Main:
    def __init__(self):
        self.state = os.path.join(os.environ["checkpoint_directory"], "state.json")
        self.epoch = json.load(open(self.state))["epoch"] if os.path.exists(self.state) else 0
        with open(os.path.join(os.environ["artifacts_directory"], "resumed.txt"), "w") as fh:
            fh.write(str(self.epoch))

    def train(self, training_directory):
        while self.epoch < int(os.environ["EPOCHS"]):
            time.sleep(float(os.environ["EPOCH_SECONDS"]))
            self.epoch += 1
            with open(self.state + ".tmp", "w") as fh:
                json.dump({"epoch": self.epoch}, fh)
            os.replace(self.state + ".tmp", self.state)
            open(os.path.join(os.environ["MARKERS"], str(self.epoch)), "w").close()

    def save(self):
        with open("model.txt", "w") as fh:
            fh.write(str(self.epoch))
'''


def runtime_spec(store: Store, tmp_path: Path, train_py: str, try_number: int, **fields: Any) -> RunSpec:
    """A train spec for try ``try_number`` of task runs/d/r/t (one package version per test)."""
    pkg = tmp_path / "pkg"
    if not pkg.exists():
        write_files(pkg, {"main.py": MAIN, "train.py": train_py, "requirements.txt": ""})
        write_files(tmp_path / "data", {"a.csv": "x\n1\n"})
        run(upload_tree(tmp_path / "data", store, "datasets/train"))
        Registry(store).upload(pkg, "resume")
    base = Registry(store).resolve("resume", "1.0")
    return RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/d/r/t/{try_number}", package="resume",
                   version=base.version, blob=base.blob, dataset=store.url("datasets/train"),
                   **fields)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def latest_epoch(store: Store) -> int:
    """The epoch in the task's latest complete checkpoint, read from the store."""
    sync = CheckpointSync(store, PREFIX, Path("/nonexistent"), 300, print)
    manifest = read(store, sync.manifest_key(sync.manifest_seqs()[-1]), CheckpointManifest)
    state = next(f for f in manifest.files if f.path == "state.json")
    return int(json.loads(store.get_bytes(sync.object_key(state.sha256)))["epoch"])


def retry_resumes(store: Store, tmp_path: Path, spawn_runtime: RuntimeSpawner, env: dict[str, str], user_env: dict[str, str],
                  expected_epoch: int) -> Outcome:
    spec = runtime_spec(store, tmp_path, RESUMING_TRAIN, 2, checkpoint_prefix=PREFIX, checkpoint_interval=300,
                        env={**user_env, "EPOCHS": str(expected_epoch + 2)})
    retry = spawn_runtime.start(spec, env)
    _, err = retry.communicate(timeout=120)
    assert retry.returncode == 0, err
    assert "restored checkpoint of try 1: 1 files" in err
    assert store.get_bytes(f"{spec.run_prefix}/artifacts/resumed.txt").decode() == str(expected_epoch)
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded"
    assert outcome.checkpoint == {"resumed_from_try": 1, "files": 1, "bytes": len(json.dumps({"epoch": expected_epoch + 2}))}
    assert latest_epoch(store) == expected_epoch + 2  # the final sync of the retry
    return outcome


def running(proc: subprocess.Popen[str], condition: Callable[[], bool]) -> Callable[[], bool]:
    """``condition``, failing at once with the runtime's output if it ended first."""
    def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the runtime ended with {proc.returncode}: {proc.communicate()[1]}")
        return condition()
    return check


def test_a_run_killed_by_sigkill_after_a_sync_resumes_from_it(store: Store, tmp_path: Path, request, spawn_runtime: RuntimeSpawner) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    markers = tmp_path / "markers"
    markers.mkdir()
    user_env = {"MARKERS": str(markers), "EPOCH_SECONDS": "0.15"}
    spec = runtime_spec(store, tmp_path, RESUMING_TRAIN, 1, checkpoint_prefix=PREFIX, checkpoint_interval=0.3,
                        env={**user_env, "EPOCHS": "1000"})
    proc = spawn_runtime.start(spec, env)
    sync = CheckpointSync(store, PREFIX, tmp_path, 300, print)
    wait_for(running(proc, lambda: len(sync.manifest_seqs()) >= 2), "two periodic checkpoints")
    proc.kill()  # preempted: no final sync, no outcome; the user process dies with its agent
    proc.communicate(timeout=30)
    epoch = latest_epoch(store)
    assert 1 <= epoch <= len(os.listdir(markers))
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "running"  # it never reported: killed hard
    retry_resumes(store, tmp_path, spawn_runtime, env, user_env, epoch)


def test_a_run_stopped_by_sigterm_mid_epoch_syncs_and_resumes(store: Store, tmp_path: Path, request, spawn_runtime: RuntimeSpawner) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    markers = tmp_path / "markers"
    markers.mkdir()
    user_env = {"MARKERS": str(markers), "EPOCH_SECONDS": "0.2"}
    spec = runtime_spec(store, tmp_path, RESUMING_TRAIN, 1, checkpoint_prefix=PREFIX, checkpoint_interval=300,
                        env={**user_env, "EPOCHS": "1000"})
    proc = spawn_runtime.start(spec, env)
    wait_for(running(proc, lambda: len(os.listdir(markers)) >= 3), "three epochs")
    time.sleep(0.1)  # mid-epoch (where a loaded machine lands later, the epochs counted after the stop still match)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    done = len(os.listdir(markers))
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "killed" and outcome.checkpoint is not None
    assert outcome.checkpoint["files"] == 1 and outcome.checkpoint["resumed_from_try"] is None
    assert "final checkpoint 1" in err  # no periodic sync ran (interval 300 s): the final one took it
    assert latest_epoch(store) == done
    retry_resumes(store, tmp_path, spawn_runtime, env, user_env, done)


def test_the_resumable_example_package_continues_from_its_checkpoint(store: Store, tmp_path: Path, request, spawn_runtime: RuntimeSpawner) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    make_dataset(tmp_path / "data", rows=200)
    run(upload_tree(tmp_path / "data", store, "datasets/churn"))
    base = Registry(store).upload(REPO / "examples" / "packages" / "resumable", "resumable")

    def train(try_number: int, epochs: int) -> dict[str, int]:
        spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/d/r/t/{try_number}", package="resumable",
                       version=base.version, blob=base.blob, dataset=store.url("datasets/churn"),
                       env={"EPOCHS": str(epochs)}, checkpoint_prefix=PREFIX, checkpoint_interval=300)
        proc = spawn_runtime.start(spec, env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        return json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/training.json"))

    assert train(1, 3) == {"resumed_from_epoch": 0, "epochs": 3, "epochs_this_run": 3}
    assert train(2, 5) == {"resumed_from_epoch": 3, "epochs": 5, "epochs_this_run": 2}


def test_two_writers_never_overwrite_or_mix_checkpoints(store: Store, tmp_path: Path) -> None:
    """A try that was given up on but still runs, and its retry, sync the same prefix at once."""
    import threading

    writers = {name: sync_for(store, write_files(tmp_path / name, {"tag.txt": "", "data.bin": ""}), try_number=n)
               for n, name in enumerate(("zombie", "retry"), start=1)}
    committed: dict[str, list[int]] = {name: [] for name in writers}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        sync = writers[name]
        try:
            for round_ in range(8):
                tag = f"{name}-{round_}"
                (sync.local_dir / "tag.txt").write_text(tag)
                (sync.local_dir / "data.bin").write_bytes(tag.encode() * 1000)
                stats = sync.sync()
                assert stats is not None
                committed[name].append(stats.seq)
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    seqs = committed["zombie"] + committed["retry"]
    assert len(seqs) == len(set(seqs)) == 16  # every sync committed under its own number

    restored = sync_for(store, tmp_path / "restored", try_number=3).restore()
    assert restored is not None
    tag = (tmp_path / "restored" / "tag.txt").read_text()
    assert (tmp_path / "restored" / "data.bin").read_bytes() == tag.encode() * 1000  # one writer's whole checkpoint
    assert restored.try_number == (1 if tag.startswith("zombie") else 2)


def test_pruning_spares_another_writers_upload_in_flight(tmp_path: Path) -> None:
    """A put's temporary (``<digest>#1`` on a file store) may be a live upload: pruned only once it is old."""
    store = open_store((tmp_path / "store").as_uri())
    ckpt = write_files(tmp_path / "ckpt", {"epoch.txt": "1"})
    sync = sync_for(store, ckpt)
    sync.sync()
    objects_dir = tmp_path / "store" / PREFIX / "objects"
    live, old = objects_dir / f"{'a' * 64}#1", objects_dir / f"{'b' * 64}#1"
    live.write_text("in flight")
    old.write_text("killed long ago")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (ckpt / "epoch.txt").write_text("2")
    sync.sync()
    assert live.exists() and not old.exists()
