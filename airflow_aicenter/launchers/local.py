"""The local launcher: the runtime as a child process of the worker (the embedded default).

Same runtime, same spec, same outcome as a pod; only the process boundary differs. It is for
trusted code (a laptop, CI): package code runs as the worker's OS user. It still never
installs anything into the worker's environment and never hands the worker's environment
variables to the runtime: the child gets a small fixed set (PATH, HOME, locale, temp dir, GPU
devices), the store's credentials and the user's secret ``env``, nothing of ``AIRFLOW_*``.
The child has its own process group, so ``kill`` stops everything user code started, and it
dies with the worker (the runtime watches its parent).
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
from typing import TYPE_CHECKING, Any

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.base import Finished, Launcher, settle_outcome
from airflow_aicenter.records import RunRef, RunSpec, redact
from airflow_aicenter.secrets import Redactor

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_aicenter.storage import Store

#: Seconds between SIGTERM (the runtime records "killed") and SIGKILL.
KILL_GRACE = 10
#: A longer output line is cut: one 400 MB line without a newline must not fill the worker's memory.
MAX_LINE = 64 * 1024
#: Variables of the worker the runtime may see; everything else (AIRFLOW_*, the worker's own
#: credentials) stays behind.
PASS_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "AICENTER_CACHE",
    "UV_CACHE_DIR",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "PIP_INDEX_URL",
    "SSL_CERT_FILE",
)
#: Test hooks (crash points) and the runtime's own settings pass as well.
PASS_PREFIXES = ("AICENTER_TEST_", "LC_")
#: Where the runtime's lines go without an operator (tests, the CLI).
RUNTIME_LOG = logging.getLogger("aicenter.runtime")


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


def log_level(line: str) -> int:
    """A runtime line's level: failures and tracebacks are errors, warnings are warnings."""
    text = line.split("] ", 1)[-1] if line.startswith("[rank ") else line
    if text.startswith(("[aicenter] FAILED", "Traceback (most recent call last)", "[aicenter] ERROR")):
        return logging.ERROR
    if text.startswith(("[aicenter] WARNING", "WARNING")) or "Warning:" in text[:120]:
        return logging.WARNING
    return logging.INFO


class LocalLauncher(Launcher):
    """Runs ``python -m airflow_aicenter.runtime SPEC.json`` and streams its output to the task log.

    :param store: the run's store (to settle its outcome).
    :param env: the runtime's credentials and the user's secret ``env`` (never in the spec).
    :param secrets: values to mask in every line streamed to the log.
    :param python: the interpreter with ``airflow_aicenter`` installed (default: the worker's).
    :param gpu: GPUs the run asks for; refused when the worker has fewer.
    :param nodes: must be 1: a local run is one machine.
    :param log: where the runtime's lines go (the task's logger), each at its own level.
    """

    name = "local"

    def __init__(
        self,
        *,
        store: Store,
        env: dict[str, str],
        secrets: Redactor | tuple[str, ...] = (),
        python: str | None = None,
        gpu: int = 0,
        nodes: int = 1,
        dataset_volume_claim: str | None = None,
        log: Any = None,
    ) -> None:
        self.store, self.env, self.secrets = store, env, secrets
        self.log = log or RUNTIME_LOG
        self.python = python or sys.executable
        self.gpu, self.nodes, self.dataset_volume_claim = gpu, nodes, dataset_volume_claim
        self.process: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        if self.nodes != 1:
            raise ConfigurationError(
                f"nodes={self.nodes} needs several machines, and the local launcher runs on this one: use nodes=1 "
                "with procs_per_node=N for N processes here, or launcher='kubernetes' for a multi-node Job"
            )
        if self.dataset_volume_claim:
            raise ConfigurationError(
                "dataset_volume_claim mounts a volume into a pod and needs launcher='kubernetes'; "
                "with the local launcher pass dataset='file:///path/to/data'"
            )
        if not Path(self.python).exists() and shutil.which(self.python) is None:
            raise ConfigurationError(
                f"local launcher interpreter {self.python!r} does not exist; give a path to a python executable"
            )
        if self.gpu > 0:
            available = visible_gpus()
            if available < self.gpu:
                raise ConfigurationError(
                    f"gpu={self.gpu} was asked for, but this worker has {available} visible GPU(s) (nvidia-smi); "
                    "run with launcher='kubernetes' to get a GPU node, or set gpu=False to train on CPU"
                )

    def launch(self, context: Context, spec: RunSpec, run: RunRef) -> Finished:
        code = self.run(spec)
        ended = f"the runtime exited with code {code}" + (
            " (killed: out of memory or a signal)" if code < 0 or code == 137 else ""
        )
        return Finished(spec, run, settle_outcome(self.store, spec, run, ended=ended))

    def run(self, spec: RunSpec) -> int:
        """Run the runtime to its end; every line it prints is logged (masked, capped, by level)."""
        # The folder is also the runtime's work folder: the runtime removes it when it ends, so it does
        # not outlive a worker that was SIGKILLed (the runtime watches its parent and stops).
        with tempfile.TemporaryDirectory(prefix="aicenter-launch-", ignore_cleanup_errors=True) as tmp:
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(spec.model_dump_json())
            child_env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(PASS_PREFIXES)}
            child_env.update(self.env)
            child_env.update(
                {"PYTHONUNBUFFERED": "1", "AICENTER_WORKDIR": tmp, "AICENTER_PARENT_PID": str(os.getpid())}
            )
            self.log.info("Starting the runtime: %s -m airflow_aicenter.runtime", self.python)
            self.process = subprocess.Popen(
                [self.python, "-m", "airflow_aicenter.runtime", str(spec_path)],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert self.process.stdout is not None
            self._stream(self.process.stdout)
            code = self.process.wait()
        self.log.info("The runtime exited with code %s", code)
        return code

    def _stream(self, out: object) -> None:
        reader = out.readline  # type: ignore[attr-defined]
        while True:
            chunk: bytes = reader(MAX_LINE)
            if not chunk:
                return
            line = chunk.decode(errors="replace").rstrip("\n")
            if not chunk.endswith(b"\n") and len(chunk) >= MAX_LINE:
                skipped = 0
                while True:  # drop the rest of the over-long line without keeping it
                    rest: bytes = reader(MAX_LINE)
                    skipped += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                line += f" ... [{skipped} more bytes of this line not shown]"
            line = redact(line, self.secrets)
            self.log.log(log_level(line), "%s", line)

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
