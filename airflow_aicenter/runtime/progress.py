"""Live progress of a run: the agent's side of ``aicenter.report`` (DESIGN "Progress, metrics and resources").

Package code appends JSON lines to the metrics file (``AICENTER_METRICS_FILE``, in the work
folder's ``control/``; ``aicenter/__init__.py`` writes them, docs/progress.md gives the format).
While the user processes run, the agent (the ``sync`` container in a pod) reads the new lines
every ``progress_interval`` seconds and keeps two files in the run folder: ``progress.json``
(step, total, percent, ETA, latest metrics, updated at) and ``metrics.jsonl`` (the history,
thinned to at most :data:`MAX_POINTS` points), and logs one line per interval::

    [aicenter] progress 40% (step 400/1000), ETA 3m12s, loss=0.31

The file is the user's: anything can be in it (garbage, 400 MB lines, millions of lines, NaN,
a link or a FIFO in its place). Reading it costs bounded memory and time whatever it holds
(:data:`READ_LIMIT` bytes a look, lines of at most :data:`LINE_LIMIT` bytes, at most
:data:`MAX_METRICS` metrics a line and :data:`MAX_NAMES` names a run), it is opened without
following links and only when it is a regular file, names and values are masked with the run's
secrets, and nothing in it can stop the run: a failing update is logged and the next one tried.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from airflow_aicenter.layout import METRICS, PROGRESS
from airflow_aicenter.records import Progress, write
from airflow_aicenter.secrets import Redactor
from airflow_aicenter.storage.store import Store

#: The metrics file, in the work folder's ``control/``.
METRICS_FILE = "metrics.jsonl"
#: Bytes read from the metrics file per look; when more was written since, the older part is skipped.
READ_LIMIT = 16 << 20
#: The longest line read; a longer one is skipped whole (``aicenter.report`` writes at most 4 KiB).
LINE_LIMIT = 64 << 10
#: Points kept in metrics.jsonl: past it every other point is dropped, and from then on only every 2nd
#: (4th, ...) report is kept, so a run of any length keeps a history spread over all of it.
MAX_POINTS = 2000
#: Metrics kept per report, distinct metric names per run, characters of a name.
MAX_METRICS = 32
MAX_NAMES = 256
MAX_NAME = 64


def number(value: Any) -> int | float | None:
    """A finite number (an int stays one), else None (a string, NaN, infinity; a bool is 0 or 1)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value if abs(value) < 2**53 else None
    if not isinstance(value, float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def duration(seconds: float) -> str:
    """``3m12s``, ``1h05m``, ``42s``: short, for a log line."""
    whole = max(round(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def shown(value: float | None) -> str:
    """A number for a log line: as short as it reads well."""
    if value is None:
        return "null"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


class MetricsFile:
    """The new complete lines of the metrics file, read without trusting it.

    Opened without following a link, only as a regular file (never a FIFO or a device: a read
    could block or never end); reopened when it was replaced, read from the start when it was cut.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.inode: tuple[int, int] | None = None
        self.offset = 0
        self.partial = b""
        #: Inside a line longer than LINE_LIMIT: drop bytes up to its end.
        self.dropping = False
        #: Lines that were not a report (not JSON, too long, skipped for lack of time) and bytes skipped.
        self.skipped = 0

    def _open(self) -> bool:
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return self.fd is not None
        if not stat.S_ISREG(now.st_mode):
            self.close()
            return False
        if self.fd is not None and self.inode == (now.st_dev, now.st_ino):
            return True
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return False
        self.fd, self.inode, self.offset, self.partial, self.dropping = fd, (info.st_dev, info.st_ino), 0, b"", False
        return True

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = self.inode = None

    def lines(self) -> list[bytes]:
        """The complete lines written since the last call (at most READ_LIMIT bytes of them)."""
        if not self._open() or self.fd is None:
            return []
        size = os.fstat(self.fd).st_size
        if size < self.offset:  # cut (truncated) by its writer: start again
            self.offset, self.partial, self.dropping = 0, b"", False
        if size - self.offset > READ_LIMIT:  # more than one look reads: the older part is skipped
            self.skipped += 1
            self.offset, self.partial, self.dropping = size - READ_LIMIT, b"", True
        data = os.pread(self.fd, min(size - self.offset, READ_LIMIT), self.offset)
        self.offset += len(data)
        out: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self.dropping:
                self.dropping = False
            elif len(self.partial) + end - start > LINE_LIMIT:
                self.skipped += 1
            else:
                out.append(self.partial + data[start:end])
            self.partial = b""
            start = end + 1
        rest = data[start:]
        if not self.dropping:
            if len(self.partial) + len(rest) > LINE_LIMIT:
                self.skipped += 1
                self.partial, self.dropping = b"", True
            else:
                self.partial += rest
        return out


class ProgressTracker:
    """Tails the metrics file and keeps ``progress.json`` and ``metrics.jsonl`` of the run folder.

    :meth:`start` runs :meth:`update` every ``interval`` seconds in a thread; :meth:`stop` ends
    it and makes the last update. Only reports of rank 0 (or of no rank) count.
    """

    def __init__(self, store: Store, key: Callable[[str], str], path: str, interval: float,
                 log: Callable[[str], None], secrets: Redactor) -> None:
        self.store, self.key, self.interval, self.log, self.secrets = store, key, interval, log, secrets
        self.file = MetricsFile(path)
        self.points: list[dict[str, Any]] = []
        self.every, self.seen = 1, 0
        self.reports = 0
        self.step: float | None = None
        self.total: float | None = None
        self.first: tuple[float, float] | None = None  # (time, step) of the first report with a step
        self.last_time: float | None = None
        self.latest: dict[str, float | None] = {}
        self.started_at: float | None = None
        self.logged = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failures = 0

    # -- reading -----------------------------------------------------------------------
    def _parse(self, raw: bytes, now: float) -> None:
        try:
            line = json.loads(raw)
        except ValueError:  # not JSON (nor UTF-8)
            self.file.skipped += 1
            return
        if not isinstance(line, dict):
            self.file.skipped += 1
            return
        rank = line.get("rank")
        if rank is not None and rank != 0:
            return
        at = number(line.get("time"))
        if at is None or not (self.started_at or now) - 3600 <= at <= now + 60:  # a clock from elsewhere: ours
            at = now
        step, total = number(line.get("step")), number(line.get("total"))
        metrics: dict[str, float | None] = {}
        given = line.get("metrics")
        if isinstance(given, dict):
            for name, value in given.items():
                if len(metrics) >= MAX_METRICS:
                    break
                name = str(name)[:MAX_NAME]
                if name not in self.latest and len(self.latest) >= MAX_NAMES:
                    continue
                metrics[name] = number(value)
        self.reports += 1
        if self.started_at is None:
            self.started_at = at
        if step is not None:
            self.step = step
            if self.first is None or step < self.first[1]:  # a restart from a checkpoint counts from there
                self.first = (at, step)
        if total is not None and total > 0:
            self.total = total
        self.last_time = at
        self.latest.update(metrics)
        self.seen += 1
        if self.seen % self.every == 0 or not self.points:
            point: dict[str, Any] = {"time": at, "metrics": metrics}
            if step is not None:
                point["step"] = step
            self.points.append(point)
            if len(self.points) > MAX_POINTS:
                self.points = self.points[::2]
                self.every *= 2

    def eta(self) -> float | None:
        if self.first is None or self.step is None or not self.total or self.last_time is None:
            return None
        took, done = self.last_time - self.first[0], self.step - self.first[1]
        if took <= 0 or done <= 0:
            return None
        return max(self.total - self.step, 0) * took / done

    def percent(self) -> float | None:
        if self.step is None or not self.total:
            return None
        return round(min(max(100 * self.step / self.total, 0.0), 100.0), 1)

    # -- writing -----------------------------------------------------------------------
    def progress(self, final: bool = False) -> Progress:
        return Progress(
            step=self.step, total=self.total, percent=self.percent(), eta_seconds=None if final else self.eta(),
            metrics=self.secrets.redact_data(self.latest), reports=self.reports, skipped=self.file.skipped,
            points=len(self.points), started_at=self.started_at, updated_at=time.time(), final=final,
        )

    def line(self) -> str:
        """``progress 40% (step 400/1000), ETA 3m12s, loss=0.31`` (names masked)."""
        parts = []
        percent = self.percent()
        where = f"step {shown(self.step)}" + (f"/{shown(self.total)}" if self.total else "") if self.step is not None else ""
        if percent is not None:
            parts.append(f"progress {percent:.0f}% ({where})")
        else:
            parts.append(f"progress: {where}" if where else f"progress: {self.reports} reports")
        eta = self.eta()
        if eta is not None and percent is not None and percent < 100:
            parts.append(f"ETA {duration(eta)}")
        shown_metrics = ", ".join(f"{self.secrets.redact(k)}={shown(v)}" for k, v in list(self.latest.items())[:8])
        return ", ".join(parts) + (f", {shown_metrics}" if shown_metrics else "")

    def update(self, final: bool = False) -> None:
        """Read what was reported since the last update; write both files and log a line when there is news."""
        with self._lock:
            now = time.time()
            for raw in self.file.lines():
                self._parse(raw, now)
            if self.reports == 0:
                return
            news = self.reports != self.logged
            if news or final:
                write(self.store, self.key(PROGRESS), self.progress(final))
                history = "".join(json.dumps(self.secrets.redact_data(p), allow_nan=False) + "\n" for p in self.points)
                self.store.put_bytes(self.key(METRICS), history.encode())
            if news:
                self.logged = self.reports
                self.log(self.line())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._safely()

    def _safely(self, final: bool = False) -> None:
        try:
            self.update(final)
        except Exception as exc:  # noqa: BLE001 - progress never stops a run
            self._failures += 1
            if self._failures <= 3:
                self.log(f"WARNING: progress not updated ({type(exc).__name__}: {exc}); the run goes on")

    def start(self) -> ProgressTracker:
        self._thread = threading.Thread(target=self._loop, name="aicenter-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the periodic updates and make the last one (the user processes have ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.interval, 30))
        self._safely(final=True)
        self.file.close()
