"""Concurrency: 32 trainings of one parent finishing at once, and concurrent alias promotions.

Each of 32 processes stores its own new package content (as a run's package_upload does)
and registers it with ``commit_once`` at the same moment (a barrier releases them together),
on the moto S3 server and on the file store. Every one must get its own version, none lost,
each pointing at its own content. One of the 32 is a real runtime run's outcome.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

from airflow_aicenter.records import BlobRef, Outcome, RunRef, read
from tests.resilience.support import check_store, run_runtime

N = 32


def _train_and_commit(uri: str, options: object, index: int, parent: str, workdir: str, barrier: object,
                      real_blob: tuple[str, int] | None) -> tuple[int, str, str]:
    """One finishing training: store its content, wait for the others, register."""
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.transfer import put_blob, sha256_file

    store = open_store(uri, options)  # type: ignore[arg-type]
    if real_blob is not None:
        blob = BlobRef(sha256=real_blob[0], size=real_blob[1])
    else:
        path = Path(workdir) / f"content-{index}.zip"
        path.write_bytes(f"package content of training {index}".encode() * 50)
        entry = sha256_file(path)
        put_blob(store, path, entry.sha256)
        blob = BlobRef(sha256=entry.sha256, size=entry.size)
    run = RunRef(dag_id="conc", run_id="r", task_id=f"train_{index}", try_number=1)
    barrier.wait(timeout=60)  # type: ignore[attr-defined]
    record = Registry(store).commit_once("res", run=run, parent=parent, blob=blob, pipeline="train")
    return index, record.version, record.blob.sha256


def test_32_concurrent_trainings_get_32_distinct_versions(concurrency_setup, tmp_path):
    concurrency_setup, options = concurrency_setup
    ref, spec = concurrency_setup.spec(try_number=1)
    done = run_runtime(spec, tmp_path, concurrency_setup.env)
    assert done.returncode == 0, done.stderr[-2000:]
    real = read(concurrency_setup.store, f"{spec.run_prefix}/outcome.json", Outcome).blob

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["airflow_aicenter.registry", "airflow_aicenter.storage.transfer"])
    barrier = ctx.Manager().Barrier(N)
    args = [(concurrency_setup.store.uri, options, i, concurrency_setup.base.version, str(tmp_path), barrier,
             (real.sha256, real.size) if i == 0 else None) for i in range(N)]
    with ctx.Pool(N) as pool:
        results = pool.starmap(_train_and_commit, args, chunksize=1)

    versions = [v for _, v, _ in results]
    assert len(set(versions)) == N, sorted(versions)
    assert sorted(versions, key=lambda v: int(v.split(".")[1])) == [f"1.{m}" for m in range(1, N + 1)]
    assert check_store(concurrency_setup.store) == ["res:1.0"] + [f"res:1.{m}" for m in range(1, N + 1)]
    for index, version, sha in results:  # each version holds the content of the run that made it
        record = concurrency_setup.registry.get("res", version)
        assert record.blob.sha256 == sha and record.run.task_id == f"train_{index}" and record.parent == "1.0"
    assert concurrency_setup.registry.get("res", next(v for i, v, _ in results if i == 0)).blob.sha256 == real.sha256
    assert concurrency_setup.registry.resolve("res", "latest").version == f"1.{N}"


def test_concurrent_alias_promotions_keep_a_consistent_history(concurrency_setup):
    concurrency_setup, _ = concurrency_setup
    registry = concurrency_setup.registry
    targets = [concurrency_setup.base.version] + [
        registry.commit("res", parent="1.0", blob=concurrency_setup.base.blob, pipeline="train").version for _ in range(7)
    ]
    barrier = threading.Barrier(16)
    errors: list[BaseException] = []

    def promote(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            registry.set_alias("res", "production", targets[i % len(targets)], set_by=f"promoter-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    history = registry.alias_history("res", "production")
    assert [h.seq for h in history] == list(range(16))  # contiguous, none lost
    assert sorted(h.set_by for h in history) == sorted(f"promoter-{i}" for i in range(16))  # each exactly once
    assert history[0].previous is None
    for before, after in zip(history, history[1:]):
        assert after.previous == before.version
    assert registry.alias("res", "production").version == history[-1].version
