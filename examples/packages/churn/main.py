"""Serving entry point of the ``churn`` ML package (AI Center contract: ``main.py`` / ``class Main``).

``Main()`` loads ``./model.json`` (written by ``train.py``'s ``save()``; the working directory
is the package root) and ``predict(input)`` scores customers.

Input (a JSON string): one record or a list of records holding the feature columns, e.g.
``{"tenure_months": 3, "monthly_charges": 95.5, "support_calls": 4, "contract_monthly": 1, "age": 31}``.
Extra keys (such as a customer id) are ignored.

Output (a JSON string, as AI Center expects): for each record
``{"churn_probability": 0.87, "churned": 1}``; one object for one record, a list for a list.
"""

from __future__ import annotations

import json
from typing import Any

from churn_model import MODEL_FILE, LogisticModel


class Main:
    def __init__(self) -> None:
        if not MODEL_FILE.exists():
            raise FileNotFoundError(
                f"{MODEL_FILE} not found in {MODEL_FILE.resolve().parent}: this package version has not been "
                "trained yet; serve a version made by a training or full pipeline"
            )
        self.model = LogisticModel.load(MODEL_FILE)

    def predict(self, input: str | bytes) -> str:
        data: Any = json.loads(input) if isinstance(input, (str, bytes, bytearray)) else input
        single = isinstance(data, dict)
        records = [data] if single else data
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("input must be a JSON object (one customer) or a list of objects")
        results = []
        for i, record in enumerate(records):
            probability, label = self.model.predict_record(record, where="record" if single else f"record {i}")
            results.append({"churn_probability": round(probability, 6), "churned": label})
        return json.dumps(results[0] if single else results)
