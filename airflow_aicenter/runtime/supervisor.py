"""The user supervisor: starts the user processes of a run, passes their output on, and ends them all.

DESIGN "★ Trust boundaries". Locally the agent calls :func:`supervise` in-process; in a pod the
``user`` container (``base``) runs this file by path, with no store credentials::

    python /aicenter/work/bin/supervisor.py /aicenter/work/control/supervisor.json

It uses the standard library only and imports nothing of ``airflow_aicenter``: the redactor
(``secrets.py``) and the process hardening (``runtime/isolation.py``) are loaded by path, from
beside this file in a pod (the stage container copies :data:`BUNDLE` into ``bin/``) or from the
package otherwise: one implementation of each, whoever runs it.

The plan (JSON)::

    {"processes": [{"label": "rank 0", "argv": [python, user.py, instructions.json], "cwd": "...",
                    "env": {...}, "result": "/.../control/rank-0.result.json"}, ...],
     "secret_env": ["NAMES", ...],     # whose values (in this process's or a user process's env) are masked
     "prefix_output": true,             # "[label] " before each line (distributed runs)
     "line_limit": 65536, "grace": 5.0,
     "run_as": null | {"uid": 1234, "gid": 1234},
     "exit_file": "/.../control/exit.json",
     "before": [{"processes": [...]}, ...],   # optional: groups run first, one after the other
     "gpus": 0,                          # GPUs the run asked for: > 0 samples them with nvidia-smi
     "inherit_env": {"names": [...], "prefixes": [...]}}  # optional: these come from this process's env

What it does: starts each process (its own session; as ``run_as`` with no supplementary
groups when given), pumps its stdout and stderr line by line (each line at most
``line_limit`` bytes, secrets masked), waits; the first process to fail fails the run and the
others get SIGTERM, then SIGKILL after ``grace``. At every ending it kills every remaining
descendant (it is their subreaper, so ``setsid`` daemons are found too), collects each
process's result file and writes the exit file last, atomically::

    {"status": "succeeded" | "failed" | "killed", "results": [<result JSON or null>, ...],
     "failed": "<label of the first failing process or null>", "cause": "<capped text or null>",
     "resources": {"wall_seconds", "cpu_seconds", "peak_memory_bytes", "gpu_utilization", "gpu_memory_peak_bytes"}}
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any, TextIO, cast

HERE = Path(__file__).resolve().parent
#: What a pod's stage container copies into ``bin/`` of the work volume: name there -> file here.
#: The companions get names no package module or standard module has (``secrets`` is a standard one).
BUNDLE = {
    "supervisor.py": HERE / "supervisor.py",
    "user.py": HERE / "user.py",
    "aicenter_secrets.py": HERE.parent / "secrets.py",
    "aicenter_isolation.py": HERE / "isolation.py",
}
#: Longest line of user output passed on; the rest of the line is cut (a 400 MB line must not
#: cost the supervisor 400 MB).
LINE_LIMIT = 64 * 1024
#: The last lines of user output kept for the run's record (the run page of a failed run shows them),
#: each at most TAIL_LINE characters.
TAIL_LINES = 50
TAIL_LINE = 500
#: Seconds a user process gets between SIGTERM and SIGKILL.
GRACE = 5.0
#: The largest result file read (a user process writes it: it must not cost the supervisor its memory).
RESULT_LIMIT = 64 << 20
#: Seconds between looks at the user processes while they run: without pidfds (polling), and with them
#: (they wake the wait at once when a process ends; the slice only bounds one wait).
POLL = 0.05
WAIT_SLICE = 1.0
#: Seconds between looks at the user processes' memory and the GPUs (``nvidia-smi``).
SAMPLE_INTERVAL = 1.0
NVIDIA_SMI_QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")


def _companion(name: str, file: str | None = None) -> ModuleType:
    """A file of the bundle as module ``name``: from beside this file (a pod's ``bin/``), else the package."""
    if name in sys.modules:
        return sys.modules[name]
    file = file or f"{name}.py"
    path = HERE / file
    if not path.exists():
        path = BUNDLE[file]
    loaded = importlib.util.spec_from_file_location(name, path)
    assert loaded is not None and loaded.loader is not None, path
    module = importlib.util.module_from_spec(loaded)
    sys.modules[name] = module  # before running it: its dataclasses look their module up
    loaded.loader.exec_module(module)
    return module


secrets = _companion("aicenter_secrets")
isolation = _companion("aicenter_isolation")
#: The user process's file, for its ``cap`` (the one cap of a recorded error: the records use it too).
user_module = _companion("aicenter_user", "user.py")

_output_lock = threading.Lock()


def emit(stream: TextIO, text: str) -> None:
    """Write whole lines from any thread without interleaving them (the agent's own log lines too)."""
    with _output_lock:
        stream.write(text)
        stream.flush()


class Stopped(BaseException):
    """SIGTERM reached the supervisor run as a script (pod deletion): stop everything, report killed."""


def read_untrusted_json(path: Path | str, limit: int | None = None) -> dict[str, Any] | None:
    """A JSON object from a file that package code could have written or replaced, else None.

    Opened without following a link (a link planted in ``control/`` would make the reader,
    which sees other volumes, read them), only when it is a regular file, at most ``limit`` bytes.
    """
    limit = RESULT_LIMIT if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(limit + 1)
        if len(raw) > limit:
            return None
        value = json.loads(raw)
        return cast(dict[str, Any], value) if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


@dataclass
class UserProcess:
    """A started user process: who it is, where it reports, the threads streaming its output."""

    label: str
    process: subprocess.Popen[bytes]
    result_path: Path
    pumps: list[threading.Thread] = field(default_factory=list)
    #: Peak resident memory of the process and what it waited for, in bytes, from ``wait4`` once it has ended.
    peak_memory: int = 0
    #: A pidfd of the process (readable once it has ended), None where the kernel has none.
    pidfd: int | None = None

    def result(self) -> dict[str, Any] | None:
        """The process's result file, when it is a regular file (never through a link user code planted)."""
        return read_untrusted_json(self.result_path)

    def failure_time(self) -> float:
        failure = (self.result() or {}).get("failure") or {}
        return float(failure.get("at", float("inf")))

    def poll(self, block: bool = False) -> int | None:
        """The exit code once the process has ended, else None; reaped here with ``wait4`` for its peak memory.

        The kernel's own figure for that process, so a run of one second is measured as well as a long one.
        """
        process = self.process
        if process.returncode is None:
            try:
                pid, status, usage = os.wait4(process.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (Popen): its code is still known there
                return process.poll()
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                self.peak_memory = usage.ru_maxrss * 1024  # kilobytes on Linux
        return process.returncode


def open_pidfd(pid: int) -> int | None:
    """A pidfd of ``pid`` (``pidfd_open``, Linux 5.3), None where there is none: then :meth:`Supervisor.pause` polls."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:  # ENOSYS, or EPERM under a seccomp filter
        return None
    os.set_inheritable(fd, False)
    return fd


def _vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process in bytes (``VmHWM`` of ``/proc/<pid>/status``), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Usage:
    """What the user processes of one group used (DESIGN "Progress, metrics and resources").

    CPU seconds come from ``getrusage`` of this process's reaped children (the user processes,
    what they waited for, and orphans this subreaper reaped), and the peak memory from ``wait4``
    of each user process (the sum over the processes, which run side by side): numbers the
    kernel keeps, which package code cannot forge. The peak memory is also sampled from
    ``/proc`` while they run (the sum over the live processes), as are the GPUs with
    ``nvidia-smi`` when the run asked for GPUs and the tool is there (utilisation averaged over
    the samples, memory at its highest); where it is not, the GPU figures are null.
    """

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.began = time.monotonic()
        self.before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.peak_memory = 0
        self.smi = shutil.which("nvidia-smi") if gpus > 0 else None
        self.gpu_utilization: list[float] = []
        self.gpu_memory = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pids: Any) -> None:
        self._thread = threading.Thread(target=self._sample, args=(pids,), name="aicenter-usage", daemon=True)
        self._thread.start()

    def _sample(self, pids: Any) -> None:
        while True:
            self.peak_memory = max(self.peak_memory, sum(_vm_hwm(pid) for pid in pids()))
            if self.smi:
                self._gpus()
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def _gpus(self) -> None:
        assert self.smi is not None
        try:
            done = subprocess.run([self.smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=10, check=False)
            rows = [[float(v) for v in line.split(",")] for line in done.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return
        if done.returncode != 0 or not rows or any(len(r) != 2 for r in rows):
            return
        self.gpu_utilization.append(sum(r[0] for r in rows) / len(rows))
        self.gpu_memory = max(self.gpu_memory, int(sum(r[1] for r in rows) * 1024 * 1024))

    def finish(self, peaks: list[int]) -> dict[str, Any]:
        """The group's figures; ``peaks`` are the ended processes' own peak memory (``wait4``), which run side by side."""
        self.peak_memory = max(self.peak_memory, sum(peaks))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (self.before.ru_utime + self.before.ru_stime)
        if after.ru_maxrss > self.before.ru_maxrss:  # a child of this group set a new high (kilobytes on Linux)
            self.peak_memory = max(self.peak_memory, after.ru_maxrss * 1024)
        sampled = bool(self.gpu_utilization)
        return {
            "wall_seconds": round(time.monotonic() - self.began, 3),
            "cpu_seconds": round(max(cpu, 0.0), 3),
            "peak_memory_bytes": self.peak_memory or None,
            "gpu_utilization": round(sum(self.gpu_utilization) / len(self.gpu_utilization), 1) if sampled else None,
            "gpu_memory_peak_bytes": self.gpu_memory if sampled else None,
        }


def merge_usage(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two groups run one after the other (a node's ``process_data``, then its ranks): times add up, peaks are the highest."""
    if not first or not second:
        return second or first
    merged = dict(second)
    for key in ("wall_seconds", "cpu_seconds"):
        merged[key] = round(float(first.get(key) or 0) + float(second.get(key) or 0), 3)
    for key in ("peak_memory_bytes", "gpu_memory_peak_bytes"):
        values = [v for v in (first.get(key), second.get(key)) if v is not None]
        merged[key] = max(values) if values else None
    weights = [(g.get("gpu_utilization"), float(g.get("wall_seconds") or 0)) for g in (first, second)]
    known = [(u, w) for u, w in weights if u is not None]
    total = sum(w for _, w in known)
    merged["gpu_utilization"] = (round(sum(u * w for u, w in known) / total, 1) if total else known[0][0]) if known else None
    return merged


class Supervisor:
    """One plan's run: see the module's docstring. :func:`supervise` is the way to use it."""

    def __init__(self, plan: dict[str, Any], stdout: TextIO, stderr: TextIO) -> None:
        self.plan, self.stdout, self.stderr = plan, stdout, stderr
        self.line_limit = int(plan.get("line_limit") or LINE_LIMIT)
        self.grace = float(plan.get("grace", GRACE))
        self.prefix = bool(plan.get("prefix_output"))
        self.run_as = plan.get("run_as")
        names = list(plan.get("secret_env") or [])
        envs = [os.environ, *(p.get("env") or {} for p in plan["processes"])]
        self.secrets = secrets.Redactor(env[n] for env in envs for n in names if env.get(n))
        self.users: list[UserProcess] = []
        self.session = os.getsid(0)
        #: The last lines passed on (masked), for the exit record: what the run page shows of a failed run.
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def keep(self, line: str) -> None:
        """Keep ``line`` (already masked) among the last lines, cut to TAIL_LINE characters."""
        cut = len(line) - TAIL_LINE
        self.tail.append(line if cut <= 0 else f"{line[:TAIL_LINE]}… [{cut} characters cut]")

    # -- starting and streaming ------------------------------------------------------------
    def start(self, entry: dict[str, Any]) -> UserProcess:
        label = str(entry["label"])
        extra: dict[str, Any] = {}
        if self.run_as:  # the kernel switches before exec: no supplementary groups, then gid, then uid
            extra = {"user": int(self.run_as["uid"]), "group": int(self.run_as["gid"]), "extra_groups": []}
        env = dict(entry.get("env") or {})
        # A pod's stage wrote the plan; the system variables of the user container itself (its HOME,
        # the GPU device plugin's NVIDIA_*/CUDA_*) are this process's: they win for those names.
        inherit = self.plan.get("inherit_env") or {}
        names, prefixes = set(inherit.get("names") or ()), tuple(inherit.get("prefixes") or ())
        env.update({k: v for k, v in os.environ.items() if k in names or (prefixes and k.startswith(prefixes))})
        try:
            process = subprocess.Popen(
                [str(a) for a in entry["argv"]], cwd=entry.get("cwd"), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # its own session: the supervisor's (the agent's) is never joined
                **extra,
            )
        except OSError as exc:
            who = f" as uid {self.run_as['uid']}" if self.run_as else ""
            raise StartError(label, f"{label}: could not start the user process{who}: {exc}"
                             + (" (that user must be able to read and run the interpreter and the package: "
                                "check the folders' permissions, or AICENTER_CACHE for the environments)"
                                if self.run_as and isinstance(exc, PermissionError) else "")) from None
        user = UserProcess(label, process, Path(entry["result"]), pidfd=open_pidfd(process.pid))
        self.users.append(user)
        prefix = f"[{label}] " if self.prefix else ""
        for pipe, sink in ((process.stdout, self.stdout), (process.stderr, self.stderr)):
            assert pipe is not None
            pump = threading.Thread(target=self._pump, args=(pipe, sink, prefix), daemon=True)
            pump.start()
            user.pumps.append(pump)
        return user

    def _pump(self, pipe: IO[bytes], sink: TextIO, prefix: str) -> None:
        """Pass user output on line by line, secrets redacted, each line at most ``line_limit`` bytes."""
        with pipe:
            for text in secrets.capped_lines(pipe.readline, self.secrets, self.line_limit):
                emit(sink, f"{prefix}{text}\n")
                self.keep(f"{prefix}{text}")

    # -- waiting and ending ----------------------------------------------------------------
    def wait(self) -> tuple[str | None, str | None]:
        """``(label, cause)`` of the first process to fail, or ``(None, None)`` when all succeeded."""
        users = self.users
        while True:
            failed = [u for u in users if u.poll() not in (None, 0)]
            if failed:
                time.sleep(0.3)  # let failures caused by this one (a broken rendezvous) land, then pick the first
                failed = [u for u in users if u.poll() not in (None, 0)]
                self.stop()
                self.join()
                first = min(failed, key=UserProcess.failure_time)
                return first.label, self.cause(first)
            if all(u.poll() is not None for u in users):
                break
            self.pause([u for u in users if u.process.returncode is None])
        # What they left running ends with them now: it may hold their output pipes, which the
        # pumps would otherwise wait on (5 s a pipe) before the last lines could be passed on.
        self.kill_leftovers()
        self.join()
        for user in users:
            result = user.result()
            if result is None or not result.get("ok"):
                return user.label, self.cause(user)
        return None, None

    @staticmethod
    def pause(running: list[UserProcess]) -> None:
        """Return as soon as one of ``running`` ends (at most :data:`WAIT_SLICE` s), else after :data:`POLL` s.

        Through each process's pidfd, readable once it has ended: the end of the user processes
        is seen at once (polling every 50 ms added 25 ms on average to every run's user code phase,
        5% of a 10,000-input batch prediction). Where there are no pidfds (before Linux 5.3, a
        seccomp filter), it polls.
        """
        fds = [u.pidfd for u in running if u.pidfd is not None]
        if running and len(fds) == len(running):
            waiter = select.poll()  # not select(): a descriptor past 1023 would not fit its set
            for fd in fds:
                waiter.register(fd, select.POLLIN)
            waiter.poll(WAIT_SLICE * 1000)
        else:
            time.sleep(POLL)

    def cause(self, user: UserProcess) -> str:
        """The one-line cause of ``user``'s failure (its full traceback goes to the log)."""
        prefix = f"{user.label}: " if self.prefix else ""
        failure = (user.result() or {}).get("failure")
        if failure:
            if failure.get("traceback"):
                tag = f"[{user.label}] " if self.prefix else ""
                lines = self.secrets.redact(str(failure["traceback"])).splitlines()
                emit(self.stderr, "".join(f"{tag}{line}\n" for line in lines))
                for line in lines:
                    self.keep(f"{tag}{line}")
            return f"{prefix}{failure['cause']}"
        code = user.process.returncode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"{prefix}the user process was killed by {name}{hint} before it reported"
        return f"{prefix}the user process exited with code {code} before it reported (did package code call os._exit?)"

    def stop(self) -> None:
        """SIGTERM each running user process's group, SIGKILL what is left after the grace."""
        running = [u for u in self.users if u.poll() is None]
        for user in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(user.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for user in running:
            while user.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if user.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(user.process.pid, signal.SIGKILL)
                user.poll(block=True)
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """Whatever the user processes started and left behind ends with them, ``setsid`` daemons included.

        Every descendant of this process outside its own session is user code's (each user
        process starts a session of its own; the agent's helpers stay in the agent's), and as
        subreaper this process inherits the orphans, so walking its descendants finds them all.
        """
        for user in self.users:
            if user.process.returncode is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(user.process.pid, signal.SIGKILL)
        isolation.kill_descendants(spare_session=self.session)

    def join(self) -> None:
        for user in self.users:
            for pump in user.pumps:
                pump.join(timeout=5)

    def close(self) -> None:
        """Close the processes' pidfds (once they have ended: nothing waits on them any more)."""
        for user in self.users:
            if user.pidfd is not None:
                os.close(user.pidfd)
                user.pidfd = None


class StartError(Exception):
    """A user process could not be started (its interpreter missing or not runnable by ``run_as``)."""

    def __init__(self, label: str, cause: str) -> None:
        super().__init__(cause)
        self.label, self.cause = label, cause


def supervise(plan: dict[str, Any], *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict[str, Any]:
    """Run ``plan``'s processes to their end and return the exit record (also written to ``exit_file``).

    An exception in the caller's thread while waiting (the agent's ``Killed`` on SIGTERM,
    :class:`Stopped`) stops every process, records ``killed`` and propagates.
    """
    isolation.become_subreaper()
    used: dict[str, Any] | None = None
    try:
        for earlier in plan.get("before") or []:  # groups run first, one after the other (a node's process_data)
            first = supervise({**plan, **earlier, "before": None, "exit_file": None}, stdout=stdout, stderr=stderr)
            used = merge_usage(used, first.get("resources"))
            if first["status"] != "succeeded":  # none of the last group starts; the exit file says why
                return _write_exit(plan.get("exit_file"), {**first, "results": [None] * len(plan["processes"])})
    except BaseException:  # stopped during an earlier group: whoever waits for the exit file still gets one
        _write_exit(plan.get("exit_file"), {"status": "killed", "results": [None] * len(plan["processes"]),
                                            "failed": None, "cause": "the run was stopped"})
        raise
    sup = Supervisor(plan, stdout or sys.stdout, stderr or sys.stderr)
    record: dict[str, Any] = {"status": "killed", "results": [], "failed": None, "cause": "the run was stopped"}
    usage = Usage(int(plan.get("gpus") or 0))
    try:
        try:
            usage.start(lambda: [u.process.pid for u in sup.users if u.process.returncode is None])
            for entry in plan["processes"]:
                sup.start(entry)
            label, cause = sup.wait()
        except StartError as exc:
            label, cause = exc.label, exc.cause
        record["status"] = "failed" if label else "succeeded"
        record["failed"] = label
        record["cause"] = user_module.cap(sup.secrets.redact(cause)) if cause else None
    except Exception as exc:  # the supervisor's own failure, not a stop (those are BaseExceptions): "killed" means stopped
        record.update(status="failed", cause=user_module.cap(sup.secrets.redact(
            f"the user supervisor failed: {type(exc).__name__}: {exc}")))
        raise
    finally:
        sup.stop()  # on an exception too: nothing outlives the supervisor's run
        sup.join()
        sup.close()
        results = [sup.secrets.redact_data(u.result()) for u in sup.users]  # user env secrets masked in them too
        record["results"] = results + [None] * (len(plan["processes"]) - len(results))
        record["resources"] = merge_usage(used, usage.finish([u.peak_memory for u in sup.users]))
        if record["status"] != "succeeded":  # what the failed run's page shows of its output
            record["output_tail"] = list(sup.tail)
        _write_exit(plan.get("exit_file"), record)
    return record


def _write_exit(exit_file: str | None, record: dict[str, Any]) -> dict[str, Any]:
    """Write the exit record atomically, through no link: its folder may be writable by ``run_as``.

    The temporary file has an unpredictable name and is created exclusively without following
    links, and a rename replaces a planted link rather than writing through it.
    """
    if exit_file:
        tmp = f"{exit_file}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
        os.replace(tmp, exit_file)  # last, atomically: whoever waits for it sees all of it or nothing
    return record


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough: a second must not interrupt the cleanup
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    """``python supervisor.py PLAN.json``: 0 when every process succeeded, 1 when one failed, 143 when stopped."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python supervisor.py PLAN.json", file=sys.stderr)
        return 2
    plan = json.loads(Path(args[0]).read_text())
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        record = supervise(plan)
    except Stopped:
        return 143
    if record["status"] != "succeeded":
        emit(sys.stderr, f"[aicenter] FAILED: {record['cause']}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
