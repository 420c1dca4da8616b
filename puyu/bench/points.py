"""Shared by every benchmark kind: options (statistics, warm-up, sweep, output) and running the load points."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .load import LoadConfig
from .report import format_sweep_table, format_table
from .results import build_summary, write_run, write_sweep
from .runner import RunResult
from .stats import DEFAULT_PERCENTILES, percentile_key

NOT_SAVED = "results not saved: give --result-dir DIR to keep the summary JSON, per-request JSONL and plots"


@dataclass
class BenchOptions:
    """What every benchmark kind shares: statistics, warm-up, sweep and where results go."""

    num_warmups: int = 1
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    goodput: dict[str, float] = field(default_factory=dict)  # seconds
    sweep: Optional[tuple[str, list[float]]] = None
    result_dir: Optional[Path] = None
    label: Optional[str] = None
    plots: bool = True
    progress: bool = True
    save_text: bool = False
    show_formulas: bool = False

    def validate(self) -> None:
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")


def sweep_loads(load: LoadConfig, sweep: Optional[tuple[str, list[float]]]) -> list[tuple[str, LoadConfig]]:
    """[(label suffix, load config)] for each sweep point, or [('', load)] without a sweep."""
    if not sweep:
        return [("", load)]
    key, points = sweep
    if key == "concurrency":
        return [(f"-c{int(p)}", dataclasses.replace(load, max_concurrency=int(p))) for p in points]
    return [(f"-r{p:g}", dataclasses.replace(load, request_rate=p)) for p in points]


def run_points(run_one: Callable[[LoadConfig, str], RunResult], header: dict[str, Any], config: dict[str, Any],
               load: LoadConfig, opts: BenchOptions, default_label: str,
               argv: Optional[list[str]], echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run each load point, print its table, write its files; returns the summaries."""
    label = opts.label or default_label
    summaries = []
    for suffix, point in sweep_loads(load, opts.sweep):
        result = run_one(point, label + suffix)
        head = dict(header, request_rate=point.request_rate, burstiness=point.burstiness,
                    max_concurrency=point.max_concurrency, arrival=point.arrival)
        cfg = dict(config, load=dataclasses.asdict(point), options=_options_dict(opts))
        summary = build_summary(result, cfg, head, argv)
        echo(format_table(summary, title=f"{header.get('backend', 'bench')} {label + suffix}",
                          show_formulas=opts.show_formulas))
        if opts.result_dir:
            files = write_run(result, summary, opts.result_dir, label + suffix, opts.plots, opts.save_text)
            echo(f"wrote {files.summary}, {files.requests}" + (f", {files.cdf_plot}" if files.cdf_plot else ""))
        summaries.append(summary)
    if opts.sweep:
        x_key = "max_concurrency" if opts.sweep[0] == "concurrency" else "request_rate"
        echo(format_sweep_table(summaries, x_key, percentile_key(max(opts.percentiles))))
        if opts.result_dir:
            path, plot = write_sweep(summaries, x_key, opts.result_dir, label, opts.plots)
            echo(f"wrote {path}" + (f", {plot}" if plot else ""))
    if not opts.result_dir:
        echo(NOT_SAVED)
    return summaries


def _options_dict(opts: BenchOptions) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    d["result_dir"] = str(opts.result_dir) if opts.result_dir else None
    d["goodput_ms"] = {k: v * 1000.0 for k, v in opts.goodput.items()}
    d.pop("goodput")
    return d
