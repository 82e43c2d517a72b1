"""Package environments: ``requirements.txt`` installed with uv into a cached virtual environment.

DESIGN "★ Environments". The user process runs with the interpreter of a virtual environment of
its own, created from the BASE interpreter (the image's Python, never the worker's or the
runtime's own virtual environment) with access to the image's system packages, so a CUDA/torch
image's libraries are used as they are. It is found, in this order:

1. the local cache: ``$AICENTER_CACHE/envs/<key>`` (default ``~/.cache/aicenter/envs/<key>``),
   used in place;
2. the store: ``envs/<key>.json`` names a packed environment under ``blobs/sha256/``: a few
   parts, each a tar stream compressed as one zstd frame, laid end to end (:data:`PARTED`; the
   record gives each part's offset, size and sha256). The record must match its key
   (requirements, Python, platform, package) and its parts must tile the blob; the parts are
   read, hashed, decompressed and unpacked at once (one ``tar`` each: a warm start is bound by
   creating ~13,000 files) into a temporary folder that is used only when every part's digest
   matches. Records of the older single-stream format (:data:`PACKED`) are still read;
3. installed: ``uv venv`` + ``uv pip install -r requirements.txt``, byte-compiled in parallel,
   and packed (its digests computed) BEFORE any package code runs; only the upload of those very
   bytes (verified against that digest while uploading) goes on in a background thread while the
   user code runs, and the agent waits for it at the end of the run. Where package code runs as
   another user, which cannot write the environment (``package_code_cannot_write``: the local
   launcher's ``run_as_user``), packing too goes on while it runs.

Installing runs no package-supplied code by default (finding 2 of issue 18): uv installs wheels
only (``--only-binary :all:``), and every uv command runs with a minimal environment
(:func:`install_env`: PATH, HOME, TMPDIR, uv's cache, the index settings; no store credentials,
no user ``env``, no ``AWS_*``, no ``AIRFLOW_*``). A requirement published only as a source
distribution fails with the fix named. Byte-compilation runs ``python -I -S`` (no ``site``, so no
``.pth`` file of the environment runs) with the same minimal environment. With
``allow_source_builds`` builds are allowed, still with that environment, with a uv cache of the
package's own, confined by Landlock to write only the build's own folders (as user processes
are: reads stay open; where the kernel has no Landlock uv's output says so), optionally as
another user (``build_user``/``demote``: the local launcher's ``run_as_user``), and the
environment is cached under a key that includes the package's name, never shared with another
package.

In a pod (launchers/pod_spec.py) a source build never runs in ``stage``, next to the store
credentials: ``stage`` (``defer_build``) only looks in the cache and the store, and on a miss
hands a build plan to the ``build`` init container (:func:`build_planned`: no credentials, no run
spec, no user ``env``, the minimal install environment); ``base`` then gets the environment volume
read-only, and ``sync`` packs and stores the folder as the build left it (:func:`store_built`).
A wheels-only install in ``stage`` (``defer_store``) is packed and stored the same way by ``sync``
while package code runs (:func:`store_meanwhile`): ``stage`` ends before package code starts.

What package code writes into its environment can never reach the store (finding 4): the
bytes stored are those packed before it ran, or packed while it runs as a user that cannot
write them. Every environment is also made read-only (``chmod -R a-w``) before it is handed
over; that is a boundary against another user (the local launcher's ``run_as_user``, a pod's
read-only mount), not against code of the same uid, which could make it writable again: there
the pack-before-run is the protection of the store, and the local cache of that worker is as
trusted as the code it runs.

What the record check cannot stop: keys are predictable (they are made of public inputs), so
whoever can create ``envs/<key>.json`` and a blob (a pod's session policy allows both, create-only,
to the ``stage`` and ``sync`` containers) can plant, for a key not stored yet, a record that names
its own blob with every field right, and it will be used. Package code never holds those
credentials (DESIGN "★ Trust boundaries"); a planted record that does not match (or a blob that
does not) is replaced by the next install where the credentials may overwrite, and otherwise stays
until someone deletes it (the warning names the key to delete).

A hit (1 or 2) runs no uv command at all, so it needs no package index (clusters without
egress). A corrupt or mismatched blob is reported and the environment rebuilt. Two first runs of
one key at once both succeed: each builds in a temporary folder renamed into place atomically
(the loser uses the winner's), and the store record is created once.

The key is the sha256 of: the normalised requirements (every logical line of requirements.txt
and of the files it includes, comments and blank lines dropped, lines stripped, SORTED: the
resolver reads the file as a set, so reordering it must not cost a cold install), the digests of
the package-local files it names (``./wheels/x.whl``: a rebuilt wheel is a new environment), the
Python version (implementation, major.minor, ABI flags) and the platform (``sys.platform``, machine,
multiarch/libc, and the names of the base interpreter's installed distributions: the environment
sees the image's packages, so an environment built on another image must not be reused), and,
with source builds allowed, the package's name.
Indexes are not part of the key: they say where packages come from, not what is installed, and a
warm run must not depend on them.

Known limit: uv does not look at system site packages when it resolves (astral-sh/uv#7358), so a
requirement the image already satisfies (say ``torch``) is installed again into the environment
(which then shadows the image's copy); leave what the image provides out of requirements.txt.

No Airflow import: this runs in the pod.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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
from airflow_aicenter.layout import blob_key, env_key, env_used_key
from airflow_aicenter.package.requirements import REQUIREMENTS, check_requirements_file, local_path, logical_lines
from airflow_aicenter.records import BlobRef, Record, read_optional, utcnow, write
from airflow_aicenter.storage.store import Store
from airflow_aicenter.storage.transfer import put_blob

#: "build": a pod's ``build`` container installs it (source builds), after ``stage``.
Source = Literal["none", "local", "store", "installed", "build"]
Log = Callable[[str], None]

#: Bumped when the layout of a cached environment changes, so old ones are never reused (2: packed
#: before package code runs and read-only; an environment of format 1 may hold what package code wrote).
FORMAT = "aicenter-env-2"
#: Written last into a built environment: a cache folder without it is not a usable one.
MARKER = "aicenter-env.json"
#: Records of this format name one tar stream compressed as one zstd stream (the format before issue 25).
PACKED = "tar.zst"
#: What is stored now: the environment split into parts, each a whole tar stream compressed as one zstd
#: frame, the parts concatenated into one blob; the record gives each part's offset, size and sha256, so
#: the parts are read, verified and unpacked at once, one ``tar`` process each (a warm start from the
#: store is bound by creating ~13,000 files, which one ``tar`` does on one core); the first part holds
#: the folders and goes first. An older runtime reads the format's name and installs instead (a
#: single-stream reader would stop at the end of the first part).
PARTED = "tar.zst-parts"
#: Parts of files an environment is packed into, beside its folders' part: more than the cores of a
#: small node, so that they even out.
PART_COUNT = 4
#: A record naming more parts is refused (each part is a thread and a ``tar`` process).
MAX_PARTS = 64
#: Parts are balanced on bytes plus this much per entry: creating a file costs about as much as
#: unpacking this many bytes.
ENTRY_WEIGHT = 32 * 1024
ZSTD_LEVEL = 3
#: uv output lines kept for the error message when an install fails.
TAIL = 12
#: How much later the environment's ``used`` marker in the store is refreshed (gc's last-use time).
USED_EVERY_DAYS = 1
CHUNK = 2**20


class EnvironmentPart(Record):
    """One part of a :data:`PARTED` blob: bytes ``offset`` to ``offset + size`` hash to ``sha256``."""

    offset: int
    size: int
    sha256: str


class EnvironmentRecord(Record):
    """``envs/<key>.json``: the packed environment of one key (created once)."""

    key: str
    blob: BlobRef
    #: :data:`PARTED` (with ``parts``) or, in records written before issue 25, :data:`PACKED`.
    format: str = PACKED
    parts: list[EnvironmentPart] = Field(default_factory=list)
    python: str
    platform: str
    requirements: list[str]
    #: Set when source builds were allowed: the environment of this package alone (part of the key).
    package: str | None = None
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
    #: ``defer_build`` and a miss: what the ``build`` container is to install (see :func:`build_planned`).
    build_plan: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: ``defer_store`` and a fresh install: what ``sync`` packs and stores while package code runs
    #: (see :func:`store_meanwhile`).
    store_plan: dict[str, Any] | None = field(default=None, repr=False, compare=False)

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
    """The base interpreter's implementation, major.minor and ABI flags (the environment's Python)."""
    return _base_tags()["python"]


def platform_tag() -> str:
    """The platform, and the image: which distributions the base interpreter has (they are visible in the env)."""
    return _base_tags()["platform"]


def _tags() -> dict[str, str]:
    """The key's facts of the running interpreter's base; also run by another interpreter (:func:`_tags_of`).

    Self-contained (its imports inside) for that reason.
    """
    import hashlib
    import os
    import platform
    import site
    import sys
    import sysconfig

    names: list[str] = []
    for folder in site.getsitepackages([sys.base_prefix, sys.base_exec_prefix]):
        try:
            names += [n for n in os.listdir(folder) if n.endswith((".dist-info", ".egg-info"))]
        except OSError:
            pass
    image = hashlib.sha256("\n".join(sorted(set(names))).encode()).hexdigest()[:16]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    return {"python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}{sys.abiflags}",
            "platform": f"{sys.platform}-{platform.machine()}-{multiarch}-image:{image}"}


def _base_tags() -> dict[str, str]:
    """:func:`_tags` of the interpreter environments are made from: this one's base, or ``AICENTER_BASE_PYTHON``'s."""
    named = os.environ.get(BASE_PYTHON_ENV)
    if named and os.path.realpath(named) != os.path.realpath(_own_base()):
        return _tags_of(named)
    return _tags()


@functools.cache
def _tags_of(python: str) -> dict[str, str]:
    """:func:`_tags` as another interpreter (``AICENTER_BASE_PYTHON``) answers them: its environments see its packages."""
    code = f"{inspect.getsource(_tags)}\nimport json\nprint(json.dumps(_tags()))"
    try:
        done = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60,
                              env={"PATH": os.defpath}, check=False)
        tags = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        tags = None
    if not isinstance(tags, dict) or not {"python", "platform"} <= tags.keys():
        raise ConfigurationError(
            f"{BASE_PYTHON_ENV}={python} does not run as a Python interpreter here; name the Python that package "
            "environments are made from (such as /usr/bin/python3.11), or unset it"
        )
    return {"python": str(tags["python"]), "platform": str(tags["platform"])}


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


def environment_key(requirements: Sequence[str], package: str | None = None) -> str:
    """The cache key; ``package``: source builds were allowed, so the environment is this package's alone."""
    own = [f"source builds of package {package}"] if package is not None else []
    text = "\n".join([FORMAT, f"python {python_tag()}", f"platform {platform_tag()}", *own, *requirements])
    return hashlib.sha256(text.encode()).hexdigest()


# -- where things are ------------------------------------------------------------------------
def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$AICENTER_CACHE``, else ``~/.cache/aicenter``; environments live in its ``envs/``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("AICENTER_CACHE") or Path.home() / ".cache" / "aicenter"
    return Path(chosen).absolute()


#: The interpreter package environments are made from, when not the runtime's own base: the local launcher
#: sets it under ``run_as_user`` to one that user can run (the worker's base may sit in a folder closed to it).
BASE_PYTHON_ENV = "AICENTER_BASE_PYTHON"


def _own_base() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def base_python() -> Path:
    """The interpreter package environments are made from: ``$AICENTER_BASE_PYTHON``, else the one the runtime's
    own was made from (the image's Python, never a virtual environment's)."""
    return Path(os.environ.get(BASE_PYTHON_ENV) or _own_base())


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
#: All an install sees of the agent's environment (DESIGN "★ Environments"): the system's basics and
#: how to reach the package indexes (their URLs, netrc, TLS roots, proxies). Nothing else: no store
#: credentials, no user ``env``, no ``AWS_*``, no ``AIRFLOW_*``. A source build (when allowed) runs
#: with this environment too, so it sees the index settings and nothing of the run.
INSTALL_INHERITED = frozenset({
    "PATH", "HOME", "TMPDIR", "LANG", "NETRC", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_HTTP_RETRIES",  # uv's network settings: a deployment tunes them
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    *INDEX_VARIABLES,
})


def _index_secrets(indexes: Iterable[str]) -> list[str]:
    """Credentials in the given indexes and in uv's index variables: masked in everything uv prints."""
    secrets: list[str] = []
    for url in [*indexes, *(u for name in INDEX_VARIABLES for u in os.environ.get(name, "").split())]:
        parts = urlsplit(url)
        for value in (parts.password, parts.username if parts.password is None else None):
            if value:
                secrets += [value, unquote(value)]
    return sorted(set(secrets), key=len, reverse=True)


def shared_uv_cache(cache: Path) -> Path:
    """uv's cache for wheels-only installs: ``$UV_CACHE_DIR`` (a node's cache volume), else beside the environments.

    Beside them by default so that uv links files instead of copying them. Source builds never
    use it (see :func:`_install`).
    """
    return Path(os.environ.get("UV_CACHE_DIR") or cache / "uv")


def install_env(uv_cache: Path, *, home: Path | None = None, tmp: Path | None = None) -> dict[str, str]:
    """The whole environment of a uv command (and of any build it runs): :data:`INSTALL_INHERITED`, uv's cache.

    ``home``/``tmp``: a build as another user gets its own (it may not reach the agent's).
    """
    env = {name: value for name, value in os.environ.items() if name in INSTALL_INHERITED}
    env.setdefault("PATH", os.defpath)
    env["UV_CACHE_DIR"] = str(uv_cache)
    env["UV_NO_PROGRESS"] = "1"
    if home is not None:
        env["HOME"] = str(home)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


@dataclass(frozen=True)
class _BuildAs:
    """How the install of a source build is started: as ``user`` (uid, gid), or through ``demote`` (pre-exec)."""

    user: tuple[int, int] | None = None
    demote: Callable[[], None] | None = None

    def popen(self) -> dict[str, Any]:
        if self.demote is not None:
            return {"preexec_fn": self.demote}
        if self.user is not None:
            return {"user": self.user[0], "group": self.user[1], "extra_groups": []}
        return {}


# -- the entry point -------------------------------------------------------------------------
def prepare_environment(
    package_root: Path, store: Store, *, cache_dir: Path | None = None, indexes: Sequence[str] = (), log: Log,
    allow_source_builds: bool = False, package: str | None = None, build_user: tuple[int, int] | None = None,
    demote: Callable[[], None] | None = None, defer_build: bool = False, package_code_cannot_write: bool = False,
    defer_store: bool = False,
) -> Environment:
    """The environment for the package at ``package_root``: cached locally, from the store, or installed.

    ``indexes``: the deployment's package indexes (connection extra ``package_indexes``); the
    first replaces PyPI, the others are searched before it (uv's first-index strategy, so a
    private package name cannot be shadowed from PyPI). Never logged with their credentials.

    ``allow_source_builds`` (the operator argument): source distributions may be built, which
    runs their code; ``package`` (its registry name) is then required: the environment is cached
    under a key of that package alone. ``build_user`` ``(uid, gid)`` runs that install as another
    user (the local launcher's ``run_as_user``; the worker must be allowed to switch), in a build
    folder of its own that is copied out after uv exits (so nothing the build left running can
    change what is packed); ``demote`` replaces the switch with the caller's own pre-exec function
    (it must then make the process the ``build_user`` it names). The cache folder and the base
    interpreter must be reachable by that user. Wheels-only installs run no package code and are
    never demoted.

    ``defer_build`` (a pod's ``stage``, with source builds allowed): on a miss nothing is installed
    here, next to the store credentials; the returned environment (source "build") carries the
    plan for the pod's ``build`` container in ``build_plan``, and its interpreter is where that
    build will put it.

    ``package_code_cannot_write``: package code runs as another user (the local launcher's
    ``run_as_user``), which cannot write the environment once it is read-only (it is the agent's),
    so a fresh install is packed and uploaded while package code runs, not before it starts.
    Otherwise (package code of the agent's own user could make it writable again) it is packed
    before this returns, and only the upload of those bytes goes on meanwhile.

    ``defer_store`` (a pod's ``stage``, which ends before package code starts): a fresh install is
    neither packed nor stored here; ``store_plan`` says what ``sync`` packs and stores
    (:func:`store_meanwhile`) while package code runs in ``base``, which mounts it read-only.

    Raises RequirementsError when the install fails (a source distribution without
    ``allow_source_builds`` names the requirement and the fix).
    """
    began = time.perf_counter()
    if allow_source_builds and not package:
        raise ConfigurationError("allow_source_builds=True needs the package's name: its environment is cached for it alone")
    if demote is not None and build_user is None:
        raise ConfigurationError("demote needs build_user: the (uid, gid) it switches to, which owns the build folder")
    owner = package if allow_source_builds else None
    root = Path(package_root).absolute()
    check_requirements_file(root)  # validation has refused these already; the runtime never trusts it
    requirements = requirement_material(root)
    key = environment_key(requirements, owner)
    envs = cache_root(cache_dir) / "envs"
    final = envs / key
    if not requirements:
        source: Source = "none"
        if not (final / MARKER).is_file():
            _build(final, lambda tmp: _create_venv(tmp, envs.parent, log), key, requirements, owner, log)
        log("requirements.txt lists nothing: a bare environment with the image's packages")
        return Environment(venv_python(final), key, source, round(time.perf_counter() - began, 3))
    storing: Future[str] | None = None
    store_plan: dict[str, Any] | None = None
    if (final / MARKER).is_file():
        source = "local"
        log(f"environment {key[:12]} found in the local cache {final}")
    elif (found := _restore(store, key, owner, final, log)) == "hit":
        source = "store"
    else:
        replace = found == "broken"
        if allow_source_builds and defer_build:
            log(f"environment {key[:12]}: source builds allowed, so it is built by the pod's build container, "
                "without credentials")
            plan = {"key": key, "requirements": requirements, "package": owner, "indexes": list(indexes),
                    "root": str(root), "replace": replace}
            return Environment(venv_python(final), key, "build", round(time.perf_counter() - began, 3), build_plan=plan)
        build_as = _BuildAs(build_user, demote) if allow_source_builds and build_user is not None else None

        def install(tmp: Path) -> None:
            _install(tmp, root, envs.parent, indexes, log, package=owner, build_as=build_as)

        # Packed before any package code runs, unless package code cannot write it (then while it runs);
        # skipped when another run stored it meanwhile.
        pack = replace or not _stored(store, key)
        later = pack and (package_code_cannot_write or defer_store)
        won, packed = _build(final, install, key, requirements, owner, log, byte_compile=True, pack=pack and not later)
        source = "installed"
        if later and won and defer_store:
            store_plan = {"key": key, "requirements": requirements, "package": owner, "replace": replace}
        elif later and won:
            storing = _in_background(lambda: _pack_and_store(store, key, final, requirements, owner, log, replace=replace))
        if packed is not None:
            if won:
                storing = _in_background(lambda: _store(store, key, packed, requirements, owner, log, replace=replace))
            else:
                packed.path.unlink(missing_ok=True)
    _mark_used(store, key, final)
    seconds = round(time.perf_counter() - began, 3)
    log(f"environment {key[:12]} ready ({source}) in {seconds:.2f} s")
    return Environment(venv_python(final), key, source, seconds, storing, store_plan=store_plan)


# -- a pod's build container, and sync storing what it built ---------------------------------
def _built_digest_path(final: Path) -> Path:
    return final.parent / f".{final.name}.built"


def build_planned(plan: dict[str, Any], log: Log, cache_dir: Path | None = None) -> str:
    """The ``build`` container's work: install ``plan`` (from ``prepare_environment(defer_build=True)``).

    Runs with neither credentials nor run spec: what it makes is trusted for this package alone
    (the key holds its name). It records the tree digest of the built folder beside it, which
    ``sync`` compares before it packs (a consistency check: the build is package code).
    """
    key, package = str(plan["key"]), str(plan["package"])
    cache = cache_root(cache_dir)
    final = cache / "envs" / key
    if (final / MARKER).is_file():
        return f"environment {key[:12]} is already here: nothing to build"
    root = Path(plan["root"])
    indexes = [str(url) for url in plan.get("indexes") or []]
    began = time.perf_counter()
    _build(final, lambda tmp: _install(tmp, root, cache, indexes, log, package=package, build_as=None), key,
           list(plan["requirements"]), package, log, byte_compile=True)
    _built_digest_path(final).write_text(_tree_digest(final))
    return f"environment {key[:12]} built for package {package!r} in {time.perf_counter() - began:.2f} s"


def store_built(store: Store, plan: dict[str, Any], log: Log, cache_dir: Path | None = None) -> str:
    """``sync``: pack the environment the ``build`` container made and store it under its key; what happened.

    ``base`` had that folder read-only, so it is as the build left it; the tree digest the build
    recorded must still match. ``plan`` comes from ``stage`` (through the agent's state), never from
    the build. Raises StorageError when the folder is not the planned environment.
    """
    key, package = str(plan["key"]), str(plan["package"])
    final = cache_root(cache_dir) / "envs" / key
    try:
        info = json.loads((final / MARKER).read_text())
        recorded = _built_digest_path(final).read_text().strip()
    except (OSError, ValueError) as exc:
        raise StorageError(f"the build container left no usable environment {key[:12]} ({exc})") from None
    if info.get("key") != key or info.get("package") != package:
        raise StorageError(f"the environment in {final} is not the one planned for package {package!r} (key {key[:12]})")
    if _tree_digest(final) != recorded:
        raise StorageError(f"the environment {key[:12]} changed after its build; not stored")
    replace = bool(plan.get("replace"))
    if not replace and _stored(store, key):
        return f"environment {key[:12]} was stored by another run meanwhile"
    handle, name = tempfile.mkstemp(prefix=f".env-{key[:12]}-", suffix=f".{PACKED}")
    os.close(handle)
    packed = _pack_into(final, Path(name))
    return _store(store, key, packed, list(plan["requirements"]), package, log, replace=replace)


# -- building --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Packed:
    """A freshly built environment, packed before package code ran: what may be stored, and its digest."""

    path: Path
    sha256: str
    size: int
    #: Set: the blob is :data:`PARTED`; empty: one stream (:data:`PACKED`).
    parts: tuple[EnvironmentPart, ...] = ()


def _pack_into(env: Path, path: Path) -> _Packed:
    """Pack ``env`` into ``path`` (a new temporary file) in parts; a partial file is deleted when packing fails."""
    try:
        return _pack_parts(env, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _build(final: Path, make: Callable[[Path], None], key: str, requirements: list[str], package: str | None, log: Log,
           *, byte_compile: bool = False, pack: bool = False) -> tuple[bool, _Packed | None]:
    """Make an environment in a temporary folder and rename it to ``final``; False when another run won.

    A fresh install is byte-compiled (``byte_compile``, running none of its code) and packed for the
    store (``pack``) here, before anyone uses it. Every environment is made read-only before it
    is renamed into place (so it is compiled first: Python could not write its bytecode later).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
    packed: _Packed | None = None
    try:
        make(tmp)
        began = time.perf_counter()
        if byte_compile:
            _compile(tmp)
        compiled = time.perf_counter() - began
        _write_marker(tmp, key, requirements, package)
        _seal(tmp)
        if byte_compile and not pack:
            log(f"environment {key[:12]}: bytecode compiled in {compiled:.2f} s")
        if pack:
            packed = _pack_into(tmp, final.parent / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}.{PACKED}")
            log(f"environment {key[:12]}: bytecode compiled in {compiled:.2f} s, packed ({packed.size / 2**20:.1f} MiB) "
                f"in {time.perf_counter() - began - compiled:.2f} s, before any package code runs")
        try:
            tmp.rename(final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            log(f"environment {key[:12]}: another run made it at the same time; using theirs")
            return False, packed
        return True, packed
    except BaseException:
        if packed is not None:
            packed.path.unlink(missing_ok=True)
        raise
    finally:
        _remove(tmp)


def _write_marker(env: Path, key: str, requirements: list[str], package: str | None) -> None:
    info = {"key": key, "python": python_tag(), "platform": platform_tag(), "requirements": requirements, "package": package}
    (env / MARKER).write_text(json.dumps(info, indent=2))


def _seal(env: Path) -> None:
    """Make the environment read-only (every file and folder; links are not followed).

    A boundary against another user (``run_as_user``), not against the owner, who may chmod it
    back: what is stored was packed before package code ran, whatever it does here.
    """
    done = subprocess.run(["chmod", "-R", "a-w", "--", str(env)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"could not make the environment read-only: chmod: {done.stderr.strip()[:300]}")


def _remove(path: Path) -> None:
    """Remove a (possibly read-only) folder tree; best effort."""
    if not path.exists() and not path.is_symlink():
        return
    subprocess.run(["chmod", "-R", "u+w", "--", str(path)], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def _create_venv(tmp: Path, cache: Path, log: Log, *, build_as: _BuildAs | None = None,
                 env: dict[str, str] | None = None, uv: str | None = None) -> None:
    command = [uv or uv_binary(), "venv", "--no-config", "--no-project", "--quiet", "--system-site-packages", "--relocatable",
               "--python", str(base_python()), str(tmp)]
    _uv(command, cwd=tmp.parent, env=env or install_env(shared_uv_cache(cache)), secrets=[], log=log,
        what="creating the environment", build_as=build_as)


def _install(tmp: Path, root: Path, cache: Path, indexes: Sequence[str], log: Log, *, package: str | None,
             build_as: _BuildAs | None) -> None:
    """``uv pip install -r requirements.txt`` into a new environment at ``tmp``.

    Wheels only unless source builds are allowed for ``package``; then with a uv cache of that
    package's own (a build's code must not reach what other packages' installs link from), and,
    with ``build_as``, as another user in a build folder of its own, copied to ``tmp`` after.
    """
    command = [uv_binary(), "pip", "install", "--no-config"]
    if package is None:
        command += ["--only-binary", ":all:"]
    if indexes:
        command += ["--default-index", indexes[0]]
        for url in indexes[1:]:
            command += ["--index", url]
    command += ["-r", REQUIREMENTS]
    shown = [mask_url(part) if part in indexes else part for part in command[1:]]
    secrets = _index_secrets(indexes)
    if package is None:
        _create_venv(tmp, cache, log)
        log(f"installing requirements: uv {' '.join(shown)}")
        _uv([*command, "--python", str(venv_python(tmp))], cwd=root, env=install_env(shared_uv_cache(cache)), secrets=secrets,
            log=log, what="installing requirements")
        return
    uv_cache = cache / "uv-builds" / hashlib.sha256(package.encode()).hexdigest()[:16]
    user = build_as.user if build_as is not None else None
    log(f"installing requirements, source builds allowed for package {package!r}"
        f"{f' (as uid {user[0]})' if user else ''}: uv {' '.join(shown)}")
    area = cache / "builds" / f"{tmp.name}-{uuid.uuid4().hex[:8]}"
    try:
        for folder in (area / "home", area / "tmp", uv_cache):
            folder.mkdir(parents=True, exist_ok=True)
        # Copies the build user can run (the worker's own environment may be unreadable to it).
        shutil.copy2(uv_binary(), area / "uv")
        shutil.copy2(CONFINE_SCRIPT, area / "aicenter_confine.py")
        target = area / "env" if user else tmp
        env = install_env(uv_cache, home=area / "home" if user else None, tmp=area / "tmp")
        if user:
            _hand_over(uv_cache, user)
            _hand_over(area, user)
        _create_venv(target, cache, log, build_as=build_as, env=env, uv=str(area / "uv"))
        writable = [str(target), str(uv_cache), str(area / "tmp"), *([str(area / "home")] if user else []), os.devnull]
        confined = [str(base_python()), "-I", "-S", "-c", _CONFINE, str(area / "aicenter_confine.py"), *writable, "--"]
        _uv([*confined, str(area / "uv"), *command[1:], "--python", str(venv_python(target))], cwd=root, env=env,
            secrets=secrets, log=log, what="installing requirements", build_as=build_as)
        if user:
            # A copy, owned by the agent: whatever the build left running (as that user) holds files of the
            # build folder, not of what is packed and used.
            done = subprocess.run(["cp", "-a", "--no-preserve=ownership", "--", str(target), str(tmp)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RequirementsError(
                    f"installing requirements failed: copying the built environment: {done.stderr.strip()[:300]}")
    finally:
        _remove(area)


#: The Landlock confinement of user processes (stdlib only), reused for source builds.
CONFINE_SCRIPT = Path(__file__).resolve().with_name("user.py")
#: Run by the base interpreter (``-I -S``) in front of uv for a source build: confine writes to
#: the build's own folders (Landlock; reads stay open), then become uv. Where the kernel has no
#: Landlock it says so in uv's output and goes on unconfined.
_CONFINE = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("aicenter_confine", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
end = sys.argv.index("--")
why = module.confine(sys.argv[2:end])
if why is not None:
    print(f"WARNING: the source build is not confined to its folders: {why}", flush=True)
os.execv(sys.argv[end + 1], sys.argv[end + 1:])
"""


def _hand_over(folder: Path, user: tuple[int, int]) -> None:
    """Make ``folder`` (and what is in it) the build user's, unless it already is."""
    info = folder.stat()
    if (info.st_uid, info.st_gid) == user:
        return
    done = subprocess.run(["chown", "-R", f"{user[0]}:{user[1]}", "--", str(folder)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RequirementsError(
            f"installing requirements failed: cannot hand {folder} to uid {user[0]} for the source build "
            f"({done.stderr.strip()[:200]}); the worker must be allowed to switch user (run it as root) for run_as_user"
        )


#: uv's words for a requirement it would have to build from source (uv 0.13): the name follows in backquotes.
_SOURCE_ONLY = (re.compile(r"Wheels are required for `([^`]+)`"),
                re.compile(r"Building source distributions is disabled, but attempted to build `([^`]+)`"))


def _uv(command: list[str], *, cwd: Path, env: dict[str, str], secrets: list[str], log: Log, what: str,
        build_as: _BuildAs | None = None) -> None:
    """Run uv, streaming its output (credentials masked) and keeping the tail for the error message."""
    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", bufsize=1, **(build_as.popen() if build_as else {}))
    except (OSError, subprocess.SubprocessError) as exc:
        if build_as is not None:
            raise RequirementsError(f"{what} failed: could not start uv as the build user ({exc}); the worker must be "
                                    "allowed to switch users (root) for run_as_user") from None
        raise RequirementsError(f"{what} failed: could not start uv ({exc}); install uv into the runtime image") from None
    tail: list[str] = []
    source_only: list[str] = []
    assert process.stdout is not None
    for raw in process.stdout:
        line = clean(raw.rstrip())
        print(f"[uv] {line}", file=sys.stderr, flush=True)
        source_only += [m.group(1) for pattern in _SOURCE_ONLY if (m := pattern.search(line))]
        if line.strip():
            tail = [*tail[-(TAIL - 1):], line.strip()]
    code = process.wait()
    if code != 0 and source_only:
        names = ", ".join(dict.fromkeys(source_only))
        raise RequirementsError(
            f"{what} failed: {names} is published only as a source distribution (no wheel for this Python and "
            "platform), and building it would run its code during the install, which is not allowed by default: "
            f"publish a wheel of {names} to the package index (connection extra package_indexes), pin a version "
            "that has one, or pass allow_source_builds=True to the operator (the build then runs without "
            "credentials, and the environment is cached for this package alone)"
        )
    if code != 0 and build_as is not None and build_as.user is not None:
        first = next((i for i, line in enumerate(tail) if line.lower().startswith(("error", "×"))), max(len(tail) - 3, 0))
        raise RequirementsError(
            f"{what} failed: uv exited with code {code} as uid {build_as.user[0]} (run_as_user, for the source build): "
            f"{' '.join(tail[first:])[:800] or 'no output'}; that user must be able to read the package, the cache folder "
            f"(AICENTER_CACHE) and the base interpreter {base_python()}, or fix requirements.txt"
        )
    if code != 0:
        first = next((i for i, line in enumerate(tail) if line.lower().startswith(("error", "×"))), max(len(tail) - 3, 0))
        cause = " ".join(tail[first:])[:800] or "no output"  # uv's error and its causes
        raise RequirementsError(
            f"{what} failed: uv exited with code {code}: {cause}; fix requirements.txt in the package (or the "
            "connection extra package_indexes), or build the requirements into the image and pass install_requirements=False"
        )


# -- the store -------------------------------------------------------------------------------
def _stored(store: Store, key: str) -> bool:
    try:
        return store.exists(env_key(key))
    except StorageError:
        return False


def _mismatch(record: EnvironmentRecord, key: str, package: str | None) -> str | None:
    """Why a stored record is not that of ``key`` (a record planted for a key it predicted, say); None: it is."""
    if record.key != key:
        return f"it names key {record.key[:12]}"
    if record.python != python_tag():
        return f"it was built for Python {record.python!r}, this is {python_tag()!r}"
    if record.platform != platform_tag():
        return f"it was built on platform {record.platform!r}, this is {platform_tag()!r}"
    if record.package != package:
        return f"it was built for package {record.package!r}" if record.package else "it is shared, not this package's own"
    if environment_key(record.requirements, record.package) != key:
        return "its requirements are not those of the key"
    return None


def _restore(store: Store, key: str, package: str | None, final: Path, log: Log) -> Literal["hit", "miss", "broken"]:
    """Unpack the stored environment of ``key`` into ``final``.

    "broken": the record names a blob that is corrupt or gone (gc), or does not match its key;
    the rebuilt environment replaces it.
    """
    try:
        record = read_optional(store, env_key(key), EnvironmentRecord)
    except StorageError as exc:
        log(f"WARNING: could not read the stored environment record ({exc}); installing instead")
        return "miss"
    if record is None:
        log(f"environment {key[:12]} is in neither the local cache nor the store: installing")
        return "miss"
    if record.format not in (PACKED, PARTED):
        log(f"stored environment {key[:12]} is packed as {record.format!r}, which this runtime cannot read: installing")
        return "miss"
    if (problem := _mismatch(record, key, package) or _bad_parts(record)) is not None:
        log(f"WARNING: the stored environment record {store.url(env_key(key))} does not match its key ({problem}): "
            "not used; installing it again")
        return "broken"
    began = time.perf_counter()

    def unpack(tmp: Path) -> None:
        if record.format == PARTED:
            _fetch_unpack_parts(store, record.blob, record.parts, tmp)
        else:
            _fetch_unpack(store, record.blob, tmp)

    try:
        _build(final, unpack, key, record.requirements, package, log)
    except (OSError, StorageError) as exc:  # corrupt or gone (gc): rebuild
        log(f"WARNING: the stored environment {key[:12]} cannot be used ({exc}); installing it again")
        return "broken"
    log(f"environment {key[:12]} restored from the store: {record.blob.size / 2**20:.1f} MiB fetched, verified and "
        f"unpacked in {time.perf_counter() - began:.2f} s")
    return "hit"


def _store(store: Store, key: str, packed: _Packed, requirements: list[str], package: str | None, log: Log, *,
           replace: bool = False) -> str:
    """Upload the environment packed before package code ran, then create its record; what happened, in words.

    The upload sends exactly the packed bytes: they are hashed again while read and must match
    the digest taken when they were packed (a file changed meanwhile stores nothing).
    ``replace``: the record names a broken blob or does not match its key, so it is overwritten;
    where the credentials only allow creating records (a pod's session policy) that fails with a
    warning naming the fix.
    """
    _low_priority()
    try:
        if not replace and _stored(store, key):
            return f"environment {key[:12]} was stored by another run meanwhile"
        began = time.perf_counter()
        try:
            put_blob(store, packed.path, packed.sha256)
        except StorageError as exc:
            raise StorageError(f"the packed environment was not stored: {exc}") from exc
        record = EnvironmentRecord(key=key, blob=BlobRef(sha256=packed.sha256, size=packed.size), python=python_tag(),
                                   platform=platform_tag(), requirements=requirements, package=package,
                                   format=PARTED if packed.parts else PACKED, parts=list(packed.parts))
        try:
            write(store, env_key(key), record, create=not replace)
        except AlreadyExistsError:
            return f"environment {key[:12]} was stored by another run meanwhile"
        except StorageError as exc:
            if not replace:
                raise
            raise StorageError(f"{exc}; the record names a broken blob or does not match its key: delete "
                               f"{store.url(env_key(key))} so that the next run stores a good one") from exc
        return (f"environment {key[:12]} stored for the next run: {packed.size / 2**20:.1f} MiB uploaded in "
                f"{time.perf_counter() - began:.2f} s")
    finally:
        packed.path.unlink(missing_ok=True)


def _pack_and_store(store: Store, key: str, final: Path, requirements: list[str], package: str | None, log: Log, *,
                    replace: bool, into: Path | None = None, why: str = "as another user, which cannot write it") -> str:
    """Pack the environment in place and store it, while package code runs where it cannot write it."""
    _low_priority()
    began = time.perf_counter()
    folder = into if into is not None else final.parent
    packed = _pack_into(final, folder / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}.{PACKED}")
    log(f"environment {key[:12]}: packed ({packed.size / 2**20:.1f} MiB) in {time.perf_counter() - began:.2f} s while "
        f"package code runs ({why})")
    return _store(store, key, packed, requirements, package, log, replace=replace)


def store_meanwhile(store: Store, plan: dict[str, Any], log: Log, cache_dir: Path | None = None) -> Environment:
    """``sync``: pack and store the environment ``stage`` installed, in the background while package code runs.

    ``plan`` is ``stage``'s ``store_plan`` (through the agent's state, never from package code);
    ``base`` mounts the environment read-only, so the folder is as ``stage`` left it. The returned
    environment's :meth:`Environment.finish` waits for it (the end of the run). Raises
    StorageError when the folder is not the planned environment.
    """
    key, package = str(plan["key"]), plan.get("package")
    final = cache_root(cache_dir) / "envs" / key
    try:
        info = json.loads((final / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise StorageError(f"the stage container left no usable environment {key[:12]} ({exc})") from None
    if info.get("key") != key or info.get("package") != package:
        raise StorageError(f"the environment in {final} is not the one stage installed (key {key[:12]})")
    requirements = [str(line) for line in plan["requirements"]]
    storing = _in_background(lambda: _pack_and_store(
        store, key, final, requirements, package, log, replace=bool(plan.get("replace")), into=Path(tempfile.gettempdir()),
        why="its container has it read-only"))
    return Environment(venv_python(final), key, "installed", 0.0, storing)


def _low_priority() -> None:
    """This thread (and the threads and processes it starts) at low priority: user code runs meanwhile."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _mark_used(store: Store, key: str, final: Path) -> None:
    """Tell gc this environment is in use: a create-once ``envs/<key>.used-<day>`` once a day, best effort.

    The local stamp lies beside the environment, never in it (it is read-only).
    """
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    stamp = final.parent / f".{final.name}.used-{day}"
    if stamp.exists():
        return
    with contextlib.suppress(StorageError):
        store.put_bytes(env_used_key(key, day), b"", create=True)
    with contextlib.suppress(OSError):
        stamp.touch()


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
    """Byte-compile the environment's packages before packing, running none of their code.

    Runs with the packed environment restored from the store then import without compiling
    (pods run with PYTHONDONTWRITEBYTECODE: without this every pod would compile pandas & co.
    at each import). ``-I -S``: no ``site``, so no ``.pth`` file of the environment runs, and
    the minimal install environment. Best effort: a file that does not compile is left as it is.

    In parallel (``-j 0``: a worker per core). The packages' own test suites (``tests/`` and
    ``test/`` folders: half the files of numpy, pandas, scikit-learn and matplotlib, which a run
    does not import) are left out: they cost half the compile time and would be compiled in
    memory on the rare import.
    """
    skip = re.escape(str(env / "lib")) + r".*[/\\]tests?[/\\]"
    subprocess.run([str(venv_python(env)), "-I", "-S", "-m", "compileall", "-q", "-j", "0", "-x", skip, str(env / "lib")],
                   env={"PATH": os.environ.get("PATH", os.defpath)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)


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

    dest.mkdir()
    digest = hashlib.sha256()
    key = blob_key(blob.sha256)
    size = 0

    def hashed() -> Iterator[bytes]:
        nonlocal size
        for data in _object_chunks(store, key, blob.size):
            digest.update(data)
            size += len(data)
            yield data

    try:
        _untar(dest, hashed())
    except _ReadError:
        raise
    except StorageError as exc:  # what was read does not unpack: not what was stored
        raise StorageError(f"{store.url(key)} is corrupt: {exc}") from exc
    if size != blob.size:
        raise StorageError(f"{store.url(key)} does not match its record: {size} bytes, the record says {blob.size}")
    if digest.hexdigest() != blob.sha256:
        raise StorageError(f"{store.url(key)} is corrupt: its content hashes to sha256:{digest.hexdigest()}, "
                           f"expected sha256:{blob.sha256}")


#: ``tar`` unpacking a stored environment: its files are the runtime's own, with no special bits. A root
#: runtime (the local launcher under ``run_as_user``) would otherwise keep the archive's owners and
#: setuid bits, and the store's bytes may have been planted (see the module's docstring). Run with
#: umask 022: what the user processes of another user read does not depend on the worker's umask.
_UNTAR = ("tar", "--no-same-owner", "--no-same-permissions", "-C")


def _untar(dest: Path, packed: Iterable[bytes]) -> None:
    """Extract a zstd-compressed tar stream into ``dest`` (the system's tar: fast)."""
    import zstandard

    tar = subprocess.Popen([*_UNTAR, str(dest), "-xf", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, umask=0o022)
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


# -- packing in parts (PARTED) ---------------------------------------------------------------
def _bad_parts(record: EnvironmentRecord) -> str | None:
    """Why the parts a :data:`PARTED` record names cannot be its blob; None: they tile it exactly."""
    if record.format != PARTED:
        return "it names parts of a blob packed as one stream" if record.parts else None
    if not 1 <= len(record.parts) <= MAX_PARTS:
        return f"it names {len(record.parts)} parts, not 1 to {MAX_PARTS}"
    offset = 0
    for index, part in enumerate(record.parts):
        if part.offset != offset or part.size <= 0 or not re.fullmatch(r"[0-9a-f]{64}", part.sha256):
            return f"its part {index} is not the next bytes of the blob with a sha256"
        offset += part.size
    if offset != record.blob.size:
        return f"its parts add up to {offset} bytes, the blob to {record.blob.size}"
    return None


def _entries(env: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The folders of ``env`` (top-down, sorted, ``.`` first), and every other entry with its weight.

    Relative names as ``tar`` takes them from a list. Links are entries of their own, never
    followed (a link to a folder is not a folder).
    """
    folders: list[str] = ["."]
    others: list[tuple[str, int]] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        inside: list[str] = []
        with os.scandir(env / rel if rel else env) as scan:
            items = sorted(scan, key=lambda item: item.name)
        for item in items:
            name = f"{rel}/{item.name}" if rel else item.name
            if not rel and item.name.startswith(".used-"):
                continue
            if item.is_dir(follow_symlinks=False):
                inside.append(name)
                folders.append(name)
            else:
                size = item.stat(follow_symlinks=False).st_size if item.is_file(follow_symlinks=False) else 0
                others.append((name, ENTRY_WEIGHT + size))
        pending.extend(reversed(inside))
    return folders, others


def _split(entries: list[tuple[str, int]], count: int) -> list[list[str]]:
    """``entries`` in ``count`` runs of about equal weight, in order (a folder's files stay together)."""
    total = sum(weight for _, weight in entries)
    parts: list[list[str]] = [[]]
    done = 0
    for name, weight in entries:
        if done >= total * len(parts) / count and len(parts) < count:
            parts.append([])
        parts[-1].append(name)
        done += weight
    return [part for part in parts if part]


def _pack_part(env: Path, names: list[str], dest: Path) -> tuple[str, int]:
    """The entries ``names`` of ``env`` as one tar stream, zstd-compressed into ``dest``: its sha256 and size.

    Modes are stored with the owner's write bit (``--mode=u+w``): parts are unpacked at once
    into the same folders, so none may be left read-only until all are in; the environment is
    made read-only again after (:func:`_seal`).
    """
    import zstandard

    listing = dest.with_name(dest.name + ".list")
    listing.write_bytes(b"".join(name.encode("utf-8", "surrogateescape") + b"\0" for name in names))
    try:
        with tempfile.TemporaryFile() as errors:
            tar = subprocess.Popen(["tar", "-C", str(env), "--no-recursion", "--null", "--verbatim-files-from",
                                    "-T", str(listing), "--mode=u+w", "--ignore-failed-read", "-cf", "-"],
                                   stdout=subprocess.PIPE, stderr=errors)
            assert tar.stdout is not None
            try:
                with dest.open("wb") as f:
                    writer = _HashingWriter(f)
                    zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(
                        tar.stdout, cast(IO[bytes], writer), read_size=CHUNK, write_size=CHUNK)
            finally:
                tar.stdout.close()
                code = tar.wait()
            if code not in (0, 1):  # 1: a file changed while read (bytecode written meanwhile): harmless
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip()
                raise StorageError(f"packing the environment failed: tar: {said[:300]}")
    finally:
        listing.unlink(missing_ok=True)
    return writer.digest.hexdigest(), writer.size


def _pack_parts(env: Path, dest: Path, count: int = PART_COUNT) -> _Packed:
    """Pack ``env`` into ``dest`` as :data:`PARTED`: the parts packed at once, then laid end to end.

    The first part holds every folder and is unpacked first, then the ``count`` others (the
    files and links, in runs of about equal weight) at once: no two ``tar`` processes create
    or set up one folder at the same time.

    The blob's own digest (its name in the store) is taken while the parts are copied into it;
    each part's digest is taken while it is compressed.
    """
    from concurrent.futures import ThreadPoolExecutor

    folders, others = _entries(env)
    runs = [folders, *_split(others, count)]
    files = [dest.with_name(f"{dest.name}.{index}") for index in range(len(runs))]
    try:
        with ThreadPoolExecutor(len(runs), thread_name_prefix="aicenter-env-pack") as pool:
            digests = list(pool.map(lambda i: _pack_part(env, runs[i], files[i]), range(len(runs))))
        parts: list[EnvironmentPart] = []
        whole = hashlib.sha256()
        offset = 0
        with dest.open("wb") as out:
            for path, (sha256, size) in zip(files, digests, strict=True):
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        whole.update(chunk)
                        out.write(chunk)
                parts.append(EnvironmentPart(offset=offset, size=size, sha256=sha256))
                offset += size
                path.unlink()
    finally:
        for path in files:
            path.unlink(missing_ok=True)
    return _Packed(dest, whole.hexdigest(), offset, tuple(parts))


class _RangesIgnored(Exception):
    """The S3 server answered a ranged GET with the whole object: the parts are read in one stream instead."""


def _fetch_unpack_parts(store: Store, blob: BlobRef, parts: Sequence[EnvironmentPart], dest: Path) -> None:
    """Read, verify and unpack the parts of a :data:`PARTED` blob at once, each into ``dest`` by a ``tar`` of its own.

    A file store's blob is read in place (``pread`` of one open descriptor), an S3 blob as one
    ranged GET per part (a server that ignores ranges: one stream, the parts in turn). The first
    part (the folders) is unpacked before the others. Each part is hashed as it is read and must
    match its record's digest (the record names each part's, so together they are the whole
    blob's); ``dest`` is a temporary folder that the caller discards when any part does not match.
    """
    from concurrent.futures import ThreadPoolExecutor

    from airflow_aicenter.storage.store import LocalStore

    dest.mkdir()
    key = blob_key(blob.sha256)
    fd: int | None = None
    if isinstance(store, LocalStore):
        try:
            fd, size = store.open_read(key)
        except (FileNotFoundError, NotADirectoryError):
            raise _ReadError(f"{store.url(key)} does not exist") from None
        if size != blob.size:
            os.close(fd)
            raise StorageError(f"{store.url(key)} is corrupt: {size} bytes, its record says {blob.size}")
    try:
        def read(part: EnvironmentPart) -> Iterator[bytes]:
            if fd is not None:
                return _pread_range(fd, part.offset, part.size)
            return _get_range(store, key, part.offset, part.size)

        try:
            _unpack_part(store.url(key), 0, parts[0], read(parts[0]), dest)  # the folders
            with ThreadPoolExecutor(max(len(parts) - 1, 1), thread_name_prefix="aicenter-env-unpack") as pool:
                for done in [pool.submit(_unpack_part, store.url(key), index, part, read(part), dest)
                             for index, part in enumerate(parts) if index > 0]:
                    done.result()
        except _RangesIgnored:
            store.ranged_reads = False
            _remove(dest)
            dest.mkdir()
            whole = _Sequential(store, key, blob.size)
            for index, part in enumerate(parts):
                _unpack_part(store.url(key), index, part, whole.take(part.size), dest)
    finally:
        if fd is not None:
            os.close(fd)


def _pread_range(fd: int, offset: int, size: int) -> Iterator[bytes]:
    end = offset + size
    while offset < end:
        data = os.pread(fd, min(CHUNK, end - offset), offset)
        if not data:
            return
        offset += len(data)
        yield data


def _get_range(store: Store, key: str, offset: int, size: int) -> Iterator[bytes]:
    import obstore

    if not store.ranged_reads:
        raise _RangesIgnored
    try:
        result = obstore.get(store.inner, key, options={"range": (offset, offset + size)})
    except FileNotFoundError:
        raise _ReadError(f"{store.url(key)} does not exist") from None
    except Exception as exc:
        if "non-partial" in str(exc):  # obstore's words for a 200 answer to a range
            raise _RangesIgnored from exc
        raise _ReadError(f"reading {store.url(key)} failed: {str(exc).splitlines()[0][:300]}") from exc
    if tuple(result.range) != (offset, offset + size):
        raise _RangesIgnored
    try:
        for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)
    except Exception as exc:  # obstore's own errors: a failed read
        raise _ReadError(f"reading {store.url(key)} failed: {str(exc).splitlines()[0][:300]}") from exc


def _object_chunks(store: Store, key: str, size: int) -> Iterator[bytes]:
    """The whole object ``key`` as a stream, never more than its record's ``size``; every failure a _ReadError."""
    import obstore

    got = 0
    try:
        for chunk in obstore.get(store.inner, key).stream(min_chunk_size=CHUNK):
            got += len(chunk)
            if got > size:
                raise _ReadError(f"{store.url(key)} does not match its record: it is larger than the {size} bytes "
                                 "the record says")
            yield bytes(chunk)
    except FileNotFoundError:
        raise _ReadError(f"{store.url(key)} does not exist") from None
    except _ReadError:
        raise
    except Exception as exc:  # obstore's own errors: a failed or missing object
        raise _ReadError(f"reading {store.url(key)} failed: {str(exc).splitlines()[0][:300]}") from exc


class _Sequential:
    """The whole object as one stream (a server that ignores ranges), handed out part by part."""

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.chunks = _object_chunks(store, key, size)
        self.rest = b""

    def take(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes (fewer where the object ends first)."""
        while size > 0:
            data = self.rest or next(self.chunks, b"")
            if not data:
                return
            chunk, self.rest = data[:size], data[size:]
            size -= len(chunk)
            yield chunk


def _unpack_part(url: str, index: int, part: EnvironmentPart, data: Iterator[bytes], dest: Path) -> None:
    """Hash, decompress and unpack one part into ``dest`` (its own ``tar`` process); StorageError when it is damaged."""
    import zstandard

    digest = hashlib.sha256()
    size = 0
    with tempfile.TemporaryFile() as errors:
        tar = subprocess.Popen([*_UNTAR, str(dest), "-xf", "-"], stdin=subprocess.PIPE, stderr=errors, umask=0o022)
        assert tar.stdin is not None
        broken: str | None = None
        try:
            with zstandard.ZstdDecompressor().stream_writer(tar.stdin, closefd=False) as writer:
                for chunk in data:
                    size += len(chunk)
                    if size > part.size:
                        raise StorageError(f"{url} is corrupt: its part {index} is longer than its record says "
                                           f"({part.size} bytes)")
                    digest.update(chunk)
                    writer.write(chunk)
        except (zstandard.ZstdError, BrokenPipeError) as exc:
            broken = f"part {index} is not a zstd tar stream ({exc})"
        finally:
            with contextlib.suppress(BrokenPipeError):
                tar.stdin.close()
            code = tar.wait()
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip()
    if size != part.size:
        raise StorageError(f"{url} is corrupt: its part {index} has {size} bytes, the record says {part.size}")
    if digest.hexdigest() != part.sha256:
        raise StorageError(f"{url} is corrupt: its part {index} hashes to sha256:{digest.hexdigest()}, "
                           f"expected sha256:{part.sha256}")
    if broken is not None or code != 0:
        raise StorageError(f"{url} is corrupt: {broken or f'unpacking part {index} failed: tar: {said[:300]}'}")
