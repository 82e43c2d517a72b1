"""Training entry point of the ``churn`` ML package (AI Center contract: ``train.py`` / ``class Main``).

The runtime calls, with the package root as working directory:

- training pipeline:   ``Main()``, ``train(data_directory)``, ``save()``
- evaluation pipeline: ``Main()``, ``evaluate(evaluation_directory)``
- full pipeline:       ``Main()``, ``process_data(data_directory)``,
  ``train(training_data_directory)``, ``evaluate(evaluation_data_directory)``, ``save()``

Hyperparameters come from environment variables (the run's ``env`` parameters):

- ``EPOCHS`` (default 200): full-batch gradient-descent steps in this run
- ``LEARNING_RATE`` (default 0.1): step size

Incremental training: when ``./model.json`` exists (the version being trained was itself
trained), training continues from its weights and standardisation instead of starting over.
"""

from __future__ import annotations

import csv
import html
import os
import random
from pathlib import Path

try:  # progress and metrics for AI Center on Airflow (docs/progress.md); the package runs the same without it
    import aicenter
except ImportError:
    aicenter = None

from churn_model import LABEL, MODEL_FILE, LogisticModel, accuracy, confusion_matrix, csv_files, log_loss, read_rows, to_xy

EVALUATION_FRACTION = 0.2  # share of the data process_data keeps for evaluation
SHUFFLE_SEED = 42          # process_data's split is the same for the same data


def _env_dir(name: str, default: str) -> Path:
    """An AI Center folder from the environment (the runtime sets absolute paths), created if missing."""
    path = Path(os.environ.get(name) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _env_number(name: str, default: float, cast: type[int] | type[float]) -> int | float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


class Main:
    def __init__(self) -> None:
        self.epochs = int(_env_number("EPOCHS", 200, int))
        self.learning_rate = float(_env_number("LEARNING_RATE", 0.1, float))
        # A previous version's model, if this version was trained before (incremental training).
        self.model: LogisticModel | None = LogisticModel.load(MODEL_FILE) if MODEL_FILE.exists() else None
        self.incremental = self.model is not None
        # Filled by train() / evaluate(), written out by save().
        self.loss_curve: list[float] = []  # loss before epoch 1, ..., after the last epoch
        self.training_rows = 0
        self.training_confusion: dict[str, int] | None = None
        self.evaluation_rows = 0
        self.evaluation_accuracy: float | None = None

    # -- full pipeline only --------------------------------------------------------------------

    def process_data(self, input_directory: str) -> None:
        """Split the dataset: 80% to ``training_data_directory``, 20% to ``evaluation_data_directory``.

        When the run was given an evaluation dataset, ``evaluation_data_directory`` already
        holds it; then all of the input is used for training.
        """
        training_dir = _env_dir("training_data_directory", "training_data")
        evaluation_dir = _env_dir("evaluation_data_directory", "evaluation_data")
        columns, rows = read_rows(input_directory)
        if not rows:
            raise ValueError(f"no data rows in {input_directory}")
        if LABEL not in columns:
            raise ValueError(f"the dataset has no {LABEL!r} column (columns: {columns})")
        random.Random(SHUFFLE_SEED).shuffle(rows)
        if csv_files(evaluation_dir):
            train_rows, eval_rows = rows, []
            print(f"process_data: evaluation dataset given; all {len(rows)} rows go to training")
        else:
            n_eval = max(1, round(len(rows) * EVALUATION_FRACTION)) if len(rows) > 1 else 0
            train_rows, eval_rows = rows[n_eval:], rows[:n_eval]
            _write_csv(evaluation_dir / "eval.csv", columns, eval_rows)
            print(f"process_data: {len(train_rows)} training rows, {len(eval_rows)} evaluation rows")
        _write_csv(training_dir / "train.csv", columns, train_rows)

    # -- training ------------------------------------------------------------------------------

    def train(self, training_directory: str) -> None:
        """Fit the model by full-batch gradient descent on every CSV under ``training_directory``."""
        columns, rows = read_rows(training_directory)
        if not rows:
            raise ValueError(f"no training rows in {training_directory}")
        if self.model is None:
            features = [c for c in columns if c != LABEL]
            xs, ys = to_xy(rows, features)
            self.model = LogisticModel.fresh(features, xs)
            print(f"train: new model on {len(rows)} rows, features {features}")
        else:
            xs, ys = to_xy(rows, self.model.features)  # keep the previous model's features and scaling
            print(f"train: continuing from model.json ({self.model.epochs_trained} epochs so far) on {len(rows)} rows")
        model = self.model
        zs = [model.standardise(x) for x in xs]
        n, k = len(zs), len(model.features)
        log_every = max(1, self.epochs // 10)
        for epoch in range(self.epochs + 1):
            # One pass: the loss of the current weights and its gradient.
            loss, grad_w, grad_b = 0.0, [0.0] * k, 0.0
            for z, y in zip(zs, ys):
                p = model.probability_std(z)
                loss += log_loss(p, y)
                error = p - y
                grad_b += error
                for j in range(k):
                    grad_w[j] += error * z[j]
            self.loss_curve.append(loss / n)
            if aicenter is not None:
                aicenter.report(step=epoch, total=self.epochs, loss=loss / n)
            if epoch % log_every == 0 or epoch == self.epochs:
                print(f"train: epoch {epoch:4d}/{self.epochs}  loss {loss / n:.4f}")
            if epoch == self.epochs:
                break  # the last pass only measures the final loss
            model.bias -= self.learning_rate * grad_b / n
            for j in range(k):
                model.weights[j] -= self.learning_rate * grad_w[j] / n
        model.epochs_trained += self.epochs
        self.training_rows = n
        self.training_confusion = confusion_matrix(model, xs, ys)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, evaluation_directory: str) -> float:
        """Accuracy of the model on every CSV under ``evaluation_directory`` (the run's score)."""
        if self.model is None:
            raise RuntimeError("no model to evaluate: this version has no model.json and train() was not called")
        _, rows = read_rows(evaluation_directory)
        if not rows:
            raise ValueError(f"no evaluation rows in {evaluation_directory}")
        xs, ys = to_xy(rows, self.model.features)
        score = accuracy(confusion_matrix(self.model, xs, ys))
        self.evaluation_rows, self.evaluation_accuracy = len(rows), score
        print(f"evaluate: accuracy {score:.4f} on {len(rows)} rows")
        return float(score)

    # -- persistence ---------------------------------------------------------------------------

    def save(self) -> None:
        """Write ``./model.json`` (becomes part of the new version) and the report to ``artifacts_directory``."""
        if self.model is None:
            raise RuntimeError("nothing to save: train() was not called")
        self.model.save(MODEL_FILE)
        artifacts = _env_dir("artifacts_directory", "artifacts")
        (artifacts / "report.md").write_text(self._report())
        if self.loss_curve:
            (artifacts / "loss.svg").write_text(loss_chart_svg(self.loss_curve, first_epoch=self.model.epochs_trained - self.epochs))

    def _report(self) -> str:
        model = self.model
        assert model is not None
        lines = [
            "# Churn model: training report",
            "",
            f"- Started from: {'the previous version (model.json), incremental training' if self.incremental else 'scratch'}",
            f"- Epochs this run: {self.epochs} (learning rate {self.learning_rate}); "
            f"epochs in total: {model.epochs_trained}",
            f"- Training rows: {self.training_rows}; features: {', '.join(model.features)}",
        ]
        if self.loss_curve:
            lines.append(f"- Training loss: {self.loss_curve[0]:.4f} → {self.loss_curve[-1]:.4f}")
        if self.training_confusion:
            lines.append(f"- Accuracy on training data: {accuracy(self.training_confusion):.4f}")
        if self.evaluation_accuracy is not None:
            lines.append(f"- Accuracy on evaluation data: {self.evaluation_accuracy:.4f} ({self.evaluation_rows} rows)")
        if self.loss_curve:
            step = max(1, self.epochs // 10)
            lines += ["", "## Training loss", "", "![training loss](loss.svg)", "", "| epoch | loss |", "|---:|---:|"]
            start = model.epochs_trained - self.epochs
            lines += [f"| {start + e} | {self.loss_curve[e]:.4f} |"
                      for e in range(len(self.loss_curve)) if e % step == 0 or e == len(self.loss_curve) - 1]
        if self.training_confusion:
            c = self.training_confusion
            lines += ["", "## Confusion matrix (training data)", "",
                      "| | predicted stays (0) | predicted churns (1) |", "|---|---:|---:|",
                      f"| **stayed (0)** | {c['tn']} | {c['fp']} |",
                      f"| **churned (1)** | {c['fn']} | {c['tp']} |"]
        lines += ["", "## Weights (on standardised features)", "", "| feature | weight | mean | std |", "|---|---:|---:|---:|"]
        lines += [f"| {f} | {w:+.4f} | {m:.4f} | {s:.4f} |"
                  for f, w, m, s in zip(model.features, model.weights, model.means, model.stds)]
        lines += [f"| (bias) | {model.bias:+.4f} | | |", ""]
        return "\n".join(lines)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def loss_chart_svg(losses: list[float], first_epoch: int = 0, width: int = 480, height: int = 300) -> str:
    """A small, dependency-free SVG line chart of the loss per epoch."""
    left, right, top, bottom = 56, 16, 32, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    last = max(1, len(losses) - 1)

    def x(i: int) -> float:
        return left + plot_w * i / last

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    stride = max(1, len(losses) // 400)  # keep the file small for long runs
    indices = list(range(0, len(losses), stride))
    if indices[-1] != len(losses) - 1:
        indices.append(len(losses) - 1)
    points = " ".join(f"{x(i):.1f},{y(losses[i]):.1f}" for i in indices)
    text = 'font-family="sans-serif" font-size="11" fill="#333"'
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-family="sans-serif" font-size="13">{html.escape("Training loss (log loss)")}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#333"/>',
    ]
    for v in (lo, (lo + hi) / 2, hi):  # y ticks
        parts.append(f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{left}" y2="{y(v):.1f}" stroke="#333"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" {text}>{v:.3f}</text>')
    for i in (0, last // 2, last):  # x ticks, labelled with the total epoch count
        parts.append(f'<line x1="{x(i):.1f}" y1="{top + plot_h}" x2="{x(i):.1f}" y2="{top + plot_h + 4}" stroke="#333"/>')
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle" {text}>{first_epoch + i}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" {text}>epoch</text>')
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
