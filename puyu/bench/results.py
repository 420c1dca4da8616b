"""Assemble a run's summary (vLLM keys + config + environment + formulas + errors) and write its files.

For a run labelled L in DIR: DIR/L.json (summary), DIR/L.requests.jsonl (one line per request, errors included),
DIR/L.cdf.png (TTFT and e2e latency CDFs). A sweep adds DIR/L.sweep.json and DIR/L.sweep.png.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .environment import collect_environment
from .metrics import FORMULAS
from .plots import plot_against_load, plot_latency_cdfs
from .report import error_summary, write_json, write_jsonl
from .runner import RunResult
from .stats import percentile_key


@dataclass
class RunFiles:
    summary: Path
    requests: Path
    cdf_plot: Optional[Path]


def build_summary(result: RunResult, config: dict[str, Any], header: dict[str, Any],
                  argv: Optional[list[str]] = None) -> dict[str, Any]:
    """`header` holds vLLM's descriptive keys (backend, model_id, num_prompts, request_rate, max_concurrency...)."""
    summary: dict[str, Any] = dict(header)
    summary.update(result.metrics)
    summary["errors"] = error_summary(result.records)
    summary["warmup_errors"] = result.warmup_failures
    summary["input_lens"] = [r.prompt_len for r in result.records]
    summary["output_lens"] = [r.output_tokens for r in result.records]
    summary["formulas"] = FORMULAS
    summary["config"] = config
    summary["environment"] = collect_environment(argv)
    return summary


def write_run(result: RunResult, summary: dict[str, Any], result_dir: Path, label: str, plots: bool = True,
              include_text: bool = False) -> RunFiles:
    result_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(summary=result_dir / f"{label}.json", requests=result_dir / f"{label}.requests.jsonl",
                     cdf_plot=(result_dir / f"{label}.cdf.png") if plots else None)
    write_json(files.summary, summary)
    write_jsonl(files.requests, result.records, include_text)
    if files.cdf_plot:
        plot_latency_cdfs({label: result.records}, files.cdf_plot, title=label)
    return files


def write_sweep(points: list[dict[str, Any]], x_key: str, result_dir: Path, label: str,
                plots: bool = True) -> tuple[Path, Optional[Path]]:
    """The summaries of a sweep (without per-request arrays) and the throughput / p99 plot against x_key."""
    slim = [{k: v for k, v in p.items() if k not in ("input_lens", "output_lens", "environment")} for p in points]
    env = points[0].get("environment") if points else None
    path = write_json(result_dir / f"{label}.sweep.json",
                      {"sweep": x_key, "formulas": FORMULAS, "points": slim, "environment": env})
    plot = None
    if plots and points:
        p_key = percentile_key(max(points[0].get("percentiles") or [99]))
        plot = plot_against_load({label: slim}, x_key, result_dir / f"{label}.sweep.png", p_key=p_key)
    return path, plot
