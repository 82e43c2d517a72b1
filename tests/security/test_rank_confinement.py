"""Issue 18, finding 9: a rank writes only its own share.

In a distributed run (one node, two processes, locally) rank 1 tried to write into rank 0's
``artifacts/`` and to add a file to rank 0's package folder, which becomes the new version:
both worked. Each user process is now confined with Landlock before package code runs: rank 1
gets PermissionError there, rank 0 still saves, and the new version holds only rank 0's files.
Being in its own Landlock domain, a process of an unprivileged user cannot read another's
``/proc/<pid>/environ`` or ``mem`` either (root keeps CAP_SYS_PTRACE: measured below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_aicenter.records import Outcome, read
from airflow_aicenter.runtime.user import landlock_abi
from airflow_aicenter.storage import open_store
from tests.runtime.test_run import run_runtime, setup_run

INTRUDER = '''
import json, os, time

def attempt(path, text="rank 1 was here"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
        return "written"
    except OSError as exc:
        return type(exc).__name__

def report(**seen):
    with open(os.path.join(os.environ["artifacts_directory"], "seen.json"), "w") as fh:
        json.dump(seen, fh)

class Main:
    def __init__(self):
        self.rank = int(os.environ["RANK"])
    def train(self, d):
        artifacts = os.environ["artifacts_directory"]
        if self.rank == 0:
            with open(os.path.join(artifacts, "pid.txt"), "w") as fh:
                fh.write(str(os.getpid()))
            for _ in range(600):  # rank 1 reads the pid, tries its worst and reports
                if os.path.exists(os.path.join(artifacts, "rank-1", "seen.json")):
                    break
                time.sleep(0.05)
            report(tmp=attempt(os.path.join(os.environ.get("TMPDIR", "/tmp"), "scratch.txt")),
                   checkpoint=attempt(os.path.join(os.environ["checkpoint_directory"], "state.txt")))
            return
        rank0_artifacts = os.path.dirname(artifacts)
        for _ in range(600):
            if os.path.exists(os.path.join(rank0_artifacts, "pid.txt")):
                break
            time.sleep(0.05)
        pid = open(os.path.join(rank0_artifacts, "pid.txt")).read()
        rank0_package = os.path.join(os.environ["artifacts_directory"], "..", "..", "package")
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = "read" if fh.read() else "empty"
        except OSError as exc:
            environ = type(exc).__name__
        report(
            artifacts=attempt(os.path.join(rank0_artifacts, "intruder.txt")),
            package=attempt(os.path.join(rank0_package, "intruder.py")),
            agent_control=attempt(os.path.join(rank0_artifacts, "..", "control", "rank-0.result.json"), "{}"),
            own_artifacts=attempt(os.path.join(artifacts, "mine.txt")),
            own_package=attempt(os.path.join(os.getcwd(), "scratch.py")),
            tmp=attempt(os.path.join(os.environ.get("TMPDIR", "/tmp"), "scratch.txt")),
            environ=environ,
            tmpdir=os.environ.get("TMPDIR"),
            listed=sorted(os.listdir(rank0_package)),
        )
    def evaluate(self, d):
        return 1.0
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("rank 0 saved")
'''


def test_rank_1_cannot_write_rank_0s_artifacts_or_package(tmp_path: Path) -> None:
    assert landlock_abi() >= 1, "this test machine has Landlock (Linux 6.x); the confinement must be proven here"
    store = open_store((tmp_path / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=INTRUDER, pipeline="train", procs_per_node=2,
                        checkpoint_prefix="runs/d/r/t/checkpoints/")
    done = run_runtime(spec, tmp_path)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.blob is not None
    seen = json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/rank-1/seen.json"))
    assert seen["artifacts"] == "PermissionError", seen
    assert seen["package"] == "PermissionError", seen
    assert seen["agent_control"] == "PermissionError", seen
    assert (seen["own_artifacts"], seen["own_package"], seen["tmp"]) == ("written",) * 3, seen
    assert "train.py" in seen["listed"], "reads are not restricted"
    rank0 = json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/seen.json"))
    assert rank0 == {"tmp": "written", "checkpoint": "written"}
    keys = [info.key for info in store.list(f"{spec.run_prefix}/artifacts/")]
    assert not any(key.endswith("intruder.txt") for key in keys), keys
    from airflow_aicenter.layout import blob_key
    from airflow_aicenter.storage.transfer import read_package_contents

    # a training's new version is per-file: its manifest lists the files, each a blob of its own
    assert outcome.blob.kind == "files"
    files = {f.path: f for f in read_package_contents(store, outcome.blob)[0].files}
    assert store.get_bytes(blob_key(files["model.txt"].sha256)) == b"rank 0 saved"
    assert "intruder.py" not in files and "scratch.py" not in files, sorted(files)


def test_a_confined_process_cannot_reach_its_siblings_memory_or_environment() -> None:
    """As an unprivileged user: unconfined, a process reads its same-user sibling's environment;
    confined (Landlock), it reads neither that nor its parent's, and writes only where it may."""
    assert os.geteuid() == 0, "the test switches to an unprivileged user (the test machine runs as root)"
    assert landlock_abi() >= 1
    base = Path(tempfile.mkdtemp(prefix="aicenter-landlock-"))  # pytest's tmp_path is private to root
    mine, other = base / "mine", base / "other"
    for folder in (base, mine, other):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o777)
    report = mine / "report.txt"
    code = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from airflow_aicenter.runtime.user import confine
os.setgid(65534); os.setuid(65534)
import ctypes
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: a uid change made it 0, as if it were the agent
sibling = os.fork()
if sibling == 0:
    time.sleep(5); os._exit(0)
def _probe(target):
    try:
        with open(f"/proc/{{target}}/environ", "rb") as fh:
            return "read" if fh.read(1) else "empty"
    except OSError as exc:
        return type(exc).__name__
seen = ["before:" + _probe(sibling)]
child = os.fork()
if child == 0:
    problem = confine([{str(mine)!r}, "/dev/null"])
    seen.append("confined:" + str(problem))
    seen += ["sibling:" + _probe(sibling), "parent:" + _probe(os.getppid())]
    for name, folder in (("mine", {str(mine)!r}), ("other", {str(other)!r})):
        try:
            open(os.path.join(folder, "x"), "w").write("x"); seen.append(name + ":written")
        except OSError as exc:
            seen.append(name + ":" + type(exc).__name__)
    open({str(report)!r}, "a").write(" ".join(seen))
    os._exit(0)
os.waitpid(child, 0)
os.kill(sibling, 9)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    try:
        seen = report.read_text().split()
    finally:
        shutil.rmtree(base)
    assert seen == ["before:read", "confined:None", "sibling:PermissionError", "parent:PermissionError",
                    "mine:written", "other:PermissionError"], seen
