"""Load models: seeded arrival processes with the right mean and spread, the concurrency limit, sweeps."""
from __future__ import annotations

import asyncio
import math
import statistics

import pytest

from puyu.bench.load import LoadConfig, arrival_offsets, parse_sweep, run_load


def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_infinite_rate_releases_everything_at_once():
    assert arrival_offsets(5, LoadConfig()) == [0.0] * 5


def test_constant_arrivals():
    assert arrival_offsets(4, LoadConfig(request_rate=4.0, arrival="constant")) == pytest.approx([0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("arrival,burstiness,cv2", [("poisson", 1.0, 1.0), ("gamma", 0.25, 4.0), ("gamma", 4.0, 0.25)])
def test_random_arrivals_have_mean_gap_one_over_rate(arrival, burstiness, cv2):
    cfg = LoadConfig(request_rate=10.0, arrival=arrival, burstiness=burstiness, seed=7)
    g = gaps(arrival_offsets(20001, cfg))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.1, rel=0.05)
    # squared coefficient of variation of gamma(k) gaps is 1/k (Poisson: 1)
    assert statistics.pvariance(g) / mean ** 2 == pytest.approx(cv2, rel=0.15)
    assert arrival_offsets(50, cfg) == arrival_offsets(50, cfg)
    assert arrival_offsets(50, cfg) != arrival_offsets(50, LoadConfig(request_rate=10.0, arrival=arrival,
                                                                      burstiness=burstiness, seed=8))


@pytest.mark.parametrize("kwargs,option", [({"request_rate": 0}, "--request-rate"), ({"arrival": "zipf"}, "--arrival"),
                                          ({"burstiness": 0}, "--burstiness"),
                                          ({"max_concurrency": 0}, "--max-concurrency")])
def test_bad_load_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        LoadConfig(**kwargs).validate()


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_is_respected_and_reached(limit):
    in_flight, peak, done = 0, 0, []

    async def send(i, item, t_arrival):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return item * 2

    results = asyncio.run(run_load(list(range(10)), send, LoadConfig(max_concurrency=limit),
                                   on_done=lambda: done.append(1)))
    assert results == [i * 2 for i in range(10)]
    assert peak == limit and len(done) == 10


def test_sweep_parsing():
    assert parse_sweep("concurrency=1,4,16") == ("concurrency", [1.0, 4.0, 16.0])
    key, points = parse_sweep("rate=0.5,2,inf")
    assert key == "rate" and points[:2] == [0.5, 2.0] and math.isinf(points[2])
    assert parse_sweep(None) is None
    for bad in ("batch=1,2", "concurrency=1.5", "rate=a", "concurrency=0"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_sweep(bad)
