"""Figure 2: snapshots (save_training_data) of a 10,000-file dataset: first, unchanged, 1% changed.

    .venv/bin/python benchmarks/bench_snapshots.py [--servers rclone,moto] [--files 10000]

The real runtime (a child process, as the local launcher runs it) trains a trivial package
with save_training_data=True on a 10,000 x 4 KB dataset, three times: the first snapshot,
again with the data unchanged, then with 1% of the files rewritten. The snapshot phase's time
is the runtime's own (outcome.json "phases"). Bytes written are counted from the store itself:
every object whose (ETag, Last-Modified) is new after the run was written by it; blobs are
the object data, the rest (manifest, outcome, artifacts) are records. Targets: unchanged ->
0 bytes of object data and < 2 s; 1% changed -> only those files' bytes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

from common import (
    REPO,
    machine,
    make_small_files,
    peer,
    run_cmd,
    save_json,
    server_kinds,
    servers,
    table,
    verdict,
    work_dir,
)

sys.path.insert(0, str(REPO))
TRAIN = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        pass\n"
         "    def save(self):\n        open('model.txt', 'w').write('m')\n")
MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return input\n"


def store_state(store) -> dict[str, tuple]:
    return {i.key: (i.etag, i.last_modified, i.size) for i in store.list("")}


def written(before: dict, after: dict) -> tuple[int, int, int, int]:
    """(blob objects, blob bytes, other objects, other bytes) new or changed between two states."""
    blobs = blob_bytes = other = other_bytes = 0
    for key, state in after.items():
        if before.get(key) == state:
            continue
        if key.startswith("blobs/sha256/"):
            blobs, blob_bytes = blobs + 1, blob_bytes + state[2]
        else:
            other, other_bytes = other + 1, other_bytes + state[2]
    return blobs, blob_bytes, other, other_bytes


def run_training(server, store, base, dataset: str, n: int, work: Path) -> dict:
    import subprocess

    from airflow_aicenter.records import Outcome, RunSpec, read

    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/snap/r/t/{n}", package="snap",
                   version=base.version, blob=base.blob, dataset=dataset, save_training_data=True)
    path = work / f"spec{n}.json"
    path.write_text(spec.model_dump_json())
    before = store_state(store)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "airflow_aicenter.runtime", str(path)], capture_output=True, text=True,
                          env={**os.environ, **server.env(), "AICENTER_WORKDIR": str(work / f"run{n}")}, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    after = store_state(store)
    blobs, blob_bytes, other, other_bytes = written(before, after)
    line = next((x for x in done.stderr.splitlines() if "snapshot of data_directory" in x), "")
    return {"snapshot_s": outcome.phases["snapshot"], "stage_data_s": outcome.phases["stage_data"],
            "wall_s": round(wall, 2),
            "blobs_written": blobs, "blob_bytes_written": blob_bytes, "records_written": other,
            "record_bytes_written": other_bytes, "runtime_says": line.replace("[aicenter] ", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=",".join(server_kinds("rclone,moto")))
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    from airflow_aicenter.registry import Registry

    work = work_dir("snapshots")
    rows, results = [], {"machine": machine(), "files": args.files, "runs": []}
    try:
        src = make_small_files(work / "data", count=args.files)
        changed = sorted(random.Random(3).sample(range(args.files), args.files // 100))
        with servers(args.servers.split(","), work) as started:
            for server in started:
                bucket = server.create_bucket("bench")
                store = server.store(f"s3://{bucket}/aicenter")
                pkg = work / "pkg"
                pkg.mkdir(exist_ok=True)
                (pkg / "main.py").write_text(MAIN)
                (pkg / "train.py").write_text(TRAIN)
                (pkg / "requirements.txt").write_text("")
                base = Registry(store).upload(pkg, "snap")
                run_cmd([peer("s5cmd"), "--endpoint-url", server.endpoint, "cp", f"{src}/*", f"s3://{bucket}/datasets/d/"],
                        server.env())
                dataset = f"s3://{bucket}/datasets/d"
                print(f"== {server.kind}: {args.files} files", flush=True)
                for n, label in enumerate(["first snapshot", "unchanged", "1% changed"], start=1):
                    if label == "1% changed":
                        stage = work / "changed"
                        for i in changed:
                            path = stage / f"d{i // 500:03d}" / f"f{i:05d}.bin"
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(os.urandom(4096))
                        run_cmd([peer("s5cmd"), "--endpoint-url", server.endpoint, "cp", f"{stage}/*", f"s3://{bucket}/datasets/d/"],
                                server.env())
                    r = run_training(server, store, base, dataset, n, work)
                    print(f"   {label:15s} snapshot {r['snapshot_s']:.2f} s, {r['blobs_written']} blobs "
                          f"({r['blob_bytes_written']} B) + {r['records_written']} records written; {r['runtime_says']}",
                          flush=True)
                    # The first run also stores the trained package once (1 blob); later runs save the same content.
                    expect = {"first snapshot": args.files + 1, "unchanged": 0, "1% changed": len(changed)}[label]
                    ok = r["blobs_written"] == expect and (label != "unchanged" or r["snapshot_s"] < 2.0)
                    target = {"first snapshot": f"all {args.files} + 1 package", "unchanged": "0 B and < 2 s",
                              "1% changed": f"only the {expect} changed"}[label]
                    rows.append([server.kind, label, f"{r['snapshot_s']:.2f}", r["blobs_written"],
                                 f"{r['blob_bytes_written'] / 2**20:.2f} MiB", r["records_written"], target, verdict(ok)])
                    results["runs"].append({"server": server.kind, "label": label, **r})
                shutil.rmtree(work / "changed", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows, ["server", "run", "snapshot s", "blobs written", "blob data", "records", "target", "met?"]))
    print(f"\nraw results: {save_json('snapshots', results)}")


if __name__ == "__main__":
    main()
