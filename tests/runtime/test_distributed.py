"""Distributed runs through the runtime itself (``python -m airflow_aicenter.runtime spec.json``):
ranks that really talk to each other over MASTER_ADDR/MASTER_PORT, the call plan, per-rank
artifacts, and a failing rank that stops the others."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.storage import open_store
from tests.conftest import free_port
from tests.runtime.test_run import run_runtime, setup_run

# Rank 0 listens on MASTER_ADDR:MASTER_PORT, every other rank connects and sends its rank;
# rank 0 checks the sum (a collective without torch), and evaluate() returns it.
RENDEZVOUS = '''
import json, os, socket, time

VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "MA_NUM_HOSTS", "MA_NUM_GPUS", "VC_TASK_INDEX", "VC_WORKER_HOSTS", "OMP_NUM_THREADS")

def _log(event, **kw):
    with open(os.path.join(os.environ["artifacts_directory"], "calls.jsonl"), "a") as fh:
        fh.write(json.dumps({"event": event, "rank": os.environ["RANK"], "cwd": os.getcwd(), **kw}) + "\\n")

class Main:
    def __init__(self):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _log("__init__", env={k: os.environ[k] for k in VARS})
    def process_data(self, d):
        _log("process_data")
        for name in ("training_data_directory", "evaluation_data_directory"):
            with open(os.path.join(os.environ[name], "split.csv"), "w") as fh:
                fh.write("x\\n1\\n")
    def train(self, d):
        _log("train", files=sorted(os.listdir(d)))
        if os.environ.get("FAIL_RANK") == str(self.rank):
            raise ValueError(f"rank {self.rank} refuses to train")
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if self.rank == 0:
            with socket.create_server((addr, port)) as server:
                server.settimeout(120)
                self.total = 0
                for _ in range(self.world - 1):
                    conn, _ = server.accept()
                    with conn:
                        self.total += int(conn.recv(16).decode())
            assert self.total == sum(range(self.world)), self.total
        else:
            deadline = time.time() + 60
            while True:
                try:
                    with socket.create_connection((addr, port), timeout=5) as conn:
                        conn.sendall(str(self.rank).encode())
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
        print(f"rank {self.rank} trained", flush=True)
    def evaluate(self, d):
        _log("evaluate")
        return float(self.total)
    def save(self):
        _log("save")
        with open("model.txt", "w") as fh:
            fh.write(str(self.total))
'''


def calls(store, spec: RunSpec, folder: str = "") -> list[dict]:
    raw = store.get_bytes(f"{spec.run_prefix}/artifacts/{folder}calls.jsonl").decode()
    return [json.loads(line) for line in raw.splitlines()]


def test_two_ranks_rendezvous_and_rank_0_alone_evaluates_and_saves(store, tmp_path, request):
    s3 = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    _, spec = setup_run(store, tmp_path, train_py=RENDEZVOUS, pipeline="full", procs_per_node=2, gpu=0)
    done = run_runtime(spec, tmp_path, s3)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.score == 1.0  # 0 + 1
    assert outcome.distributed == {"nodes": 1, "procs_per_node": 2, "world_size": 2}
    assert outcome.blob is not None
    rank0, rank1 = calls(store, spec), calls(store, spec, "rank-1/")
    # process_data once (its own process, before the ranks), then each rank Main() and train(); rank 0 evaluates and saves
    assert [c["event"] for c in rank0] == ["__init__", "process_data", "__init__", "train", "evaluate", "save"]
    assert [c["event"] for c in rank1] == ["__init__", "train"]
    assert rank0[3]["files"] == rank1[1]["files"] == ["split.csv"]
    assert rank0[2]["cwd"] != rank1[0]["cwd"], "each rank works in its own package folder"
    env0, env1 = rank0[2]["env"], rank1[0]["env"]
    ranks = (env0["RANK"], env1["RANK"], env1["LOCAL_RANK"], env1["WORLD_SIZE"], env1["LOCAL_WORLD_SIZE"])
    assert ranks == ("0", "1", "1", "2", "2")
    assert env0["MASTER_ADDR"] == env1["MASTER_ADDR"] == "127.0.0.1" and env0["MASTER_PORT"] == env1["MASTER_PORT"]
    assert env1["NODE_RANK"] == env1["GROUP_RANK"] == env1["VC_TASK_INDEX"] == "0"
    assert env1["MA_NUM_HOSTS"] == "1" and env1["MA_NUM_GPUS"] == "0" and env1["VC_WORKER_HOSTS"] == "127.0.0.1"
    assert env0["OMP_NUM_THREADS"] == env1["OMP_NUM_THREADS"] == "1"  # as torchrun: ranks do not oversubscribe the node


#: How long the failing-rank run may take. It ends in about a second, a few on a loaded machine; a rank
#: left waiting for the failed one would wait for its rendezvous (120 s), so a runtime still running
#: after this limit is that bug, reported as such at once instead of by the test's own timeout.
FAILING_RANK_LIMIT = 20


def test_a_failing_rank_fails_the_run_and_stops_the_others(tmp_path, spawn_runtime):
    store = open_store((tmp_path / "s").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=RENDEZVOUS, pipeline="train", procs_per_node=3)
    spec.env["FAIL_RANK"] = "2"
    began = time.time()
    try:
        done = spawn_runtime.run(spec, timeout=FAILING_RANK_LIMIT)
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the runtime still ran {FAILING_RANK_LIMIT} s after rank 2 failed: the failed rank did not stop "
                    f"the others (rank 0 kept waiting for it). Its output:\n{output[-2000:]}")
    took = time.time() - began
    assert done.returncode == 1
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed" and outcome.blob is None
    line = next(n for n, text in enumerate(RENDEZVOUS.splitlines(), 1) if "refuses to train" in text)
    assert outcome.error == f"rank 2: Main.train() raised ValueError: rank 2 refuses to train (train.py:{line})"
    assert took < FAILING_RANK_LIMIT, "rank 0 kept waiting for the failed rank instead of being stopped"
    assert "[rank 2] Traceback (most recent call last)" in done.stderr
    # artifacts of a failed run are still uploaded, per rank
    assert [c["event"] for c in calls(store, spec, "rank-2/")] == ["__init__", "train"]


def test_two_nodes_of_two_processes(store, tmp_path, request, spawn_runtime):
    """A multi-node Job seen from inside: two agents (node_rank 0 and 1), four ranks, one rendezvous."""
    s3 = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    _, spec = setup_run(store, tmp_path, train_py=RENDEZVOUS, pipeline="train", nodes=2, procs_per_node=2,
                        master_addr="127.0.0.1", master_port=free_port())
    agents = []
    for node in (1, 0):
        agents.append(spawn_runtime.start(
            spec.model_copy(update={"node_rank": None}), {**s3, "JOB_COMPLETION_INDEX": str(node),
                                                          "AICENTER_WORKER_HOSTS": "job-0.svc,job-1.svc"},
            stderr=subprocess.STDOUT))
    outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    node0 = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    node1 = read(store, f"{spec.run_prefix}/node-1.outcome.json", Outcome)
    assert node0.status == node1.status == "succeeded"
    assert node0.blob is not None and node1.blob is None  # only node 0 (rank 0) makes the new content
    assert node0.distributed == {"nodes": 2, "procs_per_node": 2, "world_size": 4}
    ranks = {3: calls(store, spec, "rank-3/"), 2: calls(store, spec, "rank-2/"), 0: calls(store, spec)}
    assert [c["event"] for c in ranks[0]] == ["__init__", "train", "save"]
    env3 = ranks[3][0]["env"]
    assert (env3["RANK"], env3["LOCAL_RANK"], env3["NODE_RANK"], env3["WORLD_SIZE"]) == ("3", "1", "1", "4")
    assert env3["MA_NUM_HOSTS"] == "2" and env3["VC_TASK_INDEX"] == "1" and env3["VC_WORKER_HOSTS"] == "job-0.svc,job-1.svc"
    # each node's log shows its own ranks' output, prefixed
    assert "[rank 3] rank 3 trained" in outputs[0] and "[rank 0] rank 0 trained" in outputs[1]
    assert "rank 0 trained" not in outputs[0]


def test_the_example_ddp_package_trains_on_two_ranks_and_serves(tmp_path):
    """examples/packages/regression_ddp: gradients averaged across 2 ranks (torch DDP when installed,
    else over TCP), rank 0's model saved; the new content then serves a batch prediction."""
    import random

    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage.transfer import run, upload_tree
    from tests.conftest import REPO, write_files

    store = open_store((tmp_path / "s").as_uri())
    base = Registry(store).upload(REPO / "examples" / "packages" / "regression_ddp", "regression")
    rng = random.Random(3)
    rows = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(400)]
    csv = "x1,x2,y\n" + "".join(f"{a},{b},{2 * a - 3 * b + 1 + rng.gauss(0, 0.01)}\n" for a, b in rows)
    run(upload_tree(write_files(tmp_path / "data", {"part-0.csv": csv}), store, "datasets/reg"))
    spec = RunSpec(pipeline="full", storage=store.uri, run_prefix="runs/d/r/train/1", package="regression",
                   version=base.version, blob=base.blob, dataset=store.url("datasets/reg"), procs_per_node=2,
                   env={"EPOCHS": "400", "LEARNING_RATE": "0.3", "BACKEND": "python"})
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.score is not None and outcome.score > 0.99 and outcome.blob is not None
    summaries = [json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/{folder}train.json")) for folder in ("", "rank-1/")]
    assert [s["rank"] for s in summaries] == [0, 1] and sum(s["rows"] for s in summaries) == 320  # 80 % of 400, sharded
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"], "the ranks train one model together"
    assert "[rank 1] rank 1/2" in done.stdout

    run(upload_tree(write_files(tmp_path / "inbox", {"in.jsonl": '{"x1": 1, "x2": 0}\n{"x1": 0, "x2": 1}\n'}), store, "inbox"))
    serve = RunSpec(pipeline="predict", storage=store.uri, run_prefix="runs/d/r/score/1", package="regression",
                    version="1.1", blob=outcome.blob, dataset=store.url("inbox"), procs_per_node=2)
    done = run_runtime(serve, tmp_path)
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(json.loads(line)["output"])["prediction"]
               for line in store.get_bytes(f"{serve.run_prefix}/predictions/in.jsonl").decode().splitlines()]
    assert abs(outputs[0] - 3) < 0.05 and abs(outputs[1] + 2) < 0.05
