"""Package environments (DESIGN "★ Environments"): uv installs, the local cache, the store, corruption, races, offline.

Real uv, real virtual environments, real stores (file and the moto S3 server). Nothing comes from
PyPI: the packages are tiny wheels written here, named by a package-local path or served from a
PEP 503 index folder (file://).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from airflow_aicenter.errors import RequirementsError, StorageError
from airflow_aicenter.layout import blob_key, env_key
from airflow_aicenter.records import read
from airflow_aicenter.runtime.environment import (
    MARKER,
    Environment,
    EnvironmentRecord,
    mask_url,
    prepare_environment,
    requirement_material,
)
from airflow_aicenter.storage import Store
from tests.conftest import free_port, write_files


def tiny_wheel(folder: Path, name: str = "aicenter_tiny", version: str = "0.1", value: int = 42,
               extra: dict[str, str] | None = None) -> Path:
    """A real, minimal, installable wheel (METADATA, WHEEL, RECORD with digests); ``extra``: more files of the package."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n",
        **{f"{name}/{rel}": text for rel, text in (extra or {}).items()},
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
        zf.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")
    return path


def simple_index(folder: Path, wheel: Path) -> str:
    """A PEP 503 index on disk serving ``wheel``; its file:// URL."""
    project = wheel.name.split("-")[0].replace("_", "-")
    page = folder / "simple" / project
    page.mkdir(parents=True)
    shutil.copy(wheel, page / wheel.name)
    (page / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
    return (folder / "simple").as_uri()


def package(root: Path, requirements: str, **files: str | bytes) -> Path:
    return write_files(root, {"main.py": "class Main:\n    def predict(self, x):\n        return x\n",
                              "requirements.txt": requirements, **files})


def local_wheel_package(tmp_path: Path, name: str = "pkg", value: int = 42, extra: dict[str, str] | None = None) -> Path:
    root = package(tmp_path / name, "./wheels/aicenter_tiny-0.1-py3-none-any.whl\n")
    tiny_wheel(root / "wheels", value=value, extra=extra)
    return root


def imports_tiny(env: Environment) -> str:
    done = subprocess.run([str(env.python), "-c", "import aicenter_tiny, sys; print(aicenter_tiny.VALUE, sys.prefix)"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def prepare(root: Path, store: Store, cache: Path, said: list[str] | None = None, indexes: Sequence[str] = ()) -> Environment:
    log = said.append if said is not None else (lambda message: None)
    env = prepare_environment(root, store, cache_dir=cache, log=log, indexes=indexes)
    env.finish(log)
    return env


# -- miss, local hit, store hit ---------------------------------------------------------------
def test_miss_installs_then_the_local_cache_then_the_store_serve_it(store: Store, tmp_path: Path, closed_index: str) -> None:
    root = local_wheel_package(tmp_path)
    said: list[str] = []
    first = prepare(root, store, tmp_path / "cache", said)
    assert first.source == "installed" and imports_tiny(first) == f"42 {first.python.parent.parent}"
    assert first.python.parent.parent == tmp_path / "cache" / "envs" / first.key
    assert any("+ aicenter-tiny==0.1" in line or "stored for the next run" in line for line in said)
    record = read(store, env_key(first.key), EnvironmentRecord)
    assert store.exists(blob_key(record.blob.sha256)) and record.requirements == requirement_material(root)

    again = prepare(root, store, tmp_path / "cache")
    assert (again.source, again.python, again.key) == ("local", first.python, first.key)

    shutil.rmtree(tmp_path / "cache")  # a new machine: only the store has it
    restored = prepare(root, store, tmp_path / "cache")
    assert restored.source == "store" and restored.key == first.key
    assert imports_tiny(restored) == f"42 {restored.python.parent.parent}"
    assert (restored.python.parent.parent / MARKER).is_file()
    assert restored.summary() == {"key": first.key, "source": "store", "seconds": restored.seconds}


def test_the_environment_is_its_own_never_the_workers(store: Store, tmp_path: Path) -> None:
    env = prepare(package(tmp_path / "pkg", ""), store, tmp_path / "cache")
    assert env.source == "none"
    probe = "import sys, importlib.util; print(sys.prefix); print(importlib.util.find_spec('airflow') is None); print(sys.path)"
    done = subprocess.run([str(env.python), "-c", probe], capture_output=True, text=True, check=True)
    prefix, no_airflow, path = done.stdout.splitlines()
    assert Path(prefix) == tmp_path / "cache" / "envs" / env.key
    assert no_airflow == "True", "the worker's own packages (Airflow) must not be visible to package code"
    assert sys.prefix not in path or sys.prefix == sys.base_prefix
    assert any(p.startswith(sys.base_prefix) and p.endswith("site-packages") for p in eval(path)), "image packages visible"
    assert not store.exists(env_key(env.key)), "an empty environment is made, never stored"


# -- the key -----------------------------------------------------------------------------------
def test_key_ignores_order_comments_and_blank_lines_but_not_content(tmp_path: Path, store: Store) -> None:
    a = package(tmp_path / "a", "numpy==2.1\n# arrays\npandas>=2\n")
    b = package(tmp_path / "b", "\npandas>=2   # frames\n\nnumpy==2.1\n")
    c = package(tmp_path / "c", "numpy==2.2\npandas>=2\n")
    assert requirement_material(a) == requirement_material(b) != requirement_material(c)
    one, two = local_wheel_package(tmp_path, "w1", value=1), local_wheel_package(tmp_path, "w2", value=2)
    assert requirement_material(one) != requirement_material(two), "a rebuilt local wheel is a new environment"
    first, second = prepare(one, store, tmp_path / "cache"), prepare(two, store, tmp_path / "cache")
    assert first.key != second.key and imports_tiny(first).startswith("1 ") and imports_tiny(second).startswith("2 ")


# -- corruption --------------------------------------------------------------------------------
def test_a_corrupted_stored_environment_is_detected_and_rebuilt(store: Store, tmp_path: Path, closed_index: str) -> None:
    root = local_wheel_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    store.put_bytes(blob_key(record.blob.sha256), b"not an environment")  # damaged at rest

    said: list[str] = []
    rebuilt = prepare(root, store, tmp_path / "c2", said)
    assert rebuilt.source == "installed" and imports_tiny(rebuilt).startswith("42 ")
    assert any("cannot be used" in line and "is corrupt" in line for line in said), said
    replaced = read(store, env_key(first.key), EnvironmentRecord)
    assert replaced.blob.sha256 != record.blob.sha256, "the record now names the rebuilt environment"

    restored = prepare(root, store, tmp_path / "c3")
    assert restored.source == "store" and imports_tiny(restored).startswith("42 ")


# -- two first runs at once --------------------------------------------------------------------
@pytest.mark.parametrize("shared_cache", [True, False], ids=["same-machine", "two-machines"])
def test_two_first_runs_at_once_both_succeed_and_one_environment_is_stored(
        store: Store, tmp_path: Path, closed_index: str, shared_cache: bool) -> None:
    root = local_wheel_package(tmp_path)
    results: dict[int, Environment | BaseException] = {}
    barrier = threading.Barrier(2)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = prepare(root, store, tmp_path / ("cache" if shared_cache else f"cache{index}"))
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    envs = [env for env in results.values() if isinstance(env, Environment)]
    assert len(envs) == 2, results
    for env in envs:
        assert imports_tiny(env).startswith("42 ")
    records = [info.key for info in store.list("envs/") if info.key.endswith(".json")]
    assert records == [env_key(envs[0].key)]
    record = read(store, records[0], EnvironmentRecord)
    shutil.rmtree(tmp_path / ("cache" if shared_cache else "cache0"))
    assert prepare(root, store, tmp_path / "fresh").source == "store", f"the stored blob {record.blob.sha256} is whole"
    leftovers = [p.name for p in (tmp_path / "fresh" / "envs").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


# -- no index on a warm run; private indexes ---------------------------------------------------
def test_a_warm_run_needs_no_package_index(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = simple_index(tmp_path / "mirror", tiny_wheel(tmp_path / "built"))
    root = package(tmp_path / "pkg", "aicenter-tiny==0.1\n")
    cold = prepare(root, store, tmp_path / "c1", indexes=[index])
    assert cold.source == "installed" and imports_tiny(cold).startswith("42 ")

    closed = f"http://127.0.0.1:{free_port()}/simple"
    monkeypatch.setenv("UV_INDEX_URL", closed)
    monkeypatch.setenv("UV_DEFAULT_INDEX", closed)
    shutil.rmtree(tmp_path / "mirror")  # the index is gone too
    warm = prepare(root, store, tmp_path / "c2", indexes=[closed])
    assert warm.source == "store" and imports_tiny(warm).startswith("42 ")
    assert prepare(root, store, tmp_path / "c2", indexes=[closed]).source == "local"


def test_index_credentials_are_never_logged(store: Store, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")  # the private index's closed port fails at once, not after ~10 s of retries
    index = simple_index(tmp_path / "mirror", tiny_wheel(tmp_path / "built"))
    secret = "s3cr3t-p%40ss"
    private = f"http://build-bot:{secret}@127.0.0.1:{free_port()}/simple"
    root = package(tmp_path / "pkg", "aicenter-tiny==0.1\nno-such-package-anywhere==1.0\n")
    said: list[str] = []
    with pytest.raises(RequirementsError) as info:
        prepare(root, store, tmp_path / "cache", said, indexes=[private, index])
    out, err = capfd.readouterr()
    everything = "\n".join([*said, str(info.value), out, err])
    assert "no-such-package-anywhere" in everything
    assert secret not in everything and "s3cr3t-p@ss" not in everything
    assert "build-bot:***@127.0.0.1" in "\n".join(said)
    assert mask_url(private) == f"http://build-bot:***@127.0.0.1:{private.rsplit(':', 1)[1]}"
    assert mask_url("https://pypi.org/simple") == "https://pypi.org/simple"


def test_a_failing_install_is_reported_as_a_requirements_problem(store: Store, tmp_path: Path, closed_index: str) -> None:
    root = package(tmp_path / "pkg", "# deps\nthis is not a requirement ===\n")
    with pytest.raises(RequirementsError) as info:
        prepare(root, store, tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("installing requirements failed: uv exited with code 2: ")
    assert "this is not a requirement" in message and message.endswith("pass install_requirements=False")
    assert not [p for p in (tmp_path / "cache" / "envs").iterdir() if not p.name.startswith(".")], "nothing half-made"
    assert not any(store.list("envs/"))


# -- gc ------------------------------------------------------------------------------------------
def test_gc_removes_environments_unused_longer_than_their_grace_and_keeps_the_others(tmp_path: Path) -> None:
    import os
    import time
    from datetime import timedelta

    from airflow_aicenter.gc import collect
    from airflow_aicenter.storage import open_store

    store = open_store((tmp_path / "store").as_uri())  # a file store: object ages are file times, which the test sets
    used = prepare(local_wheel_package(tmp_path, "used", value=1), store, tmp_path / "cache")
    idle = prepare(local_wheel_package(tmp_path, "idle", value=2), store, tmp_path / "cache")
    blobs = {env.key: read(store, env_key(env.key), EnvironmentRecord).blob.sha256 for env in (used, idle)}
    ten_days_ago = time.time() - 10 * 86400
    for env in (used, idle):  # everything was written long ago...
        for path in [*(tmp_path / "store" / "envs").glob(f"{env.key}*"), tmp_path / "store" / blob_key(blobs[env.key])]:
            os.utime(path, (ten_days_ago, ten_days_ago))
    store.put_bytes(f"envs/{used.key}.used-2099-01-01", b"")  # ...but this one was used just now

    dry = collect(store, grace=timedelta(hours=1), dry_run=True)
    assert dry.environments == 2 and dry.environments_deleted == [idle.key] and dry.deleted == []
    assert store.exists(env_key(idle.key))

    report = collect(store, grace=timedelta(hours=1))
    assert report.environments_deleted == [idle.key] and report.deleted == [blobs[idle.key]]
    assert not any(info.key.startswith(f"envs/{idle.key}") for info in store.list("envs/"))
    assert store.exists(env_key(used.key)) and store.exists(blob_key(blobs[used.key])), "a used environment and its blob stay"
    assert report.records["environments"] == 1

    shutil.rmtree(tmp_path / "cache")  # the idle one's next run installs again and stores it anew
    again = prepare(tmp_path / "idle", store, tmp_path / "cache")
    assert again.key == idle.key and again.source == "installed" and store.exists(env_key(idle.key))


def test_package_indexes_from_the_connection_extra() -> None:
    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.runtime.environment import package_indexes

    assert package_indexes(None) == [] and package_indexes("") == []
    assert package_indexes(["https://pypi.internal/simple", "file:///mirror/simple"]) == [
        "https://pypi.internal/simple", "file:///mirror/simple"]
    assert package_indexes("https://a/simple, https://b/simple") == ["https://a/simple", "https://b/simple"]
    with pytest.raises(ConfigurationError, match=r"package_indexes is dict, not a list of index URLs: write it as \["):
        package_indexes({"url": "https://a/simple"})
    with pytest.raises(ConfigurationError, match=r"'ftp://u:\*\*\*@host/simple' is not an index URL") as info:
        package_indexes(["ftp://u:pw@host/simple"])
    assert "pw" not in str(info.value)
    with pytest.raises(ConfigurationError, match=r"'https://bot:\*\*\*@pypi.internal/simple' carries credentials, which would "
                                                 r"travel in the run spec .*netrc"):
        package_indexes(["https://bot:t0ken@pypi.internal/simple"])


def test_a_deployments_uv_cache_is_used_and_the_used_stamp_lies_beside_the_environment(
        store: Store, tmp_path: Path, closed_index: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "node-cache"))
    env = prepare(local_wheel_package(tmp_path), store, tmp_path / "cache")
    assert env.source == "installed" and any((tmp_path / "node-cache").iterdir()), "uv used the node's cache"
    assert not (tmp_path / "cache" / "uv").exists()
    folder = env.python.parent.parent
    assert not list(folder.glob(".used-*")), "the environment is read-only: nothing is written into it"
    assert list(folder.parent.glob(f".{env.key}.used-*"))


# -- issue 25: packed in parts, unpacked at once; compiled in parallel, tests left out ------------
def many_modules_package(tmp_path: Path, name: str = "pkg") -> Path:
    """A wheel of 60 modules in 6 folders (and a test suite), so that an environment has something to split."""
    extra = {f"sub{i % 6}/mod{i}.py": f"X = {i}\n" + "# padding\n" * (50 * i) for i in range(60)}
    extra.update({f"sub{i}/__init__.py": "" for i in range(6)})
    extra.update({"tests/__init__.py": "", "tests/test_tiny.py": "def test_it():\n    assert True\n"})
    return local_wheel_package(tmp_path, name, extra=extra)


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every entry of ``folder``: its kind and content digest (links: their target), and its mode."""
    out: dict[str, tuple[str, int]] = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = (f"-> {path.readlink()}", 0)
        elif path.is_dir():
            out[rel] = ("dir", info.st_mode & 0o7777)
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mode & 0o7777)
    return out


@pytest.mark.parametrize("ranges", [True, False], ids=["ranged", "one-stream"])
def test_a_stored_environment_is_packed_in_parts_that_are_unpacked_at_once(
        store: Store, tmp_path: Path, closed_index: str, ranges: bool) -> None:
    from airflow_aicenter.runtime.environment import PARTED

    root = many_modules_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    assert record.format == PARTED and len(record.parts) >= 2, record
    blob = store.get_bytes(blob_key(record.blob.sha256))
    assert hashlib.sha256(blob).hexdigest() == record.blob.sha256 and len(blob) == record.blob.size
    offset = 0
    for part in record.parts:  # the parts tile the blob, each with its own digest
        assert part.offset == offset and hashlib.sha256(blob[offset:offset + part.size]).hexdigest() == part.sha256
        offset += part.size
    assert offset == len(blob)

    store.ranged_reads = ranges  # False: as for a server that answers a ranged GET with the whole object
    said: list[str] = []
    restored = prepare(root, store, tmp_path / "c2", said)
    assert restored.source == "store", said[0][:600]
    assert imports_tiny(restored).startswith("42 ")
    installed, unpacked = first.python.parent.parent, restored.python.parent.parent
    assert tree(unpacked) == tree(installed), "the restored environment is the installed one, modes and links included"
    writable = [p for p in [unpacked, *unpacked.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o222]
    assert writable == []


def test_a_damaged_part_is_found_and_the_environment_rebuilt(store: Store, tmp_path: Path, closed_index: str) -> None:
    root = many_modules_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    blob = bytearray(store.get_bytes(blob_key(record.blob.sha256)))
    last = record.parts[-1]
    blob[last.offset + last.size // 2] ^= 0xFF  # one flipped byte, same size, at rest
    store.put_bytes(blob_key(record.blob.sha256), bytes(blob))

    said: list[str] = []
    rebuilt = prepare(root, store, tmp_path / "c2", said)
    assert rebuilt.source == "installed" and imports_tiny(rebuilt).startswith("42 ")
    assert any(f"is corrupt: its part {len(record.parts) - 1} hashes to sha256:" in line for line in said), said
    assert not [p.name for p in (tmp_path / "c2" / "envs").iterdir() if p.name.startswith(".tmp")], "nothing half-made"
    assert read(store, env_key(first.key), EnvironmentRecord).blob.sha256 != record.blob.sha256, "replaced"


@pytest.mark.parametrize("lie", ["gap", "short", "too-many"])
def test_a_record_whose_parts_do_not_tile_its_blob_is_not_used(store: Store, tmp_path: Path, closed_index: str,
                                                                lie: str) -> None:
    from airflow_aicenter.records import write
    from airflow_aicenter.runtime.environment import MAX_PARTS, EnvironmentPart

    root = many_modules_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    parts = list(record.parts)
    if lie == "gap":
        parts[1] = parts[1].model_copy(update={"offset": parts[1].offset + 1})
    elif lie == "short":
        parts = parts[:-1]
    else:
        parts = [EnvironmentPart(offset=i, size=1, sha256="0" * 64) for i in range(MAX_PARTS + 1)]
    write(store, env_key(first.key), record.model_copy(update={"parts": parts}))

    said: list[str] = []
    rebuilt = prepare(root, store, tmp_path / "c2", said)
    assert rebuilt.source == "installed", said
    assert any("does not match its key (its part" in line or "does not match its key (it names" in line
               for line in said), said


def test_an_environment_stored_as_one_stream_is_still_restored(store: Store, tmp_path: Path, closed_index: str) -> None:
    """Records written before environments were packed in parts (format tar.zst) keep working."""
    from airflow_aicenter.records import BlobRef, write
    from airflow_aicenter.runtime.environment import PACKED, _pack
    from airflow_aicenter.storage.transfer import put_blob

    root = local_wheel_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    sha256, size = _pack(first.python.parent.parent, tmp_path / "old.tar.zst")
    put_blob(store, tmp_path / "old.tar.zst", sha256)
    write(store, env_key(first.key), record.model_copy(update={"format": PACKED, "parts": [],
                                                               "blob": BlobRef(sha256=sha256, size=size)}))
    restored = prepare(root, store, tmp_path / "c2")
    assert restored.source == "store" and imports_tiny(restored).startswith("42 ")


def test_bytecode_is_compiled_before_use_except_the_packages_own_tests(store: Store, tmp_path: Path,
                                                                        closed_index: str) -> None:
    env = prepare(many_modules_package(tmp_path), store, tmp_path / "cache")
    site = next((env.python.parent.parent / "lib").glob("python*/site-packages/aicenter_tiny"))
    assert list((site / "sub3" / "__pycache__").glob("mod3.*.pyc")), "modules are compiled before package code runs"
    assert not (site / "tests" / "__pycache__").exists(), "a package's test suite is not compiled"


def test_with_package_code_as_another_user_the_environment_is_packed_while_it_runs(
        store: Store, tmp_path: Path, closed_index: str) -> None:
    said: list[str] = []
    env = prepare_environment(many_modules_package(tmp_path), store, cache_dir=tmp_path / "cache", log=said.append,
                              package_code_cannot_write=True)
    ready = next(i for i, line in enumerate(said) if "ready (installed)" in line)
    assert not any("packed" in line for line in said[:ready]), "nothing packed before the environment is handed over"
    assert env.storing is not None
    env.finish(said.append)
    packed = next(i for i, line in enumerate(said) if "packed" in line)
    assert packed > ready and "while package code runs (as another user" in said[packed], said
    assert prepare(tmp_path / "pkg", store, tmp_path / "fresh").source == "store"


def test_in_a_pod_stage_leaves_packing_to_sync_which_stores_it_while_package_code_runs(
        store: Store, tmp_path: Path, closed_index: str) -> None:
    """``defer_store`` (stage): nothing packed or stored before package code; ``store_meanwhile`` (sync) stores it."""
    from airflow_aicenter.runtime.environment import store_meanwhile

    root = many_modules_package(tmp_path)
    said: list[str] = []
    staged = prepare_environment(root, store, cache_dir=tmp_path / "pod-env", log=said.append, defer_store=True)
    assert staged.source == "installed" and staged.storing is None and staged.store_plan is not None
    assert not any("packed" in line for line in said) and not store.exists(env_key(staged.key))
    assert not [p for p in (tmp_path / "pod-env" / "envs").iterdir() if p.name.endswith(".tar.zst")]

    synced = store_meanwhile(store, staged.store_plan, said.append, cache_dir=tmp_path / "pod-env")
    synced.finish(said.append)
    assert any("while package code runs (its container has it read-only)" in line for line in said), said
    assert prepare(root, store, tmp_path / "next-pod").source == "store"

    with pytest.raises(StorageError, match="is not the one stage installed"):
        store_meanwhile(store, {**staged.store_plan, "package": "other"}, said.append, cache_dir=tmp_path / "pod-env")


def test_a_stored_environment_unpacks_as_the_runtimes_own_files_without_special_bits(
        store: Store, tmp_path: Path, closed_index: str) -> None:
    """A stored environment (possibly planted, see DESIGN "Trust boundaries") cannot hand out setuid files or
    files of another owner to a root runtime (the local launcher's run_as_user runs it as root)."""
    import os
    import stat

    from airflow_aicenter.records import BlobRef, write
    from airflow_aicenter.runtime.environment import _pack_parts
    from airflow_aicenter.storage.transfer import put_blob

    root = local_wheel_package(tmp_path)
    first = prepare(root, store, tmp_path / "c1")
    record = read(store, env_key(first.key), EnvironmentRecord)
    planted = tmp_path / "planted"
    shutil.copytree(first.python.parent.parent, planted, symlinks=True)
    subprocess.run(["chmod", "-R", "u+w", str(planted)], check=True)
    tool = planted / "bin" / "tool"
    tool.write_text("#!/bin/sh\nid\n")
    tool.chmod(0o4755 if os.geteuid() == 0 else 0o1755)
    if os.geteuid() == 0:
        os.chown(tool, 12345, 12345)
    packed = _pack_parts(planted, tmp_path / "planted.tar.zst")
    put_blob(store, packed.path, packed.sha256)
    write(store, env_key(first.key), record.model_copy(update={
        "blob": BlobRef(sha256=packed.sha256, size=packed.size), "parts": list(packed.parts)}))

    said: list[str] = []
    restored = prepare(root, store, tmp_path / "c2", said)
    assert restored.source == "store", said[0][:600]
    info = (restored.python.parent.parent / "bin" / "tool").stat()
    assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), oct(info.st_mode)
    assert (info.st_uid, info.st_mode & 0o555) == (os.geteuid(), 0o555)


def test_many_tiny_parts_unpacked_at_once_give_the_same_tree(store: Store, tmp_path: Path) -> None:
    """Parts whose files sit in folders another part names, unpacked at once, again and again: the same tree."""
    from airflow_aicenter.records import BlobRef
    from airflow_aicenter.runtime.environment import _fetch_unpack_parts, _pack_parts
    from airflow_aicenter.storage.transfer import put_blob

    folder = tmp_path / "env"
    for i in range(40):  # tiny parts, a folder and the next one's file in each: the parts start at once
        write_files(folder / f"sub{i}", {"m.py": "X = 1\n"})
    packed = _pack_parts(folder, tmp_path / "env.tar.zst", count=40)
    put_blob(store, packed.path, packed.sha256)
    for attempt in range(10):
        dest = tmp_path / f"unpacked{attempt}"
        _fetch_unpack_parts(store, BlobRef(sha256=packed.sha256, size=packed.size), packed.parts, dest)
        assert {k: v[0] for k, v in tree(dest).items()} == {k: v[0] for k, v in tree(folder).items()}
