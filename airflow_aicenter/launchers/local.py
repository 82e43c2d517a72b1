"""The local launcher: the runtime as a child process of the worker (the embedded default).

Same runtime, same outcome as a pod; only the process boundary differs (DESIGN "★ Trust
boundaries", "Locally"). It never installs anything into the worker's environment and never
hands the worker's environment variables to the runtime: the child gets a small fixed set
(PATH, HOME, locale, temp dir, GPU devices), the store's credentials and the user's secret
``env``, nothing of ``AIRFLOW_*``. The run spec goes to the runtime on its stdin, never into a
file. The runtime makes itself non-dumpable and is the subreaper of everything package code
starts, so it is all killed at the end; it dies with the worker (it watches its parent).

Package code runs as the worker's OS user unless the connection extra ``run_as_user`` names
another (the worker must be allowed to switch: root): then it can read or write neither the
worker's processes and files, nor the store folder, nor the run spec, nor the worker's Python
environment (``sys.prefix``: Airflow, this provider and whatever else is kept there). Package code
then runs in an environment of its own (``install_requirements``), made from an interpreter that
user can run, and never from the worker's. Before a run the launcher proves all of it with a
process of that user (:func:`~airflow_aicenter.runtime.isolation.probe_as`) and refuses to start
otherwise, naming the fix: it does not change the modes of someone's installation itself.
Without ``run_as_user`` the local launcher is for trusted code: package code can read the
worker's own ``/proc/<pid>/environ``.

Each launch's folder (``$TMPDIR/aicenter-launch-*``, the runtime's work folder) is locked for
as long as its launcher lives; the next launch removes the folders whose launcher died (a
SIGKILLed worker) and kills whatever still runs in them, so nothing is left in the temp folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.base import Finished, Launcher, settle_outcome
from airflow_aicenter.records import RunRef, RunSpec
from airflow_aicenter.runtime import isolation
from airflow_aicenter.runtime.environment import BASE_PYTHON_ENV, cache_root
from airflow_aicenter.secrets import Redactor, capped_lines
from airflow_aicenter.storage.store import LocalStore

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
    "AICENTER_BLOB_CACHE",  # the runtime's blob cache for per-file packages (storage/cache.py): a folder, or off
    "AICENTER_BLOB_CACHE_MAX",
    "UV_CACHE_DIR",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "PIP_INDEX_URL",
    "SSL_CERT_FILE",
    BASE_PYTHON_ENV,
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


class RunAs(NamedTuple):
    """``run_as_user`` as checked: who user processes run as, and what their environments are made from."""

    uid: int
    gid: int
    #: The interpreter package environments are made from (the runtime gets it as ``AICENTER_BASE_PYTHON``).
    base_python: str


class _Interpreter(NamedTuple):
    """What the runtime's interpreter says of itself."""

    prefix: str
    base_prefix: str
    base_executable: str
    version: str


_DESCRIBE = ("import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
             "getattr(sys, '_base_executable', None) or sys.executable, '%d.%d' % sys.version_info[:2]]))")


def log_level(line: str) -> int:
    """A runtime line's level: failures and tracebacks are errors, warnings are warnings."""
    text = line.split("] ", 1)[-1] if line.startswith("[rank ") else line
    if text.startswith(("[aicenter] FAILED", "Traceback (most recent call last)", "[aicenter] ERROR")):
        return logging.ERROR
    if text.startswith(("[aicenter] WARNING", "WARNING")) or "Warning:" in text[:120]:
        return logging.WARNING
    return logging.INFO


class LocalLauncher(Launcher):
    """Runs ``python -m airflow_aicenter.runtime -`` (the spec on its stdin) and streams its output to the task log.

    :param store: the run's store (to settle its outcome).
    :param env: the runtime's credentials and the user's secret ``env`` (never in the spec).
    :param secrets: values to mask in every line streamed to the log.
    :param python: the interpreter with ``airflow_aicenter`` installed (default: the worker's).
    :param gpu: GPUs the run asks for; refused when the worker has fewer.
    :param nodes: must be 1: a local run is one machine.
    :param log: where the runtime's lines go (the task's logger), each at its own level.
    :param run_as_user: a user name or uid that package code runs as (the worker must be root).
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
        run_as_user: str | int | None = None,
    ) -> None:
        self.store, self.env, self.secrets = store, env, secrets
        self.run_as_user = None if run_as_user is None or str(run_as_user).strip() == "" else run_as_user
        self.log = log or RUNTIME_LOG
        self.python = python or sys.executable
        self.gpu, self.nodes, self.dataset_volume_claim = gpu, nodes, dataset_volume_claim
        self.process: subprocess.Popen[bytes] | None = None
        self._checked_run_as: RunAs | None = None

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
        self._run_as()
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

    def _run_as(self) -> RunAs | None:
        """``run_as_user`` checked (once): refused clearly when it cannot work, or would not separate.

        Beside the user itself: the interpreter package environments are made from must be one that
        user can run, the environment cache one it can enter, and the worker's own Python environment
        one it can neither read nor enter. A process of that user answers (``isolation.probe_as``).
        """
        if self.run_as_user is None:
            return None
        if self._checked_run_as is not None:
            return self._checked_run_as
        try:
            uid, gid = isolation.resolve_user(self.run_as_user)
        except LookupError as exc:
            raise ConfigurationError(f"{exc} (connection extra run_as_user)") from None
        if os.geteuid() != 0:
            raise ConfigurationError(
                f"run_as_user={self.run_as_user!r} needs a worker that may switch users (root), and this worker runs as "
                f"uid {os.geteuid()}: run the worker as root (e.g. in a container), or remove run_as_user"
            )
        if uid == 0:
            raise ConfigurationError("run_as_user must name an unprivileged user, not root (uid 0)")
        runtime = self._interpreter()
        base = self._base_python(uid, gid, runtime)
        self._check_cache(uid, gid, base)
        self._check_private(uid, gid, base, runtime)
        self._checked_run_as = RunAs(uid, gid, base)
        return self._checked_run_as

    def _interpreter(self) -> _Interpreter:
        """The runtime's interpreter (``python``): its prefix, base and version (asked of it unless it is the worker's)."""
        if Path(self.python).absolute() == Path(sys.executable).absolute():
            return _Interpreter(sys.prefix, sys.base_prefix, getattr(sys, "_base_executable", None) or sys.executable,
                                f"{sys.version_info.major}.{sys.version_info.minor}")
        try:  # not -S: a virtual environment's prefix is set by site
            done = subprocess.run([self.python, "-I", "-c", _DESCRIBE], capture_output=True, text=True, timeout=60, check=True)
            return _Interpreter(*json.loads(done.stdout))
        except (OSError, subprocess.SubprocessError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"local launcher interpreter {self.python!r} did not describe itself ({type(exc).__name__}); "
                "give a path to a python executable with airflow_aicenter installed"
            ) from None

    def _base_python(self, uid: int, gid: int, runtime: _Interpreter) -> str:
        """The interpreter package environments are made from: ``AICENTER_BASE_PYTHON``, else the runtime's base, else
        a Python of the same version that ``run_as_user`` can run (the runtime's may sit in a folder closed to it)."""
        named = os.environ.get(BASE_PYTHON_ENV)
        if named:
            if isolation.probe_as(uid, gid, named) is None:
                raise ConfigurationError(
                    f"{BASE_PYTHON_ENV}={named} is an interpreter run_as_user {self.run_as_user!r} cannot run (missing, "
                    f"or a folder on its way is closed to that user): name a Python that user can run, such as "
                    f"/usr/bin/python{runtime.version}, or unset {BASE_PYTHON_ENV}"
                )
            return named
        name = f"python{runtime.version}"
        folders = ["/usr/local/bin", "/usr/bin", *os.environ.get("PATH", os.defpath).split(os.pathsep)]
        tried = list(dict.fromkeys([runtime.base_executable, *(os.path.join(f, name) for f in folders if f)]))
        for candidate in tried:
            if not os.path.exists(candidate):
                continue
            answer = isolation.probe_as(uid, gid, candidate)
            if answer is not None and answer.get("version") == runtime.version:
                if candidate != runtime.base_executable:
                    self.log.info("Package environments are made from %s: run_as_user %r cannot run the runtime's base "
                                  "interpreter %s", candidate, self.run_as_user, runtime.base_executable)
                return candidate
        raise ConfigurationError(
            f"run_as_user {self.run_as_user!r} cannot run the interpreter package environments are made from "
            f"({runtime.base_executable}: missing, or a folder on its way is closed to that user, as pyenv's under "
            f"/root is), nor another Python {runtime.version} (looked for {', '.join(tried[1:])}): install Python "
            f"{runtime.version} for all users (e.g. apt-get install {name}), or name one that user can run in the "
            f"worker's environment variable {BASE_PYTHON_ENV}"
        )

    def _check_cache(self, uid: int, gid: int, base: str) -> None:
        """Package environments live in the cache (``AICENTER_CACHE``): ``run_as_user`` must be able to enter it."""
        root = cache_root()  # as the runtime finds it: it runs with this worker's AICENTER_CACHE and HOME
        existing = next(p for p in (root, *root.parents) if p.exists())  # the runtime creates the rest, open to all
        answer = isolation.probe_as(uid, gid, base, [existing])
        if answer is None or not answer["access"][0][1]:
            raise ConfigurationError(
                f"run_as_user {self.run_as_user!r} cannot enter {existing}, on the way to the package environments' "
                f"cache {root}: set AICENTER_CACHE on the worker to a folder that user may enter (not write), such as "
                "/var/cache/aicenter"
            )

    def _check_private(self, uid: int, gid: int, base: str, runtime: _Interpreter) -> None:
        """The worker's Python environment (and the runtime's, when another) must be closed to ``run_as_user``.

        Refused, not changed: making someone's installation private is theirs to decide (other
        services may run from it), so the error names the command.
        """
        prefixes = list(dict.fromkeys([sys.prefix, runtime.prefix]))
        for prefix, base_prefix in ((sys.prefix, sys.base_prefix), (runtime.prefix, runtime.base_prefix)):
            if os.path.realpath(prefix) == os.path.realpath(base_prefix):
                raise ConfigurationError(
                    f"run_as_user needs the worker's Python packages in a virtual environment of its own, and "
                    f"{'the runtime' if prefix != sys.prefix else 'this worker'} runs from the interpreter's own "
                    f"prefix {prefix}, which package environments are made from and see: install Airflow and this "
                    "provider into a virtual environment (python -m venv /opt/airflow-venv), make it the worker's "
                    "alone (chmod 0700 /opt/airflow-venv), and run the worker from it"
                )
        answer = isolation.probe_as(uid, gid, base, prefixes)
        if answer is None:
            raise ConfigurationError(f"run_as_user {self.run_as_user!r} could not run {base} to check what it can read")
        for prefix, (readable, enterable) in zip(prefixes, answer["access"], strict=True):
            if readable or enterable:
                mode = Path(prefix).stat().st_mode & 0o777
                raise ConfigurationError(
                    f"run_as_user {self.run_as_user!r} can read the worker's Python environment {prefix} (mode "
                    f"{mode:04o}): package code could read the worker's installation (Airflow, this provider, anything "
                    f"kept there). Make it the worker's alone: chmod 0700 {prefix} (or chmod 0750 with a group that "
                    "user is not in); package code runs in an environment of its own and never needs it"
                )

    def _private_store(self) -> None:
        """A file store is the worker's alone under ``run_as_user``: its root is made 0700 (package code cannot read it)."""
        if isinstance(self.store, LocalStore):
            root = self.store.root
            mode = root.stat().st_mode & 0o777
            if mode & 0o077:
                root.chmod(mode & 0o700)
                self.log.info("Made the file store %s private to the worker (mode 0700): run_as_user must not read it", root)

    def run(self, spec: RunSpec) -> int:
        """Run the runtime to its end; every line it prints is logged (masked, capped, by level)."""
        if self.run_as_user is not None and not spec.install_requirements:
            raise ConfigurationError(
                f"install_requirements=False runs package code with the runtime's own interpreter, the worker's Python "
                f"environment, which run_as_user {self.run_as_user!r} must not read: pass install_requirements=True "
                "(requirements.txt is installed into an environment of the package's own; without one, a bare "
                "environment with the base interpreter's packages), or remove run_as_user"
            )
        run_as = self._run_as()
        for folder in isolation.sweep(Path(tempfile.gettempdir())):
            self.log.warning("Removed %s and what still ran in it: left by a launch whose worker died", folder)
        if run_as is not None:
            self._private_store()
        # The folder is also the runtime's work folder: the runtime removes it when it ends, and the
        # next launch removes it (and kills what runs in it) if the worker and the runtime were killed.
        work = Path(tempfile.mkdtemp(prefix=isolation.LAUNCH_PREFIX))
        lock = isolation.hold_lock(work)
        try:
            child_env = {k: v for k, v in os.environ.items() if k in PASS_ENV or k.startswith(PASS_PREFIXES)}
            child_env.update(self.env)
            child_env.update(
                {"PYTHONUNBUFFERED": "1", "AICENTER_WORKDIR": str(work), "AICENTER_PARENT_PID": str(os.getpid())}
            )
            if run_as is not None:
                child_env["AICENTER_RUN_AS"] = f"{run_as.uid}:{run_as.gid}"
                child_env[BASE_PYTHON_ENV] = run_as.base_python
            self.log.info("Starting the runtime: %s -m airflow_aicenter.runtime", self.python)
            self.process = subprocess.Popen(
                [self.python, "-m", "airflow_aicenter.runtime", "-"],  # the spec on stdin: in no file
                env=child_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(lock,),  # the runtime holds the folder's lock too: a run outliving its worker is not swept
            )
            assert self.process.stdin is not None and self.process.stdout is not None
            try:
                with self.process.stdin:
                    self.process.stdin.write(spec.model_dump_json().encode())
            except BrokenPipeError:
                pass  # the runtime ended before reading it: its exit code says why
            self._stream(self.process.stdout)
            code = self.process.wait()
        finally:
            isolation.clear(work)  # what still runs there (the runtime was killed before it could end it), then the folder
            os.close(lock)
        self.log.info("The runtime exited with code %s", code)
        return code

    def _stream(self, out: IO[bytes]) -> None:
        redactor = self.secrets if isinstance(self.secrets, Redactor) else Redactor(self.secrets)
        for line in capped_lines(out.readline, redactor, MAX_LINE):
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
