"""Storage faults: 503 SlowDown, connection resets, hung requests, truncated bodies and lost answers,
injected by a loopback proxy in front of the moto S3 server.

Transfers must retry with backoff and complete with every byte right (digests checked), or
fail with a clear message once the retry budget is spent; a commit whose answer is lost must
still make exactly one version.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import airflow_aicenter.storage.store as store_module
from airflow_aicenter.errors import StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.records import RunRef
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import S3Options, open_store
from airflow_aicenter.storage.transfer import (
    FileEntry,
    download_tree,
    ensure_blobs,
    get_blob,
    local_files,
    put_blob,
    run,
    sha256_file,
    upload_tree,
)
from tests.conftest import write_files
from tests.resilience.support import FaultPlan, FaultProxy, QuickerTimeouts, QuickTimeouts, check_store


def _data(root: Path) -> Path:
    files: dict[str, str | bytes] = {f"small/f{i:03d}.bin": os.urandom(1000 + i) for i in range(60)}
    files["big/model.bin"] = os.urandom(20 * 2**20)  # multipart upload (8 MiB parts), several GET chunks
    return write_files(root, files)


def test_transfers_complete_through_every_kind_of_fault(faulty, tmp_path):
    proxy, store, direct = faulty
    plan = proxy.plan
    plan.rules = [
        (lambda m, p: m == "PUT" and "/big/" in p, "reset", 2),  # multipart parts / create
        (lambda m, p: m == "GET" and "/big/" in p, "truncate", 1),  # a body cut in the middle
        (lambda m, p: m == "GET" and "/small/" in p, "hang", 1),  # no answer until the client times out
        (lambda m, p: m == "HEAD", "slowdown", 3),
        (lambda m, p: m == "PUT" and "/blobs/" in p, "reset_after", 2),  # a put that landed, its answer lost
        (lambda m, p: m == "POST", "slowdown", 2),  # multipart create / complete
    ]
    plan.rate, plan.random_faults, plan.max_faults = 0.08, ("slowdown", "reset"), 150
    plan.__post_init__()
    src = _data(tmp_path / "src")

    # 16 in flight, not 256: the proxy is a thread per connection and the 1 s client timeouts are
    # sized for it; a slow answer past the timeout is a put that lands twice (412 on the second).
    run(upload_tree(src, store, "data", limit=16))
    entries = [FileEntry(rel, *_digest(src / rel)) for rel in local_files(src)]
    stats = run(ensure_blobs(store, src, entries, limit=16))
    # a put that landed but whose answer was lost is retried, gets 412, and counts as "already there"
    assert stats.uploaded_files >= len(entries) - 2
    assert all(direct.exists(blob_key(e.sha256)) for e in entries)
    got = run(download_tree(store, tmp_path / "dst", prefix="data", limit=16))
    model = sha256_file(src / "big" / "model.bin").sha256
    get_blob(store, model, tmp_path / "model.bin")

    assert {e.path: e.sha256 for e in got} == {e.path: e.sha256 for e in entries}
    for rel in local_files(src):
        assert (tmp_path / "dst" / rel).read_bytes() == (src / rel).read_bytes()
    kinds = {kind for kind, _, _ in plan.injected}
    assert {"reset", "truncate", "hang", "slowdown", "reset_after"} <= kinds, plan.injected
    assert len(plan.injected) >= 15
    check_store(direct)  # every blob hashes to its name, read straight from the server
    assert not list(tmp_path.glob("dst/**/.*.part")), "no temp file left behind"


def _digest(path: Path) -> tuple[str, int]:
    entry = sha256_file(path)
    return entry.sha256, entry.size


def test_commit_whose_answer_is_lost_makes_exactly_one_version(faulty, tmp_path):
    """The create-once PUT of a version record lands, its answer is lost, the client retries and gets
    412: that record is ours, not a lost race, so no second version may be taken."""
    proxy, store, direct = faulty
    registry = Registry(store)
    main = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
    pkg = write_files(tmp_path / "pkg", {"main.py": main, "requirements.txt": ""})
    base = Registry(direct).upload(pkg, "lost")
    proxy.plan.rules = [(lambda m, p: m == "PUT" and "/versions/" in p, "reset_after", 1)]
    proxy.plan.__post_init__()
    run_ref = RunRef(dag_id="d", run_id="r", task_id="t", try_number=1)
    record = registry.commit_once("lost", run=run_ref, parent=base.version, blob=base.blob, pipeline="train")
    assert [k for k, _, _ in proxy.plan.injected] == ["reset_after"]
    assert record.version == "1.1"
    assert check_store(direct) == ["lost:1.0", "lost:1.1"]
    # and the alias history, which is the same kind of numbered record
    proxy.plan.rules = [(lambda m, p: m == "PUT" and "/aliases/" in p, "reset_after", 1)]
    proxy.plan.__post_init__()
    registry.set_alias("lost", "production", "1.1")
    history = Registry(direct).alias_history("lost", "production")
    assert [h.version for h in history] == ["1.1"] and [k for k, _, _ in proxy.plan.injected] == ["reset_after"]


@pytest.mark.parametrize("fault", ["slowdown", "reset", "hang"])
def test_persistent_fault_fails_with_a_clear_message_after_the_retry_budget(faulty, fast_retries, tmp_path, fault):
    proxy, store, direct = faulty
    # Three retries show "retried, and bounded" as well as six, at half the cost: a hang costs a
    # whole client timeout a try (half a second here: one request at a time).
    fast_retries["max_retries"] = 3
    store = open_store(store.uri, QuickerTimeouts(endpoint_url=proxy.endpoint, region="us-east-1",
                                                access_key_id="testing", secret_access_key="testing-secret"))
    direct.put_bytes("data/a.bin", b"x" * 100)
    proxy.plan.rules = [(lambda m, p: True, fault, 10_000)]
    proxy.plan.max_faults = 10_000
    proxy.plan.__post_init__()
    with pytest.raises(StorageError) as info:
        run(download_tree(store, tmp_path / "dst", prefix="data"))
    message = str(info.value)
    assert store.url("data") in message or store.url("data/a.bin") in message, message
    assert "retries" in message or "retry" in message, message
    if fault == "slowdown":
        assert "SlowDown" in message or "503" in message, message
    tries = len(proxy.plan.injected)
    assert 2 <= tries <= fast_retries["max_retries"] + 2, (tries, proxy.plan.injected)  # retried, and bounded
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("*"))


def test_put_blob_through_faults_never_leaves_a_corrupt_blob(faulty, tmp_path):
    proxy, store, direct = faulty
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(12 * 2**20))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    proxy.plan.rules = [
        (lambda m, p: m == "HEAD", "reset", 1),
        (lambda m, p: m == "POST" and "uploads" in p, "slowdown", 1),  # create the multipart upload
        (lambda m, p: m == "PUT" and "partNumber=1" in p, "reset_after", 1),  # part 1 lands, answer lost
        (lambda m, p: m == "PUT" and "partNumber=2" in p, "truncate", 1),
        (lambda m, p: m == "POST" and "uploadId" in p, "reset_after", 1),  # the complete lands, answer lost
    ]
    proxy.plan.__post_init__()
    put_blob(store, path, digest)
    assert len(proxy.plan.injected) == 5, proxy.plan.injected
    assert direct.head(blob_key(digest)).size == path.stat().st_size
    check_store(direct)


@pytest.mark.parametrize("how", ["put_blob", "ensure_blobs"])
def test_a_damaged_blob_that_these_credentials_may_not_overwrite_is_named_with_its_repair(faulty, tmp_path, how):
    """Run credentials may only create blobs: repairing a damaged one in a run is refused (403).

    That refusal read as "access denied; check the credentials", about a blob that is damaged:
    the error names the damage and the repairs that work, and is not retried.
    """
    proxy, store, direct = faulty
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(50_000))
    entry = FileEntry(path.name, sha256_file(path).sha256, 50_000)
    assert put_blob(direct, path, entry.sha256) is True
    damaged = bytearray(path.read_bytes())
    damaged[7] ^= 0x01
    direct.put_bytes(blob_key(entry.sha256), bytes(damaged))
    proxy.plan.rules = [(lambda m, p: m == "PUT" and "/blobs/" in p, "denied", 10)]
    proxy.plan.__post_init__()
    with pytest.raises(StorageError) as info:
        if how == "put_blob":
            put_blob(store, path, entry.sha256)
        else:
            run(ensure_blobs(store, tmp_path, [entry]))
    message = str(info.value)
    assert f"blob sha256:{entry.sha256}" in message and "is damaged" in message, message
    assert "may not overwrite" in message and "aicenter verify --repair" in message, message
    assert not info.value.retryable
    assert len(proxy.plan.injected) == 1, "a refusal is not retried"


@pytest.mark.parametrize("size", [5000, 20 * 2**20], ids=["single-put", "multipart"])
def test_a_file_changed_after_hashing_is_never_stored_under_the_old_digest(store, tmp_path, size):
    """Package code that rewrites a staged file must not poison the content-addressed store: the
    upload hashes what it sends and stores nothing when it no longer matches the blob's name."""
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(size))
    entry = FileEntry("data.bin", sha256_file(path).sha256, size)
    path.write_bytes(os.urandom(size))  # changed after the digest was taken (same size)
    with pytest.raises(StorageError, match="changed while it was being stored"):
        run(ensure_blobs(store, tmp_path, [entry]))
    assert not store.exists(blob_key(entry.sha256))
    with pytest.raises(StorageError, match="changed while it was being stored"):
        put_blob(store, path, entry.sha256)
    assert not store.exists(blob_key(entry.sha256))
    assert list(store.list("blobs/")) == []  # no partial object either (an aborted multipart upload)


# -- large objects, overload, retry budget (issue 11) -------------------------------------------
def test_a_large_object_is_read_as_ranges_and_a_failed_part_is_retried(faulty, small_ranges, tmp_path):
    proxy, store, direct = faulty
    data = os.urandom(6 * 2**20 + 12345)  # 7 parts, an odd tail
    digest = hashlib.sha256(data).hexdigest()
    direct.put_bytes(blob_key(digest), data)
    proxy.plan.rules = [
        (lambda m, p: m == "GET" and "/blobs/" in p, "truncate", 2),  # parts cut in the middle
        (lambda m, p: m == "GET" and "/blobs/" in p, "reset", 2),
        (lambda m, p: m == "GET" and "/blobs/" in p, "slowdown", 2),
    ]
    proxy.plan.__post_init__()
    before = proxy.requests
    got = get_blob(store, digest, tmp_path / "model.bin")
    assert (got.sha256, got.size) == (digest, len(data))
    assert (tmp_path / "model.bin").read_bytes() == data
    assert [k for k, _, _ in proxy.plan.injected] == ["truncate"] * 2 + ["reset"] * 2 + ["slowdown"] * 2
    assert proxy.requests - before >= 1 + 7 + 6, "a HEAD, then one GET per part, plus the retried ones"
    assert store.ranged_reads
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"], "no temporary left"


def test_a_damaged_large_object_read_as_ranges_is_refused(faulty, small_ranges, tmp_path):
    _, store, direct = faulty
    data = bytearray(os.urandom(5 * 2**20))
    digest = hashlib.sha256(data).hexdigest()
    data[3 * 2**20 + 7] ^= 1
    direct.put_bytes(blob_key(digest), bytes(data))
    with pytest.raises(StorageError, match="is corrupt"):
        get_blob(store, digest, tmp_path / "model.bin")
    assert list(tmp_path.iterdir()) == []


class RangeIgnoringProxy(FaultProxy):
    """A server that answers every ranged GET with the whole object (as rclone serve s3 does)."""

    def _forward(self, h, body):
        del h.headers["Range"]
        return super()._forward(h, body)


def test_a_server_that_ignores_range_gets_one_stream(s3_server, fast_retries, small_ranges, tmp_path):
    bucket = s3_server.create_bucket()
    direct = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    data = os.urandom(5 * 2**20 + 3)
    digest = hashlib.sha256(data).hexdigest()
    direct.put_bytes(blob_key(digest), data)
    with RangeIgnoringProxy(s3_server.port) as proxy:
        store = open_store(f"s3://{bucket}/aicenter", QuickTimeouts(endpoint_url=proxy.endpoint, region="us-east-1",
                                                                    access_key_id="testing", secret_access_key="testing-secret"))
        got = get_blob(store, digest, tmp_path / "model.bin")
        assert got.sha256 == digest and (tmp_path / "model.bin").read_bytes() == data
        assert store.ranged_reads is False, "remembered: the next large object is one stream at once"
        get_blob(store, digest, tmp_path / "again.bin")
        assert (tmp_path / "again.bin").read_bytes() == data


def test_overload_lowers_the_number_of_requests_in_flight(faulty, monkeypatch, tmp_path):
    """obstore's own retries off, so each 503 reaches the transfer: it halves its limit and retries."""
    from airflow_aicenter.storage import transfer

    proxy, _, direct = faulty
    monkeypatch.setattr(store_module, "RETRY_CONFIG", {"max_retries": 0})
    monkeypatch.setattr(transfer, "TRANSFER_ATTEMPTS", 8)
    monkeypatch.setattr(transfer, "RETRY_WAIT", 0.02)
    store = open_store(direct.uri, QuickTimeouts(endpoint_url=proxy.endpoint, region="us-east-1",
                                                 access_key_id="testing", secret_access_key="testing-secret"))
    src = write_files(tmp_path / "src", {f"f{i:03d}.bin": os.urandom(500 + i) for i in range(80)})
    run(upload_tree(src, direct, "data"))
    proxy.plan.rules = [(lambda m, p: m == "GET" and "/data/" in p, "slowdown", 25)]
    proxy.plan.__post_init__()
    limit = transfer.AdaptiveLimit(32)
    got = run(download_tree(store, tmp_path / "dst", prefix="data", limit=limit))
    assert len(got) == 80 and len(proxy.plan.injected) == 25
    assert limit.lowest <= 4, f"25 overloads should have brought 32 in flight down to a few, not {limit.lowest}"
    for rel in local_files(src):
        assert (tmp_path / "dst" / rel).read_bytes() == (src / rel).read_bytes()


def test_a_server_overloaded_for_seconds_is_outlasted(s3_server, tmp_path):
    """The production retry policy: 503 SlowDown to every request for 4 s, and the read still succeeds
    (the old policy, 8 retries from 100 ms, spent its whole budget in about a second: 4 s is three
    times that, and each second more only adds to the test's time)."""
    import time

    bucket = s3_server.create_bucket()
    direct = open_store(f"s3://{bucket}/aicenter", s3_server.options)
    direct.put_bytes("data/a.bin", b"payload")
    until = [0.0]
    plan = FaultPlan(rules=[(lambda m, p: time.monotonic() < until[0], "slowdown", 10_000)], max_faults=10_000)
    with FaultProxy(s3_server.port, plan) as proxy:
        store = open_store(f"s3://{bucket}/aicenter", S3Options(endpoint_url=proxy.endpoint, region="us-east-1",
                                                               access_key_id="testing", secret_access_key="testing-secret"))
        until[0] = time.monotonic() + 4
        began = time.monotonic()
        assert store.get_bytes("data/a.bin") == b"payload"
        assert time.monotonic() - began >= 4 and len(plan.injected) >= 3
