"""Summary statistics of a sample: mean, population std, min, max and linearly interpolated percentiles."""
from __future__ import annotations

import math
from typing import Sequence

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
PERCENTILE_METHOD = "linear interpolation between closest ranks (numpy 'linear', Hyndman-Fan type 7)"


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile, linearly interpolated: h = (n-1)p/100, x[⌊h⌋] + frac(h)·(x[⌊h⌋+1] - x[⌊h⌋])."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return float("nan")
    xs = sorted(values)
    h = (len(xs) - 1) * p / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def percentile_key(p: float) -> str:
    """vLLM's key spelling: 'p99', 'p99.9'."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def describe(values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """mean, median, std (population), min, max and each percentile; NaN-free zeros for an empty sample."""
    n = len(values)
    if n == 0:
        out = {"mean": 0.0, "median": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
        out.update({percentile_key(p): 0.0 for p in percentiles})
        return out
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    out = {"mean": mean, "median": percentile(values, 50), "std": std, "min": min(values), "max": max(values)}
    out.update({percentile_key(p): percentile(values, p) for p in percentiles})
    return out


def parse_percentiles(text: str) -> tuple[float, ...]:
    """'50,90,99' -> (50.0, 90.0, 99.0); raises ValueError naming --percentiles."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--percentiles: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ValueError(f"--percentiles: each value must be in [0, 100], got {text!r}")
    return values
