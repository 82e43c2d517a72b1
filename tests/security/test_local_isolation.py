"""Issue 18, findings 1 and 5, on the local launcher: package code tries to reach the agent, the worker and
the run spec, and to outlive its run. Real launches (the local launcher run by a real worker process,
as a throwaway system user or as root with ``run_as_user``), the moto S3 server's keys in the agent's
environment, real ``/proc`` reads, real daemons and real SIGKILLs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_aicenter.completion import PostRun, RunRequest
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.layout import PROGRESS
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.plans import TRAIN
from airflow_aicenter.records import Outcome, Progress, RunRef, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.runtime.test_run import setup_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                reason="needs Linux and root (creates a system user)")

#: Package code as an attacker writes it: everything it could read or write, into artifacts/probe.json.
PROBE = r'''
import json, os, subprocess, sys, time

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}

def read(path):
    with open(path, "rb") as fh:
        return fh.read().decode("latin-1")

def scan_mem(pid):
    """What follows every AWS_SECRET_ACCESS_KEY= in the process's writable memory."""
    found = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if "rw" not in perms:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(min(end - start, 64 << 20))
            except OSError:
                continue
            at = chunk.find(b"AWS_SECRET_ACCESS_KEY=")
            while at >= 0:
                found.append(chunk[at:at + 60].decode("latin-1"))
                at = chunk.find(b"AWS_SECRET_ACCESS_KEY=", at + 1)
    return found

def write(path):
    with open(path, "w") as fh:
        fh.write("planted")
    return path

class Main:
    def __init__(self):
        pass
    def train(self, d):
        agent = os.getppid()
        worker = int(read(f"/proc/{agent}/stat").rsplit(")", 1)[1].split()[1])
        launch = os.path.dirname(os.environ["artifacts_directory"])
        probe = {
            "uid": os.getuid(), "groups": os.getgroups(), "agent": agent, "worker": worker,
            "agent_environ": attempt(lambda: read(f"/proc/{agent}/environ")),
            "agent_mem": attempt(lambda: scan_mem(agent)),
            "worker_environ": attempt(lambda: read(f"/proc/{worker}/environ")),
            "launch_listing": attempt(lambda: sorted(os.listdir(launch))),
            "spec": attempt(lambda: read(os.path.join(launch, "spec.json"))),
            "python": os.path.realpath(sys.executable),
        }
        if os.environ.get("PROBE_VENV"):
            probe["venv_write"] = attempt(lambda: write(os.path.join(os.environ["PROBE_VENV"], "planted.pth")))
            probe["venv_read"] = attempt(lambda: read(os.environ["PROBE_VENV_FILE"]))
            probe["venv_listing"] = attempt(lambda: sorted(os.listdir(os.environ["PROBE_PREFIX"])))
        if os.environ.get("PROBE_STORE"):
            probe["store_listing"] = attempt(lambda: os.listdir(os.environ["PROBE_STORE"]))
            probe["store_write"] = attempt(lambda: write(os.path.join(os.environ["PROBE_STORE"], "planted")))
        if os.environ.get("PROBE_SECRET_FILE"):
            probe["worker_file"] = attempt(lambda: read(os.environ["PROBE_SECRET_FILE"]))
        probe["tmp_write"] = attempt(lambda: write(os.path.join(os.environ.get("TMPDIR", "/tmp"), "scratch")))
        with open(os.path.join(os.environ["artifacts_directory"], "probe.json"), "w") as fh:
            json.dump(probe, fh)
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("trained")
'''

#: A daemon as servers and leaky libraries start one: setsid, double fork, chdir /, then it lives on.
DAEMON_TRAIN = r'''
import os, subprocess, sys, time
DAEMON = """
import os, sys, time
os.setsid()
if os.fork():
    os._exit(0)
os.chdir("/")
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""
class Main:
    def __init__(self):
        pass
    def train(self, d):
        pid_file = os.path.join(os.environ["artifacts_directory"], "daemon.pid")  # Landlock: its own folders only
        subprocess.run([sys.executable, "-c", DAEMON, pid_file + ".tmp"], check=True)
        while not os.path.exists(pid_file + ".tmp") or not open(pid_file + ".tmp").read():
            time.sleep(0.05)
        os.replace(pid_file + ".tmp", pid_file)
        open(pid_file + ".user", "w").write(f"{os.getpid()} {os.getppid()}")
        if os.environ.get("FAIL"):
            raise ValueError("boom")
        # the run goes on for TRAIN_SLEEP seconds at most, or until the test releases it (release())
        release, until = pid_file + ".release", time.monotonic() + float(os.environ.get("TRAIN_SLEEP", "0"))
        while time.monotonic() < until and not os.path.exists(release):
            time.sleep(0.05)
        if os.path.exists(release):
            os.remove(release)
    def save(self):
        pass
'''

#: The worker: a process that runs the local launcher, as the operator does (its environment holds Airflow's secrets).
WORKER = r'''
import os, signal, sys
from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.records import RunSpec
from airflow_aicenter.storage import open_store

spec = RunSpec.model_validate_json(open(sys.argv[1]).read())
env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
env.update({k: os.environ[k] for k in spec.user_env_names if k in os.environ})
extra = {"run_as_user": os.environ["RUN_AS"]} if os.environ.get("RUN_AS") else {}
launcher = LocalLauncher(store=open_store(spec.storage), env=env, **extra)  # the runtime runs the worker's interpreter
try:
    launcher.check()
except ConfigurationError as exc:
    print(f"ConfigurationError: {exc}")
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: launcher.kill())  # Airflow's on_kill
sys.exit(launcher.run(spec))
'''

WORKER_SECRETS = {
    "AIRFLOW_CONN_WAREHOUSE": "postgresql://etl:worker-conn-password@db/warehouse",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://airflow:worker-sqlalchemy-password@db/airflow",
}


def s3_store(s3_server):
    return open_store(f"s3://{s3_server.create_bucket()}/aicenter", s3_server.options)


def runnable_by(user: SimpleNamespace, python: str, code: str = "pass") -> bool:
    try:
        done = subprocess.run([python, "-c", code], user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                              capture_output=True, timeout=60, check=False)
    except OSError:
        return False
    return done.returncode == 0


def launch(spec, scratch: Path, env: dict[str, str], python: Path, *, user: SimpleNamespace | None = None,
           run_as: SimpleNamespace | None = None, tmpdir: Path | None = None, wait: bool = True) -> subprocess.Popen[str]:
    """Start the worker (as ``user``, or root) from the venv of ``python``, running the local launcher on ``spec``
    (user code as ``run_as``). The worker's installation is that venv (conftest's ``runtime_venv`` or ``private_worker``).
    """
    driver = scratch / "worker.py"
    driver.write_text(WORKER)
    spec_file = scratch / f"spec-{uuid.uuid4().hex[:6]}.json"
    spec_file.write_text(spec.model_dump_json())
    tmpdir = tmpdir or scratch / "tmp"
    tmpdir.mkdir(exist_ok=True)
    if user is not None:
        os.chown(tmpdir, user.uid, user.gid)
    full = {"PATH": os.environ["PATH"], "HOME": str(tmpdir), "TMPDIR": str(tmpdir), "LANG": "C.UTF-8",
            "AICENTER_CACHE": str(scratch / "cache"), **WORKER_SECRETS, **env}
    if run_as:
        full["RUN_AS"] = run_as.name
    extra = {"user": user.uid, "group": user.gid, "extra_groups": []} if user is not None else {}
    process = subprocess.Popen([str(python), str(driver), str(spec_file)], env=full, cwd=str(scratch),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **extra)
    if wait:
        process.output = process.communicate(timeout=180)[0]  # type: ignore[attr-defined]
    return process


def daemon_run(store, tmp_path: Path, env: dict[str, str]):
    registry, spec = setup_run(store, tmp_path, train_py=DAEMON_TRAIN)
    return registry, spec.model_copy(update={"env": {**spec.env, **env}})


def run_file(scratch: Path, name: str, timeout: float = 60) -> str:
    """A file package code wrote into its artifacts folder, read while the run is going on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (scratch / "tmp").glob(f"aicenter-launch-*/artifacts/{name}"):
            with contextlib.suppress(OSError):
                if text := path.read_text():
                    return text
        time.sleep(0.05)
    raise AssertionError(f"package code never wrote {name}")


def release(scratch: Path) -> None:
    """Ends a DAEMON_TRAIN run's wait (its TRAIN_SLEEP is the most it waits): the test has seen what it needed."""
    [pid_file] = (scratch / "tmp").glob("aicenter-launch-*/artifacts/daemon.pid")
    pid_file.with_name("daemon.pid.release").write_text("")


def probe_of(store, spec) -> dict:
    return json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/probe.json"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def gone_within(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- finding 1: the user process reads the agent ------------------------------------------------
def test_same_user_package_code_cannot_read_the_agent_nor_the_run_spec(s3_server, system_user, scratch, tmp_path,
                                                                        runtime_venv):
    """Worker, agent and package code all run as one non-root user (the default local setup)."""
    store = s3_store(s3_server)
    _, spec = setup_run(store, tmp_path, train_py=PROBE)
    worker = launch(spec, scratch, s3_server.env(), runtime_venv.python, user=system_user)
    assert worker.returncode == 0, worker.output[-3000:]
    probe = probe_of(store, spec)
    assert probe["uid"] == system_user.uid
    # the agent holds the store's keys: neither its environment nor its memory can be read
    assert probe["agent_environ"] == {"ok": False, "error": "PermissionError"}, "the agent's environ was readable"
    assert probe["agent_mem"] == {"ok": False, "error": "PermissionError"}, "the agent's memory was readable"
    # the run spec is in no file of the launch folder
    assert probe["spec"]["ok"] is False
    assert "spec.json" not in (probe["launch_listing"].get("value") or [])
    # nothing of it reached the logs or the store
    assert "testing-secret" not in worker.output
    assert read(store, f"{spec.run_prefix}/outcome.json", Outcome).status == "succeeded"


def test_the_agent_is_not_dumpable_to_any_process_of_its_uid(s3_server, system_user, scratch, tmp_path, runtime_venv):
    """Not only to package code (which Landlock may confine as well): to any process of the same uid."""
    store = s3_store(s3_server)
    _, spec = daemon_run(store, tmp_path, {"TRAIN_SLEEP": "30"})
    worker = launch(spec, scratch, s3_server.env(), runtime_venv.python, user=system_user, wait=False)
    _, agent = map(int, run_file(scratch, "daemon.pid.user").split())
    reader = "import sys\ntry:\n    open(sys.argv[1], 'rb').read(); print('read')\nexcept PermissionError:\n    print('denied')"
    seen = {}
    for pid in (agent, worker.pid):
        for name in ("environ", "mem"):
            done = subprocess.run([sys.executable if runnable_by(system_user, sys.executable) else "/usr/bin/python3",
                                   "-c", reader, f"/proc/{pid}/{name}"], user=system_user.uid, group=system_user.gid,
                                  extra_groups=[], capture_output=True, text=True, cwd="/", timeout=60, check=False)
            seen[("agent" if pid == agent else "worker", name)] = done.stdout.strip() or done.stderr[-300:]
    release(scratch)
    out = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, out[-3000:]
    assert seen[("agent", "environ")] == "denied" and seen[("agent", "mem")] == "denied", seen
    assert seen[("worker", "environ")] == "read", seen  # the control: the same reader reads a dumpable process


def run_as_probe(scratch: Path, tmp_path: Path, worker_venv: SimpleNamespace):
    """A file store, a secret file of the worker's, and a probing run that looks at them and at the worker's venv."""
    store_dir = scratch / "store"
    store = open_store(store_dir.as_uri())
    secret_file = scratch / "airflow.cfg"
    secret_file.write_text("fernet_key = worker-fernet-secret\n")
    secret_file.chmod(0o600)
    _, spec = setup_run(store, tmp_path, train_py=PROBE)
    probes = {"PROBE_VENV": str(worker_venv.site), "PROBE_PREFIX": str(worker_venv.prefix),
              # the provider's own code, installed in the worker's venv
              "PROBE_VENV_FILE": str(worker_venv.site / "airflow_aicenter" / "__init__.py"),
              "PROBE_STORE": str(store_dir), "PROBE_SECRET_FILE": str(secret_file)}
    # run_as_user runs package code in an environment of its own (an empty requirements.txt: a bare one)
    return store, store_dir, spec.model_copy(update={"env": {**spec.env, **probes}, "install_requirements": True})


def test_run_as_user_cannot_reach_the_worker_its_venv_the_store_or_the_spec(system_user, scratch, tmp_path,
                                                                            private_worker):
    """The worker is root and switches user processes to ``run_as_user``: the worker's files and processes are out of reach.

    The worker's venv is private (0700) and made from an interpreter that user cannot run (pyenv's under /root
    here): the package's environment is made from one that user can run, and package code reads nothing of
    the worker's installation (not even the provider's own files, which user processes no longer run from).
    """
    store, store_dir, spec = run_as_probe(scratch, tmp_path, private_worker)
    worker = launch(spec, scratch, {"AWS_SECRET_ACCESS_KEY": "worker-aws-secret"}, private_worker.python, run_as=system_user)
    assert worker.returncode == 0, worker.output[-3000:]
    probe = probe_of(store, spec)
    assert probe["uid"] == system_user.uid and probe["groups"] in ([], [system_user.gid])
    for what in ("agent_environ", "agent_mem", "worker_environ", "spec", "launch_listing", "venv_write", "venv_read",
                 "venv_listing", "store_listing", "store_write", "worker_file"):
        assert probe[what]["ok"] is False, (what, probe[what])
    assert probe["venv_read"]["error"] == "PermissionError"
    assert not (private_worker.site / "planted.pth").exists() and not (store_dir / "planted").exists()
    assert not Path(probe["python"]).is_relative_to(private_worker.prefix)
    # what it may write, it can: its artifacts (probe.json came back), its tmp, and the package it saves
    assert probe["tmp_write"]["ok"] is True
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.blob is not None
    assert "worker-aws-secret" not in json.dumps(probe) and "worker-fernet-secret" not in json.dumps(probe)
    assert not any((scratch / "tmp").iterdir()), "the launch left something in TMPDIR"


def test_run_as_user_refuses_a_worker_venv_that_user_can_read(system_user, scratch, tmp_path, private_worker):
    """The worker's venv (``sys.prefix``) readable by that user: refused before anything runs, with the chmod that fixes it."""
    store, _, spec = run_as_probe(scratch, tmp_path, private_worker)
    private_worker.holder.chmod(0o755)  # a venv as pip and python -m venv leave it: 0755 all the way
    try:
        worker = launch(spec, scratch, {}, private_worker.python, run_as=system_user)
    finally:
        private_worker.holder.chmod(0o700)
    assert worker.returncode == 3, worker.output[-3000:]
    assert f"chmod 0700 {private_worker.prefix}" in worker.output, worker.output[-3000:]
    assert f"user {system_user.name!r}" in worker.output and "can read" in worker.output
    assert not store.exists(f"{spec.run_prefix}/outcome.json"), "the run started"


def test_run_as_user_refuses_package_code_in_the_workers_own_interpreter(system_user, tmp_path):
    """``install_requirements=False`` runs package code with the runtime's (the worker's) interpreter: not as another user."""
    store = open_store((tmp_path / "store").as_uri())
    _, spec = setup_run(store, tmp_path)
    launcher = LocalLauncher(store=store, env={}, run_as_user=system_user.name)
    with pytest.raises(ConfigurationError, match=r"install_requirements=False.*run_as_user.*install_requirements=True"):
        launcher.run(spec.model_copy(update={"install_requirements": False}))
    assert not store.exists(f"{spec.run_prefix}/outcome.json")


def test_run_as_user_refuses_a_base_python_that_user_cannot_run(system_user, tmp_path, monkeypatch, private_worker):
    """The interpreter named to make package environments from must be one ``run_as_user`` can run."""
    monkeypatch.setenv("AICENTER_BASE_PYTHON", str(private_worker.python))  # inside a 0700 folder
    launcher = LocalLauncher(store=open_store((tmp_path / "store").as_uri()), env={}, run_as_user=system_user.name)
    with pytest.raises(ConfigurationError, match=rf"AICENTER_BASE_PYTHON={re.escape(str(private_worker.python))}.*cannot run"):
        launcher.check()
    monkeypatch.setenv("AICENTER_BASE_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(ConfigurationError, match=r"AICENTER_BASE_PYTHON=.*no-python"):
        launcher.check()


def test_run_as_user_that_does_not_exist_is_refused_before_anything_runs(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    launcher = LocalLauncher(store=store, env={}, run_as_user="no-such-user-aicenter")
    with pytest.raises(ConfigurationError, match="run_as_user 'no-such-user-aicenter' is not a user on this machine"):
        launcher.check()


# -- finding 5: daemons survive the run --------------------------------------------------------
def test_a_setsid_daemon_is_killed_when_the_run_succeeds(scratch, tmp_path, runtime_venv):
    store = open_store((tmp_path / "store").as_uri())
    _, spec = daemon_run(store, tmp_path, {})
    worker = launch(spec, scratch, {}, runtime_venv.python)
    assert worker.returncode == 0, worker.output[-3000:]
    daemon = int(store.get_bytes(f"{spec.run_prefix}/artifacts/daemon.pid"))
    assert gone_within(daemon, 5), "the setsid daemon outlived its successful run"
    assert not any((scratch / "tmp").iterdir()), "the launch left something in TMPDIR"


@pytest.mark.parametrize("ending", ["failure", "sigterm"])
def test_nothing_is_left_after_a_failure_or_a_sigterm(scratch, tmp_path, ending, runtime_venv):
    store = open_store((tmp_path / "store").as_uri())
    _, spec = daemon_run(store, tmp_path, {"TRAIN_SLEEP": "120", **({"FAIL": "1"} if ending == "failure" else {})})
    worker = launch(spec, scratch, {}, runtime_venv.python, wait=False)
    daemon = int(run_file(scratch, "daemon.pid"))
    if ending == "sigterm":
        run_file(scratch, "daemon.pid.user")
        worker.send_signal(signal.SIGTERM)  # Airflow's on_kill reaches the worker: it kills the launcher's group
    worker.communicate(timeout=60)
    assert gone_within(daemon, 5), f"the setsid daemon outlived a {ending}"
    assert not any((scratch / "tmp").iterdir()), sorted(p.name for p in (scratch / "tmp").iterdir())


def test_sigkill_of_worker_and_agent_is_cleaned_up_by_the_next_launch(scratch, tmp_path, runtime_venv):
    store = open_store((tmp_path / "store").as_uri())
    _, spec = daemon_run(store, tmp_path, {"TRAIN_SLEEP": "120"})
    worker = launch(spec, scratch, {}, runtime_venv.python, wait=False)
    daemon = int(run_file(scratch, "daemon.pid"))
    user, agent = map(int, run_file(scratch, "daemon.pid.user").split())
    os.kill(worker.pid, signal.SIGKILL)
    os.kill(agent, signal.SIGKILL)
    worker.communicate(timeout=30)
    assert gone_within(user, 5), "the user process outlived its agent"
    assert alive(daemon)  # reparented to init: only the next launch can find it
    left = list((scratch / "tmp").iterdir())
    assert [p.name.startswith("aicenter-launch-") for p in left] == [True]
    assert not (left[0] / "spec.json").exists(), "the run spec sat in a file of the launch folder"
    assert read(store, f"{spec.run_prefix}/outcome.json", Outcome).status == "running"

    # the next launch on this worker sweeps what the dead one left: its folder and its daemon
    quick = setup_run(store, tmp_path / "next")[1].model_copy(update={"run_prefix": "runs/d/r/t/2"})
    again = launch(quick, scratch, {}, runtime_venv.python)
    assert again.returncode == 0, again.output[-3000:]
    assert gone_within(daemon, 5), "the next launch left the dead run's daemon alive"
    assert not any((scratch / "tmp").iterdir()), sorted(p.name for p in (scratch / "tmp").iterdir())

    # and the operator's next try settles the dead try's outcome as killed
    post = PostRun(Registry(store), RunRequest(plan=TRAIN, package="rec", dataset="file:///unused"))
    ref = RunRef(dag_id="d", run_id="r", task_id="t", try_number=2)
    assert post.recover(ref, outlives_worker=LocalLauncher.outlives_worker) is None
    settled = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert settled.status == "killed" and settled.end_at is not None and "never reported an ending" in settled.error


def test_a_live_launch_folder_is_never_swept(scratch, tmp_path, runtime_venv):
    """The next launch removes only folders whose launcher is dead: a concurrent run on the same worker is left alone."""
    store = open_store((tmp_path / "store").as_uri())
    _, spec = daemon_run(store, tmp_path, {"TRAIN_SLEEP": "30"})
    first = launch(spec, scratch, {}, runtime_venv.python, wait=False)
    daemon = int(run_file(scratch, "daemon.pid"))
    quick = setup_run(store, tmp_path / "next")[1].model_copy(update={"run_prefix": "runs/d/r/t/2"})
    second = launch(quick, scratch, {}, runtime_venv.python)
    assert second.returncode == 0, second.output[-3000:]
    assert alive(daemon) and first.poll() is None, "a live run was swept"
    release(scratch)
    out = first.communicate(timeout=60)[0]
    assert first.returncode == 0, out[-3000:]
    assert gone_within(daemon, 5)
    assert not any((scratch / "tmp").iterdir())


def test_the_launch_lock_lives_as_long_as_the_launcher_or_the_runtime(scratch):
    """A runtime outliving its worker (stopping after its parent died) keeps its folder from the next launch's sweep."""
    from airflow_aicenter.runtime import isolation

    folder = scratch / "tmp" / f"{isolation.LAUNCH_PREFIX}x"
    folder.mkdir(parents=True)
    lock = isolation.hold_lock(folder)
    runtime = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], pass_fds=(lock,))
    try:
        assert isolation.sweep(scratch / "tmp") == [] and folder.exists()  # the launcher holds it
        os.close(lock)  # the launcher is gone; the runtime still holds the lock
        assert isolation.sweep(scratch / "tmp") == [] and folder.exists()
    finally:
        runtime.kill()
        runtime.wait()
    assert isolation.sweep(scratch / "tmp") == [folder] and not folder.exists()


def test_run_as_user_refuses_an_environment_cache_that_user_cannot_enter(system_user, tmp_path, monkeypatch):
    """Package environments live in the cache: a cache under a folder closed to that user (root's HOME) is refused."""
    monkeypatch.setenv("AICENTER_CACHE", str(tmp_path / "cache"))  # pytest's folders are root's alone
    launcher = LocalLauncher(store=open_store((tmp_path / "store").as_uri()), env={}, run_as_user=system_user.name)
    with pytest.raises(ConfigurationError, match=r"cannot enter .*set AICENTER_CACHE on the worker to a folder that user"):
        launcher.check()


def test_the_connection_extra_run_as_user_reaches_the_local_launcher(tmp_path, monkeypatch, system_user, scratch):
    """The operator reads ``run_as_user`` from the aicenter connection (a real Airflow connection from the environment)."""
    monkeypatch.setenv("AICENTER_CACHE", str(scratch / "cache"))
    extra = {"storage": (tmp_path / "store").as_uri(), "run_as_user": system_user.name}
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": extra}))
    operator = TrainPipelineOperator(task_id="t", package="rec", dataset="file:///unused")
    launcher = operator.make_launcher("local")
    assert isinstance(launcher, LocalLauncher) and launcher.run_as_user == system_user.name
    try:
        launcher.check()  # root may switch to it
    except ConfigurationError as exc:  # only because this checkout's venv is readable by that user
        assert f"chmod 0700 {sys.prefix}" in str(exc), exc
    extra["run_as_user"] = "root"
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": extra}))
    with pytest.raises(ConfigurationError, match="unprivileged user, not root"):
        TrainPipelineOperator(task_id="t", package="rec", dataset="file:///unused").make_launcher("local").check()


# -- aicenter.report under run_as_user (docs/progress.md) ------------------------------------------
REPORTING = '''
import os
import aicenter

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        pass
    def train(self, training_directory):
        for step in range(1, 4):
            aicenter.report(step=step, total=3, uid=os.getuid())
    def evaluate(self, evaluation_directory):
        return 1.0
    def save(self):
        open("model.txt", "w").write("trained")
'''


def test_a_run_as_user_training_reports_its_progress(system_user, scratch, tmp_path, private_worker):
    """That user cannot read the worker's installation: ``import aicenter`` comes from the copy beside the user
    processes (``bin/lib/``), and the metrics file in the agent's ``control/`` is that user's to write."""
    store = open_store((scratch / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=REPORTING)
    spec = spec.model_copy(update={"install_requirements": True, "progress_interval": 0.2})
    worker = launch(spec, scratch, {}, private_worker.python, run_as=system_user)
    assert worker.returncode == 0, worker.output[-3000:]
    progress = read(store, f"{spec.run_prefix}/{PROGRESS}", Progress)
    assert (progress.step, progress.total, progress.final) == (3, 3, True)
    assert progress.metrics == {"uid": system_user.uid}, "the reports came from the run_as user's process"
    used = read(store, f"{spec.run_prefix}/outcome.json", Outcome).resources
    assert used is not None and used["wall_seconds"] > 0 and used["peak_memory_bytes"] > 0
