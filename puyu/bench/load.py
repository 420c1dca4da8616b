"""Load models: open-loop arrivals (Poisson, gamma with burstiness, constant; seeded) and a concurrency limit.

A request's `t_arrival` is when the arrival process releases it; `t_send` is when it gets past the concurrency limit.
Their difference is the client-side queue, reported instead of hidden.
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Sequence, TypeVar

ARRIVALS = ("poisson", "gamma", "constant")
T = TypeVar("T")


@dataclass
class LoadConfig:
    request_rate: float = math.inf  # requests/s; inf releases everything at once
    arrival: str = "poisson"
    burstiness: float = 1.0  # gamma shape; 1.0 is Poisson, < 1 burstier, > 1 more regular
    max_concurrency: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 or inf, got {self.request_rate}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"--arrival: must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")


def arrival_offsets(n: int, cfg: LoadConfig) -> list[float]:
    """Seconds from the start at which each of n requests arrives (the first at 0).

    Gaps have mean 1/rate: exponential (poisson), gamma(shape=burstiness, scale=1/(rate·burstiness)), or constant.
    """
    cfg.validate()
    if math.isinf(cfg.request_rate):
        return [0.0] * n
    rng = random.Random(cfg.seed)
    mean_gap = 1.0 / cfg.request_rate
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        if cfg.arrival == "constant":
            gap = mean_gap
        elif cfg.arrival == "poisson":
            gap = rng.expovariate(cfg.request_rate)
        else:
            gap = rng.gammavariate(cfg.burstiness, mean_gap / cfg.burstiness)
        t += gap
    return offsets


async def run_load(items: Sequence[T], send: Callable[[int, T, float], Awaitable[object]], cfg: LoadConfig,
                   on_done: Optional[Callable[[], None]] = None) -> list[object]:
    """Release items on the arrival schedule, at most `max_concurrency` in flight; returns send()'s results in order.

    `send(index, item, t_arrival)` is called once past the limit; it records t_send itself.
    """
    offsets = arrival_offsets(len(items), cfg)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    start = time.perf_counter()

    async def one(i: int) -> object:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t_arrival = time.perf_counter()
        try:
            if limit is None:
                return await send(i, items[i], t_arrival)
            async with limit:
                return await send(i, items[i], t_arrival)
        finally:
            if on_done:
                on_done()

    return list(await asyncio.gather(*(one(i) for i in range(len(items)))))


def parse_sweep(text: Optional[str]) -> Optional[tuple[str, list[float]]]:
    """'concurrency=1,4,16' or 'rate=1,2,inf' -> ('concurrency', [1, 4, 16]); errors name --sweep."""
    if not text:
        return None
    key, sep, values = text.partition("=")
    if not sep or key not in ("concurrency", "rate"):
        raise ValueError(f"--sweep: expected concurrency=1,4,16 or rate=1,2,inf, got {text!r}")
    try:
        points = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep: values must be numbers (or inf for rate), got {values!r}") from None
    if not points or any(p <= 0 for p in points):
        raise ValueError(f"--sweep: values must be > 0, got {values!r}")
    if key == "concurrency" and any(not p.is_integer() or math.isinf(p) for p in points):
        raise ValueError(f"--sweep: concurrency values must be integers, got {values!r}")
    return key, points
