#!/usr/bin/env python3
"""Write a synthetic, learnable customer-churn dataset for the example ``churn`` ML package.

Standard library only, so it runs anywhere the project does::

    python examples/make_dataset.py DEST [--rows N] [--seed S] [--split NAME]

writes ``DEST/churn.csv`` (or ``DEST/churn_NAME.csv`` with ``--split``). The same seed always
gives the same file; use a different seed for an evaluation set drawn from the same
population, e.g. ``--seed 7`` to train and ``--seed 8`` to evaluate. The example DAGs score
every version on one such holdout, ``$AIRFLOW_HOME/aicenter-datasets/churn-holdout`` (seed 8):
keep it unchanged while the training data changes week by week, so that the versions stay
comparable (a promotion compares scores on the same evaluation data).

Columns (one customer per row):

============================  =================================================================
``tenure_months``             months as a customer, 1..72 (many new customers, a long tail)
``monthly_charges``           monthly bill in currency units, 18.25..120.00, two decimals
``support_calls``             support calls in the last quarter, 0..12
``contract_monthly``          1 for a month-to-month contract, 0 for a yearly one
``age``                       customer age in years, 18..85
``churned``                   the label: 1 if the customer left, 0 otherwise
============================  =================================================================

The label comes from a noisy logistic model of the features: short tenure, high charges,
many support calls and a month-to-month contract make churn likely, age matters a little.
A logistic regression on the five features reaches about 80-85% accuracy; the rest is noise
no model can learn.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from pathlib import Path

COLUMNS = ["tenure_months", "monthly_charges", "support_calls", "contract_monthly", "age", "churned"]
FEATURES = COLUMNS[:-1]
LABEL = COLUMNS[-1]


def _clip(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _poisson(rng: random.Random, lam: float) -> int:
    """Knuth's Poisson sampler: fine for the small rates used here."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def churn_probability(tenure_months: float, monthly_charges: float, support_calls: float,
                      contract_monthly: float, age: float, noise: float = 0.0) -> float:
    """The ground-truth model the labels are drawn from (``noise`` is added to the logit)."""
    logit = (
        -1.45
        - 0.10 * (tenure_months - 20.0)
        + 0.055 * (monthly_charges - 65.0)
        + 0.85 * (support_calls - 1.5)
        + 2.0 * contract_monthly
        - 0.03 * (age - 45.0)
        + noise
    )
    return 1.0 / (1.0 + math.exp(-logit))


def generate_rows(rows: int, seed: int) -> list[dict[str, int | float]]:
    """Draw ``rows`` customers; deterministic for a given ``seed``."""
    rng = random.Random(seed)
    out: list[dict[str, int | float]] = []
    for _ in range(rows):
        tenure = int(_clip(round(rng.expovariate(1 / 22)), 1, 72))
        # New customers are more often on month-to-month contracts.
        contract_monthly = int(rng.random() < (0.75 if tenure < 12 else 0.4))
        charges = round(_clip(rng.gauss(65.0, 24.0), 18.25, 120.0), 2)
        # Expensive plans generate a few more support calls.
        calls = min(12, _poisson(rng, 1.1 + (charges - 18.25) / 100.0))
        age = int(_clip(round(rng.gauss(45.0, 14.0)), 18, 85))
        p = churn_probability(tenure, charges, calls, contract_monthly, age, noise=rng.gauss(0.0, 0.9))
        out.append({
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_calls": calls,
            "contract_monthly": contract_monthly,
            "age": age,
            "churned": int(rng.random() < p),
        })
    return out


def make_churn_dataset(dest: Path, rows: int = 2000, seed: int = 7, split: str | None = None) -> Path:
    """Write the dataset as ``dest/churn.csv`` (``dest/churn_<split>.csv`` with ``split``).

    ``dest`` is a folder (a dataset in AI Center terms); it is created if needed. Returns the
    path of the CSV file written.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / (f"churn_{split}.csv" if split else "churn.csv")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(generate_rows(rows, seed))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic customer-churn CSV dataset (churn.csv).")
    parser.add_argument("dest", type=Path, help="folder to write churn.csv into (created if missing)")
    parser.add_argument("--rows", type=int, default=2000, help="number of customers (default 2000)")
    parser.add_argument("--seed", type=int, default=7, help="random seed; use another one for an evaluation set (default 7)")
    parser.add_argument("--split", default=None, help="write churn_SPLIT.csv instead of churn.csv")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    path = make_churn_dataset(args.dest, rows=args.rows, seed=args.seed, split=args.split)
    print(f"wrote {args.rows} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
