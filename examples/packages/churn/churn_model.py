"""The model shared by ``train.py`` (training) and ``main.py`` (serving): plain-Python logistic regression.

Standard library only, so the package needs nothing from ``requirements.txt``. The runtime
puts the package root on ``sys.path`` and makes it the working directory, so both entry
points import this module as ``churn_model`` and read and write ``./model.json``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_FILE = Path("model.json")  # relative: the working directory is the package root
LABEL = "churned"                # the column to predict; every other column is a feature
FORMAT_VERSION = 1

Row = dict[str, str]


def sigmoid(z: float) -> float:
    """Numerically stable logistic function."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def log_loss(p: float, y: int) -> float:
    """Cross-entropy of one prediction, clamped so that a confident mistake stays finite."""
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return -math.log(p) if y == 1 else -math.log(1.0 - p)


# -- data ------------------------------------------------------------------------------------

def csv_files(directory: str | Path) -> list[Path]:
    """Every ``*.csv`` under ``directory`` (recursively), in a stable order."""
    return sorted(p for p in Path(directory).rglob("*.csv") if p.is_file())


def read_rows(directory: str | Path) -> tuple[list[str], list[Row]]:
    """Read all CSV files under ``directory``: (column names of the first file, all rows).

    Every file must have a header row; files may order their columns differently but must
    all hold the first file's columns.
    """
    columns: list[str] = []
    rows: list[Row] = []
    for path in csv_files(directory):
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in (reader.fieldnames or [])]
            if not header:
                continue  # an empty file
            if not columns:
                columns = header
            elif missing := [c for c in columns if c not in header]:
                raise ValueError(f"{path} lacks the columns {missing} that the other CSV files have")
            for raw in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                if any(row.values()):  # skip blank lines
                    rows.append(row)
    return columns, rows


def parse_number(value: object, column: str, where: str) -> float:
    """A feature value as float, with an error message that says which value is wrong."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}: {column}={value!r} is not a finite number")
    return number


def parse_label(value: str, where: str) -> int:
    number = parse_number(value, LABEL, where)
    if number not in (0.0, 1.0):
        raise ValueError(f"{where}: {LABEL}={value!r} must be 0 or 1")
    return int(number)


def to_xy(rows: Sequence[Mapping[str, object]], features: Sequence[str]) -> tuple[list[list[float]], list[int]]:
    """Feature matrix (raw units) and labels from parsed CSV rows."""
    xs: list[list[float]] = []
    ys: list[int] = []
    for i, row in enumerate(rows):
        where = f"row {i + 1}"
        if missing := [f for f in (*features, LABEL) if f not in row]:
            raise ValueError(f"{where} lacks the columns {missing}")
        xs.append([parse_number(row[f], f, where) for f in features])
        ys.append(parse_label(str(row[LABEL]), where))
    return xs, ys


# -- model -----------------------------------------------------------------------------------

@dataclass
class LogisticModel:
    """Logistic regression on standardised features: p = sigmoid(bias + sum(w_i * (x_i - mean_i) / std_i))."""

    features: list[str]
    means: list[float]
    stds: list[float]
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    epochs_trained: int = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = [0.0] * len(self.features)

    @classmethod
    def fresh(cls, features: Sequence[str], xs: Sequence[Sequence[float]]) -> LogisticModel:
        """An untrained model whose standardisation is fitted on ``xs`` (zero weights: p = 0.5)."""
        n = len(xs)
        means = [sum(col) / n for col in zip(*xs)]
        stds = []
        for j, col in enumerate(zip(*xs)):
            var = sum((v - means[j]) ** 2 for v in col) / n
            stds.append(math.sqrt(var) or 1.0)  # a constant column: leave it unscaled
        return cls(features=list(features), means=means, stds=stds)

    def standardise(self, x: Sequence[float]) -> list[float]:
        return [(v - m) / s for v, m, s in zip(x, self.means, self.stds)]

    def probability_std(self, z: Sequence[float]) -> float:
        """Churn probability of an already standardised feature vector."""
        return sigmoid(self.bias + sum(w * v for w, v in zip(self.weights, z)))

    def probability(self, x: Sequence[float]) -> float:
        """Churn probability of a feature vector in raw units (the order of ``features``)."""
        return self.probability_std(self.standardise(x))

    def predict_record(self, record: Mapping[str, object], where: str = "record") -> tuple[float, int]:
        """(probability, label) for one record holding at least the feature columns."""
        if missing := [f for f in self.features if f not in record]:
            raise ValueError(f"{where} lacks the features {missing}; expected {self.features}")
        p = self.probability([parse_number(record[f], f, where) for f in self.features])
        return p, int(p >= self.threshold)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: Path = MODEL_FILE) -> None:
        data = {"format": FORMAT_VERSION, "label": LABEL, **asdict(self)}
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> LogisticModel:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported model format {data.get('format')!r} (expected {FORMAT_VERSION})")
        model = cls(**{k: data[k] for k in ("features", "means", "stds", "weights", "bias", "epochs_trained", "threshold")})
        if not (len(model.features) == len(model.means) == len(model.stds) == len(model.weights)):
            raise ValueError(f"{path}: features, means, stds and weights differ in length")
        return model


def confusion_matrix(model: LogisticModel, xs: Iterable[Sequence[float]], ys: Iterable[int]) -> dict[str, int]:
    """Counts of true/false positives/negatives (positive = churned)."""
    counts = {"tn": 0, "fp": 0, "fn": 0, "tp": 0}
    for x, y in zip(xs, ys):
        predicted = int(model.probability(x) >= model.threshold)
        counts[("t" if predicted == y else "f") + ("p" if predicted else "n")] += 1
    return counts


def accuracy(counts: Mapping[str, int]) -> float:
    total = sum(counts.values())
    return (counts["tp"] + counts["tn"]) / total if total else float("nan")
