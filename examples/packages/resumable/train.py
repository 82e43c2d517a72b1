"""A training package that survives preemption: it resumes from ``checkpoint_directory``.

Each epoch ends by writing the weights and the epoch counter to ``checkpoint_directory``
(to a temporary name, then renamed, so a sync never sees half a file). The runtime uploads
that folder to the task's ``checkpoints/`` every ``checkpoint_interval`` seconds and once more
when the run ends or is stopped (SIGTERM); a retry of the task finds the latest complete
checkpoint restored there before ``Main()`` is created, and training goes on from that epoch
instead of starting over.

Data: CSV files whose columns are numbers, one of them the 0/1 label (``LABEL``, default
``churned``: ``examples/make_dataset.py`` writes such data). Standard library only.

Env: ``EPOCHS`` (the total, default 20), ``LEARNING_RATE`` (0.1), ``LABEL`` (churned),
``EPOCH_SECONDS`` (a pause per epoch that stands in for real work, default 0).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

try:  # progress for AI Center on Airflow (docs/progress.md); the package runs the same without it
    import aicenter
except ImportError:
    aicenter = None

STATE = "state.json"
MODEL_FILE = Path("model.json")


def read_rows(folder: str, label: str) -> tuple[list[str], list[list[float]], list[float]]:
    features: list[str] = []
    xs: list[list[float]] = []
    ys: list[float] = []
    for path in sorted(Path(folder).rglob("*.csv")):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                features = features or [c for c in row if c != label]
                xs.append([float(row[c]) for c in features])
                ys.append(float(row[label]))
    if not xs:
        raise ValueError(f"no CSV rows under {folder}; the data needs CSV files with a {label!r} column")
    return features, xs, ys


def _folder(variable: str, default: str) -> Path:
    """An AI Center folder the runtime names in the environment (absolute), or ``default`` outside it."""
    return Path(os.environ.get(variable) or default)


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-max(min(z, 30.0), -30.0)))


class Main:
    def __init__(self) -> None:
        self.epochs = int(os.environ.get("EPOCHS", "20"))
        self.rate = float(os.environ.get("LEARNING_RATE", "0.1"))
        self.label = os.environ.get("LABEL", "churned")
        self.pause = float(os.environ.get("EPOCH_SECONDS", "0"))
        self.checkpoints = _folder("checkpoint_directory", "checkpoints")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        state = self.checkpoints / STATE
        # A retry: the runtime restored the task's latest checkpoint here before Main().
        self.state: dict = json.loads(state.read_text()) if state.exists() else {"epoch": 0}
        self.resumed_from = self.state["epoch"]
        if self.resumed_from:
            print(f"resuming from epoch {self.resumed_from} of {self.epochs}")

    def train(self, training_directory: str) -> None:
        features, xs, ys = read_rows(training_directory, self.label)
        if "means" not in self.state:  # standardisation, fixed at the first epoch and kept in the checkpoint
            columns = list(zip(*xs, strict=True))
            means = [sum(col) / len(col) for col in columns]
            stds = [max(math.sqrt(sum((v - m) ** 2 for v in c) / len(c)), 1e-9) for c, m in zip(columns, means, strict=True)]
            self.state.update(features=features, means=means, stds=stds, weights=[0.0] * len(features), bias=0.0)
        means, stds = self.state["means"], self.state["stds"]
        rows = [[(v - m) / s for v, m, s in zip(x, means, stds, strict=True)] for x in xs]
        while self.state["epoch"] < self.epochs:
            w, b = self.state["weights"], self.state["bias"]
            grad_w, grad_b = [0.0] * len(w), 0.0
            for x, y in zip(rows, ys, strict=True):
                err = sigmoid(sum(wi * xi for wi, xi in zip(w, x, strict=True)) + b) - y
                grad_w = [g + err * xi for g, xi in zip(grad_w, x, strict=True)]
                grad_b += err
            self.state["weights"] = [wi - self.rate * g / len(rows) for wi, g in zip(w, grad_w, strict=True)]
            self.state["bias"] = b - self.rate * grad_b / len(rows)
            self.state["epoch"] += 1
            if aicenter is not None:
                aicenter.report(step=self.state["epoch"], total=self.epochs)
            time.sleep(self.pause)
            self._checkpoint()

    def _checkpoint(self) -> None:
        tmp = self.checkpoints / f".{STATE}.tmp"
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.checkpoints / STATE)  # atomic: a sync sees the old or the new state, never half

    def evaluate(self, evaluation_directory: str) -> float:
        model = self.state
        _, xs, ys = read_rows(evaluation_directory, self.label)
        hits = 0
        for x, y in zip(xs, ys, strict=True):
            z = sum(w * (v - m) / s for w, v, m, s in zip(model["weights"], x, model["means"], model["stds"], strict=True))
            hits += int((sigmoid(z + model["bias"]) >= 0.5) == (y >= 0.5))
        return hits / len(xs)

    def save(self) -> None:
        MODEL_FILE.write_text(json.dumps({k: self.state[k] for k in ("features", "means", "stds", "weights", "bias")}))
        artifacts = _folder("artifacts_directory", "artifacts")
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "training.json").write_text(json.dumps({
            "resumed_from_epoch": self.resumed_from, "epochs": self.state["epoch"],
            "epochs_this_run": self.state["epoch"] - self.resumed_from,
        }))
