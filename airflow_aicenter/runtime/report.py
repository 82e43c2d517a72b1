"""Progress and metrics from package code: ``aicenter.report(step=120, total=1000, loss=0.31)``.

Standard library only, and nothing else of AI Center: this file is the ``aicenter`` module of
the user processes. The agent copies it, alone, to ``bin/lib/aicenter.py`` of the work folder
and user.py puts that folder on the path (a package's own environment does not hold
``airflow_aicenter``), so ``import aicenter`` works in ``train.py`` whatever the launcher; where
this distribution is installed, the top-level ``aicenter`` package re-exports it. Code that must
also run elsewhere guards the import (``try: import aicenter`` / ``except ImportError: aicenter = None``).

A report is one JSON line appended to the file named by ``AICENTER_METRICS_FILE`` (code in any
language can write the same line, docs/progress.md)::

    {"time": 1700000000.5, "step": 120, "total": 1000, "metrics": {"loss": 0.31, "accuracy": 0.88}}

The call never raises and never blocks training: without the variable it does nothing; a
write that fails (full disk, a file replaced by something that is not a file) is dropped;
numbers that are not finite are written as ``null``; a line is at most :data:`MAX_LINE` bytes
(metrics that do not fit are left out, the step is kept).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

__all__ = ["MAX_LINE", "METRICS_FILE_ENV", "report"]

#: The variable naming the file reports are appended to (set by the AI Center runtime).
METRICS_FILE_ENV = "AICENTER_METRICS_FILE"
#: The longest line written, in bytes (one ``write`` of an appended line: ranks never interleave).
MAX_LINE = 4096
#: The longest metric name kept, in characters.
MAX_NAME = 64


def _number(value: Any) -> float | int | None:
    """A finite number as JSON can hold it, else None (NaN, infinity, a tensor that will not convert)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if abs(value) < 2**63 else float(value)
    try:
        number = float(value)  # numpy and torch scalars convert
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def _line(step: Any, total: Any, metrics: dict[str, Any]) -> bytes:
    record: dict[str, Any] = {"time": round(time.time(), 3)}
    for key, value in (("step", step), ("total", total)):
        if value is not None:
            record[key] = _number(value)
    rank = os.environ.get("RANK")
    if rank and rank.isdigit():
        record["rank"] = int(rank)
    kept: dict[str, Any] = {}
    record["metrics"] = kept
    size = len(json.dumps(record))
    for name, value in metrics.items():
        name = str(name)[:MAX_NAME]
        item = _number(value)
        cost = len(json.dumps({name: item})) + 1
        if size + cost >= MAX_LINE:
            break  # the rest does not fit: the step and what fitted are still reported
        kept[name] = item
        size += cost
    return (json.dumps(record, allow_nan=False) + "\n").encode()


def report(step: Any = None, total: Any = None, **metrics: Any) -> None:
    """Report progress (``step`` of ``total``) and metrics (numbers by name). Never raises, never blocks.

    Call it as often as is natural (every batch or every epoch): the runtime reads the file
    every ``progress_interval`` seconds and keeps a thinned history.
    """
    try:
        path = os.environ.get(METRICS_FILE_ENV)
        if not path:
            return
        data = _line(step, total, metrics)
        # O_NONBLOCK: a FIFO left in its place without a reader fails at once instead of blocking training.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - reporting must never stop a training
        return
