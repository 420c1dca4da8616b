"""`puyu bench serve|engine|latency|compare`: argument parsing only; the work is in the library modules."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import (add_dataset_args, add_load_args, add_output_args, bench_options, dataset_config, load_config,
                   parse_extra_body)


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark a server, the engine, or fixed-shape latency")
    sub = bench.add_subparsers(dest="bench_command", metavar="KIND")
    bench.set_defaults(func=lambda args: (bench.print_help(), 0)[1])
    _register_serve(sub)
    _register_engine(sub)
    _register_latency(sub)
    _register_compare(sub)


def _register_serve(sub) -> None:
    p = sub.add_parser("serve", help="benchmark any OpenAI-compatible server (streaming)",
                       description="Benchmark an OpenAI-compatible endpoint (puyu, LMDeploy, vLLM, SGLang, "
                                   "llama.cpp, transformers serve); nothing server-specific is sent.")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:23333 (with or without /v1)")
    p.add_argument("--model", required=True, help="model name sent in requests")
    p.add_argument("--tokenizer", default=None, help="local dir or model name for token counting (default: the "
                                                      "server's /tokenize, else --model when it is on disk)")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--api-key", default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers that reject it)")
    p.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    add_dataset_args(p)
    add_load_args(p)
    add_output_args(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .client import ClientConfig
    from .serve_bench import run_serve_bench

    client = ClientConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint, api_key=args.api_key,
                          ignore_eos=not args.no_ignore_eos, include_usage=not args.no_usage,
                          temperature=args.temperature, extra_body=parse_extra_body(args.extra_body))
    summaries = run_serve_bench(client, dataset_config(args), load_config(args), bench_options(args),
                                args.tokenizer, argv=["puyu", *sys.argv[1:]],
                                fixed_output_len=args.output_len)
    return 0 if all(s["completed"] > 0 for s in summaries) else 1


def _register_engine(sub) -> None:
    p = sub.add_parser("engine", help="benchmark the engine in-process (no HTTP), like profile_throughput")
    p.add_argument("model", nargs="?", default=None, help="model dir or name (default puyu-tiny)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (closed loop)")
    _add_engine_args(p)
    add_dataset_args(p)
    add_load_args(p)
    add_output_args(p)
    p.set_defaults(func=_engine)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine options of `puyu serve` (defaults: EngineConfig's), and the earlier spelling of
    --no-enable-prefix-caching."""
    from ..serve.options import add_engine_options

    add_engine_options(p)
    p.add_argument("--disable-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help=argparse.SUPPRESS)


def _engine(args: argparse.Namespace) -> int:
    from ..serve.options import engine_config_from_args
    from .engine_bench import run_engine_bench

    if args.concurrency is not None:
        args.max_concurrency = args.concurrency
    summaries = run_engine_bench(args.model, engine_config_from_args(args), dataset_config(args), load_config(args),
                                 bench_options(args), argv=["puyu", *sys.argv[1:]], fixed_output_len=args.output_len)
    return 0 if all(s["completed"] > 0 for s in summaries) else 1


def _register_latency(sub) -> None:
    p = sub.add_parser("latency", help="fixed-shape first-token and per-token latency over batch sizes")
    p.add_argument("model", nargs="?", default=None, help="model dir or name (default puyu-tiny)")
    p.add_argument("--input-len", type=int, nargs="+", default=[128])
    p.add_argument("--output-len", type=int, nargs="+", default=[128])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per shape")
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--percentiles", default="50,90,95,99")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", type=Path, default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--show-formulas", action="store_true", help="print how each reported metric is computed")
    _add_engine_args(p)
    p.set_defaults(func=_latency)


def _latency(args: argparse.Namespace) -> int:
    from ..serve.options import engine_config_from_args
    from .latency import LatencyConfig, run_latency_bench
    from .stats import parse_percentiles

    cfg = LatencyConfig(input_lens=args.input_len, output_lens=args.output_len, batches=args.batch,
                        rounds=args.rounds, num_warmups=args.num_warmups, seed=args.seed,
                        percentiles=parse_percentiles(args.percentiles))
    run_latency_bench(args.model, engine_config_from_args(args), cfg, args.result_dir, args.label,
                      argv=["puyu", *sys.argv[1:]], progress=not args.no_progress, show_formulas=args.show_formulas)
    return 0


def _register_compare(sub) -> None:
    p = sub.add_parser("compare", help="side-by-side table and ratios of result JSON files")
    p.add_argument("results", nargs="+", type=Path, help="summary or sweep JSON files (the first is the baseline)")
    p.add_argument("--plot", type=Path, default=None, help="write a bar chart PNG here")
    p.add_argument("--show-formulas", action="store_true", help="print how each compared metric is computed")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_table, load_summaries
    from .plots import plot_compare
    from .metrics import formulas_header

    runs = load_summaries(args.results)
    if args.show_formulas:
        print(formulas_header(("ttft", "e2el", "tpot", "throughput", "statistics")))
    print(compare_table(runs))
    if args.plot:
        print(f"wrote {plot_compare(runs, args.plot)}")
    return 0
