"""Figure 6: the runtime's ``requirements`` phase, cold and warm, against its peers in the same run.

    .venv/bin/python benchmarks/bench_requirements.py [--repeat 1] [--no-s3] [--pip]

The package needs numpy + pandas + scikit-learn + matplotlib (unpinned, from PyPI, ~330 MB
installed). Every row is the phase the runtime runs before user code, timed the same way, beside
the peer that bounds it, measured in the same round:

- **the install alone** (peer of the cold path): ``uv venv`` + ``uv pip install`` into a fresh
  folder with an empty uv cache: what any installer must do. The cold path is then
  ``prepare_environment`` with an empty local cache, an empty uv cache and an empty store: the
  install, byte-compiling (parallel), packing in parts (before package code runs), and the upload
  that the end of a run whose user code takes 0 s waits for; each figure from the runtime's own
  log. "cold, another user": the same with ``package_code_cannot_write`` (the local launcher's
  ``run_as_user``): packed and uploaded while package code runs.
- **tar -x of the same files** (peer of the warm start): the environment as one uncompressed tar
  in the page cache, unpacked by one ``tar``. The warm start from the store is a fresh machine
  whose store has the packed environment: read, verify each part's digest, unpack the parts at
  once, make read-only. File store, and S3 on the moto server over HTTP. "one stream" is the
  format before issue 25 (one tar + zstd stream, one ``tar``) unpacked from the same files.
- ``--pip``: also pip into a fresh environment without a cache (what the runtime did before
  issue 11; minutes).

Targets (issue 25): the cold path adds <= 1.3x the install itself; warm from the store <= 1 s
and <= 1.2x ``tar -x`` of the same files.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, median, save_json, start_server, table, verdict

from airflow_aicenter.layout import env_key
from airflow_aicenter.records import read, write
from airflow_aicenter.runtime.environment import (
    EnvironmentRecord,
    _pack,
    _remove,
    _seal,
    _untar,
    base_python,
    install_env,
    prepare_environment,
    uv_binary,
)
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import get_blob, put_blob

REQUIREMENTS = "numpy\npandas\nscikit-learn\nmatplotlib\n"
MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, x):\n        return x\n"


class Said(list[str]):
    """The runtime's log lines, kept to read its own figures (compile, pack, upload) from."""

    def __call__(self, message: str) -> None:
        self.append(message)
        if "stored for the next run" in message or "restored from the store" in message or "packed" in message:
            print(f"    {message}", flush=True)

    def figure(self, pattern: str) -> float:
        for line in self:
            if found := re.search(pattern, line):
                return float(found.group(1))
        return 0.0


def package(work: Path) -> Path:
    root = work / "pkg"
    root.mkdir(parents=True)
    (root / "main.py").write_text(MAIN)
    (root / "requirements.txt").write_text(REQUIREMENTS)
    return root


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children: what a phase costs whatever else the machine runs."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cold_pip(work: Path, root: Path) -> float:
    venv = work / "pip-venv"
    subprocess.run([str(base_python()), "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    began = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--isolated", "--no-cache-dir",
                    "--disable-pip-version-check", "--quiet", "-r", "requirements.txt"], cwd=root, env=env, check=True)
    took = time.perf_counter() - began
    shutil.rmtree(venv, ignore_errors=True)
    return took


def install_alone(work: Path, root: Path) -> float:
    """The peer of the cold path: uv venv + uv pip install, empty uv cache, as the runtime runs them."""
    venv, cache = work / "uv-alone", work / "uv-alone-cache"
    env = install_env(cache)  # what the runtime's uv commands see
    began = time.perf_counter()
    subprocess.run([uv_binary(), "venv", "--no-config", "--no-project", "--quiet", "--system-site-packages", "--relocatable",
                    "--python", str(base_python()), str(venv)], env=env, check=True)
    subprocess.run([uv_binary(), "pip", "install", "--no-config", "--quiet", "--only-binary", ":all:", "-r", "requirements.txt",
                    "--python", str(venv / "bin" / "python")], cwd=root, env=env, check=True)
    took = time.perf_counter() - began
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return took


def cold(root: Path, store: Store, cache: Path, results: dict[str, float], name: str, *, cannot_write: bool = False) -> str:
    """The cold path: the phase, its parts from the runtime's log, and the end-of-run wait for the upload."""
    os.environ["UV_CACHE_DIR"] = str(cache / "uv")  # empty: this round's own
    said = Said()
    cpu = cpu_seconds()
    env = prepare_environment(root, store, cache_dir=cache, log=said, package_code_cannot_write=cannot_write)
    results[f"{name} phase"], results[f"{name} cpu"] = env.seconds, cpu_seconds() - cpu
    began = time.perf_counter()
    env.finish(said)
    results[f"{name} end wait"] = time.perf_counter() - began
    results[f"{name} compile"] = said.figure(r"bytecode compiled in ([\d.]+) s")
    results[f"{name} pack"] = said.figure(r"packed \([\d.]+ MiB\) in ([\d.]+) s")
    results[f"{name} upload"] = said.figure(r"uploaded in ([\d.]+) s")
    results[f"{name} total"] = results[f"{name} phase"] + results[f"{name} end wait"]
    os.environ.pop("UV_CACHE_DIR")
    return env.key


def warm(root: Path, store: Store, cache: Path, results: dict[str, float], name: str) -> Path:
    said = Said()
    cpu = cpu_seconds()
    env = prepare_environment(root, store, cache_dir=cache, log=said)
    assert env.source == "store", said
    results[name], results[f"{name} cpu"] = env.seconds, cpu_seconds() - cpu
    return env.python.parent.parent


def tar_peer(env_dir: Path, work: Path) -> float:
    """``tar -x`` of the same files: one uncompressed tar, read from the page cache, unpacked by one tar."""
    plain = work / "plain.tar"
    subprocess.run(["tar", "-C", str(env_dir), "-cf", str(plain), "."], check=True)
    plain.read_bytes()  # in the page cache, as the store's blob is
    target = work / "tar-peer"
    target.mkdir()
    began = time.perf_counter()
    subprocess.run(["tar", "-C", str(target), "-xf", str(plain)], check=True)
    took = time.perf_counter() - began
    _remove(target)
    plain.unlink()
    return took


def one_stream(env_dir: Path, work: Path) -> tuple[float, float]:
    """The format before issue 25 (one tar + zstd stream, one tar), the same files: (unpack and seal seconds, MiB)."""
    packed = work / "one.tar.zst"
    _, size = _pack(env_dir, packed)
    target = work / "one-stream"
    target.mkdir()
    began = time.perf_counter()
    with packed.open("rb") as f:
        _untar(target, iter(lambda: f.read(2**20), b""))
    _seal(target)
    took = time.perf_counter() - began
    _remove(target)
    packed.unlink()
    return took, size / 2**20


def copy_environment(source: Store, target: Store, key: str, work: Path) -> None:
    record = read(source, env_key(key), EnvironmentRecord)
    blob = work / "blob"
    get_blob(source, record.blob.sha256, blob)
    put_blob(target, blob, record.blob.sha256)
    write(target, env_key(key), record, create=True)
    blob.unlink()


def one_round(work: Path, s3: bool, pip: bool) -> dict[str, float]:
    os.environ.pop("UV_CACHE_DIR", None)
    root = package(work)
    results: dict[str, float] = {}
    if pip:
        print("  cold pip ...", flush=True)
        results["cold pip"] = cold_pip(work, root)
    print("  the install alone (uv venv + uv pip install, empty uv cache) ...", flush=True)
    results["install alone"] = install_alone(work, root)
    print("  cold ...", flush=True)
    store = open_store((work / "store").as_uri())
    key = cold(root, store, work / "c1", results, "cold")
    print("  cold, package code as another user ...", flush=True)
    cold(root, open_store((work / "store2").as_uri()), work / "c2", results, "cold, another user",
         cannot_write=True)
    print("  the install alone, again ...", flush=True)
    results["install alone 2"] = install_alone(work, root)

    print("  warm local ...", flush=True)
    began = time.perf_counter()
    assert prepare_environment(root, store, cache_dir=work / "c1", log=lambda m: None).source == "local"
    results["warm local"] = time.perf_counter() - began

    print("  warm store (file) and tar -x of the same files ...", flush=True)
    restored = warm(root, store, work / "c3", results, "warm store (file)")
    results["tar -x"] = tar_peer(restored, work)
    results["one stream"], results["one stream MiB"] = one_stream(restored, work)
    record = read(store, env_key(key), EnvironmentRecord)
    results["packed MiB"], results["parts"] = record.blob.size / 2**20, len(record.parts)
    results["files"] = sum(len(files) + len(dirs) for _, dirs, files in os.walk(restored))

    if s3:
        print("  warm store (S3, moto) ...", flush=True)
        server = start_server("moto", work)
        try:
            bucket = server.create_bucket("envs")
            s3_store = server.store(f"s3://{bucket}/aicenter")
            copy_environment(store, s3_store, key, work)
            warm(root, s3_store, work / "c4", results, "warm store (S3, moto)")
        finally:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) warm-store row")
    parser.add_argument("--pip", action="store_true", help="also time pip without a cache (minutes)")
    args = parser.parse_args()
    rounds: list[dict[str, float]] = []
    for index in range(args.repeat):
        print(f"round {index + 1}/{args.repeat}", flush=True)
        with tempfile.TemporaryDirectory(prefix="aicenter-bench-req-") as tmp:
            rounds.append(one_round(Path(tmp), s3=not args.no_s3, pip=args.pip))
    f = {name: median([r[name] for r in rounds]) for name in rounds[0]}
    install = median([f["install alone"], f["install alone 2"]])
    print()
    rows = [("the install alone (uv venv + uv pip install)", f"{f['install alone']:.2f} s / {f['install alone 2']:.2f} s",
             "1.00x", "", "", "", "")]
    for name in ("cold", "cold, another user"):
        rows.append((name, f"{f[f'{name} total']:.2f} s", f"{f[f'{name} total'] / install:.2f}x",
                     f"{f[f'{name} compile']:.2f} s", f"{f[f'{name} pack']:.2f} s", f"{f[f'{name} upload']:.2f} s",
                     f"{f[f'{name} end wait']:.2f} s"))
    print(table(rows, ("cold path (phase + end-of-run wait)", "wall", "/ install alone", "compile", "pack", "upload",
                       "end-of-run wait")))
    print()
    warm_rows = [n for n in ("warm store (file)", "warm store (S3, moto)") if n in f]
    print(table([("tar -x of the same files (one tar, uncompressed)", f"{f['tar -x']:.2f} s", "1.00x", ""),
                 ("one stream (the format before; unpack + seal)", f"{f['one stream']:.2f} s",
                  f"{f['one stream'] / f['tar -x']:.2f}x", ""),
                 *[(n, f"{f[n]:.2f} s", f"{f[n] / f['tar -x']:.2f}x", f"{f[n + ' cpu']:.2f} s") for n in warm_rows],
                 ("warm local", f"{f['warm local']:.3f} s", "", "")],
                ("warm start", "wall", "/ tar -x", "CPU")))
    print(f"({f['files']:.0f} files and folders; {f['packed MiB']:.0f} MiB packed in {f['parts']:.0f} parts; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if "cold pip" in f:
        print(f"cold pip: {f['cold pip']:.2f} s")
    print()
    cold_ratio = f["cold total"] / install
    print(f"target cold path <= 1.3x the install alone: {verdict(cold_ratio <= 1.3)} ({cold_ratio:.2f}x; "
          f"package code as another user: {f['cold, another user total'] / install:.2f}x)")
    for name in warm_rows:
        ok = f[name] <= 1 and f[name] <= 1.2 * f["tar -x"]
        print(f"target {name}: <= 1 s and <= 1.2x tar -x: {verdict(ok)} ({f[name]:.2f} s, {f[name] / f['tar -x']:.2f}x)")
    path = save_json("requirements-issue25", {"machine": machine(), "python": sys.version.split()[0], "repeat": args.repeat,
                                      "median": f, "rounds": rounds})
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
