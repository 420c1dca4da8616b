"""puyu's OpenAI server against `transformers serve --continuous-batching`, same random InternLM2-shaped model.

Both servers get the same weights: puyu serves the InternLM2-layout checkpoint, transformers the Llama-layout twin
built with the same seed and shape (puyu.tiny draws identical tensors for both layouts). Both run on CPU in float32
with --threads torch threads and a 256-block KV cache, and are measured by the same client (`puyu bench serve`, chat
endpoint, streaming, greedy) at each concurrency with random token-exact prompts and forced output lengths (puyu:
`ignore_eos`; transformers: `generation_config` with `eos_token_id: -1`, since it rejects `ignore_eos`). Both servers
stay up and the levels are interleaved, so background load hits both alike.

    .venv/bin/python benchmarks/serve_vs_transformers.py --threads 1
    # writes benchmarks/results/serve_vs_transformers.{json,png}
    .venv/bin/python benchmarks/serve_vs_transformers.py --threads 2 --out-dir benchmarks/results/threads2

The main result uses 1 thread each: on these 2 shared cores, `transformers serve` keeps its event-loop thread busy
(~100% of a core, seen with top -H) while its model thread works, so with 2 torch threads its compute threads get
about one core and it runs 5x slower than with 1 (results/threads2 holds that run, for the record).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from puyu.bench.client import ClientConfig
from puyu.bench.compare import compare_table
from puyu.bench.datasets import DatasetConfig
from puyu.bench.environment import collect_environment
from puyu.bench.load import LoadConfig
from puyu.bench.metrics import FORMULAS
from puyu.bench.plots import plot_against_load
from puyu.bench.points import BenchOptions
from puyu.bench.report import read_json, write_json
from puyu.bench.serve_bench import run_serve_bench
from puyu.bench.server_proc import ServerProcess, free_port, offline_env
from puyu.tiny import TinyShape, build_checkpoint

SHAPE = TinyShape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408, max_position_embeddings=4096)
RATIO_KEYS = ("output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
              "p99_tpot_ms", "mean_e2el_ms")
SLIM_DROP = ("input_lens", "output_lens", "environment", "formulas", "config", "warmup_errors")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts-per-level", type=int, nargs="+", default=[8, 16, 64],
                   help="requests measured at each concurrency (same order)")
    p.add_argument("--input-len", type=int, default=64, help="user prompt tokens (the chat template adds ~16)")
    p.add_argument("--range-ratio", type=float, default=0.1,
                   help="vllm mode: prompt lengths in [L(1-r), L(1+r)]; outputs are exactly --output-len")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-blocks", type=int, default=256,
                   help="KV cache blocks of 64 tokens for both servers (by default both would take most of the RAM)")
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints, logs, per-request files (default tmp)")
    p.add_argument("--only", choices=("puyu", "transformers"), default=None)
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing result JSON")
    p.add_argument("--tiny", action="store_true", help="the tests' 2-layer shape instead (a smoke run)")
    return p.parse_args()


def model_shape(args: argparse.Namespace) -> TinyShape:
    """The benchmark shape, or the tests' tiny one with --tiny (a smoke run of the whole script)."""
    return TinyShape() if args.tiny else SHAPE


def count_params(shape: TinyShape, vocab: int) -> int:
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    attn = h * d * (shape.num_attention_heads * 2 + shape.num_key_value_heads * 2)
    layer = attn + 3 * h * i + 2 * h
    return shape.num_hidden_layers * layer + 2 * vocab * h + h


def server_commands(args: argparse.Namespace, work: Path) -> dict[str, tuple[list[str], Path, str, dict]]:
    """name -> (command, model dir, ready path, extra client options)."""
    shape = model_shape(args)
    internlm2 = build_checkpoint(work / "internlm2", "internlm2", torch.float32, shape, seed=args.seed, num_shards=2)
    llama = build_checkpoint(work / "llama", "llama", torch.float32, shape, seed=args.seed, num_shards=2)
    exe = Path(sys.executable).parent
    puyu_cmd = [sys.executable, "-m", "puyu.cli", "serve", str(internlm2), "--model-name", "internlm2-random",
                "--num-threads", str(args.threads), "--dtype", "float32", "--log-level", "warning",
                "--cache-block-seq-len", "64", "--cache-max-entry-count", str(args.kv_blocks)]
    tf_cmd = [str(exe / "transformers"), "serve", str(llama), "--continuous-batching", "--device", "cpu",
              "--dtype", "float32", "--host", "127.0.0.1", "--cb-block-size", "64",
              "--cb-num-blocks", str(args.kv_blocks)]
    tf_extra = {"generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})}
    return {"puyu": (puyu_cmd, internlm2, "/health", {"model": "internlm2-random", "ignore_eos": True}),
            "transformers": (tf_cmd, llama, "/health", {"model": str(llama), "ignore_eos": False,
                                                         "extra_body": tf_extra})}


def start_server(name: str, spec: tuple, args: argparse.Namespace, work: Path) -> ServerProcess:
    cmd, _, ready, _ = spec
    port = free_port()
    cmd = cmd + (["--server-port", str(port)] if name == "puyu" else ["--port", str(port)])
    server = ServerProcess(cmd, port, work / f"{name}.log", ready, offline_env(args.threads))
    server.startup_s = server.wait_ready()
    print(f"{name}: ready after {server.startup_s:.1f} s ({' '.join(cmd)})", flush=True)
    return server


def measure_level(name: str, spec: tuple, server: ServerProcess, conc: int, n: int,
                  args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One concurrency level against one (warm, otherwise idle) server."""
    _, model_dir, _, client_opts = spec
    client = ClientConfig(base_url=server.base_url, endpoint="chat", **client_opts)
    dataset = DatasetConfig("random", num_prompts=n, input_len=args.input_len, output_len=args.output_len,
                            range_ratio=args.range_ratio, output_range_ratio=0.0, seed=args.seed)
    opts = BenchOptions(num_warmups=args.num_warmups, result_dir=work / "runs", label=f"{name}-c{conc}",
                        plots=False, progress=False)
    summary = run_serve_bench(client, dataset, LoadConfig(max_concurrency=conc), opts, str(model_dir),
                              argv=sys.argv, fixed_output_len=args.output_len, echo=lambda s: None)[0]
    summary.update(server_startup_s=server.startup_s, server_command=" ".join(server.cmd),
                   load_average=os.getloadavg())
    print(f"{name} c={conc}: {summary['completed']}/{n} ok, {summary['output_throughput']:.1f} out tok/s, "
          f"mean TTFT {summary['mean_ttft_ms']:.1f} ms, mean TPOT {summary['mean_tpot_ms']:.1f} ms, "
          f"load {summary['load_average'][0]:.1f}", flush=True)
    return summary


def run_all(names: list[str], specs: dict, args: argparse.Namespace, work: Path) -> dict[str, list[dict]]:
    """Both servers stay up (idle ones use no CPU); the levels are interleaved, the order alternating per level,
    so that a change in the machine's background load hits both alike."""
    servers = {}
    try:
        for name in names:
            servers[name] = start_server(name, specs[name], args, work)
        results: dict[str, list[dict]] = {name: [] for name in names}
        for i, (conc, n) in enumerate(zip(args.concurrency, args.prompts_per_level)):
            for name in (names if i % 2 == 0 else names[::-1]):
                results[name].append(measure_level(name, specs[name], servers[name], conc, n, args, work))
        return results
    finally:
        for server in servers.values():
            server.stop()


def ratios(puyu: list[dict], tf: list[dict]) -> dict[str, dict[str, float]]:
    """puyu / transformers per concurrency (> 1 is better for throughputs, worse for latencies)."""
    out = {}
    for a, b in zip(puyu, tf):
        out[str(a["max_concurrency"])] = {k: (a[k] / b[k] if b.get(k) else math.nan) for k in RATIO_KEYS}
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    setup = result["setup"]
    load = setup["load_average_before"][0]
    title = (f"puyu serve vs transformers serve --continuous-batching (CPU, {setup['threads']} thread(s) each, "
             f"background load avg {load:.1f})")
    return plot_against_load(result["runs"], "max_concurrency", path, title=title)


def main() -> int:
    args = parse_args()
    json_path, png_path = args.out_dir / "serve_vs_transformers.json", args.out_dir / "serve_vs_transformers.png"
    if args.plot_only:
        print(f"wrote {plot(read_json(json_path), png_path)}")
        return 0
    if len(args.prompts_per_level) != len(args.concurrency):
        raise SystemExit("--prompts-per-level needs one value per --concurrency")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="puyu-serve-vs-tf-"))
    specs = server_commands(args, work)
    names = [args.only] if args.only else ["puyu", "transformers"]
    load_before = os.getloadavg()
    results = run_all(names, specs, args, work)
    slim = {name: [{k: v for k, v in p.items() if k not in SLIM_DROP} for p in pts] for name, pts in results.items()}
    vocab = json.loads((work / "internlm2" / "config.json").read_text())["vocab_size"]
    out = {
        "description": __doc__.strip().splitlines()[0],
        "setup": {"shape": model_shape(args).__dict__, "vocab_size": vocab,
                  "params": count_params(model_shape(args), vocab),
                  "dtype": "float32", "threads": args.threads, "kv_blocks_of_64_tokens": args.kv_blocks,
                  "concurrency": args.concurrency,
                  "prompts_per_level": args.prompts_per_level, "input_len": args.input_len,
                  "range_ratio": args.range_ratio, "range_mode": "vllm", "output_range_ratio": 0.0,
                  "output_len": args.output_len,
                  "endpoint": "chat", "num_warmups": args.num_warmups, "seed": args.seed,
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "formulas": FORMULAS,
        "runs": slim,
        "environment": collect_environment(sys.argv),
    }
    if len(names) == 2:
        out["ratios_puyu_over_transformers"] = ratios(results["puyu"], results["transformers"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_json(json_path, out)
    png = plot(out, png_path)
    runs = [(f"{n}@c{p['max_concurrency']}", p) for c in range(len(args.concurrency)) for n in names
            for p in [slim[n][c]]]
    if len(names) == 2:
        for c in range(len(args.concurrency)):  # transformers first: the ratio column is puyu / transformers
            print(compare_table(runs[2 * c:2 * c + 2][::-1]))
    print(f"wrote {path} and {png} (per-request files in {work / 'runs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
