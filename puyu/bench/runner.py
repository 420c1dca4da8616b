"""One measured run: warm-up (excluded), then the load model over all samples with a progress bar.

The target is any async `send(sample, record)` that fills the record (HTTP client or in-process engine), so the
serving and the engine benchmark share the timing, queueing and metric code.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence

from .datasets import SampleRequest
from .load import LoadConfig, run_load
from .metrics import summarize
from .records import RequestRecord
from .stats import DEFAULT_PERCENTILES

Sender = Callable[[SampleRequest, RequestRecord], Awaitable[RequestRecord]]


@dataclass
class RunResult:
    metrics: dict[str, Any]
    records: list[RequestRecord]
    warmup_failures: list[str]


async def warm_up(send: Sender, samples: Sequence[SampleRequest], n: int) -> list[str]:
    """Send n requests one at a time (cycling over the samples); returns the errors of those that failed."""
    errors = []
    for i in range(n):
        s = samples[i % len(samples)]
        rec = RequestRecord(index=-1 - i, prompt_len=s.prompt_len, expected_output_len=s.output_len)
        rec.t_arrival = time.perf_counter()
        await send(s, rec)
        if not rec.success:
            errors.append(rec.error)
    return errors


async def measure(send: Sender, samples: Sequence[SampleRequest], load: LoadConfig, num_warmups: int = 1,
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES, goodput: Optional[dict[str, float]] = None,
                  progress: bool = True, desc: str = "bench") -> RunResult:
    warm_errors = await warm_up(send, samples, num_warmups) if num_warmups > 0 else []
    check_warmup(warm_errors, num_warmups)
    records = [RequestRecord(index=i, prompt_len=s.prompt_len, expected_output_len=s.output_len)
               for i, s in enumerate(samples)]
    bar = _progress_bar(len(samples), desc, progress)

    async def one(i: int, sample: SampleRequest, t_arrival: float) -> RequestRecord:
        records[i].t_arrival = t_arrival
        return await send(sample, records[i])

    t0 = time.perf_counter()
    await run_load(list(samples), one, load, on_done=bar.update if bar else None)
    duration = time.perf_counter() - t0  # first release to the last response
    if bar:
        bar.close()
    metrics = summarize(records, duration, t0, percentiles, goodput)
    return RunResult(metrics, records, warm_errors)


class BenchAborted(ValueError):
    """Every warm-up request was refused for a reason the measured run would share (a wrong model name, a bad
    key): the run stops with the server's message instead of measuring only failures. A ValueError, so the CLI
    prints it as one line."""


_REFUSAL = re.compile(r"HTTP (4\d\d): (.*)", re.DOTALL)
_TRANSIENT = {"408", "429"}  # timeouts and rate limits may pass: the run goes on


def check_warmup(errors: Sequence[str], num_warmups: int) -> None:
    """BenchAborted when all `num_warmups` (>= 1) warm-up requests failed with the same non-transient 4xx."""
    if num_warmups < 1 or len(errors) < num_warmups:
        return
    found = [_REFUSAL.search(e or "") for e in errors]
    refusals = [m for m in found if m is not None]
    if len(refusals) != len(found) or len({m.group(1) for m in refusals}) != 1 or refusals[0].group(1) in _TRANSIENT:
        return
    status, detail = refusals[0].group(1), _server_message(refusals[0].group(2))
    raise BenchAborted(f"every warm-up request was refused (HTTP {status}): {detail}; nothing measured "
                       f"(check --model, --base-url and --api-key)")


def _server_message(detail: str) -> str:
    """The `error.message` (OpenAI) or `detail` (FastAPI) of an error body, else the body itself."""
    try:
        body = json.loads(detail)
    except ValueError:
        return detail.strip()[:300]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("detail"):
            return str(body["detail"])[:300]
    return detail.strip()[:300]


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)
