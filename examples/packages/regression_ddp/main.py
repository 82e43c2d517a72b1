"""Serving entry point of the ``regression_ddp`` package: ``Main()`` loads ``./model.json``.

Input (a JSON string): one record ``{"x1": 1.0, "x2": 2.0, ...}`` with every feature column, or a list
of them. Output: ``{"prediction": ...}`` for one record, a list for a list.
"""

from __future__ import annotations

import json
from typing import Any

from linear import MODEL_FILE, LinearModel


class Main:
    def __init__(self) -> None:
        if not MODEL_FILE.exists():
            raise FileNotFoundError(f"{MODEL_FILE} not found: serve a version made by a training or full pipeline")
        self.model = LinearModel.load(MODEL_FILE)

    def predict(self, input: str | bytes) -> str:
        data: Any = json.loads(input)
        records = [data] if isinstance(data, dict) else data
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("input must be a JSON object of features or a list of them")
        missing = [f for f in self.model.features if f not in records[0]] if records else []
        if missing:
            raise ValueError(f"input lacks the features {missing}; give every one of {self.model.features}")
        out = [{"prediction": self.model.predict_row([float(r[f]) for f in self.model.features])} for r in records]
        return json.dumps(out[0] if isinstance(data, dict) else out)
