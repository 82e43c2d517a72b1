"""Figure 5: peak memory (RSS) of the runtime packaging and uploading a 2 GB saved model.

    .venv/bin/python benchmarks/bench_memory.py [--model-mb 2048] [--stores s3,file]

The real runtime (`python -m airflow_aicenter.runtime SPEC.json`, as both launchers start it)
trains a package whose save() writes a model of --model-mb random megabytes (random: weights
do not compress) into the package folder. The runtime then zips the package folder and
uploads the zip as a blob (phase package_upload): that is what this measures. A second run
trains the 2 GB version it just made, so it also stages (downloads, verifies, unzips) 2 GB.

Peak RSS is the child's own high-water mark (os.wait4 -> ru_maxrss, exact), and psutil
samples every 20 ms say in which phase it was reached. Target: < 200 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import PYTHON, REPO, machine, save_json, servers, table, verdict, work_dir

TRAIN = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        pass
    def save(self):
        mb = int(os.environ["MODEL_MB"])
        if os.path.exists("model.bin") and os.path.getsize("model.bin") == mb << 20:
            return  # the staged version already holds the model: keep it (same content, same blob)
        with open("model.bin", "wb") as fh:
            for _ in range(mb):
                fh.write(os.urandom(1 << 20))
'''
MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"
TARGET_MB = 200


def run_runtime(spec_json: str, env: dict[str, str], work: Path) -> dict:
    """Run the runtime; return exit code, ru_maxrss and the sampled peak per phase."""
    spec = work / "spec.json"
    spec.write_text(spec_json)
    import psutil

    proc = subprocess.Popen([str(PYTHON), "-m", "airflow_aicenter.runtime", str(spec)], env={**os.environ, **env},
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    phase = ["start-up"]
    peaks: dict[str, float] = {}
    durations: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = ps.memory_info().rss / 2**20
            except psutil.Error:
                break
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = []
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)
        if m := re.match(r"\[aicenter\] (\w+) \.\.\.$", line.strip()):
            phase[0] = m.group(1)
        if m := re.match(r"\[aicenter\] (\w+) done in ([\d.]+) s", line.strip()):
            durations[m.group(1)] = float(m.group(2))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError("runtime failed:\n" + "".join(log[-30:]))
    return {"maxrss_mb": usage.ru_maxrss / 1024, "peaks": peaks, "durations": durations,
            "log": [x.rstrip() for x in log if "new package content" in x or "staged" in x]}


def measure(store_uri: str, env: dict[str, str], work: Path, model_mb: int) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from airflow_aicenter.records import BlobRef, Outcome, RunSpec, read
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.transfer import run, upload_tree

    store = open_store(store_uri)
    registry = Registry(store)
    pkg = work / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "main.py").write_text(MAIN)
    (pkg / "train.py").write_text(TRAIN)
    (pkg / "requirements.txt").write_text("")
    base = registry.upload(pkg, "big")
    data = work / "data"
    data.mkdir()
    (data / "rows.csv").write_text("x\n1\n")
    run(upload_tree(data, store, "datasets/d"))
    out = []
    blob: BlobRef = base.blob
    for i, label in enumerate(["train: save() writes the model, zip + upload", "train again: stage 2 GB, zip, dedupe"]):
        spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/mem/r/t/{i + 1}", package="big",
                       version="1.0", blob=blob, dataset=store.url("datasets/d"), env={"MODEL_MB": str(model_mb)})
        began = time.perf_counter()
        # MODEL_MB is the user's env (the spec): the user process does not inherit the runtime's variables
        result = run_runtime(spec.model_dump_json(), {**env, "AICENTER_WORKDIR": str(work / f"run{i}")}, work)
        result["wall_s"] = round(time.perf_counter() - began, 1)
        outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
        blob = outcome.blob
        result["blob_mb"] = round(blob.size / 2**20)
        result["label"] = label
        out.append(result)
        shutil.rmtree(work / f"run{i}", ignore_errors=True)
        print(f"  {label}: peak RSS {result['maxrss_mb']:.0f} MB, phases {result['durations']}, "
              f"peaks {({k: round(v) for k, v in result['peaks'].items()})}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mb", type=int, default=2048)
    parser.add_argument("--stores", default="s3,file")
    args = parser.parse_args()
    work = work_dir("memory")
    rows, results = [], {"machine": machine(), "model_mb": args.model_mb, "runs": []}
    try:
        print(f"machine: {machine()}", flush=True)
        for kind in args.stores.split(","):
            sub = work / kind
            sub.mkdir()
            if kind == "file":
                runs = measure((sub / "store").as_uri(), {}, sub, args.model_mb)
            else:
                with servers(["moto"], sub) as (server,):
                    server.create_bucket("bench")
                    os.environ.update(server.env())
                    runs = measure("s3://bench/aicenter", server.env(), sub, args.model_mb)
            for r in runs:
                rows.append([kind, r["label"], f"{r['blob_mb']} MB", f"{r['wall_s']}", f"{r['maxrss_mb']:.0f}",
                             max(r["peaks"], key=r["peaks"].get), verdict(r["maxrss_mb"] < TARGET_MB)])
                results["runs"].append({"store": kind, **r})
            shutil.rmtree(sub, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows, ["store", "run", "package zip", "wall s", "peak RSS MB", "peak in phase", f"< {TARGET_MB} MB"]))
    print(f"\nraw results: {save_json('memory', results)}")


if __name__ == "__main__":
    main()
