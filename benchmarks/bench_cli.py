"""Figure 8: what one ``aicenter`` call costs, against ``python -c pass``.

    .venv/bin/python benchmarks/bench_cli.py [--repeat 7]

Method: a file store with the example package and one alias (``aicenter package upload``,
``package promote --if always``); then each command, and ``python -c pass`` as the floor, run
--repeat times interleaved as fresh processes. For each: the median wall time, the median CPU
time (user + system: less moved by other work on the machine than wall time) and the peak RSS
(``wait4``'s ``ru_maxrss``). Airflow is not imported when a store is given (``--storage``), so the
figures are the command's own. Target (issue 24): < 0.5 s wall per call on a file:// store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time

from common import PYTHON, REPO, machine, save_json, table, verdict, work_dir

AICENTER = str(PYTHON.parent / "aicenter")
TARGET_S = 0.5


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, int, int]:
    """(wall s, cpu s, peak RSS KiB, exit status) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    opts = parser.parse_args()
    work = work_dir("cli")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_", "AIRFLOW"))}
        env["AIRFLOW_HOME"] = str(work / "no-airflow-home")  # never read: the store is given
        uri = (work / "store").as_uri()
        example = REPO / "examples" / "packages" / "churn"
        for setup in (["package", "upload", str(example), "--name", "churn"],
                      ["package", "promote", "churn:1.0", "--alias", "production", "--if", "always"]):
            subprocess.run([AICENTER, "--storage", uri, *setup], env=env, check=True, capture_output=True)
        cases: dict[str, list[str]] = {
            "python -c pass": [str(PYTHON), "-c", "pass"],
            "aicenter package list": [AICENTER, "--storage", uri, "package", "list"],
            "aicenter package show churn": [AICENTER, "--storage", uri, "package", "show", "churn"],
            "aicenter runs list": [AICENTER, "--storage", uri, "runs", "list"],
            "aicenter package validate": [AICENTER, "package", "validate", str(example)],
        }
        samples: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in cases}
        for _ in range(opts.repeat):
            for name, args in cases.items():  # interleaved: load on the machine hits every case alike
                samples[name].append(measure(args, env))
        floor = statistics.median(s[0] for s in samples["python -c pass"])
        rows, raw = [], {}
        for name, got in samples.items():
            wall = statistics.median(s[0] for s in got)
            cpu = statistics.median(s[1] for s in got)
            rss = max(s[2] for s in got) / 1024
            codes = sorted({s[3] for s in got})
            target = "-" if name.startswith("python") else f"{verdict(wall < TARGET_S)} (< {TARGET_S} s)"
            rows.append([name, f"{wall:.3f}", f"{wall - floor:+.3f}", f"{cpu:.3f}", f"{rss:.0f}", codes, target])
            raw[name] = {"wall_s": [s[0] for s in got], "cpu_s": [s[1] for s in got], "peak_rss_mib": rss,
                         "exit": codes}
        print(f"aicenter CLI cost on a file:// store, {opts.repeat} runs each, interleaved; {machine()}")
        print(table(rows, ["command", "wall s (median)", "over python", "cpu s", "peak RSS MiB", "exit", "target"]))
        airflow_imported = "airflow" in subprocess.run(
            [AICENTER, "--storage", uri, "package", "list"], env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
            capture_output=True, text=True, check=False).stderr.replace("airflow_aicenter", "")
        print(f"Airflow imported by `aicenter --storage file://... package list`: {'yes' if airflow_imported else 'no'}")
        print(f"raw numbers: {save_json('cli', {'machine': machine(), 'repeat': opts.repeat, 'samples': raw})}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
