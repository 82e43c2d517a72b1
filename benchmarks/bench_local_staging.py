"""Figure 9: staging a 2 GB package from the file store, against `cp` and sha256 of the same bytes.

    .venv/bin/python benchmarks/bench_local_staging.py [--mb 2048] [--repeat 2] [--blobs 2000]
    AICENTER_BENCH_STAGING_MB=256 .venv/bin/python benchmarks/bench_local_staging.py   # a quick run

A package whose `model/weights.bin` is --mb random megabytes (random: weights do not compress,
so the zip stores it) is zipped as the product zips it and stored as a blob of a `file://`
store. Each measure is a fresh process, run in turn within each round (interleaved), after a
`sync` so one measure's dirty pages are not written back on the next one's time:

- **ours (staging)**: what the runtime's package staging does (`agent._stage_package`):
  `transfer.extract_blob`: on the file store the blob is read in place and extracted while
  its digest is taken in the same pass (stored entries hashed from their copies).
- **ours, extract_zip**: extraction alone, unverified (CRC-checked); **ours, get_blob**: a
  verified copy of the blob (`aicenter package download`, datasets).
- **before**: the previous read path, measured in the same run: the blob read through obstore
  and hashed (`transfer._streamed`, what the file store used), then the zip extracted through
  `zipfile` (`extract_zip` of an open reader takes that path).
- **python + our imports**: a fresh interpreter importing what the staging imports: the fixed
  cost inside every "ours" figure (a small package shows it, a 2 GB one hides it).
- **cp**: `cp` of the blob (coreutils: an in-kernel copy), **sha256**: `hashlib` over the same
  bytes in a fresh interpreter, **unzip**: `unzip -q` of the same zip. Page cache warm for all.

Part 2, the re-snapshot check's metadata: `snapshot.check_vouched` over --blobs stored blobs
(one HEAD each on the file store), with LocalStore.head (one os.stat) and with obstore's HEAD
(the previous path), in the same run.

Target (issue 25): staging <= 1.5x `cp` of the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import PYTHON, machine, save_json, table, verdict, work_dir

CHILD = r'''
import sys, os
from pathlib import Path
op, store_uri, digest, dest = sys.argv[1:5]
dest = Path(dest)
if op == "sha256":
    import hashlib
    with open(sys.argv[5], "rb") as fh:
        print(hashlib.file_digest(fh, "sha256").hexdigest() == digest)
    sys.exit()
from airflow_aicenter.layout import blob_key
from airflow_aicenter.package.archive import extract_zip
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import _streamed, get_blob, run
store = open_store(store_uri)
if op == "imports":
    sys.exit()
if op == "ours":
    from airflow_aicenter.storage.transfer import extract_blob
    extract_blob(store, digest, dest / "package", dest / "package.zip")
elif op == "get_blob":
    entry = get_blob(store, digest, dest / "package.zip")
    assert entry.sha256 == digest
elif op == "extract_zip":
    extract_zip(Path(sys.argv[5]), dest / "package")
elif op == "before":
    dest.mkdir(parents=True, exist_ok=True)
    hexdigest, _ = run(_streamed(store, blob_key(digest), dest / "package.zip"))
    assert hexdigest == digest
    with open(dest / "package.zip", "rb") as reader:
        extract_zip(reader, dest / "package")
    (dest / "package.zip").unlink()
'''


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(cmd: list[str], dest: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh process; ``dest`` emptied and the disk synced first (untimed)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    os.sync()
    cpu = child_cpu()
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0 or "False" in done.stdout:
        raise RuntimeError(f"{cmd[:3]} failed: {(done.stdout + done.stderr)[-2000:]}")
    return wall, child_cpu() - cpu


def make_package(root: Path, mb: int) -> Path:
    folder = root / "pkg"
    (folder / "model").mkdir(parents=True)
    (folder / "main.py").write_text("class Main:\n    def train(self, training_directory):\n        pass\n")
    (folder / "requirements.txt").write_text("")
    with open(folder / "model" / "weights.bin", "wb") as fh:
        for _ in range(mb):
            fh.write(os.urandom(2**20))
    for i in range(20):
        (folder / f"src_{i}.py").write_text(f"VALUE = {i}\n" * 50)
    return folder


def snapshot_metadata(root: Path, blobs: int, repeat: int) -> dict[str, list[float]]:
    """check_vouched over ``blobs`` blobs: LocalStore.head (os.stat) against obstore's HEAD."""
    from airflow_aicenter.layout import blob_key
    from airflow_aicenter.runtime.snapshot import check_vouched
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.store import LocalStore, Store

    class ObstoreHead(LocalStore):
        """The file store as it was: every HEAD through obstore."""

        head = Store.head
        head_async = Store.head_async

    uri = (root / "snapstore").as_uri()
    store = open_store(uri)
    sizes = {}
    for i in range(blobs):
        data = f"file {i}\n".encode() * 8
        digest = hashlib.sha256(data).hexdigest()
        (store.root / blob_key(digest)).parent.mkdir(parents=True, exist_ok=True)
        (store.root / blob_key(digest)).write_bytes(data)
        sizes[digest] = len(data)
    since = datetime.now(UTC) + timedelta(seconds=5)  # written before the manifest: vouched for, not read
    out: dict[str, list[float]] = {"stat (LocalStore.head)": [], "obstore HEAD (before)": []}
    for _ in range(repeat):
        for label, which in (("stat (LocalStore.head)", LocalStore(uri)), ("obstore HEAD (before)", ObstoreHead(uri))):
            began = time.perf_counter()
            states = asyncio.run(check_vouched(which, sizes, since))
            out[label].append(time.perf_counter() - began)
            assert set(states.values()) == {"ok"}, states
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=int(os.environ.get("AICENTER_BENCH_STAGING_MB", "2048")))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--blobs", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from airflow_aicenter.layout import blob_key
    from airflow_aicenter.package.archive import write_zip
    from airflow_aicenter.storage import open_store
    from airflow_aicenter.storage.transfer import put_blob

    root = work_dir("local-staging")
    try:
        folder = make_package(root, args.mb)
        zipped = write_zip(folder, root / "package.zip")
        shutil.rmtree(folder)
        store_uri = (root / "store").as_uri()
        put_blob(open_store(store_uri), root / "package.zip", zipped.sha256)
        blob = root / "store" / blob_key(zipped.sha256)
        dest = root / "dest"
        py = [str(PYTHON), "-c", CHILD]
        cmds = {
            "ours (staging)": [*py, "ours", store_uri, zipped.sha256, str(dest)],
            "ours, get_blob (a verified copy)": [*py, "get_blob", store_uri, zipped.sha256, str(dest)],
            "ours, extract_zip": [*py, "extract_zip", store_uri, zipped.sha256, str(dest), str(root / "package.zip")],
            "before (obstore read + zipfile)": [*py, "before", store_uri, zipped.sha256, str(dest)],
            "python + our imports (fixed cost)": [*py, "imports", store_uri, zipped.sha256, str(dest)],
            "cp": ["cp", str(blob), str(dest / "package.zip")],
            "sha256 (hashlib)": [*py, "sha256", store_uri, zipped.sha256, str(dest), str(blob)],
        }
        if shutil.which("unzip"):
            cmds["unzip -q"] = ["unzip", "-q", str(root / "package.zip"), "-d", str(dest / "package")]
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
        for _ in range(args.repeat):
            for name, cmd in cmds.items():
                runs[name].append(measure(cmd, dest))
                print(f"{name}: {runs[name][-1][0]:.2f} s", flush=True)
        shutil.rmtree(dest, ignore_errors=True)
        meta = snapshot_metadata(root, args.blobs, max(args.repeat, 3))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {name: statistics.median(w for w, _ in r) for name, r in runs.items()}
    cpu = {name: statistics.median(c for _, c in r) for name, r in runs.items()}
    cp = med["cp"]
    rows = [[name, ", ".join(f"{w:.2f}" for w, _ in r), f"{med[name]:.2f}", f"{cpu[name]:.2f}",
             f"{zipped.size / 2**20 / med[name]:,.0f}", f"{med[name] / cp:.2f}x"] for name, r in runs.items()]
    print(f"\n{machine()}; package zip {zipped.size:,} bytes\n")
    print(table(rows, ["measure", "runs (s)", "median s", "CPU s", "MiB/s", "vs cp"]))
    ours = med["ours (staging)"]
    floor = med["cp"] + med["sha256 (hashlib)"]  # a verified copy: the least a staging that writes the files can cost
    print(f"\nstaging <= 1.5x cp: {ours / cp:.2f}x -> {verdict(ours <= 1.5 * cp)}; "
          f"cp + sha256 of the same bytes (a copy that is verified): {floor:.2f} s, ours / that = {ours / floor:.2f}x; "
          f"before / ours = {med['before (obstore read + zipfile)'] / ours:.2f}x")
    meta_rows = [[label, ", ".join(f"{t:.3f}" for t in times), f"{statistics.median(times):.3f}"]
                 for label, times in meta.items()]
    print(f"\nre-snapshot check, {args.blobs} vouched-for blobs on the file store:\n")
    print(table(meta_rows, ["metadata from", "runs (s)", "median s"]))
    save_json("local-staging", {"machine": machine(), "mb": args.mb, "zip_bytes": zipped.size,
                                "runs": {n: [{"wall": w, "cpu": c} for w, c in r] for n, r in runs.items()},
                                "snapshot_metadata": meta, "blobs": args.blobs})


if __name__ == "__main__":
    main()
