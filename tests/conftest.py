"""Shared fixtures: a real S3 protocol server (moto, HTTP on 127.0.0.1) and both store backends."""

from __future__ import annotations

import sys

# Bytecode is cached even where PYTHONDONTWRITEBYTECODE is set (as on CI machines): this process and each xdist
# worker then rewrite the test modules' asserts once, not in every run (about 8 CPU-s a process), and the
# subprocesses (runtimes, ``airflow dags test``), which keep the variable, read airflow_aicenter's cached bytecode
# instead of compiling it each time. Nothing is written where package code runs: those are subprocesses.
sys.dont_write_bytecode = False

import functools
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.storage import S3Options, Store, open_store

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PACKAGE = REPO / "examples" / "packages" / "churn"


def built_once(name: str, build: Callable[[Path], object]) -> Path:
    """``build(folder)`` once per test session, by whichever xdist worker asks first; the others wait, then reuse it.

    For what is slow to make and only read afterwards (a venv: ~10 s of pip each): each worker made
    its own before. The folder is under the session's temp root (``pytest_configure``), which any
    user may traverse and which is removed at the session's end.
    """
    import fcntl
    import tempfile

    root = Path(os.environ.get("AICENTER_TEST_TMP_ROOT") or tempfile.gettempdir()) / "built-once"
    root.mkdir(mode=0o755, exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the build fails
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            build(folder)
            done.write_text("")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def atomic_conditional_writes() -> None:
    """Give moto's server S3's guarantee for conditional writes (``If-None-Match: *``).

    moto checks the condition, then parses the body and stores it, while other request threads
    run: under load two create-only PUTs of one key both got 200 (a stress run of the 32
    concurrent trainings test made version 1.27 twice). S3 decides a conditional write
    atomically, and the registry relies on that; one lock around moto's conditional writes (a
    PUT, and the POST completing a multipart upload) restores it. Other requests stay concurrent.
    """
    from moto.s3.responses import S3Response

    if getattr(S3Response, "_aicenter_atomic", False):
        return
    lock = threading.Lock()

    def serialised(method: Any) -> Any:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.headers.get("If-None-Match") is None and self.headers.get("If-Match") is None:
                return method(self, *args, **kwargs)
            with lock:
                return method(self, *args, **kwargs)
        return wrapper

    S3Response.put_object = serialised(S3Response.put_object)  # type: ignore[method-assign]
    S3Response._key_response_post = serialised(S3Response._key_response_post)  # type: ignore[method-assign]
    S3Response._aicenter_atomic = True  # type: ignore[attr-defined]


class S3Server:
    """moto in server mode: real HTTP, real S3 protocol, on a free loopback port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.options = S3Options(endpoint_url=self.endpoint, region="us-east-1", access_key_id="testing", secret_access_key="testing-secret")

    def start(self) -> None:
        atomic_conditional_writes()
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing-secret",
        ).create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        return self.options.to_env()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A fresh, empty storage root on each backend."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    server: S3Server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.create_bucket()}/aicenter", server.options)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Credentials in the environment, as the runtime reads them in a pod or child process."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def example_package() -> Path:
    assert (EXAMPLE_PACKAGE / "main.py").exists(), "examples/packages/churn is missing"
    return EXAMPLE_PACKAGE


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


# -- real Airflow --------------------------------------------------------------------------
import json
import subprocess
import sys
from dataclasses import dataclass, field

BIN = Path(sys.executable).parent


@dataclass
class AirflowEnv:
    """A throw-away AIRFLOW_HOME with a migrated database and our DAGs in its dags folder."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def default_store_uri(self) -> str:
        return (self.home / "aicenter").as_uri()

    def run(self, *args: str, extra_env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], env={**self.env, **(extra_env or {})},
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def dags_test(self, dag_id: str, conf: dict | None = None, *, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        args = ["airflow", "dags", "test", dag_id]
        if conf:
            args += ["-c", json.dumps(conf)]
        return self.run(*args, extra_env=extra_env)

    def add_dag(self, name: str, source: str) -> None:
        """Put a test DAG file next to the example DAGs."""
        (self.home / "dags" / name).write_text(source)

    def aicenter(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run("aicenter", *args, extra_env=extra_env, timeout=120)


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    home = tmp_path_factory.mktemp("airflow-home")
    dags = home / "dags"
    dags.mkdir()
    for dag_file in (REPO / "dags").glob("*.py"):
        shutil.copy(dag_file, dags / dag_file.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_", "AICENTER_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        AICENTER_CACHE=str(home / "aicenter-cache"),  # package environments of this session's runs
    )
    airflow = AirflowEnv(home=home, env=env)
    done = airflow.run("airflow", "db", "migrate")
    assert done.returncode == 0, done.stdout + done.stderr
    return airflow


def make_dataset(dest: Path, rows: int = 400, seed: int = 7) -> Path:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        from make_dataset import make_churn_dataset
    finally:
        sys.path.pop(0)
    return make_churn_dataset(dest, rows=rows, seed=seed)


# -- the two tiers and their timeouts (DESIGN "Tests") ---------------------------------------------
# ``python -m pytest`` runs the fast tier (pyproject's addopts: -m "not integration"); ``-m integration``
# runs the rest. Tests are marked here, by the fixtures they use and the folder they are in, so no
# test module has to say which tier it belongs to.
INTEGRATION_FIXTURES = {
    "airflow_env",  # a real AIRFLOW_HOME: `airflow db migrate`, `airflow dags test` subprocesses
    "ui_server", "browser",  # tests/ui: the api-server and Chromium
    "postgres", "stack",  # tests/load: PostgreSQL with a scheduler, a dag-processor and an api-server
    "runtime_image", "podman_pods", "kube_podman",  # tests/containers: pods in real containers (podman)
}
INTEGRATION_MARKERS = ("containers", "cluster")
INTEGRATION_TIMEOUT = 300  # seconds; the fast tier's default is pyproject's `timeout`
SLOWER = {  # a longer timeout (seconds) for the integration tests under these paths, first match
    "tests/load/": 900,  # PostgreSQL, db migrate, 8 trainings, a scheduler killed and restarted
    "tests/containers/": 600,  # pods' containers started one after another by podman
}


def is_integration(item: pytest.Item) -> bool:
    if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    path = item.nodeid.replace("\\", "/")
    return path.startswith("tests/containers/") or any(item.get_closest_marker(name) for name in INTEGRATION_MARKERS)


def xdist_group(item: pytest.Item) -> str:
    """The worker an integration test shares with others under ``--dist loadgroup`` (pyproject's addopts).

    One group per module, so a module's and a session's fixtures (a migrated AIRFLOW_HOME, the
    api-server and Chromium of tests/ui, a module's DAG run) are built once, not on both workers;
    every container test in one group, so podman runs one test's pods at a time. The fast tier has
    no groups: its tests go to whichever worker is free.
    """
    path = item.nodeid.replace("\\", "/")
    if path.startswith("tests/containers/"):
        return "containers"
    if path.startswith("tests/ui/"):
        return "ui"
    return path.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the integration tier, and give it a longer timeout unless a test or the command line names one.

    tryfirst: the marks must be there before pytest's own hook deselects by ``-m``.
    """
    timeout_given = config.getoption("timeout", None) is not None
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if not is_integration(item):
            continue
        item.add_marker(pytest.mark.integration)
        if xdist:
            item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
        if timeout_given or item.get_closest_marker("timeout") is not None:
            continue
        path = item.nodeid.replace("\\", "/")
        seconds = next((s for prefix, s in SLOWER.items() if path.startswith(prefix)), INTEGRATION_TIMEOUT)
        item.add_marker(pytest.mark.timeout(seconds))


# -- one temp root per test session, removed at its end ---------------------------------------------
#: Prefix of a session's temp root, short: Unix socket paths under it must stay within 108 bytes.
TEMP_ROOT_PREFIX = "aict-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pytest_configure(config: pytest.Config) -> None:
    """Point TMPDIR at a folder of this session's own (xdist workers inherit it), after removing roots of dead sessions.

    pytest's own folders and every temp folder the code under test makes land in it, and it is
    removed at the session's end (``pytest_unconfigure``): runs no longer pile up gigabytes in
    TMPDIR. AICENTER_KEEP_TEST_TMP=1 keeps it to look into a failure.
    """
    if hasattr(config, "workerinput") or os.environ.get("AICENTER_TEST_TMP_ROOT"):
        return  # an xdist worker, or a session inside a session: the outer one owns the root
    import tempfile

    parent = Path(tempfile.gettempdir())
    for old in parent.glob(f"{TEMP_ROOT_PREFIX}*"):
        try:
            pid = int((old / "pid").read_text())
        except (OSError, ValueError):
            continue  # not one of ours (or not finished being made)
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=TEMP_ROOT_PREFIX, dir=parent))
    root.chmod(0o1777)  # as /tmp: other users (run_as_user's, PostgreSQL's) make and reach their folders in it
    (root / "pid").write_text(str(os.getpid()))
    config.stash[_TEMP_ROOT] = root
    os.environ.update(TMPDIR=str(root), AICENTER_TEST_TMP_ROOT=str(root))
    tempfile.tempdir = None  # computed again from TMPDIR


def pytest_unconfigure(config: pytest.Config) -> None:
    root = config.stash.get(_TEMP_ROOT, None)
    if root is None:
        return
    if os.environ.get("AICENTER_KEEP_TEST_TMP"):
        print(f"test temp folders kept in {root} (AICENTER_KEEP_TEST_TMP)")
        return
    shutil.rmtree(root, ignore_errors=True)


_TEMP_ROOT = pytest.StashKey[Path]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say where the tests went when none ran: often every one asked for is in the other tier."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        terminalreporter.write_line(
            f"no tests ran with -m {config.getoption('markexpr')!r}: python -m pytest runs the fast tier, "
            "python -m pytest -m integration the rest (scripts/test.sh runs both)", yellow=True)


# -- the runtime as a subprocess (what the local launcher starts) ----------------------------------
class RuntimeSpawner:
    """``python -m airflow_aicenter.runtime SPEC.json``, as the local launcher and a pod start it.

    :meth:`run` waits and captures the output; :meth:`start` returns the process. Each spec gets
    its own file under ``folder``; processes started and still running are killed at the end.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen[str]] = []

    def spec_file(self, spec: Any) -> Path:
        """The spec (a RunSpec, or its JSON text) written to a fresh file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"spec-{uuid.uuid4().hex[:8]}.json"
        path.write_text(spec if isinstance(spec, str) else spec.model_dump_json())
        return path

    def command(self, spec: Any) -> list[str]:
        return [sys.executable, "-m", "airflow_aicenter.runtime", str(self.spec_file(spec))]

    def run(self, spec: Any, env: dict[str, str] | None = None, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(spec), capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=timeout, check=False)

    def start(self, spec: Any, env: dict[str, str] | None = None, *, stdout: Any = subprocess.PIPE,
              stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.command(spec), env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr, text=True)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def spawn_runtime(tmp_path: Path) -> Iterator[RuntimeSpawner]:
    """Start the runtime as a subprocess: ``spawn_runtime.run(spec, env)`` or ``spawn_runtime.start(spec, env)``."""
    spawner = RuntimeSpawner(tmp_path / "runtime-specs")
    yield spawner
    spawner.close()


# -- fixtures of the top-level test modules (issue 19: every fixture in a conftest), and their helpers.
# They import tests.aicenter_helpers inside the fixture: that module imports this conftest.
import signal
import time

from airflow_aicenter import layout
from airflow_aicenter.records import Outcome, RunSpec, VersionRecord, read_optional
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.packages import ECHO_MAIN, TRAIN_ONLY, write_package


def run_cli_dag(data: str) -> None:
    """One run of a DAG ``aicenter_test_cli``: train >> full >> [evaluate, evaluate_nan], each task as Airflow runs it."""
    from airflow_aicenter.operators import EvaluatePipelineOperator, FullPipelineOperator, TrainPipelineOperator
    from tests.operators.kube_api import make_context

    def run(op: object) -> dict:
        return op.execute(make_context("aicenter_test_cli", op.task_id))  # type: ignore[attr-defined]

    trained = run(TrainPipelineOperator(task_id="train", package="scored", version="1.0", dataset=data,
                                        env={"SCORE": "0.1", "API_KEY": "k-9f8e7d"}))
    run(FullPipelineOperator(task_id="full", package="scored", version=trained["version"], dataset=data,
                             env={"SCORE": "0.7", "EPOCHS": "4"}, promote_to="production"))
    run(EvaluatePipelineOperator(task_id="evaluate", package="scored", version="production", evaluation_dataset=data,
                                 env={"SCORE": "0.8"}, promote_to="staging"))
    with pytest.raises(Exception, match=r"Main\.evaluate\(\) returned nan"):  # evaluate_nan fails the DAG run
        run(EvaluatePipelineOperator(task_id="evaluate_nan", package="scored", version="production",
                                     evaluation_dataset=data, env={"SCORE": "nan"}))



def record_run(store, run_id: str, *, dataset: str, files: dict[str, bytes], start: float, status: str = "succeeded"):
    """A run folder as the runtime leaves it: outcome.json and the data snapshot's manifest."""
    import hashlib

    from airflow_aicenter.records import Manifest, ManifestEntry, Outcome, write

    entries = [ManifestEntry(path=p, sha256=hashlib.sha256(b).hexdigest(), size=len(b)) for p, b in sorted(files.items())]
    manifest_key = f"runs/{run_id}/data_directory.manifest.json"
    write(store, manifest_key, Manifest(source=dataset, directory="data_directory", files=entries, file_count=len(entries),
                                        total_bytes=sum(e.size for e in entries)))
    write(store, f"runs/{run_id}/outcome.json", Outcome(
        status=status, pipeline="train", package="churn", version="1.0", start_at=start, end_at=start + 12.5,
        dataset=dataset, env={"EPOCHS": "5"}, snapshots={"data_directory": store.url(manifest_key)},
        error=None if status == "succeeded" else "ValueError: bad rows (train.py:12)"))



RUN_IDS = [f"aicenter_training/scheduled__2026-11-{day:02d}T03:00:00+00:00/train_churn_model/1" for day in (1, 2, 3)]



TRAIN_PY = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, training_directory):\n        pass\n"
            "    def evaluate(self, evaluation_directory):\n        return 0.5\n    def save(self):\n        pass\n")


#: The "big" file: large enough that rewriting it shows in the bytes written, small enough for the fast tier.
BIG = 3 * 2**20



SLEEPY_TRAIN = '''
import time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        time.sleep(120)
    def save(self):
        pass
'''



def start_runtime(spawn_runtime: RuntimeSpawner, store: Store, process_env: dict[str, str], run_id: str, pipeline: str,
                  package: str, **spec_kw: Any) -> subprocess.Popen[str]:
    registry = Registry(store)
    base = registry.get(package, "1.0")
    spec = RunSpec.model_validate({"pipeline": pipeline, "storage": store.uri, "run_prefix": f"runs/{run_id}",
                                   "package": package, "version": "1.0", "blob": base.blob, **spec_kw})
    return spawn_runtime.start(spec, process_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# from test_approval.py
@pytest.fixture
def registry(store: Store, tmp_path: Path) -> Registry:
    registry = Registry(store)
    registry.upload(write_package(tmp_path / "pkg", train=TRAIN_ONLY), "churn")
    return registry



# from test_cli.py
@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(store URI, dataset URI) after one DAG run: 1.1 trained, 1.2 full (production), evaluated, one failure."""
    from tests.aicenter_helpers import SCORED_TRAIN, small_dataset, upload_package
    tmp = tmp_path_factory.mktemp("cli")
    uri = (tmp / "aicenter").as_uri()
    upload_package(Registry(open_store(uri)), tmp, "scored", SCORED_TRAIN)
    data = small_dataset(tmp).as_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": {"storage": uri}}))
        run_cli_dag(data)
    yield uri, data



# from test_cli.py
@pytest.fixture
def recorded(tmp_path) -> str:
    uri = (tmp_path / "store").as_uri()
    store = open_store(uri)
    data = "s3://bucket/datasets/churn/"
    record_run(store, RUN_IDS[0], dataset=data, files={"a.csv": b"x\n1\n"}, start=1_790_000_000)
    record_run(store, RUN_IDS[1], dataset=data, files={"a.csv": b"x\n1\n"}, start=1_790_086_400)
    record_run(store, RUN_IDS[2], dataset=data, files={"a.csv": b"x\n1\n", "b.csv": b"x\n2\n"}, start=1_790_172_800,
               status="failed")
    return uri



# from test_cli_errors.py
@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A file store with churn 1.0 and a run whose cause and env hold rich markup; and a scratch folder."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    store = open_store((tmp / "store").as_uri())
    Registry(store).upload(EXAMPLE_PACKAGE, "churn")
    run = layout.RunPath("dag", "run1", "train", try_number=1)
    store.put_bytes(run.key(layout.OUTCOME), (
        b'{"status": "failed", "pipeline": "train", "package": "churn", "version": "1.0", "start_at": 1.0, "end_at": 2.0,'
        b' "error": "ValueError: [/bold] in [red]column[/red", "env": {"[/x]": "[/y]"}}'))
    broken = layout.RunPath("dag", "run2", "train", try_number=1)
    store.put_bytes(broken.key(layout.OUTCOME), b"[/bold] not an outcome")
    (tmp / "afile").write_text("x")
    return store.uri, tmp



# from test_cli_exit_codes.py
@pytest.fixture
def uri(tmp_path: Path) -> str:
    """A file store holding ``churn`` 1.0 (trainable) and ``served`` 1.0 (main.py only: it can be served, not trained)."""
    uri = (tmp_path / "store").as_uri()
    registry = Registry(open_store(uri))
    registry.upload(write_files(tmp_path / "churn", {"main.py": ECHO_MAIN, "train.py": TRAIN_PY, "requirements.txt": ""}),
                    "churn")
    registry.upload(write_files(tmp_path / "served", {"main.py": ECHO_MAIN, "requirements.txt": ""}), "served")
    return uri



# from test_cli_package.py
@pytest.fixture(params=["file", "s3"])
def target(request, tmp_path):
    if request.param == "file":
        return (tmp_path / "store").as_uri(), {}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.create_bucket()}/root", server.env()



# from test_cli_speed.py
@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    uri = (tmp_path / "store").as_uri()
    Registry(open_store(uri)).upload(EXAMPLE_PACKAGE, "churn")
    return uri



# from test_completion.py
@pytest.fixture
def scored_registry(store: Store, tmp_path: Path) -> Registry:
    """A store with package "scored" version 1.0."""
    from tests.aicenter_helpers import SCORED_TRAIN, upload_package
    scored_registry = Registry(store)
    upload_package(scored_registry, tmp_path, "scored", SCORED_TRAIN)
    return scored_registry



# from test_per_file_versions.py
@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    """A package with a big unchanged file, a small changing one, a subfolder and an executable script."""
    root = write_package(tmp_path / "pkg", train=TRAIN_ONLY, files={
        "weights.bin": os.urandom(BIG), "meta.json": '{"epoch": 1}', "tools/run.sh": "#!/bin/sh\necho hi\n"})
    (root / "tools" / "run.sh").chmod(0o755)
    return root



# from test_registry.py
@pytest.fixture
def train_pkg(tmp_path: Path) -> Path:
    return write_package(tmp_path / "train_pkg", train=TRAIN_ONLY)



# from test_run_spec.py
@pytest.fixture
def parent(store: Store, tmp_path: Path) -> VersionRecord:
    from tests.aicenter_helpers import SCORED_TRAIN, upload_package
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    return registry.get("scored", "1.0")



# from test_runs.py
@pytest.fixture
def history(store: Store, tmp_path: Path, request: pytest.FixtureRequest, spawn_runtime: RuntimeSpawner) -> Store:
    """Five real runs: two tries of a training task, a failed evaluation, a full run, a killed run."""
    from tests.aicenter_helpers import SCORED_TRAIN, small_dataset, upload_package
    env = request.getfixturevalue("s3_server").env() if store.uri.startswith("s3://") else {}
    registry = Registry(store)
    upload_package(registry, tmp_path, "scored", SCORED_TRAIN)
    upload_package(registry, tmp_path, "sleepy", SLEEPY_TRAIN)
    run(upload_tree(small_dataset(tmp_path), store, "datasets/d"))
    data = store.url("datasets/d")
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("nightly/r1/train/1", "train", {"dataset": data}),
        ("nightly/r1/train/2", "train", {"dataset": data}),
        ("nightly/r1/evaluate/1", "evaluate", {"evaluation_dataset": data, "env": {"SCORE": "nan"}}),
        ("adhoc/r2/full/1", "full", {"dataset": data, "env": {"SCORE": "0.7", "EPOCHS": "4"}}),
    ]
    for run_id, pipeline, kw in runs:
        assert start_runtime(spawn_runtime, store, env, run_id, pipeline, "scored", **kw).wait(timeout=120) in (0, 1)
    slow = start_runtime(spawn_runtime, store, env, "adhoc/r2/slow/1", "train", "sleepy", dataset=data)
    deadline = time.monotonic() + 60
    while (o := read_optional(store, "runs/adhoc/r2/slow/1/outcome.json", Outcome)) is None or o.phase != "user_code":
        assert time.monotonic() < deadline, "the slow run never reached user code"
        time.sleep(0.2)
    slow.send_signal(signal.SIGTERM)  # what on_kill / pod deletion does
    assert slow.wait(timeout=60) == 1
    return store



# from test_verify.py
@pytest.fixture
def store_env(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The store, with its S3 credentials in the environment for the CLI."""
    if store.uri.startswith("s3://"):
        for key, value in store.options.to_env().items():  # type: ignore[attr-defined]
            monkeypatch.setenv(key, value)
    return store
