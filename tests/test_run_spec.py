"""The spec a run is given, built from the task's RunRequest without Airflow (airflow_aicenter/run_spec.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from airflow_aicenter import run_spec
from airflow_aicenter.completion import RunRequest
from airflow_aicenter.errors import ConfigurationError, DatasetError, VersionError
from airflow_aicenter.launchers.base import Launcher
from airflow_aicenter.launchers.local import LocalLauncher
from airflow_aicenter.layout import OUTCOME
from airflow_aicenter.plans import EVALUATE, PREDICT, TRAIN
from airflow_aicenter.records import Outcome, RunRef, VersionRecord, read, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.secrets import MASK, SECRET_KEYS_ENV
from airflow_aicenter.storage import Store

SECRET, KNOWN = "pa55-w0rd-value", "postgres://u:dbpass@db/x"


@dataclass
class TaskTry:
    dag_id: str = "dag"
    run_id: str = "manual__1"
    task_id: str = "train"
    try_number: int | None = 2
    map_index: int | None = None


def test_the_spec_holds_the_arguments_and_no_secret(store: Store, parent: VersionRecord):
    request = RunRequest(
        plan=TRAIN, package="scored", dataset="s3://data/train/", env={"EPOCHS": "3", "API_TOKEN": SECRET, "DB": KNOWN},
        secret_keys=frozenset({"DB"}), gpu=1, nodes=2, procs_per_node=4, checkpoint_interval=60.0, allow_source_builds=True,
    )
    run = run_spec.run_ref(TaskTry(), store)
    assert (run.try_number, run.map_index, run.uri) == (2, -1, store.url(run.prefix))
    spec = run_spec.build_spec(
        request, parent, run, storage=store.uri, extra={"package_indexes": ["https://pypi.example/simple"]}
    )
    assert spec.env == {"EPOCHS": "3"} and spec.user_env_names == ["API_TOKEN", "DB"]
    assert SECRET not in spec.model_dump_json() and KNOWN not in spec.model_dump_json()
    assert (spec.pipeline, spec.package, spec.version, spec.blob) == ("train", "scored", "1.0", parent.blob)
    assert (spec.storage, spec.run_prefix, spec.dataset) == (store.uri, run.prefix, "s3://data/train/")
    assert (spec.gpu, spec.nodes, spec.procs_per_node, spec.checkpoint_interval) == (1, 2, 4, 60.0)
    assert spec.allow_source_builds and spec.install_requirements
    assert spec.checkpoint_prefix == run.path.task.checkpoints and spec.package_indexes == ["https://pypi.example/simple"]
    # What the process gets besides the spec: the secret values, and their names so it masks them.
    assert run_spec.secret_env(request) == {"API_TOKEN": SECRET, "DB": KNOWN, SECRET_KEYS_ENV: "API_TOKEN,DB"}
    assert request.masked_env() == {"EPOCHS": "3", "API_TOKEN": MASK, "DB": MASK}


def test_runs_without_a_version_have_no_checkpoints_and_a_type_adds_its_fields(store: Store, parent: VersionRecord):
    run = run_spec.run_ref(TaskTry(try_number=None, map_index=3), store)
    assert (run.try_number, run.map_index) == (1, 3)
    evaluate = RunRequest(plan=EVALUATE, package="scored", evaluation_dataset="s3://data/eval/", save_test_data=True)
    spec = run_spec.build_spec(evaluate, parent, run, storage=store.uri, extra={})
    assert spec.checkpoint_prefix is None and spec.save_test_data and not spec.save_training_data
    predict = RunRequest(plan=PREDICT, package="scored", dataset="s3://in/", spec_extra={"input_type": "file", "max_failed": 2})
    spec = run_spec.build_spec(predict, parent, run, storage=store.uri, extra={})
    assert (spec.input_type, spec.max_failed) == ("file", 2)


def test_an_incremental_run_needs_the_parents_snapshot(store: Store, parent: VersionRecord):
    request = RunRequest(plan=TRAIN, package="scored", dataset="s3://data/train/", incremental=True)
    run = run_spec.run_ref(TaskTry(), store)
    with pytest.raises(ConfigurationError, match="train it once with save_training_data=True"):
        run_spec.build_spec(request, parent, run, storage=store.uri, extra={})
    snapshotted = parent.model_copy(update={"snapshot": "s3://store/snap.json"})
    spec = run_spec.build_spec(request, snapshotted, run, storage=store.uri, extra={})
    assert spec.incremental_base == "s3://store/snap.json" and spec.save_training_data  # it snapshots its own data


@dataclass
class Arguments:
    """The operator's arguments as it holds them (attributes of the same names)."""

    package: str = "scored"
    requested_version: str = "production"
    dataset: str | None = "/data/train/"
    evaluation_dataset: str | None = None
    env: dict[str, Any] = field(default_factory=lambda: {"EPOCHS": "3", "DB": KNOWN})
    gpu: int = 1
    promote_to: str | None = "production"
    promote_if: str = "always"
    save_training_data: bool = True
    save_test_data: bool = False
    install_requirements: bool = False
    allow_source_builds: bool = True
    nodes: int | str = "2"  # a rendered template: text naming the count
    procs_per_node: int | str = 3
    checkpoint_interval: float = 60.0
    progress_interval: float = 5.0
    incremental: bool = True


def test_the_request_is_the_operators_rendered_arguments():
    request = run_spec.run_request(TRAIN, Arguments(), secret_keys=frozenset({"DB"}), spec_extra={"input_type": "file"})
    assert (request.plan, request.package, request.requested_version, request.gpu) == (TRAIN, "scored", "production", 1)
    assert request.dataset == "file:///data/train/", "a plain path is named by its file:// URI"
    assert (request.nodes, request.procs_per_node) == (2, 3), "a rendered count is a number"
    assert (request.checkpoint_interval, request.progress_interval, request.incremental) == (60.0, 5.0, True)
    assert (request.save_training_data, request.install_requirements, request.allow_source_builds) == (True, False, True)
    assert (request.promote_to, request.promote_if, dict(request.spec_extra)) == ("production", "always", {"input_type": "file"})
    assert request.masked_keys == {"DB"} and request.secret_env() == {"DB": KNOWN}


@pytest.mark.parametrize("nodes", ["{{ params.nodes }}", "two", 0, True])
def test_a_count_that_is_not_a_whole_number_is_refused_naming_it(nodes: object):
    with pytest.raises(ConfigurationError, match=r"nodes=.* is not valid; give a whole number of at least 1"):
        run_spec.run_request(TRAIN, Arguments(nodes=nodes), secret_keys=frozenset(), spec_extra={})  # type: ignore[arg-type]


class Checks:
    """What prepare() asked for, in order; ``refuse`` makes the input check refuse the datasets."""

    def __init__(self, launcher: Launcher, refuse: bool = False) -> None:
        self.launcher, self.refuse = launcher, refuse
        self.calls: list[str] = []

    def make(self) -> Launcher:
        self.calls.append("launcher")
        return self.launcher

    def inputs(self) -> None:
        self.calls.append("inputs")
        if self.refuse:
            raise DatasetError("dataset s3://data/train/ is empty or does not exist; upload the data there or fix the URI")


def prepare(store: Store, run: RunRef, checks: Checks, **changed: Any) -> run_spec.Prepared:
    request = RunRequest(**{"plan": TRAIN, "package": "scored", "dataset": "s3://data/train/", **changed})
    return run_spec.prepare(Registry(store), request, run, launcher=checks.make, check_inputs=checks.inputs,
                            extra={"package_indexes": ["https://pypi.example/simple"]}, log=logging.getLogger("test"))


def test_prepare_resolves_checks_and_builds_the_spec(store: Store, parent: VersionRecord):
    run, checks = run_spec.run_ref(TaskTry(try_number=1), store), Checks(LocalLauncher(store=store, env={}))
    ready = prepare(store, run, checks)
    assert checks.calls == ["launcher", "inputs"] and ready.launcher is checks.launcher and ready.recovered is None
    assert (ready.run, ready.spec.version, ready.spec.run_prefix, ready.spec.storage) == (run, "1.0", run.prefix, store.uri)
    assert ready.spec.package_indexes == ["https://pypi.example/simple"]
    assert not store.exists(run.key(OUTCOME)), "nothing recorded before the run starts"


@pytest.mark.parametrize(
    ("launcher", "refuse", "changed", "error", "recorded_version"),
    [
        # the launcher's own check (here: the local launcher is one machine), after the version resolved
        (lambda store: LocalLauncher(store=store, env={}, nodes=2), False, {}, ConfigurationError, "1.0"),
        # the inputs, after the version resolved
        (lambda store: LocalLauncher(store=store, env={}), True, {}, DatasetError, "1.0"),
        # an unknown version: what was asked is recorded
        (lambda store: LocalLauncher(store=store, env={}), False, {"requested_version": "9.9"}, VersionError, "9.9"),
    ],
)
def test_a_refusal_before_compute_is_recorded_as_a_failed_run(store, parent, launcher, refuse, changed, error, recorded_version):
    run = run_spec.run_ref(TaskTry(try_number=1), store)
    with pytest.raises(error) as raised:
        prepare(store, run, Checks(launcher(store), refuse), env={"API_TOKEN": SECRET}, **changed)
    refused = read(store, run.key(OUTCOME), Outcome)
    assert (refused.status, refused.phase, refused.version) == ("failed", "prepare", recorded_version)
    assert refused.error == str(raised.value) and refused.env == {"API_TOKEN": MASK}


def test_a_launcher_that_cannot_be_built_is_a_recorded_refusal_too(store: Store, parent: VersionRecord):
    """queue_name on the local launcher is refused while the launcher is built: before the version is even resolved."""

    def refused_launcher() -> Launcher:
        raise ConfigurationError("queue_name='q' is for the kubernetes launcher")

    run = run_spec.run_ref(TaskTry(try_number=1), store)
    request = RunRequest(plan=TRAIN, package="scored", dataset="s3://data/train/")
    with pytest.raises(ConfigurationError, match="queue_name='q'"):
        run_spec.prepare(Registry(store), request, run, launcher=refused_launcher, check_inputs=lambda: None, extra={},
                         log=logging.getLogger("test"))
    refused = read(store, run.key(OUTCOME), Outcome)
    assert (refused.status, refused.version, refused.error) == ("failed", "latest", "queue_name='q' is for the kubernetes launcher")


def test_prepare_completes_an_earlier_tries_finished_run_instead_of_running_again(store: Store, parent: VersionRecord):
    try1, try2 = (run_spec.run_ref(TaskTry(try_number=n), store) for n in (1, 2))
    finished = Outcome(status="succeeded", pipeline="train", package="scored", version="1.0", start_at=1.0, end_at=2.0,
                       blob=parent.blob)
    write(store, try1.key(OUTCOME), finished)
    ready = prepare(store, try2, Checks(LocalLauncher(store=store, env={})))
    assert ready.recovered is not None and ready.recovered.outcome == finished
    assert ready.run == try1 and ready.spec.run_prefix == try1.prefix, "completed under the folder of the try that ran it"


def test_run_spec_imports_neither_airflow_nor_kubernetes():
    code = (
        "import sys, airflow_aicenter.run_spec\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'kubernetes'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
