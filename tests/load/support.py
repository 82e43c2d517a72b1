"""Shared by the load tests: a package that trains for a while, polling with deadlines, process scans."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: train() prints while it works (an orphaned child used to die on its next print) and saves a model.
TRAIN_PY = '''
import os, time

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        end = time.monotonic() + float(os.environ["TRAIN_SECONDS"])
        while time.monotonic() < end:
            print("training shard", os.environ["SHARD"], flush=True)
            time.sleep(0.5)
    def save(self):
        with open("model.txt", "w") as fh:
            fh.write("shard " + os.environ["SHARD"])
'''

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float, interval: float = 1.0) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def runtime_processes(tmp_root: Path) -> list[str]:
    """Runtime and user processes of this test (their command lines name files under its TMPDIR)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "airflow_aicenter.runtime" in cmdline and str(tmp_root) not in cmdline:
            try:  # the local launcher hands the runtime its spec on stdin: its work folder is in its environment
                if str(tmp_root).encode() in (entry / "environ").read_bytes():
                    cmdline += f" [AICENTER_WORKDIR under {tmp_root}]"
            except OSError:
                continue
        if ("airflow_aicenter.runtime" in cmdline or "user.py" in cmdline) and str(tmp_root) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def user_processes(tmp_root: Path) -> int:
    return sum(1 for p in runtime_processes(tmp_root) if "user.py" in p)
