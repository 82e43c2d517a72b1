"""Figure 6: the runtime's ``requirements`` phase, cold and warm, against pip.

    .venv/bin/python benchmarks/bench_requirements.py [--repeat 1] [--no-s3]

The package needs numpy + pandas + scikit-learn + matplotlib (unpinned, from PyPI, ~330 MB
installed). Every row is the phase the runtime runs before user code, timed the same way:

- cold pip: what the runtime did before (pip into a fresh environment, no pip cache: a fresh
  pod). pip runs ``--isolated`` (no local mirrors from pip.conf) into a venv without system
  site packages, so it installs the same packages uv does.
- cold uv: ``prepare_environment`` with an empty local cache, an empty uv cache and an empty
  store: venv + ``uv pip install`` (the first run of a key on a fresh pod); bytecode is compiled
  in the background afterwards, before packing.
- cold uv, warm uv cache: a machine that downloaded these wheels before (another key).
- warm local: the local cache has the environment (local launcher, a node cache volume).
- warm store (file / S3): a fresh machine; the store has the packed environment: fetch,
  verify the digest, unpack (a pod's normal case). S3 is the moto server over HTTP.

After the cold uv run the environment is packed and uploaded in the background; the script
reports that time and how long a run whose user code takes 0 s waits for it at its end (the
worst case), and the sizes and unpack times of zstd against gzip for the same environment.
Targets (issue 11): warm <= 2 s and >= 5x faster than cold pip.
"""

from __future__ import annotations

import argparse
import gzip
import os
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
from airflow_aicenter.runtime.environment import EnvironmentRecord, _pack, _untar, base_python, prepare_environment
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import get_blob, put_blob

REQUIREMENTS = "numpy\npandas\nscikit-learn\nmatplotlib\n"
MAIN = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, x):\n        return x\n"


def quiet(message: str) -> None:
    if "stored for the next run" in message or "restored from the store" in message:
        print(f"    {message}", flush=True)


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


def cold_pip(work: Path, root: Path) -> tuple[float, float]:
    venv = work / "pip-venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([str(base_python()), "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    began, cpu = time.perf_counter(), cpu_seconds()
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--isolated", "--no-cache-dir",
                    "--disable-pip-version-check", "--quiet", "-r", "requirements.txt"], cwd=root, env=env, check=True)
    took, cpu = time.perf_counter() - began, cpu_seconds() - cpu
    shutil.rmtree(venv, ignore_errors=True)
    return took, cpu


def prepare(root: Path, store: Store, cache: Path) -> tuple[float, str, float, float]:
    """(phase seconds, source, phase CPU seconds, seconds the end of the run waits for the background upload)."""
    cpu = cpu_seconds()
    env = prepare_environment(root, store, cache_dir=cache, log=quiet)
    cpu = cpu_seconds() - cpu
    began = time.perf_counter()
    env.finish(quiet)
    return env.seconds, env.source, cpu, time.perf_counter() - began


def copy_environment(source: Store, target: Store, key: str, work: Path) -> None:
    record = read(source, env_key(key), EnvironmentRecord)
    blob = work / "blob"
    get_blob(source, record.blob.sha256, blob)
    put_blob(target, blob, record.blob.sha256)
    write(target, env_key(key), record, create=True)
    blob.unlink()


def formats(env_dir: Path, work: Path) -> dict[str, dict[str, float]]:
    """zstd (what the product packs) against tar.gz of the same environment: size, pack and unpack time."""
    out: dict[str, dict[str, float]] = {}
    began = time.perf_counter()
    _, size = _pack(env_dir, work / "env.tar.zst")
    packed = time.perf_counter() - began
    target = work / "unpacked-zst"
    target.mkdir()
    began = time.perf_counter()
    with (work / "env.tar.zst").open("rb") as packed_file:
        _untar(target, iter(lambda: packed_file.read(2**20), b""))
    out["zstd"] = {"mib": size / 2**20, "pack_s": packed, "unpack_s": time.perf_counter() - began}
    began = time.perf_counter()
    tar = subprocess.Popen(["tar", "-C", str(env_dir), "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    with gzip.open(work / "env.tar.gz", "wb", compresslevel=6) as gz:
        shutil.copyfileobj(tar.stdout, gz, 2**20)
    tar.wait()
    packed = time.perf_counter() - began
    target = work / "unpacked-gz"
    target.mkdir()
    began = time.perf_counter()
    untar = subprocess.Popen(["tar", "-C", str(target), "-xf", "-"], stdin=subprocess.PIPE)
    assert untar.stdin is not None
    with gzip.open(work / "env.tar.gz", "rb") as gz:
        shutil.copyfileobj(gz, untar.stdin, 2**20)
    untar.stdin.close()
    untar.wait()
    out["gzip"] = {"mib": (work / "env.tar.gz").stat().st_size / 2**20, "pack_s": packed,
                   "unpack_s": time.perf_counter() - began}
    return out


def one_round(work: Path, s3: bool) -> dict[str, float]:
    os.environ.pop("UV_CACHE_DIR", None)
    root = package(work)
    results: dict[str, float] = {}
    print("  cold pip ...", flush=True)
    results["cold pip"], results["cold pip cpu"] = cold_pip(work, root)

    print("  cold uv ...", flush=True)
    store = open_store((work / "store").as_uri())
    cpu = cpu_seconds()
    env = prepare_environment(root, store, cache_dir=work / "c1", log=quiet)
    results["cold uv"], results["cold uv cpu"] = env.seconds, cpu_seconds() - cpu
    began = time.perf_counter()
    env.finish(quiet)
    results["end-of-run wait for the upload (user code 0 s)"] = time.perf_counter() - began
    key = env.key

    print("  cold uv, warm uv cache ...", flush=True)
    os.environ["UV_CACHE_DIR"] = str(work / "c1" / "uv")
    seconds, _, cpu, _ = prepare(root, open_store((work / "store2").as_uri()), work / "c2")
    results["cold uv, warm uv cache"], results["cold uv, warm uv cache cpu"] = seconds, cpu
    os.environ.pop("UV_CACHE_DIR")

    print("  warm local ...", flush=True)
    seconds, source, cpu, _ = prepare(root, store, work / "c1")
    assert source == "local", source
    results["warm local"], results["warm local cpu"] = seconds, cpu

    print("  warm store (file) ...", flush=True)
    seconds, source, cpu, _ = prepare(root, store, work / "c3")
    assert source == "store", source
    results["warm store (file)"], results["warm store (file) cpu"] = seconds, cpu

    if s3:
        print("  warm store (S3, moto) ...", flush=True)
        server = start_server("moto", work)
        try:
            bucket = server.create_bucket("envs")
            s3_store = server.store(f"s3://{bucket}/aicenter")
            copy_environment(store, s3_store, key, work)
            seconds, source, cpu, _ = prepare(root, s3_store, work / "c4")
            assert source == "store", source
            results["warm store (S3, moto)"], results["warm store (S3, moto) cpu"] = seconds, cpu
        finally:
            server.stop()
    for name, figures in formats(work / "c1" / "envs" / key, work).items():
        for what, value in figures.items():
            results[f"{name} {what}"] = value
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) warm-store row")
    args = parser.parse_args()
    rounds: list[dict[str, float]] = []
    for index in range(args.repeat):
        print(f"round {index + 1}/{args.repeat}", flush=True)
        with tempfile.TemporaryDirectory(prefix="aicenter-bench-req-") as tmp:
            rounds.append(one_round(Path(tmp), s3=not args.no_s3))
    figures = {name: median([r[name] for r in rounds]) for name in rounds[0]}
    pip = figures["cold pip"]
    phases = [n for n in ("cold pip", "cold uv", "cold uv, warm uv cache", "warm local", "warm store (file)",
                          "warm store (S3, moto)") if n in figures]
    print()
    pip_cpu = figures["cold pip cpu"]
    print(table([(name, f"{figures[name]:.2f} s", f"{pip / figures[name]:.1f}x", f"{figures[name + ' cpu']:.2f} s",
                  f"{pip_cpu / max(figures[name + ' cpu'], 1e-3):.1f}x") for name in phases],
                ("requirements phase", "wall (median)", "cold pip / this", "CPU", "cold pip CPU / this")))
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print()
    rows = [(fmt, f"{figures[f'{fmt} mib']:.0f} MiB", f"{figures[f'{fmt} pack_s']:.2f} s", f"{figures[f'{fmt} unpack_s']:.2f} s")
            for fmt in ("zstd", "gzip")]
    print(table(rows, ("packed as", "size", "pack", "unpack")))
    print(f"\nbackground pack + upload: the end of a run whose user code takes 0 s waits "
          f"{figures['end-of-run wait for the upload (user code 0 s)']:.2f} s for it")
    warm = [n for n in phases if n.startswith("warm")]
    for name in warm:
        ok = figures[name] <= 2 and pip / figures[name] >= 5
        print(f"target {name}: <= 2 s and >= 5x cold pip: {verdict(ok)} ({figures[name]:.2f} s, {pip / figures[name]:.1f}x)")
    path = save_json("requirements", {"machine": machine(), "python": sys.version.split()[0], "repeat": args.repeat,
                                      "median": figures, "rounds": rounds})
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
