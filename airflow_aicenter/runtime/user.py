"""The user process: package code (``Main`` and its methods) in a process of its own.

The agent (``runtime/agent.py``) starts this file BY PATH with the package's interpreter::

    <env python> .../airflow_aicenter/runtime/user.py INSTRUCTIONS.json

That interpreter belongs to the package's environment, which does not contain
``airflow_aicenter`` (nor pydantic, nor obstore), so this script is self-contained and uses
the standard library only: it must never import the rest of the runtime. Its environment
holds the AI Center variables, the user's ``env`` and the distributed variables, no store
credentials: what package code can reach is decided by the agent, not by this file.

It creates ``Main()`` from ``train.py`` (or ``main.py`` for batch prediction), calls the
methods its instructions list, in order, on that one instance, and writes a result JSON file
(score, prediction counts, or the failure: one line with the package ``file:line``, the
exception's type, first message line and location, and the full traceback) at the path the
agent gave it. Exit code 0 when every step ran, 1 when it reported a failure; any other
ending (a signal, ``os._exit``) is the agent's to explain.

Instructions (JSON)::

    {"root": "/work/package", "module": "train", "result": "/work/control/rank-0.result.json",
     "parent": 1234,                      # the agent's pid: this process dies with it
     "steps": [{"call": "process_data", "args": ["/work/data"]},
               {"require_files": "/work/training_data", "message": "..."},
               {"call": "train", "args": ["/work/training_data"]},
               {"call": "evaluate", "args": ["/work/evaluation_data"], "score": true,
                "unless_empty": "/work/evaluation_data"},
               {"call": "save"}],
     "predict": {"input_type": "json", "data": "/work/data", "out": "/work/parts/0",
                 "inputs": [["a.jsonl", 0, 500], ...]},   # or [["x.png"], ...] for "file"
     "writable": ["/work/tmp", "/work/artifacts/rank-1", ...],   # or null: not confined
     "lib": "/work/bin/lib"}              # on sys.path: the ``aicenter`` module (aicenter.report) alone

With ``writable`` (the runs of several processes), the process confines itself with Landlock
before it imports package code (:func:`confine`): it writes only below those folders and reads
everywhere; where the kernel has no Landlock, local rank 0 says so in one line and the run goes on.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

# Imported where they are used, not here: this file starts every user process, and a batch
# prediction's phase includes that start (``traceback`` and ``typing`` alone cost ~5 ms of it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any, BinaryIO

#: Full tracebacks of failed predictions printed per process; the rest are only counted.
PRINTED_TRACEBACKS = 3
#: ``prctl(PR_SET_PDEATHSIG, ...)``: the kernel signals this process when its parent dies.
PR_SET_PDEATHSIG = 1
#: The most characters of an error recorded (a cause, a failed input's error, a warning): by this
#: process and, through ``records`` (which takes ``cap`` from here), in every record (DESIGN "Trust
#: boundaries"). A 50 MB exception message must not become a 50 MB result, prediction line or ``outcome.json``.
ERROR_CAP = 4096
ERROR_HEAD = 1024
#: A recorded or printed traceback keeps this much (its frames' start and its end).
TRACEBACK_CAP = 64 * 1024


def cap(text: str, limit: int = ERROR_CAP) -> str:
    """``text`` if it fits in ``limit`` characters, else its head, ``…[N characters cut]…`` and its end
    (where the package ``file:line`` is)."""
    if len(text) <= limit:
        return text
    head = min(ERROR_HEAD, limit // 4)
    marker_room = len("…[ characters cut]…") + len(str(len(text)))
    tail = max(limit - head - marker_room, 0)
    cut = len(text) - head - tail
    return f"{text[:head]}…[{cut} characters cut]…{text[len(text) - tail:] if tail else ''}"


class Failure(Exception):
    """A step failed: ``cause`` is the one-line message, ``details`` the traceback (may be empty).

    ``fields`` says what user code raised, when it raised: ``type``, ``message`` (its first
    line) and ``location`` (the package ``file:line``), for the agent and the run records.
    """

    def __init__(self, cause: str, details: str = "", **fields: str) -> None:
        super().__init__(cause)
        self.cause, self.details, self.fields = cause, details, fields


def die_with_parent(parent: int | None) -> None:
    """Never outlive the agent: if it dies (killed, its launcher gone), this process is killed too."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(137)


# -- Landlock: each process writes only its own folders (DESIGN "Trust boundaries") ----------
#: Syscall numbers (the same on x86_64 and aarch64) and constants of <linux/landlock.h>.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
#: Write access rights by the ABI that introduced them; reads and execution are never restricted.
#: ``IOCTL_DEV`` (ABI 5) is left alone: GPU drivers need ioctls on /dev/nvidia*.
WRITE_FILE, TRUNCATE = 1 << 1, 1 << 14
WRITE_ACCESS_ABI1 = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make *
REFER = 1 << 13  # ABI 2: links and renames across folders (ABI 1 refuses them all)
#: The rights that apply to a file (a rule for /dev/null may name no folder right).
FILE_ACCESS = WRITE_FILE | TRUNCATE


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none (not Linux, an old kernel, a seccomp filter)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        abi = _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    except (OSError, AttributeError):
        return 0
    return max(int(abi), 0)


def confine(writable: list[str]) -> str | None:
    """Allow this process (and all it starts) to write only below ``writable``; read everywhere.

    Landlock, applied before any package code runs: a rank cannot write another rank's
    artifacts or the package that becomes the new version, nor the agent's files. Being in a
    Landlock domain also denies ptrace-style access (``/proc/<pid>/mem``, ``environ``) to every
    process outside it, to a process without CAP_SYS_PTRACE (measured: root keeps reading
    ``environ``). Returns None once confined, or why it could not be (no Landlock here).
    """
    abi = landlock_abi()
    if abi < 1:
        return "this kernel has no Landlock (Linux 5.13 or later, enabled in the LSM list)"
    handled = WRITE_ACCESS_ABI1 | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)
    libc = _libc()
    attr = ctypes.c_uint64(handled)  # struct landlock_ruleset_attr's first field: handled_access_fs
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8), 0)
    if ruleset < 0:
        return f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    try:
        for path in writable:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a folder that does not exist cannot be written to anyway
            try:
                rights = handled if os.path.isdir(path) else handled & FILE_ACCESS
                rule = _PathBeneath(rights, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                    return f"landlock_add_rule for {path} failed: {os.strerror(ctypes.get_errno())}"
            finally:
                os.close(fd)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0:
            return f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return None


def location(exc: BaseException, root: Path) -> str:
    """``file:line`` of the innermost frame inside the package (`` (train.py:41)``), or ``""``.

    Frames of the import machinery (``<frozen importlib._bootstrap>``) are not files and are
    skipped, so an import error at the top of ``train.py`` points at its line.
    """
    import traceback

    places = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    if isinstance(exc, SyntaxError) and exc.filename:
        places.append((exc.filename, exc.lineno))
    for filename, lineno in reversed(places):
        rel = _inside(filename, root)
        if rel is not None:
            return f" ({rel}:{lineno})"
    return ""


def _inside(filename: str, root: Path) -> str | None:
    if not filename or not os.path.isabs(filename):
        return None
    try:
        path = Path(filename).resolve()
    except OSError:
        return None
    if not path.is_file() or not path.is_relative_to(root):
        return None
    return path.relative_to(root).as_posix()


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, capped."""
    text = str(exc).strip()
    return cap(text.splitlines()[0]) if text else ""


def cause_of(exc: BaseException, root: Path, where: str) -> str:
    message = first_line(exc)
    return cap(f"{where} raised {type(exc).__name__}{': ' + message if message else ''}{location(exc, root)}")


def guarded(root: Path, where: str, fn: Any, *args: Any) -> Any:
    """Call user code; anything it raises (``sys.exit()`` too) becomes a :class:`Failure`."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:  # user code may raise anything; a kill passes through
        import traceback

        raise Failure(cause_of(exc, root, where), cap(traceback.format_exc(), TRACEBACK_CAP), type=type(exc).__name__,
                      message=first_line(exc), location=location(exc, root).strip(" ()")) from exc


def load_main(root: Path, module_name: str) -> Any:
    """Import ``<module_name>.py`` from the package root and create its ``Main()``."""
    path = root / f"{module_name}.py"
    if not path.is_file():
        raise Failure(f"{module_name}.py is missing from the package root; add it with class Main")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise Failure(f"{module_name}.py cannot be loaded as a Python module; check the file")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    guarded(root, f"importing {module_name}.py", spec.loader.exec_module, module)
    cls = getattr(module, "Main", None)
    if cls is None:
        raise Failure(f"{module_name}.py defines no class Main; add class Main with __init__(self)")
    return guarded(root, "Main()", cls)


def check_score(value: Any) -> float:
    """``evaluate`` must return one finite number; say exactly what it returned otherwise."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise Failure(
            f"Main.evaluate() returned {shown} ({type(value).__name__}); it must return one number, the score "
            "(e.g. `return float(accuracy)`)"
        )
    score = float(value)
    if not math.isfinite(score):
        raise Failure(f"Main.evaluate() returned {score}, which is not a finite number; return a real score such as accuracy")
    return score


def has_files(folder: str) -> bool:
    return any(files for _, _, files in os.walk(folder))


def run_steps(instance: Any, root: Path, steps: list[dict[str, Any]], result: dict[str, Any]) -> None:
    for step in steps:
        if "require_files" in step:
            if not has_files(step["require_files"]):
                raise Failure(step["message"])
            continue
        method = step["call"]
        if step.get("unless_empty") is not None and not has_files(step["unless_empty"]):
            result["skipped"].append(method)
            continue
        fn = getattr(instance, method, None)
        if fn is None:
            raise Failure(f"train.py's Main has no {method}() method; add it to run this pipeline")
        value = guarded(root, f"Main.{method}()", fn, *step.get("args", []))
        if step.get("score"):
            result["score"] = check_score(value)


# -- batch prediction ------------------------------------------------------------------------
#: One encoder for every output (``json.dumps`` with options builds a new one per call).
_encode = json.JSONEncoder(allow_nan=False).encode
#: Input lines are read this many bytes at a time (whole lines: a longer line is read whole), and
#: outputs are written once this many bytes of them are held, or at the end of each block of inputs.
BATCH_BYTES = 1 << 20


class Predictor:
    """Calls ``predict`` for each input of this process's share and writes the outputs.

    The loop over inputs is the hot path of batch prediction (a predict of 50 µs is common): per
    input it calls ``predict``, encodes the output and appends one line to a list; lines are read
    in blocks (``readlines``) and the outputs written once a block (one ``write`` of the joined
    lines), so reading, writing and counting cost next to nothing per input. The label of an
    input, tracebacks and error texts are only built when it fails.
    """

    def __init__(self, instance: Any, root: Path, out: Path) -> None:
        fn = getattr(instance, "predict", None)
        if fn is None:
            raise Failure("main.py's Main has no predict(self, input) method; add it to run batch prediction")
        self.predict, self.root, self.out = fn, root, out
        self.predicted = self.failed = 0
        self.first_error: str | None = None

    def one(self, key: str, n: Any, value: Any, rel: str) -> str:
        """The output record of one input (``{key: n, "output": ...}`` or ``{key: n, "error": ...}``)."""
        try:
            output = self.predict(value)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a failing input is recorded, the batch goes on
            return self._raised(key, n, rel, exc)
        try:
            encoded = _encode(output)
        except (TypeError, ValueError) as exc:
            return self._unencodable(key, n, rel, output, exc)
        self.predicted += 1
        return f'{{"{key}": {_encode(n)}, "output": {encoded}}}'

    @staticmethod
    def _where(key: str, n: Any, rel: str) -> str:
        return f"{rel} line {n}" if key == "line" else rel

    def _raised(self, key: str, n: Any, rel: str, exc: BaseException) -> str:
        """The error record of an input whose ``predict`` raised; the first tracebacks go to stderr."""
        import traceback

        message = cause_of(exc, self.root, "Main.predict()")
        if self.failed < PRINTED_TRACEBACKS:
            print(f"{self._where(key, n, rel)}: {cap(traceback.format_exc(), TRACEBACK_CAP)}", file=sys.stderr, flush=True)
        return self._failed(key, n, rel, message)

    def _unencodable(self, key: str, n: Any, rel: str, output: Any, exc: Exception) -> str:
        return self._failed(key, n, rel, (
            f"Main.predict() returned {type(output).__name__}, which is not JSON-serialisable ({first_line(exc)}); "
            "return a str, number, bool, None, list or dict"))

    def _failed(self, key: str, n: Any, rel: str, message: str) -> str:
        self.failed += 1
        if self.first_error is None:
            self.first_error = cap(f"{self._where(key, n, rel)}: {message}")
        return json.dumps({key: n, "error": message})

    def json_lines(self, data: Path, rel: str, first: int, last: int) -> None:
        """Lines ``first`` to ``last - 1`` (0-based) of ``rel``; each non-blank line is one input, as the string it is.

        Lines are split at ``\\n`` only (``\\r\\n`` ends are stripped; a ``\\r`` or a Unicode line
        separator inside a line is part of it), a last line without ``\\n`` counts, and a line
        that is empty or white space is no input. The outputs are ``{"line": N, "output": ...}``,
        N counted from 1 in the file, in input order.
        """
        target = self.out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        predict, encode = self.predict, _encode
        predicted = 0
        held: list[str] = []
        hold, size = held.append, 0
        with open(data / rel, "rb") as source, open(target, "w", encoding="utf-8") as sink:
            index = skip_lines(source, first)
            try:
                while index < last:
                    lines = source.readlines(BATCH_BYTES)
                    if not lines:
                        break
                    if len(lines) > last - index:
                        del lines[last - index:]
                    for raw in lines:
                        index += 1
                        try:
                            text = raw.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError as exc:
                            hold(self._failed("line", index, rel, f"line is not UTF-8 text ({exc.reason} at byte "
                                                                  f"{exc.start}); write the inputs as UTF-8") + "\n")
                            continue
                        if not text or text.isspace():
                            continue
                        try:
                            output = predict(text)
                        except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded, the batch goes on
                            hold(self._raised("line", index, rel, exc) + "\n")
                            continue
                        try:
                            line = f'{{"line": {index}, "output": {encode(output)}}}\n'
                        except (TypeError, ValueError) as exc:
                            hold(self._unencodable("line", index, rel, output, exc) + "\n")
                            continue
                        predicted += 1
                        hold(line)
                        size += len(line)
                        if size >= BATCH_BYTES:  # large outputs: held memory stays bounded within a block
                            sink.write("".join(held))
                            held.clear()
                            size = 0
                    sink.write("".join(held))
                    held.clear()
                    size = 0
            finally:
                self.predicted += predicted

    def file(self, data: Path, rel: str) -> None:
        target = self.out / f"{rel}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.one("file", rel, (data / rel).read_bytes(), rel) + "\n", encoding="utf-8")


def skip_lines(source: BinaryIO, count: int) -> int:
    """Move ``source`` past its first ``count`` lines (fewer at its end); return how many it passed.

    A process's share of the inputs may start deep in a file: whole blocks are counted with
    ``bytes.count``, not line by line.
    """
    passed = 0
    while passed < count:
        start = source.tell()
        block = source.read(BATCH_BYTES)
        if not block:
            return passed
        newlines = block.count(b"\n")
        if passed + newlines < count:
            passed += newlines
            continue
        end = -1
        for _ in range(count - passed):
            end = block.index(b"\n", end + 1)
        source.seek(start + end + 1)
        return count
    return passed


def run_predict(instance: Any, root: Path, plan: dict[str, Any], result: dict[str, Any]) -> None:
    predictor = Predictor(instance, root, Path(plan["out"]))
    data = Path(plan["data"])
    began = time.perf_counter()
    for item in plan["inputs"]:
        if plan["input_type"] == "json":
            predictor.json_lines(data, item[0], item[1], item[2])
        else:
            predictor.file(data, item[0])
    result.update(predicted=predictor.predicted, failed=predictor.failed, first_error=predictor.first_error,
                  predict_seconds=round(time.perf_counter() - began, 6))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python user.py INSTRUCTIONS.json (started by the aicenter agent)", file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[0]).read_text())
    die_with_parent(plan.get("parent"))
    root = Path(plan["root"]).resolve()
    os.chdir(root)
    # The result file is opened before confinement: it lies in the agent's control folder, which
    # package code may not write.
    result_fd = os.open(plan["result"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    if plan.get("writable") is not None:
        problem = confine(plan["writable"])
        if problem and os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"[aicenter] user processes are not confined to their own folders: {problem}", file=sys.stderr,
                  flush=True)
    # Package code imports its own modules (``from model import Net``), never this folder's; and
    # ``aicenter`` (aicenter.report) from ``lib``, a folder holding that one stdlib-only module.
    sys.path[0] = str(root)
    if plan.get("lib"):
        sys.path.append(str(plan["lib"]))
    result: dict[str, Any] = {"ok": False, "score": None, "skipped": [], "failure": None}
    try:
        instance = load_main(root, plan["module"])
        run_steps(instance, root, plan.get("steps", []), result)
        if plan.get("predict"):
            run_predict(instance, root, plan["predict"], result)
        result["ok"] = True
    except Failure as failure:
        result["failure"] = {"cause": failure.cause, "traceback": failure.details, "at": time.time(), **failure.fields}
    except Exception as exc:  # noqa: BLE001 - not user code (writing outputs: a full disk): reported all the same
        import traceback

        result["failure"] = {"cause": cap(f"the user process failed: {type(exc).__name__}: {first_line(exc)}"),
                             "traceback": cap(traceback.format_exc(), TRACEBACK_CAP), "at": time.time()}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # One write at the very end: the supervisor reads it once this process has ended (an empty
    # or cut file, from a process killed meanwhile, reads as no report).
    data = json.dumps(result).encode()
    while data:
        data = data[os.write(result_fd, data):]
    os.close(result_fd)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Leave at once: threads user code left running (a data loader) must not hold the process.
    os._exit(code)
