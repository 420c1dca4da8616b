"""Command-line options shared by the `puyu bench` subcommands, and their conversion to typed configs."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .datasets import DATASETS, RANGE_MODES, DatasetConfig
from .load import ARRIVALS, LoadConfig, parse_sweep
from .metrics import parse_goodput
from .points import BenchOptions
from .stats import parse_percentiles


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS, default="random")
    g.add_argument("--dataset-path", help="local ShareGPT-format JSON or JSONL file (never downloaded)")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--input-len", type=int, default=128, help="random: prompt tokens; shared-prefix: question tokens")
    g.add_argument("--output-len", type=int, default=None,
                   help="output tokens (default 128; for sharegpt the reply's length unless given)")
    g.add_argument("--range-ratio", type=float, default=None,
                   help="length spread: vllm mode [L(1-r), L(1+r)] (default r=0), sglang mode [L*r, L] (default 1)")
    g.add_argument("--range-mode", choices=RANGE_MODES, default="vllm")
    g.add_argument("--output-range-ratio", type=float, default=None,
                   help="random: a different ratio for output lengths (0 = exactly --output-len)")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens of each shared prefix")
    g.add_argument("--num-groups", type=int, default=4, help="shared-prefix: number of distinct prefixes")
    g.add_argument("--seed", type=int, default=0)


def add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, or inf (all at once)")
    g.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--sweep", default=None, help="concurrency=1,4,16 or rate=1,2,inf")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:500 tpot:50")
    g.add_argument("--percentiles", default="50,90,95,99", help="comma-separated (linear interpolation)")
    g.add_argument("--num-warmups", type=int, default=1, help="requests sent first and excluded")
    g.add_argument("--result-dir", type=Path, default=None, help="write summary JSON, per-request JSONL and plots")
    g.add_argument("--label", default=None, help="file name stem of the results")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--save-text", action="store_true", help="keep generated texts in the JSONL")
    g.add_argument("--show-formulas", action="store_true", help="print how each reported metric is computed")


def dataset_config(args: argparse.Namespace) -> DatasetConfig:
    ratio = args.range_ratio
    if ratio is None:
        ratio = 0.0 if args.range_mode == "vllm" else 1.0
    cfg = DatasetConfig(name=args.dataset, path=args.dataset_path, num_prompts=args.num_prompts,
                        input_len=args.input_len, output_len=args.output_len or 128, range_ratio=ratio,
                        range_mode=args.range_mode, output_range_ratio=args.output_range_ratio,
                        seed=args.seed, prefix_len=args.prefix_len,
                        num_groups=args.num_groups)
    cfg.validate()
    return cfg


def load_config(args: argparse.Namespace) -> LoadConfig:
    cfg = LoadConfig(request_rate=args.request_rate, arrival=args.arrival, burstiness=args.burstiness,
                     max_concurrency=args.max_concurrency, seed=args.seed)
    cfg.validate()
    return cfg


def bench_options(args: argparse.Namespace) -> BenchOptions:
    opts = BenchOptions(num_warmups=args.num_warmups, percentiles=parse_percentiles(args.percentiles),
                        goodput=parse_goodput(args.goodput), sweep=parse_sweep(args.sweep),
                        result_dir=args.result_dir, label=args.label, plots=not args.no_plots,
                        progress=not args.no_progress, save_text=args.save_text,
                        show_formulas=args.show_formulas)
    opts.validate()
    return opts


def parse_extra_body(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--extra-body: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("--extra-body: must be a JSON object")
    return value
