"""Serving entry point: ``Main()`` loads ``./model.json``; ``predict`` scores one JSON record of features."""

from __future__ import annotations

import json
import math
from pathlib import Path


class Main:
    def __init__(self) -> None:
        path = Path("model.json")
        if not path.exists():
            raise FileNotFoundError("model.json not found: serve a version made by a training or full pipeline")
        self.model = json.loads(path.read_text())

    def predict(self, input: str) -> str:
        record = json.loads(input)
        m = self.model
        columns = zip(m["features"], m["weights"], m["means"], m["stds"], strict=True)
        z = sum(w * (float(record[f]) - mu) / s for f, w, mu, s in columns)
        probability = 1 / (1 + math.exp(-max(min(z + m["bias"], 30.0), -30.0)))
        return json.dumps({"probability": round(probability, 6)})
