"""Small statistics shared by the benchmarks."""

from __future__ import annotations

import math


def percentile(values, q: float):
    """The nearest-rank q-quantile of ``values`` (None when there are none)."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else None
