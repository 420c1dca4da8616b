"""Metric code on hand-made timestamps: multi-token chunks, failed requests, goodput, percentiles."""
from __future__ import annotations

import math

import numpy as np
import pytest

from puyu.bench.client import rescale_chunk_tokens
from puyu.bench.metrics import (inter_chunk_gaps, parse_goodput, peak_concurrency, peak_output_rate,
                                request_metrics, summarize)
from puyu.bench.records import Chunk, RequestRecord
from puyu.bench.stats import describe, parse_percentiles, percentile


def rec(index, t_arrival, t_send, chunks, output_tokens, prompt_len=10, success=True, error="", t_end=None):
    chunk_objs = [Chunk(t, n) for t, n in chunks]
    end = t_end if t_end is not None else (chunk_objs[-1].t if chunk_objs else t_send)
    return RequestRecord(index=index, prompt_len=prompt_len, expected_output_len=output_tokens, t_arrival=t_arrival,
                         t_send=t_send, chunks=chunk_objs, t_end=end, output_tokens=output_tokens,
                         success=success, error=error)


@pytest.fixture
def records():
    return [
        # queued 0.5 s by the client; 5 tokens in three chunks, one of them carrying 3 tokens
        rec(0, 0.0, 0.5, [(1.0, 1), (1.2, 3), (1.5, 1)], 5, prompt_len=10),
        # no queue; 4 tokens in 4 chunks
        rec(1, 0.0, 0.0, [(0.2, 1), (0.4, 1), (0.6, 1), (0.8, 1)], 4, prompt_len=20),
        # a single token: no tpot
        rec(2, 1.0, 1.0, [(1.1, 1)], 1, prompt_len=30),
        # failed: never counted in latencies or tokens, but counted as failed and in concurrency
        rec(3, 0.0, 0.1, [], 0, prompt_len=40, success=False, error="HTTP 500: boom", t_end=0.3),
    ]


def test_request_metrics_follow_the_formulas(records):
    m = request_metrics(records[0])
    assert m["ttft"] == pytest.approx(0.5)
    assert m["e2el"] == pytest.approx(1.0)
    assert m["e2el_incl_queue"] == pytest.approx(1.5)
    assert m["client_queue"] == pytest.approx(0.5)
    assert m["tpot"] == pytest.approx((1.0 - 0.5) / (5 - 1))
    assert request_metrics(records[2])["tpot"] is None
    failed = request_metrics(records[3])
    assert failed["ttft"] is None and failed["e2el"] is None


def test_itl_is_per_chunk_and_per_token(records):
    gaps, per_token = inter_chunk_gaps(records[0])
    assert gaps == pytest.approx([0.2, 0.3])
    assert per_token == pytest.approx([0.2 / 3, 0.3])


def test_summary_aggregates(records):
    s = summarize(records, duration=2.0, t0=0.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["total_input_tokens"] == 60  # the failed request's 40 prompt tokens are not counted
    assert s["total_output_tokens"] == 10
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(5.0)
    assert s["input_throughput"] == pytest.approx(30.0)
    assert s["total_token_throughput"] == pytest.approx(35.0)
    assert s["mean_concurrency"] == pytest.approx((1.0 + 0.8 + 0.1) / 2.0)
    # ms; tpot only from requests with >= 2 tokens
    assert s["mean_ttft_ms"] == pytest.approx((500 + 200 + 100) / 3)
    assert s["mean_tpot_ms"] == pytest.approx((125 + 200) / 2)
    assert s["mean_itl_ms"] == pytest.approx(np.mean([200, 300, 200, 200, 200]))
    assert s["mean_itl_per_token_ms"] == pytest.approx(np.mean([200 / 3, 300, 200, 200, 200]))
    assert s["max_e2el_ms"] == pytest.approx(1000)
    assert s["mean_client_queue_ms"] == pytest.approx(500 / 3)
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile([500, 200, 100], 99))
    assert "request_goodput" not in s


def test_peak_output_rate_uses_one_second_bins(records):
    ok = [r for r in records if r.success]
    # bin [0,1): 1+1+1+1 (request 1); bin [1,2): 1+3+1 (request 0) + 1 (request 2)
    assert peak_output_rate(ok, t0=0.0) == 6
    # shifted bins: [0.5,1.5) holds 0.6, 0.8 (request 1), 1.0, 1.2 (request 0: 1+3), 1.1 (request 2)
    assert peak_output_rate(ok, t0=0.5) == 7


def test_peak_concurrency_counts_failed_requests(records):
    # intervals [t_send, t_end]: 0 [0.5, 1.5], 1 [0, 0.8], 2 [1.0, 1.1], 3 (failed) [0.1, 0.3]
    assert peak_concurrency(records) == 2
    assert peak_concurrency([records[1], records[3]]) == 2  # the failed request was in flight too
    assert peak_concurrency([records[1]]) == 1
    back_to_back = [rec(0, 0, 0, [(1, 1)], 1), rec(1, 1, 1, [(2, 1)], 1)]
    assert peak_concurrency(back_to_back) == 1  # one ends as the next starts


def test_goodput_counts_requests_meeting_every_slo(records):
    slos = parse_goodput(["ttft:300", "tpot:250"])
    assert slos == {"ttft": 0.3, "tpot": 0.25}
    s = summarize(records, duration=2.0, t0=0.0, goodput=slos)
    # request 0: ttft 500 ms fails; request 1: ttft 200, tpot 200 ok; request 2: ttft 100, no tpot -> ok
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    s = summarize(records, duration=2.0, t0=0.0, goodput=parse_goodput(["e2el:900"]))
    assert s["request_goodput"] == pytest.approx(2 / 2.0)  # 1000 ms fails, 800 and 100 pass


@pytest.mark.parametrize("bad", ["ttft", "foo:10", "ttft:x", "tpot:-1"])
def test_goodput_errors_name_the_option(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput([bad])


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0, 4.0], [5.0], [3.0, 1.0, 2.0, 10.0, 7.5, 0.1, 4.4]])
def test_percentiles_interpolate_linearly(values):
    for p in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)


def test_describe_and_percentile_keys():
    d = describe([1.0, 2.0, 3.0, 4.0], (50, 99.9))
    assert d["mean"] == 2.5 and d["min"] == 1.0 and d["max"] == 4.0
    assert d["std"] == pytest.approx(np.std([1, 2, 3, 4]))
    assert set(d) >= {"p50", "p99.9", "median"}
    assert parse_percentiles("50, 90,99.9") == (50.0, 90.0, 99.9)
    with pytest.raises(ValueError, match="--percentiles"):
        parse_percentiles("50,101")


def test_summary_of_only_failures_keeps_them():
    failed = [rec(i, 0.0, 0.0, [], 0, success=False, error="ConnectError", t_end=0.1) for i in range(3)]
    s = summarize(failed, duration=0.5, t0=0.0)
    assert (s["completed"], s["failed"]) == (0, 3)
    assert s["mean_ttft_ms"] == 0.0 and not math.isnan(s["p99_e2el_ms"])


def test_summary_rejects_zero_duration(records):
    with pytest.raises(ValueError, match="duration"):
        summarize(records, duration=0.0)


def test_rescaled_chunk_tokens_sum_to_the_server_count():
    chunks = [Chunk(0.0, n) for n in (9, 1, 5, 1)]  # tokenised deltas over-count (e.g. partial UTF-8)
    rescale_chunk_tokens(chunks, 8)
    assert sum(c.tokens for c in chunks) == 8 and min(c.tokens for c in chunks) >= 1
    assert chunks[0].tokens > chunks[1].tokens
    few = [Chunk(0.0, 2) for _ in range(3)]
    rescale_chunk_tokens(few, 2)
    assert [c.tokens for c in few] == [1, 1, 0]
