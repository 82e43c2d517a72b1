"""The local launcher: the runtime as a child process of the worker (the embedded default).

Same runtime, same spec, same outcome as a pod; only the process boundary differs. The child
gets its own process group so ``on_kill`` stops everything user code started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.records import RunSpec, redact

#: Seconds between SIGTERM (the runtime records "killed") and SIGKILL.
KILL_GRACE = 10


def visible_gpus() -> int:
    """GPUs this worker can use, as ``nvidia-smi -L`` lists them (0 when there is no driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        count = min(count, len([d for d in devices.split(",") if d.strip() and d.strip() != "-1"]))
    return count


def check_gpus(requested: int) -> None:
    if requested <= 0:
        return
    available = visible_gpus()
    if available < requested:
        raise ConfigurationError(
            f"gpu={requested} was asked for, but this worker has {available} visible GPU(s) (nvidia-smi); "
            "run with launcher='kubernetes' to get a GPU node, or set gpu=False to train on CPU"
        )


class LocalLauncher:
    """Runs ``python -m airflow_aicenter.runtime SPEC.json`` and streams its output to the task log."""

    def __init__(self, log: logging.Logger, python: str | None = None) -> None:
        self.log = log
        self.python = python or sys.executable
        self.process: subprocess.Popen[str] | None = None

    def run(self, spec: RunSpec, env: dict[str, str], *, secrets: tuple[str, ...] = ()) -> int:
        """Run the runtime; every line it prints is logged with ``secrets`` replaced by ``***``."""
        if not Path(self.python).exists() and shutil.which(self.python) is None:
            raise ConfigurationError(f"local launcher interpreter {self.python!r} does not exist; give a path to a python executable")
        with tempfile.TemporaryDirectory(prefix="aicenter-launch-") as tmp:
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(spec.model_dump_json())
            child_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "AICENTER_WORKDIR": str(Path(tmp) / "work")}
            self.log.info("Starting the runtime: %s -m airflow_aicenter.runtime", self.python)
            self.process = subprocess.Popen(
                [self.python, "-m", "airflow_aicenter.runtime", str(spec_path)],
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
            )
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.log.info("%s", redact(line.rstrip("\n"), secrets))
            code = self.process.wait()
        self.log.info("The runtime exited with code %s", code)
        return code

    def kill(self) -> None:
        """SIGTERM the whole process group (the runtime records the run as killed), then SIGKILL."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
