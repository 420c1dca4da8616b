"""Results on disk and on the console: summary JSON, per-request JSONL, and a table headed by the formulas."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .metrics import SERVE_TOPICS, formulas_header
from .records import RequestRecord
from .stats import percentile_key

TABLE_METRICS = (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                 ("itl", "Inter-chunk latency"), ("itl_per_token", "Inter-token latency (per token)"),
                 ("e2el", "End-to-end latency"), ("client_queue", "Client-side queue"))


def error_summary(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Each distinct error message with how many requests failed with it (the full list is in the JSONL)."""
    counts = Counter(r.error for r in records if not r.success)
    return [{"error": e, "count": n} for e, n in counts.most_common()]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")
    return path


def write_jsonl(path: Path, records: Sequence[RequestRecord], include_text: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_json_safe(r.to_json(include_text)), ensure_ascii=False) + "\n")
    return path


def read_json(path: Path | str, option: str = "") -> Any:
    """Parsed JSON; errors name the file (and the option it came from, e.g. '--dataset-path')."""
    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None


def format_table(summary: dict[str, Any], title: str = "Serving Benchmark Result",
                 show_formulas: bool = False) -> str:
    """A vLLM-style console table; with `show_formulas`, headed by the formulas of the metrics it shows."""
    topics = SERVE_TOPICS + (("goodput",) if "request_goodput" in summary else ())
    lines = [formulas_header(topics)] if show_formulas else []
    width = 60
    lines.append(f"{' ' + title + ' ':=^{width}}")

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", summary["completed"])
    row("Failed requests:", summary["failed"])
    if summary.get("empty_outputs"):
        row("Successful requests with empty output:", summary["empty_outputs"])
    if summary.get("max_concurrency"):
        row("Maximum request concurrency:", summary["max_concurrency"])
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    if "request_goodput" in summary:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Peak output token throughput (tok/s):", summary["max_output_tokens_per_s"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    row("Mean concurrency:", summary["mean_concurrency"])
    row("Peak concurrent requests:", summary["max_concurrent_requests"])
    for key, label in TABLE_METRICS:
        lines.append(f"{' ' + label + ' ':-^{width}}")
        row(f"Mean {key.upper()} (ms):", summary[f"mean_{key}_ms"])
        row(f"Std {key.upper()} (ms):", summary[f"std_{key}_ms"])
        for p in summary.get("percentiles", [50, 99]):
            row(f"P{p:g} {key.upper()} (ms):", summary[f"{percentile_key(p)}_{key}_ms"])
    lines.append("=" * width)
    for err in summary.get("errors", [])[:5]:
        lines.append(f"error x{err['count']}: {err['error'][:200]}")
    return "\n".join(lines)


def format_sweep_table(summaries: Sequence[dict[str, Any]], x_key: str, p: str = "p99") -> str:
    """One line per sweep point: what changed, throughput, and TTFT / TPOT (mean and the highest percentile)."""
    name = {"max_concurrency": "concurrency", "request_rate": "rate"}.get(x_key, x_key)
    head = (f"{name:>11} {'ok':>5} {'fail':>5} {'out tok/s':>10} {'TTFT mean':>10} {'TTFT ' + p:>10} "
            f"{'TPOT mean':>10} {'TPOT ' + p:>10}  (ms)")
    lines = ["Sweep summary", head, "-" * len(head)]
    for s in summaries:
        x = s.get(x_key)
        x_text = f"{x:g}" if isinstance(x, (int, float)) else str(x)
        lines.append(f"{x_text:>11} {s['completed']:>5} {s['failed']:>5} {s['output_throughput']:>10.1f} "
                     f"{s['mean_ttft_ms']:>10.2f} {s[f'{p}_ttft_ms']:>10.2f} {s['mean_tpot_ms']:>10.2f} "
                     f"{s[f'{p}_tpot_ms']:>10.2f}")
    return "\n".join(lines)
