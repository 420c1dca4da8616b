"""Serving metrics from request records, exactly as ../shared/spec/bench-metrics.md defines them (vLLM names).

Per request (successful requests only):
    ttft            = t(first content chunk) − t_send
    e2el            = t_last_token − t_send
    e2el_incl_queue = t_last_token − t_arrival
    client_queue    = t_send − t_arrival
    tpot            = (e2el − ttft) / (output_tokens − 1), only for output_tokens ≥ 2
    itl             = gaps between consecutive content chunks after the first (pooled over requests);
    itl_per_token   = each such gap / tokens in the later chunk (a chunk may carry several tokens)
Aggregates: see `FORMULAS`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from .records import RequestRecord
from .stats import DEFAULT_PERCENTILES, PERCENTILE_METHOD, describe, percentile_key

FORMULAS = [
    "ttft = t_first_content_chunk - t_send",
    "e2el = t_last_token - t_send;  e2el_incl_queue = t_last_token - t_arrival;  client_queue = t_send - t_arrival",
    "tpot = (e2el - ttft) / (output_tokens - 1), requests with output_tokens >= 2",
    "itl = gaps between consecutive chunks after the first, pooled;  itl_per_token = gap / tokens_in_chunk",
    "request_throughput = completed / duration;  input|output|total_token_throughput = tokens of completed / duration",
    "max_output_tokens_per_s = max over 1 s bins of output tokens streamed;  mean_concurrency = sum(e2el) / duration",
    "max_concurrent_requests = max number of requests between t_send and t_end at any instant",
    "request_goodput = completed requests meeting every SLO / duration (tpot SLO not applied below 2 tokens)",
    f"statistics: mean, population std, min, max; percentiles by {PERCENTILE_METHOD}",
]



# what each line of FORMULAS defines, so a report can show only the lines of the metrics it prints
FORMULA_TOPICS = ("ttft", "e2el", "tpot", "itl", "throughput", "peak", "concurrency", "goodput", "statistics")
SERVE_TOPICS = ("ttft", "e2el", "tpot", "itl", "throughput", "peak", "concurrency", "statistics")


def formulas_header(topics: Optional[Sequence[str]] = None) -> str:
    """The formulas block (`--show-formulas`): the lines of `topics` only (None: every line)."""
    lines = [f for f, topic in zip(FORMULAS, FORMULA_TOPICS) if topics is None or topic in topics]
    return "\n".join(["Formulas:"] + [f"  {f}" for f in lines])


SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "itl_per_token", "e2el", "e2el_incl_queue", "client_queue")


def request_metrics(r: RequestRecord) -> dict[str, Optional[float]]:
    """The per-request metrics in seconds (None where undefined: failed, no chunk, or fewer than 2 tokens)."""
    out: dict[str, Optional[float]] = {"ttft": None, "e2el": None, "e2el_incl_queue": None, "tpot": None,
                                       "client_queue": r.t_send - r.t_arrival}
    if not r.success or not r.chunks:
        return out
    ttft = r.chunks[0].t - r.t_send
    e2el = r.chunks[-1].t - r.t_send
    out.update(ttft=ttft, e2el=e2el, e2el_incl_queue=r.chunks[-1].t - r.t_arrival)
    if r.output_tokens >= 2:
        out["tpot"] = (e2el - ttft) / (r.output_tokens - 1)
    return out


def inter_chunk_gaps(r: RequestRecord) -> tuple[list[float], list[float]]:
    """(gaps, gaps per token) between consecutive chunks after the first; a 0-token chunk counts as 1 token."""
    gaps, per_token = [], []
    for prev, cur in zip(r.chunks, r.chunks[1:]):
        gap = cur.t - prev.t
        gaps.append(gap)
        per_token.append(gap / max(cur.tokens, 1))
    return gaps, per_token


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 0.5, 'tpot': 0.05} (seconds); errors name --goodput."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput: expected METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {name} needs a number of milliseconds, got {value!r}") from None
        if ms <= 0:
            raise ValueError(f"--goodput: {name} must be > 0 ms, got {value!r}")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(m: dict[str, Optional[float]], slos: dict[str, float]) -> bool:
    for name, limit in slos.items():
        value = m.get(name)
        if value is None and name == "tpot":  # fewer than 2 tokens: no tpot to hold against the SLO
            continue
        if value is None or value > limit:
            return False
    return True


def peak_output_rate(records: Sequence[RequestRecord], t0: float) -> float:
    """The largest number of output tokens streamed within one 1-second bin [t0 + k, t0 + k + 1)."""
    bins: dict[int, int] = {}
    for r in records:
        if not r.success:
            continue
        for c in r.chunks:
            k = int((c.t - t0) // 1.0)
            bins[k] = bins.get(k, 0) + c.tokens
    return float(max(bins.values(), default=0))


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Sweep over [t_send, t_end] intervals of all requests (ends sort before starts at the same instant)."""
    events = []
    for r in records:
        events.append((r.t_send, 1))
        events.append((max(r.t_end, r.t_send), -1))
    events.sort(key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def summarize(records: Sequence[RequestRecord], duration: float, t0: Optional[float] = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              goodput: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """All aggregates of one run. `duration` is the wall time of the measured part (first arrival to last end)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in records if r.success]
    per_req = [request_metrics(r) for r in ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    if t0 is None:
        t0 = min((r.t_arrival for r in records), default=0.0)
    e2els = [m["e2el"] for m in per_req if m["e2el"] is not None]
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "empty_outputs": sum(1 for r in ok if not r.generated_text),  # finished, but no visible text
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_output_rate(ok, t0),
        "mean_concurrency": sum(e2els) / duration,
        "max_concurrent_requests": peak_concurrency(records),
    }
    if goodput:
        good = sum(1 for m in per_req if meets_slos(m, goodput))
        out["request_goodput"] = good / duration
        out["goodput_slos_ms"] = {k: v * 1000.0 for k, v in goodput.items()}
    samples: dict[str, list[float]] = {name: [] for name in LATENCY_METRICS}
    for r, m in zip(ok, per_req):
        for name in ("ttft", "tpot", "e2el", "e2el_incl_queue"):
            value = m[name]
            if value is not None:
                samples[name].append(value)
        queue = m["client_queue"]
        if queue is not None:
            samples["client_queue"].append(queue)
        gaps, per_token = inter_chunk_gaps(r)
        samples["itl"].extend(gaps)
        samples["itl_per_token"].extend(per_token)
    for name, values in samples.items():
        stats = describe([v * 1000.0 for v in values], percentiles)
        for stat, value in stats.items():
            out[f"{stat}_{name}_ms"] = value
    out["percentiles"] = [float(p) for p in percentiles]
    out["percentile_keys"] = [percentile_key(p) for p in percentiles]
    return out
