"""Loading the package's ``train.py`` and calling its ``Main`` methods.

Failures in user code become one line (exception type, message, file:line inside the
package) for the task log's last line and the pod's termination message; the full traceback
still goes to the log.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from airflow_aicenter.errors import RunError


class UserCodeError(RunError):
    """User code raised; ``str()`` is the one-line cause, ``details`` the full traceback."""

    def __init__(self, cause: str, details: str) -> None:
        super().__init__(cause)
        self.details = details


def _cause(exc: BaseException, root: Path, where: str) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if _is_under(f.filename, root)]
    location = f" ({Path(inside[-1].filename).relative_to(root)}:{inside[-1].lineno})" if inside else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where} raised {type(exc).__name__}{': ' + message if message else ''}{location}"


def _is_under(filename: str, root: Path) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(root)
    except (OSError, ValueError):
        return False


class PackageCode:
    """``train.py``'s ``Main`` instance, created with the package root as working directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        os.chdir(self.root)
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        module = self._load("train")
        self.instance = self.call_on(module, "Main", where="Main()")

    def _load(self, name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, self.root / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # user code may raise anything, sys.exit() too
            raise UserCodeError(_cause(exc, self.root, f"importing {name}.py"), traceback.format_exc()) from exc
        return module

    def call_on(self, obj: Any, method: str, *args: Any, where: str | None = None) -> Any:
        label = where or f"Main.{method}()"
        try:
            return getattr(obj, method)(*args)
        except (Exception, SystemExit) as exc:  # a kill (BaseException) passes through
            raise UserCodeError(_cause(exc, self.root, label), traceback.format_exc()) from exc

    def call(self, method: str, *args: Any) -> Any:
        return self.call_on(self.instance, method, *args)


def check_score(value: Any) -> float:
    """``evaluate`` must return one finite number; say exactly what it returned otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise RunError(
            f"Main.evaluate() returned {shown} ({type(value).__name__}); it must return one number, the score "
            "(e.g. `return float(accuracy)`)"
        )
    score = float(value)
    if not math.isfinite(score):
        raise RunError(f"Main.evaluate() returned {score}, which is not a finite number; return a real score such as accuracy")
    return score
