"""The node's blob cache (storage/cache.py): sealed entries, what unseals them, concurrent fetches, the known-digest hook."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.package.contents import contents_of, file_mode
from airflow_aicenter.runtime import isolation
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.cache import SEALED_MODE, SEALED_MTIME_NS, BlobCache, PlacedFiles, runtime_cache
from airflow_aicenter.storage.store import Store
from airflow_aicenter.storage.transfer import put_package_files, stage_package
from tests.packages import write_package


def entry_of(cache: BlobCache, data: bytes, tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert cache.add(src, digest, len(data))
    return digest, cache.path(digest)


def test_runtime_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AICENTER_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("AICENTER_BLOB_CACHE", raising=False)
    local = runtime_cache(in_pod=False)
    assert local is not None and local.root == tmp_path / "c" / "blobs"
    monkeypatch.delenv("AICENTER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = runtime_cache(in_pod=False)
    assert default is not None and default.root == tmp_path / "home" / ".cache" / "aicenter" / "blobs"
    assert runtime_cache(in_pod=True) is None, "a pod's AICENTER_CACHE is its own volume: no cache unless asked"
    monkeypatch.setenv("AICENTER_BLOB_CACHE", str(tmp_path / "node"))
    chosen = runtime_cache(in_pod=True)
    assert chosen is not None and chosen.root == tmp_path / "node" / "blobs"
    monkeypatch.setenv("AICENTER_BLOB_CACHE", "off")
    assert runtime_cache(in_pod=False) is None


def test_an_entry_is_sealed_and_only_verified_bytes_enter(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    digest, path = entry_of(cache, b"model bytes", tmp_path)
    st = path.stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (SEALED_MODE, SEALED_MTIME_NS)
    assert cache.lookup(digest, 11) == path
    assert cache.lookup(digest, 12) is None and not path.exists(), "an entry of another size is dropped"
    other = tmp_path / "other.bin"
    other.write_bytes(b"not the bytes")
    assert not cache.add(other, digest, 13), "bytes that do not hash to the name never become an entry"
    assert not path.exists() and not any(cache.tmp.iterdir())
    assert (cache.root.stat().st_mode & 0o777) == 0o700, "package content of every run: private to the runtime's user"


@pytest.mark.parametrize("change", ["write", "chmod", "touch", "chown", "replace"])
def test_a_changed_entry_is_dropped(tmp_path: Path, change: str) -> None:
    cache = BlobCache(tmp_path / "c")
    digest, path = entry_of(cache, b"0123456789", tmp_path)
    if change == "write":  # root writes a read-only file; the modification time says so
        with open(path, "r+b") as fh:
            fh.write(b"X")
    elif change == "chmod":
        path.chmod(0o644)
    elif change == "touch":
        os.utime(path)
    elif change == "chown":
        os.chown(path, 12345, 12345)
    else:
        fresh = tmp_path / "fresh"
        fresh.write_bytes(b"9876543210")
        os.replace(fresh, path)
    assert cache.lookup(digest, 10) is None
    assert not path.exists()


def test_known_gives_a_digest_only_while_the_placed_file_is_untouched(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    digest, _ = entry_of(cache, b"weights", tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("linked", "copied", "chmodded", "relinked"):
        if name == "linked":
            cache.link(digest, work / name, size=7)
        else:
            cache.copy(digest, work / name, size=7, mode=0o644)
    placed = PlacedFiles()
    for name in ("linked", "copied", "chmodded", "relinked"):
        placed.remember(work / name, digest)
    assert all(placed.known(work / n, (work / n).stat()) == digest for n in ("linked", "copied", "chmodded", "relinked"))
    (work / "copied").write_bytes(b"weights")  # the same bytes, rewritten: hashed again all the same
    (work / "chmodded").chmod(0o755)
    os.link(work / "relinked", work / "another-name")
    for name in ("copied", "chmodded", "relinked"):
        assert placed.known(work / name, (work / name).stat()) is None, name
    assert placed.known(tmp_path / "src.bin", (tmp_path / "src.bin").stat()) is None, "not placed by the cache"


def test_link_falls_back_to_a_copy_on_another_file_system(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system here")
    cache = BlobCache(tmp_path / "c")
    digest, path = entry_of(cache, b"weights", tmp_path)
    dest = shm / f"aicenter-test-{os.getpid()}"
    try:
        assert cache.link(digest, dest, size=7) is False
        assert dest.read_bytes() == b"weights" and dest.stat().st_ino != path.stat().st_ino
        assert (dest.stat().st_mode & 0o777) == 0o644
    finally:
        dest.unlink(missing_ok=True)


def test_a_published_entry_wins_and_an_unsealed_one_is_replaced(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    digest, path = entry_of(cache, b"abc", tmp_path)
    inode = path.stat().st_ino
    tmp = cache.new_temp(digest)
    tmp.write_bytes(b"abc")
    assert cache.publish(tmp, digest, 3) == path and path.stat().st_ino == inode, "the first entry stays"
    path.chmod(0o644)  # unsealed
    tmp = cache.new_temp(digest)
    tmp.write_bytes(b"abc")
    cache.publish(tmp, digest, 3)
    assert cache.lookup(digest, 3) == path and path.stat().st_ino != inode
    assert not any(cache.tmp.iterdir())


STAGE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from airflow_aicenter.records import BlobRef
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.cache import BlobCache
    from airflow_aicenter.storage.transfer import stage_package
    store = open_store(sys.argv[1])
    ref = BlobRef.model_validate_json(sys.argv[2])
    root, fetched = stage_package(store, ref, Path(sys.argv[3]), Path(sys.argv[3] + ".zip"), cache=BlobCache(Path(sys.argv[4])))
    print(fetched)
""")


def test_concurrent_runs_on_one_node_fetch_into_one_cache_without_clashing(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = dict(os.environ)
    if store.uri.startswith("s3://"):
        env.update(request.getfixturevalue("s3_env").env())
    package = write_package(tmp_path / "pkg", files={"w.bin": os.urandom(2**20 + 5), "b.bin": os.urandom(70_000)})
    ref, _ = put_package_files(store, package)
    procs = [subprocess.Popen([sys.executable, "-c", STAGE, store.uri, ref.model_dump_json(), str(tmp_path / f"r{n}" / "p"),
                               str(tmp_path / "cache")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    for n in range(4):
        assert (tmp_path / f"r{n}" / "p" / "w.bin").read_bytes() == (package / "w.bin").read_bytes()
    cache = BlobCache(tmp_path / "cache")
    assert not any(cache.tmp.iterdir()), "no fetch left behind"
    assert len(list(cache.entries.iterdir())) == len(contents_of(package).digests()) + 1  # + the manifest
    _, fetched = stage_package(store, ref, tmp_path / "again" / "p", tmp_path / "again.zip", cache=cache)
    assert fetched == 0



def test_trim_removes_the_least_recently_used_entries_past_the_limit(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c", max_bytes=250)
    digests = [entry_of(cache, bytes([n]) * 100, tmp_path)[0] for n in range(4)]
    hour = 3600 * 10**9
    for age, digest in zip((5, 2, 4, 3), digests, strict=True):  # hours since each was last used
        atime = time.time_ns() - age * hour
        os.utime(cache.path(digest), ns=(atime, SEALED_MTIME_NS))
    assert cache.trim(keep={digests[0]}) == 200, "the oldest but kept one stays; the next two oldest go"
    assert [cache.lookup(d, 100) is not None for d in digests] == [True, True, False, False]
    assert cache.lookup(digests[1], 100) is not None and cache.trim() == 0, "within the limit, or used in the last hour"
    assert BlobCache(tmp_path / "c", max_bytes=None).trim() == 0


def test_a_lookup_marks_an_entry_used_and_keeps_it_sealed(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    digest, path = entry_of(cache, b"abc", tmp_path)
    os.utime(path, ns=(1, SEALED_MTIME_NS))
    assert cache.lookup(digest, 3) == path
    st = path.stat()
    assert st.st_atime_ns > 1 and st.st_mtime_ns == SEALED_MTIME_NS and cache.lookup(digest, 3) == path


@pytest.mark.parametrize(("text", "size"), [("40G", 40 * 2**30), ("500M", 500 * 2**20), ("1.5GiB", 3 * 2**29),
                                            ("1024", 1024), ("0", None)])
def test_the_cache_limit_setting(text: str, size: int | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AICENTER_CACHE", str(tmp_path))
    monkeypatch.setenv("AICENTER_BLOB_CACHE_MAX", text)
    cache = runtime_cache(in_pod=False)
    assert cache is not None and cache.max_bytes == size


@pytest.mark.parametrize("text", ["lots", "-1G", "G"])
def test_a_bad_cache_limit_is_named(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AICENTER_BLOB_CACHE_MAX", text)
    with pytest.raises(ConfigurationError, match=r"AICENTER_BLOB_CACHE_MAX=.* (is not a size|is negative).* 0 for no limit"):
        runtime_cache(in_pod=False)


def test_a_finished_runs_new_file_is_adopted_without_a_copy_unless_touched_after_the_seal(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    work = tmp_path / "work"
    work.mkdir()
    kept, touched = work / "weights.bin", work / "touched.bin"
    for path in (kept, touched):
        path.write_bytes(b"new weights")
    digest = hashlib.sha256(b"new weights").hexdigest()
    sealed = {p: cache.seal_in_place(p) for p in (kept, touched)}
    assert all(st is not None for st in sealed.values())
    assert file_mode(kept.stat().st_mode) == 0o644, "a version records a sealed file as it was: not executable"
    with open(touched, "r+b") as fh:  # a lingering process writes after the seal, while the file is hashed
        fh.write(b"N")
    os.utime(touched, ns=(1, SEALED_MTIME_NS))  # even with the sealed time put back: the change time gives it away
    touched_st = sealed[touched]
    assert touched_st is not None and not cache.adopt(touched, digest, 11, touched_st)
    kept_st = sealed[kept]
    assert kept_st is not None and cache.adopt(kept, digest, 11, kept_st)
    assert cache.path(digest).stat().st_ino == kept.stat().st_ino, "a link: no copy"
    kept.unlink()  # the work folder goes
    assert cache.lookup(digest, 11) is not None and cache.path(digest).read_bytes() == b"new weights"


def test_what_is_never_sealed_in_place(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "c")
    script, shared, foreign = tmp_path / "run.sh", tmp_path / "shared", tmp_path / "foreign"
    for path in (script, shared, foreign):
        path.write_bytes(b"x")
    script.chmod(0o755)
    os.link(shared, tmp_path / "other-name")
    os.chown(foreign, 12345, 12345)
    for path in (script, shared, foreign):
        before = path.stat()
        assert cache.seal_in_place(path) is None
        assert (path.stat().st_mode, path.stat().st_mtime_ns) == (before.st_mode, before.st_mtime_ns)



# -- what staging placed, as a run_as_user hand-over and a pod's sync see it (PlacedFiles) -------
def _staged(store_dir: Path, tmp_path: Path) -> tuple[Path, PlacedFiles, dict[str, str]]:
    """A per-file package staged without a cache into ``tmp_path/work/package``, with what staging placed."""
    store = open_store(store_dir.as_uri())
    pkg = write_package(tmp_path / "pkg", files={"weights.bin": os.urandom(2**20), "meta.json": "{}"})
    ref, _ = put_package_files(store, pkg)
    placed = PlacedFiles()
    root, _ = stage_package(store, ref, tmp_path / "work" / "package", tmp_path / "x.zip", cache=None, link=False,
                            placed=placed)
    digests = {f.path: f.sha256 for f in contents_of(pkg).files}
    return root, placed, digests


def test_staging_without_a_cache_knows_what_it_placed(tmp_path: Path) -> None:
    root, placed, digests = _staged(tmp_path / "store", tmp_path)
    assert contents_of(root, known=placed.known) == contents_of(root)
    assert all(placed.known(root / rel, (root / rel).lstat()) == digest for rel, digest in digests.items())


def test_the_hand_over_to_run_as_user_keeps_untouched_files_known(tmp_path: Path) -> None:
    """The agent's chown to that user moves every ctime; the files untouched before it stay known after it,
    a file written before it (its mtime put back) does not, nor one that user writes after it."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (chown to another user), as the local launcher's run_as_user does")
    root, placed, digests = _staged(tmp_path / "store", tmp_path)
    weights, meta = root / "weights.bin", root / "meta.json"
    st = meta.stat()
    meta.write_text("{}")  # the same bytes again, the modification time put back: only the change time tells
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns))
    stale = PlacedFiles(placed.table())  # what the cache's in-process table knew: it did not see the chown
    time.sleep(0.02)  # past the file system's clock tick: the chown's change time differs from staging's
    with placed.handing_over(root.parent):
        isolation.hand_over(tmp_path / "work", 65534, 65534, [root])
    after = weights.lstat()
    assert after.st_uid == 65534
    assert stale.known(weights, after) is None, "the chown moved the change time"
    assert placed.known(weights, after) == digests["weights.bin"], "known across the agent's own chown"
    assert placed.known(meta, meta.lstat()) is None, "written before the hand-over: hashed again"
    with open(weights, "r+b") as fh:  # what that user may do to its package folder
        fh.write(b"x")
    assert placed.known(weights, weights.lstat()) is None


def test_a_table_handed_from_stage_to_sync_knows_the_same_files(tmp_path: Path) -> None:
    """A pod's stage hands its table to sync in the agent's state (plain values): same answers there."""
    root, placed, digests = _staged(tmp_path / "store", tmp_path)
    handed = PlacedFiles(placed.table())
    assert all(handed.known(root / rel, (root / rel).lstat()) == digest for rel, digest in digests.items())
    (root / "meta.json").chmod(0o600)
    assert handed.known(root / "meta.json", (root / "meta.json").lstat()) is None
