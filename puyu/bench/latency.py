"""`puyu bench latency`: fixed-shape first-token and per-token latency over batch sizes (LMDeploy's former
profile_generation). Each shape runs `batch` closed-loop streams of `rounds` requests each, with token-exact
random prompts and `ignore_eos`, so every request has exactly input_len prompt and output_len generated tokens.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from puyu.config import EngineConfig

from .datasets import DatasetConfig, load_dataset
from .engine_bench import make_engine_sender, open_engine
from .environment import collect_environment
from .load import LoadConfig
from .points import NOT_SAVED
from .metrics import FORMULAS, formulas_header
from .plots import plot_against_load
from .report import write_json
from .runner import measure
from .stats import DEFAULT_PERCENTILES, percentile_key
from .tokenizer import load_tokenizer


@dataclass
class LatencyConfig:
    input_lens: Sequence[int] = (128,)
    output_lens: Sequence[int] = (128,)
    batches: Sequence[int] = (1, 8, 32)
    rounds: int = 3
    num_warmups: int = 1
    seed: int = 0
    percentiles: Sequence[float] = DEFAULT_PERCENTILES

    def validate(self) -> None:
        for name, option in (("input_lens", "--input-len"), ("output_lens", "--output-len"), ("batches", "--batch")):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{option}: values must be >= 1, got {list(values)}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")


def shape_row(batch: int, input_len: int, output_len: int, metrics: dict[str, Any],
              percentiles: Sequence[float]) -> dict[str, Any]:
    keys = ["mean"] + [percentile_key(p) for p in percentiles]
    row: dict[str, Any] = {"batch": batch, "input_len": input_len, "output_len": output_len,
                           "completed": metrics["completed"], "failed": metrics["failed"],
                           "output_throughput": metrics["output_throughput"],
                           "request_throughput": metrics["request_throughput"]}
    for name in ("ttft", "tpot", "e2el"):
        for k in keys:
            row[f"{k}_{name}_ms"] = metrics[f"{k}_{name}_ms"]
    return row


LATENCY_TOPICS = ("ttft", "e2el", "tpot", "throughput", "statistics")  # the metrics this table shows


def format_latency_table(rows: list[dict[str, Any]], percentiles: Sequence[float],
                         show_formulas: bool = False) -> str:
    p = percentile_key(max(percentiles))
    head = f"{'batch':>5} {'in':>5} {'out':>5} {'ok':>4} {'fail':>4} {'out tok/s':>10} " \
           f"{'TTFT mean':>10} {'TTFT ' + p:>10} {'TPOT mean':>10} {'TPOT ' + p:>10}  (ms)"
    lines = ([formulas_header(LATENCY_TOPICS)] if show_formulas else []) + [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['input_len']:>5} {r['output_len']:>5} {r['completed']:>4} {r['failed']:>4} "
                     f"{r['output_throughput']:>10.1f} {r['mean_ttft_ms']:>10.2f} {r[f'{p}_ttft_ms']:>10.2f} "
                     f"{r['mean_tpot_ms']:>10.2f} {r[f'{p}_tpot_ms']:>10.2f}")
    return "\n".join(lines)


def run_latency_bench(model: Optional[str], engine_cfg: EngineConfig, cfg: LatencyConfig,
                      result_dir: Optional[Path] = None, label: Optional[str] = None,
                      argv: Optional[list[str]] = None, echo: Callable[[str], None] = print,
                      progress: bool = True, show_formulas: bool = False) -> list[dict[str, Any]]:
    """Every shape in turn (a progress bar per shape on stderr with `progress`), then the table; the JSON and plot
    go to `result_dir` when given, else a line says nothing was saved."""
    cfg.validate()
    engine, path = open_engine(model, engine_cfg)
    rows = []
    shapes = list(itertools.product(cfg.input_lens, cfg.output_lens, cfg.batches))
    try:
        tokenizer = load_tokenizer(str(path))
        send = make_engine_sender(engine, tokenizer)
        for k, (input_len, output_len, batch) in enumerate(shapes, 1):
            samples = load_dataset(DatasetConfig("random", num_prompts=batch * cfg.rounds, input_len=input_len,
                                                 output_len=output_len, seed=cfg.seed), tokenizer)
            load = LoadConfig(request_rate=math.inf, max_concurrency=batch)
            desc = f"shape {k}/{len(shapes)}: batch {batch}, in {input_len}, out {output_len}"
            result = asyncio.run(measure(send, samples, load, cfg.num_warmups, cfg.percentiles, None, progress,
                                         desc))
            rows.append(shape_row(batch, input_len, output_len, result.metrics, cfg.percentiles))
    finally:
        engine.close()
    echo(format_latency_table(rows, cfg.percentiles, show_formulas))
    if not result_dir:
        echo(NOT_SAVED)
    if result_dir:
        label = label or f"latency-{path.name}"
        summary = {"backend": "puyu-engine", "model_path": str(path), "formulas": FORMULAS, "rows": rows,
                   "config": {"latency": dataclasses.asdict(cfg), "engine": dataclasses.asdict(engine_cfg)},
                   "environment": collect_environment(argv)}
        echo(f"wrote {write_json(result_dir / f'{label}.json', summary)}")
        if len(cfg.batches) > 1:
            series = {f"in{i}/out{o}": [r for r in rows if (r['input_len'], r['output_len']) == (i, o)]
                      for i, o in itertools.product(cfg.input_lens, cfg.output_lens)}
            plot = plot_against_load(series, "batch", result_dir / f"{label}.png",
                                     p_key=percentile_key(max(cfg.percentiles)))
            echo(f"wrote {plot}")
    return rows
