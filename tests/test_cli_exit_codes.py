"""Exit statuses scripts can trust, and the rough edges of a first hour with the ``aicenter`` command (issue 24).

Commands run through the console script's entry function with the same argv (the status it
returns is the exit status), and the refused and error statuses also as the installed script in a
subprocess, on a real store; run records
are those the operators' completion writes (``PostRun``) after an outcome as the runtime reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_aicenter.completion import PostRun, RunRequest
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.plans import PREDICT, TRAIN
from airflow_aicenter.records import Outcome, RunRef, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests import cli_helpers
from tests.cli_helpers import cli_in_process
from tests.conftest import TRAIN_PY, RuntimeSpawner, write_files
from tests.packages import ECHO_MAIN

AICENTER = str(Path(sys.executable).parent / "aicenter")
#: ``1`` error or problems found; ``3`` the request was valid but a rule refused it (docs/cli.md).
EXIT_ERROR, EXIT_REFUSED = 1, 3


def cli(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    """In this process through ``cli.main``, the status it returns being the script's exit status."""
    return cli_in_process(["--storage", uri, *args])


def cli_process(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script: the exit status the shell sees."""
    return cli_helpers.cli_process(["--storage", uri, *args])


# -- item 2: a request that was not carried out never exits 0 ------------------------------
def test_promote_refused_as_not_better_exits_3(uri: str) -> None:
    refused = cli_process(uri, "package", "promote", "churn:1.0", "--alias", "production")
    assert refused.returncode == EXIT_REFUSED, refused
    assert "Not promoted" in refused.stdout and "--if always" in refused.stdout
    as_json = cli(uri, "package", "promote", "churn:1.0", "--alias", "production", "--json")
    assert as_json.returncode == EXIT_REFUSED and json.loads(as_json.stdout)["promoted"] is False
    done = cli(uri, "package", "promote", "churn:1.0", "--alias", "production", "--if", "always")
    assert done.returncode == 0, done
    # the alias already is where it was asked to be: the request's end state holds, nothing to refuse
    again = cli(uri, "package", "promote", "churn:1.0", "--alias", "production")
    assert again.returncode == 0 and "already points at 1.0" in again.stdout, again


def test_identical_upload_is_done_and_says_so(uri: str, tmp_path: Path) -> None:
    """The content is stored (as 1.0): the request is carried out, so a re-run script goes on (exit 0)."""
    again = cli(uri, "package", "upload", str(tmp_path / "churn"), "--name", "churn")
    assert again.returncode == 0, again
    assert "Already stored: the content is identical to churn 1.0" in again.stdout and "--force" in again.stdout


def test_exit_table_lists_every_status_the_code_returns() -> None:
    """docs/cli.md's one table holds each exit status the command returns."""
    from airflow_aicenter import cli as module

    table = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for code in (module.EXIT_OK, module.EXIT_PROBLEM, module.EXIT_USAGE, module.EXIT_REFUSED, module.INTERRUPTED,
                 module.BROKEN_PIPE):
        assert f"\n| {code} |" in table, f"exit status {code} is not in docs/cli.md's table"


# -- item 3: what a package can do, said on upload; a Train run of one that cannot be trained ---
def test_upload_says_what_the_package_can_do(uri: str, tmp_path: Path) -> None:
    pkg = write_files(tmp_path / "churn2", {"main.py": ECHO_MAIN, "requirements.txt": ""})
    done = cli(uri, "package", "upload", str(pkg), "--name", "churn2")
    assert done.returncode == 0, done
    assert "can: serve (predict)" in done.stdout
    assert "cannot: train, evaluate, full (no train.py" in done.stdout
    as_json = json.loads(cli(uri, "package", "upload", str(pkg), "--name", "churn2", "--json", "--force").stdout)
    assert as_json["pipelines"] == {"train": False, "evaluate": False, "full": False, "predict": True}
    trainable = json.loads(cli(uri, "package", "upload", str(tmp_path / "churn"), "--name", "c3", "--json").stdout)
    assert trainable["pipelines"] == {"train": True, "evaluate": True, "full": False, "predict": True}
    assert "process_data" in trainable["cannot"]["full"]


def test_training_a_package_without_train_py_names_the_package(uri: str) -> None:
    """What the operators call before compute (Registry.check): the error names the package and the missing file."""
    from airflow_aicenter.errors import PackageError

    registry = Registry(open_store(uri))
    with pytest.raises(PackageError) as caught:
        registry.check(registry.get("served", "1.0"), "train")
    message = str(caught.value)
    assert message.startswith("package served:1.0 cannot run the train pipeline: "), message
    assert "no train.py" in message and "train(self, training_directory)" in message


# -- item 4: predict runs as the records hold them; validate accepts the operators' names ---------
def _complete(registry: Registry, plan_name: str, task: str, **fields: object) -> None:
    plan = PREDICT if plan_name == "predict" else TRAIN
    run = RunRef(dag_id="dag", run_id="manual__1", task_id=task, try_number=1)
    run.uri = registry.store.url(run.prefix)
    ended = Outcome(status="succeeded", pipeline=plan.name, package="churn", version="1.0", start_at=100.0, end_at=160.0,
                    dataset="s3://data/inbox/", blob=registry.get("churn", "1.0").blob if plan.makes_version else None,
                    **fields)  # type: ignore[arg-type]
    write(registry.store, run.key(OUTCOME), ended)
    PostRun(registry, RunRequest(plan=plan, package="churn", dataset="s3://data/inbox/")).complete(run, ended, "1.0")


def test_predict_runs_are_shown_as_the_records_hold_them(uri: str) -> None:
    registry = Registry(open_store(uri))
    _complete(registry, "predict", "score", predicted=7, failed=2)
    _complete(registry, "train", "fit")
    shown = json.loads(cli(uri, "runs", "show", "score", "--json").stdout)
    assert (shown["version"], shown["new_version"], shown["dataset"]) == ("1.0", None, "s3://data/inbox/")
    assert (shown["predicted"], shown["failed"]) == (7, 2)
    assert shown["predictions_uri"].endswith("runs/dag/manual__1/score/1/predictions/")
    text = cli(uri, "runs", "show", "score").stdout
    assert "1.0 -> 1.0" not in text and "s3://data/inbox/" in text and "7 predicted, 2 failed" in text
    compared = json.loads(cli(uri, "runs", "compare", "score", "fit", "--json").stdout)["fields"]
    assert compared["version"] == ["1.0", "1.0"] and compared["new_version"] == [None, "1.1"]
    assert compared["dataset"] == ["s3://data/inbox/", "s3://data/inbox/"]
    assert compared["predicted"] == [7, None] and compared["failed"] == [2, None]
    listed = cli(uri, "runs", "list").stdout
    assert "1.0 -> 1.0" not in listed and "1.0 -> 1.1" in listed


@pytest.mark.parametrize("pipeline", ["train", "evaluate", "full", "predict", "serve"])
def test_validate_takes_the_operators_pipeline_names(uri: str, tmp_path: Path, pipeline: str) -> None:
    pkg = write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": TRAIN_PY.replace(
        "    def train", "    def process_data(self, input_directory):\n        pass\n    def train"), "requirements.txt": ""})
    done = cli(uri, "package", "validate", str(pkg), "--pipeline", pipeline, "--json")
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["pipeline"] == pipeline
    assert json.loads(done.stdout)["pipelines"] == {"train": True, "evaluate": True, "full": True, "predict": True}


def test_validate_says_what_a_package_without_train_py_can_do(tmp_path: Path) -> None:
    pkg = write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "requirements.txt": ""})
    done = cli((tmp_path / "unused").as_uri(), "package", "validate", str(pkg), "--pipeline", "predict")
    assert done.returncode == 0, done
    assert "the package can: serve (predict)" in done.stdout and "cannot: train, evaluate, full" in done.stdout
    refused = cli((tmp_path / "unused").as_uri(), "package", "validate", str(pkg), "--pipeline", "train")
    assert refused.returncode == EXIT_ERROR and "no train.py" in refused.stderr


# -- item 7a: a close name is suggested --------------------------------------------------------
def test_a_mistyped_package_name_suggests_the_close_one(uri: str) -> None:
    for args in (("package", "show", "chrun"), ("package", "show", "chrun:1.0"),
                 ("package", "promote", "chrun:1.0", "--alias", "production")):
        done = cli_process(uri, *args)
        assert done.returncode == EXIT_ERROR, done
        assert "did you mean 'churn'?" in done.stderr, done.stderr
    far = cli(uri, "package", "show", "zzzzzz")
    assert far.returncode == EXIT_ERROR and "did you mean" not in far.stderr


# -- item 7b: a plain path dataset is recorded as a file:// URI --------------------------------
def test_a_plain_path_dataset_is_recorded_as_a_file_uri(uri: str, tmp_path: Path) -> None:
    from airflow_aicenter.errors import ConfigurationError

    data = write_files(tmp_path / "my data", {"rows.csv": "x\n1\n"})
    request = RunRequest(plan=TRAIN, package="churn", dataset=f"{data}/")
    assert request.dataset == f"{data.as_uri()}/" and request.datasets()["dataset"] == f"{data.as_uri()}/"
    assert RunRequest(plan=TRAIN, package="churn", dataset="s3://b/d/").dataset == "s3://b/d/"
    registry = Registry(open_store(uri))
    run = RunRef(dag_id="dag", run_id="manual__1", task_id="fit", try_number=1)
    run.uri = registry.store.url(run.prefix)
    ended = Outcome(status="succeeded", pipeline="train", package="churn", version="1.0", start_at=1.0, end_at=2.0,
                    dataset=request.dataset, blob=registry.get("churn", "1.0").blob)
    write(registry.store, run.key(OUTCOME), ended)
    PostRun(registry, request).complete(run, ended, "1.0")
    shown = json.loads(cli(uri, "runs", "show", "fit", "--json").stdout)
    assert shown["dataset"] == f"{data.as_uri()}/", shown["dataset"]
    with pytest.raises(ConfigurationError, match="relative"):
        RunRequest(plan=TRAIN, package="churn", dataset="data/rows")


# -- item 7c: an S3 connection without AWS credentials says so, and the fix ----------------------
def test_s3_connection_without_credentials_says_what_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An AWS connection with no key, role or profile (and none in the environment) is named with the fix."""
    from airflow_aicenter.hooks.aicenter import AICenterHook

    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_BARE", json.dumps({"conn_type": "aws", "extra": {"region_name": "us-east-1"}}))
    extra = {"storage": "s3://some-bucket/aicenter", "aws_conn_id": "aws_bare"}
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_TEST", json.dumps({"conn_type": "aicenter", "extra": extra}))
    ok, message = AICenterHook("aicenter_test").test_connection()
    assert not ok
    assert "NoneType" not in message and "get_frozen_credentials" not in message, message
    assert "no AWS credentials for the AWS connection 'aws_bare'" in message and "AWS_ACCESS_KEY_ID" in message, message


# -- item 7e: the runtime leaves no temp folder behind ---------------------------------------------
SLEEPY_TRAIN = ("import time\nclass Main:\n    def __init__(self):\n        pass\n"
                "    def train(self, training_directory):\n        time.sleep(120)\n    def save(self):\n        pass\n")


def test_the_runtime_leaves_no_temp_folder_on_any_ending(tmp_path: Path, spawn_runtime: RuntimeSpawner) -> None:
    """Started on its own (no launcher folder given), the runtime removes its work folder when it ends; one
    killed with SIGKILL cannot, so the next start removes it and kills what still ran in it."""
    import signal
    import time

    from airflow_aicenter.records import RunSpec, read_optional
    from airflow_aicenter.storage.transfer import run, upload_tree
    from tests.aicenter_helpers import small_dataset, upload_package

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(store)
    upload_package(registry, tmp_path, "fits", TRAIN_PY)
    upload_package(registry, tmp_path, "sleepy", SLEEPY_TRAIN)
    run(upload_tree(small_dataset(tmp_path), store, "datasets/d"))

    def spec(run_id: str, package: str, **kw: object) -> RunSpec:
        base = registry.get(package, "1.0")
        return RunSpec.model_validate({"pipeline": "train", "storage": store.uri, "run_prefix": f"runs/{run_id}",
                                       "package": package, "version": "1.0", "blob": base.blob,
                                       "dataset": store.url("datasets/d"), **kw})

    def left() -> list[str]:
        return sorted(p.name for p in temp.iterdir())

    assert spawn_runtime.start(spec("d/r/ok/1", "fits"), env).wait(timeout=120) == 0
    assert left() == [], "a run that succeeded"
    assert spawn_runtime.start(spec("d/r/bad/1", "fits", dataset=store.url("datasets/none")), env).wait(timeout=120) == 1
    assert left() == [], "a run that failed"

    killed = spawn_runtime.start(spec("d/r/slow/1", "sleepy"), env)
    deadline = time.monotonic() + 90
    while (o := read_optional(store, "runs/d/r/slow/1/outcome.json", Outcome)) is None or o.phase != "user_code":
        assert time.monotonic() < deadline, "the slow run never reached user code"
        time.sleep(0.2)
    killed.send_signal(signal.SIGTERM)
    assert killed.wait(timeout=60) == 1
    assert left() == [], "a run stopped with SIGTERM (what on_kill and pod deletion send)"

    killed = spawn_runtime.start(spec("d/r/slow/2", "sleepy"), env)
    while (o := read_optional(store, "runs/d/r/slow/2/outcome.json", Outcome)) is None or o.phase != "user_code":
        assert time.monotonic() < deadline + 90, "the slow run never reached user code"
        time.sleep(0.2)
    killed.kill()
    killed.wait(timeout=60)
    assert len(left()) == 1, "SIGKILL: nothing can clean up at that moment"
    assert spawn_runtime.start(spec("d/r/ok/2", "fits"), env).wait(timeout=120) == 0
    assert left() == [], "the next run removed the folder of the killed one (and what still ran in it)"


def test_a_test_session_removes_its_temp_root(tmp_path: Path) -> None:
    """tests/conftest.py gives each session its own TMPDIR (pytest's folders and every temp folder the code under
    test makes go there) and removes it at the end; a root left by a killed session goes at the next start."""
    stale = tmp_path / "aict-stale"
    stale.mkdir()
    (stale / "pid").write_text("999999999")  # no such process: a session that was killed
    (tmp_path / "test_probe.py").write_text(
        "import os, tempfile\n\ndef test_probe(tmp_path):\n    tempfile.mkdtemp(prefix='aicenter-run-')\n"
        "    assert os.stat(tempfile.gettempdir()).st_mode & 0o7777 == 0o1777, 'other users reach it, as /tmp'\n"
        "    print('ROOT', tempfile.gettempdir(), tmp_path)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AICENTER_KEEP", "AICENTER_TEST_TMP"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-o",
                           "addopts=", "-s", "-q", str(tmp_path / "test_probe.py")], capture_output=True, text=True,
                          env={**env, "TMPDIR": str(tmp_path)}, cwd=Path(__file__).resolve().parents[1], timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    root, pytest_tmp = next(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("ROOT"))
    assert Path(root).parent == tmp_path and Path(pytest_tmp).is_relative_to(root)
    assert not Path(root).exists(), "the session's temp root is removed at its end"
    assert not stale.exists(), "a killed session's root is removed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["test_probe.py"], \
        "nothing else is left where TMPDIR was (the probe's bytecode, where Python writes it, aside)"
