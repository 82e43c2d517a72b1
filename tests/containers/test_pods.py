"""Runs in real containers: the launchers' own pods (stage, base, sync), played by podman.

The operators run in this process against the test Kubernetes API server in podman mode
(tests/containers/podman.py): every pod and every pod of an Indexed Job is validated against the
Kubernetes schema, then played with ``podman kube play`` in the runtime image built from
docker/Dockerfile (scripts/images.sh). So the pod spec is what is tested: init container
first, user and sync containers together, emptyDir volumes, read-only mounts, read-only root
filesystem, uid 10001, no capabilities, no service-account token, credentials in ``stage`` and
``sync`` only.

One training (file store), one distributed run (Indexed Job, 2 nodes, S3 with per-run STS
credentials), one batch prediction (S3) and one attack from inside the user container.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.operators import (
    EvaluatePipelineOperator,
    FullPipelineOperator,
    PredictPipelineOperator,
    TrainPipelineOperator,
)
from tests.conftest import write_files
from tests.containers.deployments import CONN_PASSWORD, Deployment
from tests.containers.podman import podman
from tests.operators.kube_api import Pod, make_context, run_in_thread
from tests.packages import DOUBLING_MAIN, ECHO_MAIN
from tests.runtime.test_distributed import RENDEZVOUS

pytestmark = pytest.mark.containers

FAST = {"startup_check_interval_seconds": 1, "poll_interval": 0.5, "base_container_status_polling_interval": 0.2}
TRAIN = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.rows = sum(1 for _ in open(os.path.join(training_directory, "rows.csv")))
        print("trained on", self.rows, "rows as uid", os.getuid(), flush=True)
    def save(self):
        open("model.txt", "w").write(str(self.rows))
'''


def upload(deployment: Deployment, tmp_path: Path, name: str, **files: str) -> None:
    folder = write_files(tmp_path / f"pkg-{name}", {"main.py": ECHO_MAIN, "requirements.txt": "", **files})
    deployment.registry.upload(folder, name)


def container_states(pod: Pod) -> dict[str, Any]:
    status = pod.obj["status"]
    return {s["name"]: s["state"] for s in [*status.get("initContainerStatuses", []), *status["containerStatuses"]]}


def played(deployment: Deployment, pod: Pod) -> dict[str, Any]:
    """The manifest podman was given for ``pod``."""
    return next(m for m in deployment.pods.manifests if m["metadata"]["name"] == pod.key[1])


def env_of(manifest: dict[str, Any], container: str) -> dict[str, str]:
    spec = manifest["spec"]
    found = next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == container)
    return {e["name"]: e["value"] for e in found["env"]}


# -- the pipelines --------------------------------------------------------------------------
def test_a_training_runs_as_stage_base_and_sync_containers(file_deployment: Deployment, tmp_path: Path):
    deployment = file_deployment
    upload(deployment, tmp_path, "rows", **{"train.py": TRAIN})
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=deployment.dataset, **FAST)
    result = op.execute(make_context())

    assert result["version"] == "1.1"
    blob = deployment.registry.get("rows", "1.1")
    assert blob.run is not None
    [pod] = deployment.kube.all_pods()
    states = container_states(pod)
    assert {name: s["terminated"]["exitCode"] for name, s in states.items()} == {"stage": 0, "base": 0, "sync": 0}
    assert "trained on 3 rows as uid 10001" in "\n".join(line for _, c, line in pod.log if c == "base")
    manifest = played(deployment, pod)
    assert manifest["spec"]["automountServiceAccountToken"] is False
    assert manifest["spec"]["securityContext"]["runAsUser"] == 10001
    base_mounts = {m["mountPath"] for m in next(c for c in manifest["spec"]["containers"] if c["name"] == "base")["volumeMounts"]}
    assert str(deployment.store_folder) not in base_mounts, "the file store is not mounted into base"
    assert "AICENTER_RUN_SPEC" not in env_of(manifest, "base") and "AICENTER_RUN_SPEC" in env_of(manifest, "sync")
    # nothing left in podman once the pod is deleted: the pod, its containers and its emptyDir volumes
    deployment.kube.wait_for(lambda: all(p.done.is_set() for p in deployment.pods.played.values()), what="pod removal")
    assert pod.key[1] not in podman("pod", "ps", "--format", "{{.Name}}").stdout
    volumes = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert not [v for v in volumes if v.startswith(pod.obj["metadata"]["uid"][:8])], volumes


def test_a_distributed_run_is_an_indexed_job_of_two_pods_in_containers(s3_deployment: Deployment, tmp_path: Path):
    deployment = s3_deployment
    upload(deployment, tmp_path, "ddp", **{"train.py": RENDEZVOUS})
    op = FullPipelineOperator(task_id="train", package="ddp", dataset=deployment.dataset, nodes=2, procs_per_node=2, **FAST)
    result = op.execute(make_context())

    assert result["version"] == "1.1" and result["score"] == 6.0, "rank 0 summed ranks 0+1+2+3 over TCP, across two pods"
    pods = deployment.kube.all_pods()
    assert len(pods) == 2
    for pod in pods:
        assert {n: s["terminated"]["exitCode"] for n, s in container_states(pod).items()} == {"stage": 0, "base": 0, "sync": 0}
        manifest = played(deployment, pod)
        base, sync = env_of(manifest, "base"), env_of(manifest, "sync")
        assert "AWS_SECRET_ACCESS_KEY" not in base and "AWS_SESSION_TOKEN" not in base
        assert sync["AWS_SESSION_TOKEN"], "sync reached S3 with the run's session credentials"
    deployment.kube.wait_for(lambda: not deployment.kube.jobs and not deployment.kube.services, timeout=30,
                             what="Job and Service removal")
    assert CONN_PASSWORD not in deployment.kube.everything_sent()




def test_a_batch_prediction_runs_in_containers(s3_deployment: Deployment, tmp_path: Path):
    deployment = s3_deployment
    deployment.registry.upload(write_files(tmp_path / "pkg", {"main.py": DOUBLING_MAIN, "requirements.txt": ""}), "doubler")
    lines = "".join(json.dumps({"x": n}) + "\n" for n in range(1, 51))
    inbox = deployment.add_dataset("inbox", {"a/batch.jsonl": lines, "b.jsonl": '{"x": -1}\n'}, tmp_path)
    op = PredictPipelineOperator(task_id="score", package="doubler", version="1.0", dataset=inbox, procs_per_node=2,
                                 max_failed=1, **FAST)
    result = op.execute(make_context(task_id="score"))

    assert (result["predicted"], result["failed"]) == (50, 1), "50 outputs, 1 counted failure (max_failed=1)"
    store = deployment.registry.store
    prefix = result["run_uri"].removeprefix(store.url("")).strip("/")
    outputs = [json.loads(line) for line in store.get_bytes(f"{prefix}/predictions/a/batch.jsonl").decode().splitlines()]
    assert [json.loads(o["output"])["y"] for o in outputs] == [2 * n for n in range(1, 51)]
    [pod] = deployment.kube.all_pods()
    assert {n: s["terminated"]["exitCode"] for n, s in container_states(pod).items()} == {"stage": 0, "base": 0, "sync": 0}


# -- an attack from inside the user container --------------------------------------------------
ATTACK = r'''
import glob, json, os, socket

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

def write(path):
    def go():
        with open(path, "w") as fh:
            fh.write("planted")
        return path
    return go

def environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return fh.read().decode(errors="replace")

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()

def readable_files(root, skip):
    """Every file under root it can read (contents capped), but the environment's own files."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as fh:
                    found[path] = fh.read(65536).decode(errors="replace")
            except OSError as exc:
                found[path] = f"<{type(exc).__name__}>"
    return found

class Main:
    def __init__(self):
        pass

    def evaluate(self, evaluation_directory):
        store = os.environ["ATTACK_STORE"]
        store_listing = attempt(lambda: os.listdir(store))  # before anything here creates that path
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        report = {
            "uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
            "cap_eff": status_field("CapEff"), "cap_prm": status_field("CapPrm"), "cap_bnd": status_field("CapBnd"),
            "no_new_privs": status_field("NoNewPrivs"), "seccomp": status_field("Seccomp"),
            "env_names": sorted(os.environ),
            "pids": {pid: attempt(lambda pid=pid: open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode())
                     for pid in pids},
            "environ": {pid: attempt(lambda pid=pid: environ(pid)) for pid in pids},
            "files": readable_files("/aicenter", {"/aicenter/env"}),
            "spec_files": glob.glob("/aicenter/**/*spec*.json", recursive=True),
            "state_folder": attempt(lambda: os.listdir("/aicenter/state")),
            "sa_token": attempt(lambda: open("/var/run/secrets/kubernetes.io/serviceaccount/token").read()),
            "sa_folder": os.path.exists("/var/run/secrets/kubernetes.io"),
            "write_package": attempt(write(os.path.join(os.getcwd(), "planted.py"))),
            "write_data": attempt(write(os.path.join(evaluation_directory, "planted.csv"))),
            "env_prefix": os.sys.prefix,
            "write_env": attempt(write(os.path.join(os.sys.prefix, "planted.pth"))),
            "write_env_site": attempt(write(os.path.join(
                next(iter(glob.glob(os.sys.prefix + "/lib/python3*/site-packages")), os.sys.prefix), "planted.pth"))),
            "write_bin": attempt(write("/aicenter/work/bin/supervisor.py")),
            "write_root": {p: attempt(write(p)) for p in ("/planted", "/etc/planted", "/usr/lib/planted", "/opt/aicenter/planted",
                                                           "/home/aicenter/planted")},
            "store_listing": store_listing,
            "write_store": attempt(lambda: os.makedirs(os.path.join(store, "runs", "planted"))),
            "write_artifacts": attempt(write(os.path.join(os.environ["artifacts_directory"], "ok.txt"))),
            "mounts": open("/proc/self/mountinfo").read().splitlines(),
            "hostname": socket.gethostname(),
        }
        with open(os.path.join(os.environ["artifacts_directory"], "attack.json"), "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        return 1.0
'''


def where(report: Any, needle: str, path: str = "") -> list[str]:
    """The places in the attack report whose text holds ``needle``."""
    if isinstance(report, dict):
        return [hit for key, value in report.items() for hit in where(value, needle, f"{path}/{key}")]
    if isinstance(report, list):
        return [hit for i, value in enumerate(report) for hit in where(value, needle, f"{path}[{i}]")]
    return [path] if needle in str(report) else []


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_package_code_in_base_reaches_no_credentials_spec_agent_or_store(backend: str, request: pytest.FixtureRequest,
                                                                         tmp_path: Path):
    deployment: Deployment = request.getfixturevalue(f"{backend}_deployment")
    upload(deployment, tmp_path, "attacker", **{"train.py": ATTACK})
    evaluation = deployment.add_dataset("eval", {"rows.csv": "a\n1\n"}, tmp_path)
    store_path = str(deployment.store_folder) if deployment.store_folder else "/aicenter/store-not-mounted"
    op = EvaluatePipelineOperator(task_id="evaluate", package="attacker", version="1.0", evaluation_dataset=evaluation,
                                  env={"ATTACK_STORE": store_path}, **FAST)
    result = op.execute(make_context(task_id="evaluate"))
    assert result["score"] == 1.0
    store = deployment.registry.store
    prefix = result["run_uri"].removeprefix(store.url("")).strip("/")
    report = json.loads(store.get_bytes(f"{prefix}/artifacts/attack.json"))
    [pod] = deployment.kube.all_pods()
    manifest = played(deployment, pod)
    agent_env = env_of(manifest, "sync")
    secrets = [agent_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if k in agent_env]
    assert bool(secrets) == (backend == "s3"), "stage and sync hold the run's credentials on S3"
    spec = agent_env["AICENTER_RUN_SPEC"]
    print(json.dumps({k: v for k, v in report.items() if k not in ("mounts", "files", "environ")}, indent=1))
    print("readable under /aicenter:", sorted(report["files"]))

    # identity and privileges
    assert report["uid"] == report["euid"] == 10001 and report["gid"] == 10001
    assert int(report["cap_eff"], 16) == 0 and int(report["cap_prm"], 16) == 0
    assert report["no_new_privs"] == "1" and report["seccomp"] == "2"
    # credentials and run spec: not in its env, no other process's env, no file it can read
    assert not [n for n in report["env_names"] if n.startswith("AWS_") or n in ("AICENTER_RUN_SPEC", "AICENTER_STATE")]
    environs = [r["value"] for r in report["environ"].values() if r["ok"]]
    assert environs, "it can read its own container's /proc/*/environ"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AICENTER_RUN_SPEC"):
        assert not [e for e in environs if f"{name}=" in e], f"{name} in a process environment in base"
    for needle in (*secrets, spec, json.loads(spec)["run_prefix"]):  # the values, anywhere it could read
        assert not where(report, needle), f"{needle[:40]} reachable from base: {where(report, needle)}"
    assert not report["spec_files"]
    assert report["state_folder"] in ({"ok": True, "value": []}, {"ok": False, "error": report["state_folder"].get("error")}), \
        "the agent's handover volume is not mounted in base (the image's empty mount point at most)"
    # other containers' processes: /proc shows only this container's (the supervisor and the user processes)
    cmdlines = [r["value"] for r in report["pids"].values() if r["ok"]]
    assert not [c for c in cmdlines if "--phase" in c], cmdlines
    assert any("supervisor.py" in c for c in cmdlines)
    # no service-account token
    assert not report["sa_token"]["ok"] and not report["sa_folder"]
    # read-only: package (evaluation makes no version), data, environment, supervisor, root filesystem
    for key in ("write_package", "write_data", "write_env", "write_env_site", "write_bin"):
        assert not report[key]["ok"] and "Read-only file system" in report[key]["error"], (key, report[key])
    for path, outcome in report["write_root"].items():
        assert not outcome["ok"] and "Read-only file system" in outcome["error"], (path, outcome)
    assert report["write_artifacts"]["ok"]
    # the store: a file store is not mounted in base at all. Its path is under /tmp here, so the write
    # attempt may "succeed" into base's own /tmp volume: what counts is that nothing reached the store.
    assert not report["store_listing"]["ok"] and "FileNotFoundError" in report["store_listing"]["error"]
    if deployment.store_folder is not None:
        assert not (deployment.store_folder / "runs" / "planted").exists(), "nothing written by base reached the store"


# -- progress and resources (docs/progress.md) ------------------------------------------------
REPORTING_TRAIN = '''
import aicenter

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        for epoch in range(1, 4):
            aicenter.report(step=epoch, total=3, loss=1.0 / epoch)
    def save(self):
        open("model.txt", "w").write("trained")
'''


def test_a_training_in_containers_reports_progress_through_sync(file_deployment: Deployment, tmp_path: Path):
    """``import aicenter`` in base (read-only root, bin/lib/ from stage), the reports read by sync into the run folder."""
    from airflow_aicenter.layout import METRICS, PROGRESS
    from airflow_aicenter.records import Outcome, Progress, read

    deployment = file_deployment
    upload(deployment, tmp_path, "reports", **{"train.py": REPORTING_TRAIN})
    op = TrainPipelineOperator(task_id="train", package="reports", dataset=deployment.dataset, progress_interval=0.5, **FAST)
    result = op.execute(make_context())
    run_ref = deployment.registry.get("reports", result["version"]).run
    assert run_ref is not None
    store = deployment.registry.store
    progress = read(store, f"{run_ref.prefix}/{PROGRESS}", Progress)
    assert (progress.step, progress.total, progress.final, progress.metrics) == (3, 3, True, {"loss": 1 / 3})
    assert len(store.get_bytes(f"{run_ref.prefix}/{METRICS}").decode().splitlines()) == 3
    [pod] = deployment.kube.all_pods()
    assert "[aicenter] progress 100% (step 3/3)" in "\n".join(line for _, c, line in pod.log if c == "sync")
    used = read(store, f"{run_ref.prefix}/outcome.json", Outcome).resources
    assert used is not None and used["wall_seconds"] > 0 and used["peak_memory_bytes"] > 0 and used["bytes_staged"] > 0


# -- a stop reaches user code in real containers ------------------------------------------------
STOPPABLE_TRAIN = '''
import signal, sys, time
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        def stopped(*_):
            print("user code heard SIGTERM", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stopped)
        print("training started", flush=True)
        time.sleep(120)
    def save(self):
        pass
'''


def test_deleting_the_pod_stops_user_code_with_sigterm_before_the_grace_period_ends(file_deployment: Deployment,
                                                                                      tmp_path: Path):
    """podman, like the kubelet, signals only each container's first process; in ``base`` that is a shell (PID 1),
    which ignores SIGTERM unless it traps it: the stop must still reach the supervisor and user code at once."""
    import time

    from airflow_aicenter.records import Outcome, read

    deployment = file_deployment
    upload(deployment, tmp_path, "stoppable", **{"train.py": STOPPABLE_TRAIN})
    op = TrainPipelineOperator(task_id="train", package="stoppable", dataset=deployment.dataset,
                               termination_grace_period=45, **FAST)
    worker, _ = run_in_thread(op, make_context())  # stopped: what the run records is what the test reads
    deployment.kube.wait_for(lambda: any("training started" in line for p in deployment.kube.all_pods()
                                         for _, c, line in p.log if c == "base"), timeout=120, what="user code to start")
    [pod] = deployment.kube.all_pods()
    started = time.monotonic()
    op.on_kill()
    deployment.kube.wait_for(lambda: pod.gone, timeout=90, what="the pod to be deleted")
    took = time.monotonic() - started
    worker.join(timeout=60)
    base = "\n".join(line for _, c, line in pod.log if c == "base")
    assert "user code heard SIGTERM" in base, base[-2000:]
    assert took < 40, f"the pod took {took:.0f} s to stop: its containers waited for the grace period's SIGKILL"
    key = "runs/aicenter_k8s/manual__2026-03-01T00:00:00+00:00/train/1/outcome.json"
    assert read(deployment.registry.store, key, Outcome).status == "killed"

