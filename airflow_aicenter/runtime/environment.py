"""Package environments: ``requirements.txt`` installed with uv into a cached virtual environment.

DESIGN "★ Environments". The user process runs with the interpreter of a virtual environment of
its own, created from the BASE interpreter (the image's Python, never the worker's or the
runtime's own virtual environment) with access to the image's system packages, so a CUDA/torch
image's libraries are used as they are. It is found, in this order:

1. the local cache: ``$AICENTER_CACHE/envs/<key>`` (default ``~/.cache/aicenter/envs/<key>``),
   used in place;
2. the store: ``envs/<key>.json`` names a packed environment (tar + zstd) under
   ``blobs/sha256/``; it is streamed through zstd into tar while its digest is computed, into a
   temporary folder that is used only when the digest matches;
3. installed: ``uv venv`` + ``uv pip install -r requirements.txt``; then, in a background thread
   at low priority while the user code runs, byte-compiled (so restored environments import
   without compiling: pods run with PYTHONDONTWRITEBYTECODE), packed and uploaded create-once
   for the next run. The agent waits for that thread at the end of the run.

A hit (1 or 2) runs no uv command at all, so it needs no package index (clusters without
egress). A corrupt blob is reported and the environment rebuilt. Two first runs of one key at
once both succeed: each builds in a temporary folder renamed into place atomically (the loser
uses the winner's), and the store record is created once.

The key is the sha256 of: the normalised requirements (every logical line of requirements.txt
and of the files it includes, comments and blank lines dropped, lines stripped, SORTED: the
resolver reads the file as a set, so reordering it must not cost a cold install), the digests of
the package-local files it names (``./wheels/x.whl``: a rebuilt wheel is a new environment), the
Python version (implementation, major.minor, ABI flags) and the platform (``sys.platform``, machine,
multiarch/libc, and the names of the base interpreter's installed distributions: the environment
sees the image's packages, so an environment built on another image must not be reused).
Indexes are not part of the key: they say where packages come from, not what is installed, and a
warm run must not depend on them.

Known limit: uv does not look at system site packages when it resolves (astral-sh/uv#7358), so a
requirement the image already satisfies (say ``torch``) is installed again into the environment
(which then shadows the image's copy); leave what the image provides out of requirements.txt.

No Airflow import: this runs in the pod.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, cast
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field

from airflow_aicenter.errors import AlreadyExistsError, ConfigurationError, RequirementsError, StorageError
from airflow_aicenter.layout import ENVS, blob_key, env_key
from airflow_aicenter.package.requirements import REQUIREMENTS, check_requirements_file, local_path, logical_lines
from airflow_aicenter.records import BlobRef, Record, read_optional, utcnow, write
from airflow_aicenter.storage.store import Store
from airflow_aicenter.storage.transfer import put_blob

Source = Literal["none", "local", "store", "installed"]
Log = Callable[[str], None]

#: Bumped when the layout of a cached environment changes, so old ones are never reused.
FORMAT = "aicenter-env-1"
#: Written last into a built environment: a cache folder without it is not a usable one.
MARKER = "aicenter-env.json"
PACKED = "tar.zst"
ZSTD_LEVEL = 3
#: uv output lines kept for the error message when an install fails.
TAIL = 12
#: How much later the environment's ``used`` marker in the store is refreshed (gc's last-use time).
USED_EVERY_DAYS = 1
CHUNK = 2**20


class EnvironmentRecord(Record):
    """``envs/<key>.json``: the packed environment of one key (created once)."""

    key: str
    blob: BlobRef
    format: str = PACKED
    python: str
    platform: str
    requirements: list[str]
    created_at: datetime = Field(default_factory=utcnow)


@dataclass
class Environment:
    """The interpreter user code runs with, and where it came from."""

    python: Path
    key: str
    source: Source
    seconds: float
    #: After an install: packing and uploading it for the next run (see :meth:`finish`).
    storing: Future[str] | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """What ``outcome.json`` records."""
        return {"key": self.key, "source": self.source, "seconds": self.seconds}

    def finish(self, log: Log, timeout: float | None = None) -> None:
        """Wait for the background upload (end of run); a failed upload only costs the next run an install."""
        if self.storing is None:
            return
        began = time.perf_counter()
        try:
            said = self.storing.result(timeout)
        except Exception as exc:  # noqa: BLE001 - never fail a run for its cache
            log(f"WARNING: the environment was not stored for the next run ({type(exc).__name__}: {exc}); "
                "the next run installs the requirements again")
            return
        waited = time.perf_counter() - began
        log(f"{said}; the run waited {waited:.2f} s for it at the end")


# -- the key ---------------------------------------------------------------------------------
def python_tag() -> str:
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}{sys.abiflags}"


def platform_tag() -> str:
    """The platform, and the image: which distributions the base interpreter has (they are visible in the env)."""
    names: list[str] = []
    for folder in site.getsitepackages([sys.base_prefix, sys.base_exec_prefix]):
        with contextlib.suppress(OSError):
            names += [n for n in os.listdir(folder) if n.endswith((".dist-info", ".egg-info"))]
    image = hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()[:16]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    return f"{sys.platform}-{platform.machine()}-{multiarch}-image:{image}"


def requirement_material(root: Path) -> list[str]:
    """The sorted, normalised lines of requirements.txt and the files it includes, with local files' digests."""
    material: set[str] = set()
    pending, seen = [REQUIREMENTS], set()
    while pending:
        name = pending.pop()
        if name in seen or not (root / name).is_file():
            continue
        seen.add(name)
        for _, line in logical_lines((root / name).read_text(encoding="utf-8-sig")):
            material.add(line if name == REQUIREMENTS else f"{name}: {line}")
            target = local_path(line)
            if target is None:
                continue
            if line.startswith("-"):
                pending.append(str(Path(name).parent / target))
            else:
                material.add(f"{target} sha256:{_tree_digest(root / target)}")
    return sorted(material)


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def environment_key(requirements: Sequence[str]) -> str:
    text = "\n".join([FORMAT, f"python {python_tag()}", f"platform {platform_tag()}", *requirements])
    return hashlib.sha256(text.encode()).hexdigest()


# -- where things are ------------------------------------------------------------------------
def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$AICENTER_CACHE``, else ``~/.cache/aicenter``; environments live in its ``envs/``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("AICENTER_CACHE") or Path.home() / ".cache" / "aicenter"
    return Path(chosen).absolute()


def base_python() -> Path:
    """The interpreter the runtime's own one was made from: the image's Python, not a virtual environment's."""
    return Path(getattr(sys, "_base_executable", None) or sys.executable)


def uv_binary() -> str:
    try:
        import uv
    except ImportError:
        raise RequirementsError(
            "installing requirements failed: uv is not installed next to the runtime; install airflow-aicenter "
            "with its dependencies (uv) into the runtime image"
        ) from None
    return str(uv.find_uv_bin())


def venv_python(env: Path) -> Path:
    return env / "bin" / "python"


def mask_url(url: str) -> str:
    """An index URL as it may be logged: a password (or a lone token) in it replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    user = f"{parts.username}:***" if parts.password is not None else "***"
    host = parts.hostname or ""
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def package_indexes(value: object) -> list[str]:
    """The connection extra ``package_indexes``: a list of index URLs (or one URL, or URLs separated by spaces)."""
    if value is None or value == "":
        return []
    urls = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise ConfigurationError(
            f"connection extra package_indexes is {type(value).__name__}, not a list of index URLs: write it as "
            '["https://pypi.internal/simple"] (the first replaces PyPI, the others are searched before it)'
        )
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http", "file"):
            raise ConfigurationError(
                f"connection extra package_indexes: {mask_url(url)!r} is not an index URL: give the simple index's "
                "https:// URL, such as https://pypi.internal/simple"
            )
        if parts.username or parts.password:
            raise ConfigurationError(
                f"connection extra package_indexes: {mask_url(url)!r} carries credentials, which would travel in the "
                "run spec (readable in the pod spec): give the URL without them and hand uv the credentials through a "
                "netrc file (NETRC, or ~/.netrc of the runtime, e.g. mounted from a Kubernetes Secret)"
            )
    return list(urls)


#: uv's own index variables: a deployment may set them (with credentials) where the runtime runs.
INDEX_VARIABLES = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL", "UV_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")


def _index_secrets(indexes: Iterable[str]) -> list[str]:
    """Credentials in the given indexes and in uv's index variables: masked in everything uv prints."""
    secrets: list[str] = []
    for url in [*indexes, *(u for name in INDEX_VARIABLES for u in os.environ.get(name, "").split())]:
        parts = urlsplit(url)
        for value in (parts.password, parts.username if parts.password is None else None):
            if value:
                secrets += [value, unquote(value)]
    return sorted(set(secrets), key=len, reverse=True)


# -- the entry point -------------------------------------------------------------------------
def prepare_environment(
    package_root: Path, store: Store, *, cache_dir: Path | None = None, indexes: Sequence[str] = (), log: Log,
) -> Environment:
    """The environment for the package at ``package_root``: cached locally, from the store, or installed.

    ``indexes``: the deployment's package indexes (connection extra ``package_indexes``); the
    first replaces PyPI, the others are searched before it (uv's first-index strategy, so a
    private package name cannot be shadowed from PyPI). Never logged with their credentials.
    Raises RequirementsError when the install fails.
    """
    began = time.perf_counter()
    root = Path(package_root).absolute()
    check_requirements_file(root)  # validation has refused these already; the runtime never trusts it
    requirements = requirement_material(root)
    key = environment_key(requirements)
    envs = cache_root(cache_dir) / "envs"
    final = envs / key
    if not requirements:
        source: Source = "none"
        if not (final / MARKER).is_file():
            _build(final, lambda tmp: _create_venv(tmp, log), key, requirements, log)
        log("requirements.txt lists nothing: a bare environment with the image's packages")
        return Environment(venv_python(final), key, source, round(time.perf_counter() - began, 3))
    storing: Future[str] | None = None
    if (final / MARKER).is_file():
        source = "local"
        log(f"environment {key[:12]} found in the local cache {final}")
    elif (found := _restore(store, key, final, log)) == "hit":
        source = "store"
    else:
        won = _build(final, lambda tmp: _install(tmp, root, envs.parent, indexes, log), key, requirements, log)
        source = "installed"
        if won:
            replace = found == "broken"
            storing = _in_background(lambda: _store(store, key, final, requirements, log, replace=replace))
    _mark_used(store, key, final)
    seconds = round(time.perf_counter() - began, 3)
    log(f"environment {key[:12]} ready ({source}) in {seconds:.2f} s")
    return Environment(venv_python(final), key, source, seconds, storing)


# -- building --------------------------------------------------------------------------------
def _build(final: Path, make: Callable[[Path], None], key: str, requirements: list[str], log: Log) -> bool:
    """Make an environment in a temporary folder and rename it to ``final``; False when another run won."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        make(tmp)
        _write_marker(tmp, key, requirements)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            log(f"environment {key[:12]}: another run made it at the same time; using theirs")
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(env: Path, key: str, requirements: list[str]) -> None:
    info = {"key": key, "python": python_tag(), "platform": platform_tag(), "requirements": requirements}
    (env / MARKER).write_text(json.dumps(info, indent=2))


def _uv_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UV_CACHE_DIR", str(cache / "uv"))  # beside the environments: uv links instead of copying
    env["UV_NO_PROGRESS"] = "1"
    return env


def _create_venv(tmp: Path, log: Log) -> None:
    command = [uv_binary(), "venv", "--no-config", "--no-project", "--quiet", "--system-site-packages", "--relocatable",
               "--python", str(base_python()), str(tmp)]
    _uv(command, cwd=tmp.parent, env=_uv_env(tmp.parent.parent), secrets=[], log=log, what="creating the environment")


def _install(tmp: Path, root: Path, cache: Path, indexes: Sequence[str], log: Log) -> None:
    _create_venv(tmp, log)
    command = [uv_binary(), "pip", "install", "--no-config", "--python", str(venv_python(tmp))]
    if indexes:
        command += ["--default-index", indexes[0]]
        for url in indexes[1:]:
            command += ["--index", url]
    command += ["-r", REQUIREMENTS]
    shown = [mask_url(part) if part in indexes else part for part in command[1:]]
    log(f"installing requirements: uv {' '.join(shown)}")
    _uv(command, cwd=root, env=_uv_env(cache), secrets=_index_secrets(indexes), log=log, what="installing requirements")


def _uv(command: list[str], *, cwd: Path, env: dict[str, str], secrets: list[str], log: Log, what: str) -> None:
    """Run uv, streaming its output (credentials masked) and keeping the tail for the error message."""
    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", bufsize=1)
    except OSError as exc:
        raise RequirementsError(f"{what} failed: could not start uv ({exc}); install uv into the runtime image") from None
    tail: list[str] = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = clean(raw.rstrip())
        print(f"[uv] {line}", file=sys.stderr, flush=True)
        if line.strip():
            tail = [*tail[-(TAIL - 1):], line.strip()]
    code = process.wait()
    if code != 0:
        first = next((i for i, line in enumerate(tail) if line.lower().startswith(("error", "×"))), max(len(tail) - 3, 0))
        cause = " ".join(tail[first:])[:800] or "no output"  # uv's error and its causes
        raise RequirementsError(
            f"{what} failed: uv exited with code {code}: {cause}; fix requirements.txt in the package (or the "
            "connection extra package_indexes), or build the requirements into the image and pass install_requirements=False"
        )


# -- the store -------------------------------------------------------------------------------
def _restore(store: Store, key: str, final: Path, log: Log) -> Literal["hit", "miss", "broken"]:
    """Unpack the stored environment of ``key`` into ``final``.

    "broken": the record names a blob that is corrupt or gone (gc); the rebuilt environment replaces it.
    """
    try:
        record = read_optional(store, env_key(key), EnvironmentRecord)
    except StorageError as exc:
        log(f"WARNING: could not read the stored environment record ({exc}); installing instead")
        return "miss"
    if record is None:
        log(f"environment {key[:12]} is in neither the local cache nor the store: installing")
        return "miss"
    if record.format != PACKED:
        log(f"stored environment {key[:12]} is packed as {record.format!r}, which this runtime cannot read: installing")
        return "miss"
    began = time.perf_counter()
    try:
        _build(final, lambda tmp: _fetch_unpack(store, record.blob, tmp), key, record.requirements, log)
    except (OSError, StorageError) as exc:  # corrupt or gone (gc): rebuild
        log(f"WARNING: the stored environment {key[:12]} cannot be used ({exc}); installing it again")
        return "broken"
    log(f"environment {key[:12]} restored from the store: {record.blob.size / 2**20:.1f} MiB fetched, verified and "
        f"unpacked in {time.perf_counter() - began:.2f} s")
    return "hit"


def _store(store: Store, key: str, env: Path, requirements: list[str], log: Log, *, replace: bool = False) -> str:
    """Pack ``env`` and store it (blob, then the create-once record); what happened, in words.

    ``replace``: the record names a broken blob, so it is overwritten; where the credentials only
    allow creating records (a pod's session policy) that fails with a warning naming the fix.
    """
    with contextlib.suppress(OSError):  # compile and pack at low priority: the user code runs meanwhile
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    if not replace and store.exists(env_key(key)):
        return f"environment {key[:12]} was stored by another run meanwhile"
    began = time.perf_counter()
    packed = env.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}.{PACKED}"
    try:
        _compile(env)
        compiled_in = time.perf_counter() - began
        sha256, size = _pack(env, packed)
        packed_in = time.perf_counter() - began - compiled_in
        put_blob(store, packed, sha256)
        record = EnvironmentRecord(key=key, blob=BlobRef(sha256=sha256, size=size), python=python_tag(),
                                   platform=platform_tag(), requirements=requirements)
        try:
            write(store, env_key(key), record, create=not replace)
        except AlreadyExistsError:
            return f"environment {key[:12]} was stored by another run meanwhile"
        except StorageError as exc:
            if not replace:
                raise
            raise StorageError(f"{exc}; the record names a broken blob: delete {store.url(env_key(key))} so that "
                               "the next run stores a good one") from exc
        return (f"environment {key[:12]} stored for the next run: bytecode compiled in {compiled_in:.2f} s, "
                f"{size / 2**20:.1f} MiB packed in {packed_in:.2f} s, uploaded in "
                f"{time.perf_counter() - began - compiled_in - packed_in:.2f} s")
    finally:
        packed.unlink(missing_ok=True)


def _mark_used(store: Store, key: str, final: Path) -> None:
    """Tell gc this environment is in use: a create-once ``envs/<key>.used-<day>`` once a day, best effort."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    stamp = final / f".used-{day}"
    if stamp.exists():
        return
    with contextlib.suppress(StorageError):
        store.put_bytes(used_key(key, day), b"", create=True)
    with contextlib.suppress(OSError):
        stamp.touch()


def used_key(key: str, day: str) -> str:
    return f"{ENVS}{key}.used-{day}"


def _in_background(work: Callable[[], str]) -> Future[str]:
    future: Future[str] = Future()

    def target() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=target, name="aicenter-env-store", daemon=True).start()
    return future


# -- packing ---------------------------------------------------------------------------------
def _compile(env: Path) -> None:
    """Byte-compile the environment's packages before packing, off the run's critical path.

    Runs with the packed environment restored from the store then import without compiling
    (pods run with PYTHONDONTWRITEBYTECODE: without this every pod would compile pandas & co.
    at each import). Best effort: a file that does not compile is left as it is.
    """
    subprocess.run([str(venv_python(env)), "-m", "compileall", "-q", "-j", "0", str(env / "lib")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


class _HashingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.digest, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


def _pack(env: Path, dest: Path) -> tuple[str, int]:
    """tar (the system's, fast) piped through zstd; returns the packed file's sha256 and size."""
    import zstandard

    tar = subprocess.Popen(["tar", "-C", str(env), "--exclude=./.used-*", "--ignore-failed-read", "-cf", "-", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdout is not None and tar.stderr is not None
    with dest.open("wb") as f:
        writer = _HashingWriter(f)
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        compressor.copy_stream(tar.stdout, cast(IO[bytes], writer), read_size=CHUNK, write_size=CHUNK)
    errors = tar.stderr.read().decode(errors="replace")
    if tar.wait() not in (0, 1):  # 1: a file changed while read (bytecode written meanwhile): harmless
        raise StorageError(f"packing the environment failed: tar: {errors.strip()[:300]}")
    return writer.digest.hexdigest(), writer.size


class _ReadError(StorageError):
    """The packed environment could not be read from the store (as opposed to read and found damaged)."""


def _fetch_unpack(store: Store, blob: BlobRef, dest: Path) -> None:
    """Stream the packed environment from the store through zstd into tar, hashing it on the way.

    Download, decompression and extraction overlap (obstore's I/O threads, this thread, the tar
    process). ``dest`` is a temporary folder: if the digest does not match, the caller discards
    it, so a corrupt blob is never used.
    """
    import obstore

    dest.mkdir()
    digest = hashlib.sha256()
    key = blob_key(blob.sha256)

    def hashed() -> Iterator[bytes]:
        try:
            for chunk in obstore.get(store.inner, key).stream(min_chunk_size=CHUNK):
                data = bytes(chunk)
                digest.update(data)
                yield data
        except FileNotFoundError:
            raise _ReadError(f"{store.url(key)} does not exist") from None
        except Exception as exc:  # obstore's own errors: a failed or missing object
            raise _ReadError(f"reading {store.url(key)} failed: {str(exc).splitlines()[0][:300]}") from exc

    try:
        _untar(dest, hashed())
    except _ReadError:
        raise
    except StorageError as exc:  # what was read does not unpack: not what was stored
        raise StorageError(f"{store.url(key)} is corrupt: {exc}") from exc
    if digest.hexdigest() != blob.sha256:
        raise StorageError(f"{store.url(key)} is corrupt: its content hashes to sha256:{digest.hexdigest()}, "
                           f"expected sha256:{blob.sha256}")


def _untar(dest: Path, packed: Iterable[bytes]) -> None:
    """Extract a zstd-compressed tar stream into ``dest`` (the system's tar: fast)."""
    import zstandard

    tar = subprocess.Popen(["tar", "-C", str(dest), "-xf", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None and tar.stderr is not None
    try:
        with zstandard.ZstdDecompressor().stream_writer(tar.stdin, closefd=False) as writer:
            for chunk in packed:
                writer.write(chunk)
    except (zstandard.ZstdError, BrokenPipeError) as exc:
        raise StorageError(f"the stored environment is not a zstd tar stream ({exc})") from exc
    finally:
        tar.stdin.close()
    errors = tar.stderr.read().decode(errors="replace")
    if tar.wait() != 0:
        raise StorageError(f"unpacking the stored environment failed: tar: {errors.strip()[:300]}")
