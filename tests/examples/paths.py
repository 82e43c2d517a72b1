"""Where the examples live in this checkout."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "examples" / "packages" / "churn"
