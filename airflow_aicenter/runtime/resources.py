"""What a run used, and what it cost with the connection's ``prices`` (DESIGN "Progress, metrics and resources").

The user processes' figures come from the user supervisor (``supervisor.Usage``); the agent adds
the GPU seconds and the bytes it staged and uploaded, and, when the connection extra ``prices``
is set, the cost (docs/progress.md)::

    cost = cpu_seconds * cpu_hour / 3600 + gpu_seconds * gpu_hour / 3600
           + peak memory in GiB * wall hours * gib_hour
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from airflow_aicenter.errors import ConfigurationError

#: The prices a connection may name, per hour: a CPU second, a GPU second, a GiB of peak memory held.
PRICE_KEYS = ("cpu_hour", "gpu_hour", "gib_hour")
GIB = 1 << 30
_EXAMPLE = '{"cpu_hour": 0.04, "gpu_hour": 2.5, "gib_hour": 0.005}'


def prices_of(value: Any) -> dict[str, float] | None:
    """The connection extra ``prices`` checked: None when unset, else each price a number >= 0.

    A JSON object or its text; anything else is a configuration error that says what to give.
    """
    if value is None or value in ("", {}):
        return None
    given = value
    if isinstance(value, str):
        try:
            given = json.loads(value)
        except ValueError:
            given = None
    if not isinstance(given, Mapping):
        raise ConfigurationError(f"the connection extra prices={value!r} is not a JSON object; give prices per hour such as "
                                 f"{_EXAMPLE} (any of {', '.join(PRICE_KEYS)}), or remove it")
    unknown = sorted(str(k) for k in given if k not in PRICE_KEYS)
    if unknown:
        raise ConfigurationError(f"the connection extra prices names {', '.join(map(repr, unknown))}, which is not a price; "
                                 f"use {', '.join(PRICE_KEYS)} (per hour), e.g. {_EXAMPLE}")
    prices: dict[str, float] = {}
    for key, price in given.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
            raise ConfigurationError(f"the connection extra prices has {key}={price!r}; give a number >= 0 (a price per "
                                     f"hour), e.g. {_EXAMPLE}")
        prices[key] = float(price)
    return prices


def cost_of(resources: Mapping[str, Any], prices: Mapping[str, float]) -> dict[str, Any]:
    """The cost of a run's ``resources`` at ``prices`` (in the prices' currency), by part and in total."""
    wall = float(resources.get("wall_seconds") or 0)
    parts = {
        "cpu": float(resources.get("cpu_seconds") or 0) * prices.get("cpu_hour", 0.0) / 3600,
        "gpu": float(resources.get("gpu_seconds") or 0) * prices.get("gpu_hour", 0.0) / 3600,
        "memory": float(resources.get("peak_memory_bytes") or 0) / GIB * wall / 3600 * prices.get("gib_hour", 0.0),
    }
    return {**{k: round(v, 6) for k, v in parts.items()}, "total": round(sum(parts.values()), 6), "prices": dict(prices)}
