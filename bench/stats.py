"""Small statistics shared by the benchmarks."""

from __future__ import annotations

import math


def percentile(values, q: float):
    """The nearest-rank q-quantile of ``values`` (None when there are none)."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else None


def memory_mb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status in MB ("VmRSS", "VmHWM", "RssAnon", "RssFile"); NaN where absent."""
    found = dict.fromkeys(fields, float("nan"))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in found:
                    found[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found
