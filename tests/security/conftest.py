"""Fixtures of the attack tests: Python environments laid out as a worker's are, without this checkout's venv.

The local launcher's boundary under ``run_as_user`` includes the worker's own Python environment
(``sys.prefix``): package code must not read it. The tests therefore never run another user's
processes through this checkout's venv (``.venv``, made from an interpreter under ``/root``): each
worker and runtime they start runs from a venv built here, with the runtime's dependencies
(``docker/requirements.txt``, pinned to the versions installed here) and ``airflow_aicenter``
copied into its ``site-packages`` (installed, as a wheel would put it: its files live under
``sys.prefix``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import version as dist_version
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError

from airflow_aicenter.credentials import S3Credentials
from airflow_aicenter.storage import Store, open_store
from tests.conftest import S3Server, built_once, free_port
from tests.security.helpers import AGENT_ENV, BOMB_ENTRIES, small_entry_bomb
from tests.security.iam_moto import (
    ACCOUNT,
    BLOB,
    BUCKET,
    DATASET,
    ROLE,
    ROLE_ARN,
    SCOPE,
    SETUP_REQUESTS,
    IamMoto,
    assume,
    policy_for_this_run,
)

REPO = Path(__file__).resolve().parents[2]
#: The system's interpreter: any user can run it (this checkout's venv was made from pyenv's, under /root).
SYSTEM_PYTHON = Path("/usr/bin/python3")


def build_venv(base: str, dest: Path) -> SimpleNamespace:
    """A venv made from ``base`` with the runtime's dependencies and this checkout's ``airflow_aicenter`` installed."""
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest)], check=True, capture_output=True, timeout=120)
    python = dest / "bin" / "python"
    pins = dest / "constraints.txt"
    pins.write_text("".join(f"{name}=={dist_version(name)}\n"
                            for name in ("obstore", "pydantic", "pydantic-core", "uv", "zstandard")))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
         "-r", str(REPO / "docker" / "requirements.txt"), "-c", str(pins)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not build the venv {dest}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    shutil.copytree(REPO / "airflow_aicenter", venv_of(dest).site / "airflow_aicenter", ignore=shutil.ignore_patterns("__pycache__"))
    return venv_of(dest)


def venv_of(dest: Path) -> SimpleNamespace:
    return SimpleNamespace(prefix=dest, python=dest / "bin" / "python", site=next((dest / "lib").glob("python3*/site-packages")))


@pytest.fixture(scope="session")
def runtime_venv() -> SimpleNamespace:
    """A worker's and runtime's venv that every user can run: made from the system's Python, world-readable.

    For the tests where the worker itself runs as an unprivileged user, and the ones run as root without
    ``run_as_user``. Outside pytest's temporary folders, which are root's alone: in the session's temp
    root (any user may traverse it), built once for all pytest workers.
    """
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"{SYSTEM_PYTHON} is missing: the attack tests run other users' processes with the system's Python")
    return venv_of(built_once("runtime-venv", lambda dest: build_venv(str(SYSTEM_PYTHON), dest)))


@pytest.fixture(scope="session")
def private_worker() -> Iterator[SimpleNamespace]:
    """A root worker's venv as a platform team sets one up for ``run_as_user``: private (its folder 0700).

    Made from the interpreter this checkout's venv was made from (on these machines pyenv's under
    ``/root``, which another user cannot run: the launcher must then find one that user can run to
    make package environments from). ``holder`` is the 0700 folder around it, in ``/tmp`` (open to
    all, unlike pytest's folders): a test may open it.

    Each pytest worker gets its own copy (a test may open its holder), of one venv built once for the
    session: a copy takes a fraction of a second, pip took seconds per worker.
    """
    base = getattr(sys, "_base_executable", None) or sys.executable
    source = built_once("private-worker-venv", lambda dest: build_venv(base, dest))
    holder = Path(tempfile.mkdtemp(prefix="aict-worker-", dir="/tmp"))
    holder.chmod(0o700)
    try:
        shutil.copytree(source, holder / "venv", symlinks=True)
        built = venv_of(holder / "venv")
        built.holder = holder
        yield built
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_entry_bomb(tmp_path_factory.mktemp("bomb") / "bomb.zip", entries=BOMB_ENTRIES)


@pytest.fixture(params=["file", "s3"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, dict[str, str]]:
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri()), {}
    server: S3Server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.create_bucket()}/aicenter", server.options), server.env()


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in AGENT_ENV.items():
        monkeypatch.setenv(name, value)
    return AGENT_ENV


@pytest.fixture
def system_user() -> Iterator[SimpleNamespace]:
    """A throwaway system user (no home, no login), removed afterwards with everything it still runs."""
    name = f"aict{uuid.uuid4().hex[:10]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    try:
        yield SimpleNamespace(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", str(entry.pw_uid)], capture_output=True, check=False)
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder any user may traverse (pytest's own tmp is root's alone): driver files, TMPDIR, a file store."""
    path = Path(tempfile.mkdtemp(prefix="aict-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[IamMoto]:
    """A moto server of this module's own, with IAM access control on after the set-up requests."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        anyone = IamMoto(endpoint, "testing", "testing-secret")
        anyone.worker("s3").create_bucket(Bucket=BUCKET)  # 1
        iam = anyone.worker("iam")
        iam.create_user(UserName="airflow-worker")  # 2
        key = iam.create_access_key(UserName="airflow-worker")["AccessKey"]  # 3
        iam.put_user_policy(UserName="airflow-worker", PolicyName="worker", PolicyDocument=json.dumps({  # 4
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": ROLE_ARN},
                # Each test gives the role the policy of the run it tests (moto enforces the role's policy only).
                {"Effect": "Allow", "Action": "iam:PutRolePolicy", "Resource": ROLE_ARN},
                {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]},
            ],
        }))
        iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps({  # 5
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/airflow-worker"},
                           "Action": "sts:AssumeRole"}],
        }))
        # moto enforces only the role's own policy for assumed-role credentials: give the role this run's session policy.
        iam.put_role_policy(RoleName=ROLE, PolicyName="run", PolicyDocument=json.dumps(policy_for_this_run()))  # 6
        moto = IamMoto(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        with pytest.raises(ClientError):  # access control is on now: unknown keys are refused
            anyone.worker("s3").list_objects_v2(Bucket=BUCKET)
        yield moto
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def credentials(iam_moto: IamMoto, monkeypatch: pytest.MonkeyPatch) -> S3Credentials:
    # The worker's own writes (it alone registers versions): a package blob and a dataset file to read.
    worker_s3 = iam_moto.worker("s3")
    worker_s3.put_object(Bucket=BUCKET, Key=BLOB, Body=b"package zip")
    worker_s3.put_object(Bucket=BUCKET, Key="datasets/churn/train.csv", Body=b"a,b\n1,2\n")
    return assume(iam_moto, monkeypatch, replace(SCOPE, datasets=(DATASET, "file:///local/data")))
