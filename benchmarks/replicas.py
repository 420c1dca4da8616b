"""`puyu serve --replicas`: output tok/s with 1 vs 2 replicas, and prefix-aware vs round-robin routing (TTFT and
prefix-cache hit rate) on the shared-prefix dataset, measured by `puyu bench serve` (unchanged) against each setup.

Each setup is a fresh server (empty prefix caches) on the same cores: 1 replica with --threads threads, or 2
replicas with --threads/2 each, so the totals match. The hit rate is the servers' own (`/metrics`:
puyu_prefix_cache_hits / queries, admissions that reused at least one block), read after the run.

    .venv/bin/python benchmarks/replicas.py                 # writes benchmarks/results/replicas.json
    .venv/bin/python benchmarks/replicas.py --num-prompts 16 --out /tmp/r.json   # a short check
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from puyu.bench.server_proc import ServerProcess, free_port

SETUPS = [("1 replica", 1, "prefix"), ("2 replicas, prefix routing", 2, "prefix"),
          ("2 replicas, round-robin", 2, "round-robin")]
ENGINE = ["--cache-block-seq-len", "16", "--cache-max-entry-count", "512", "--session-len", "2048"]


def scrape(url: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(url + "/metrics", timeout=10).text, re.M)
    return float(m.group(1)) if m else 0.0


def run_setup(label: str, replicas: int, routing: str, args: argparse.Namespace, work: Path) -> dict:
    port = free_port()
    threads = max(1, args.threads // replicas)
    cmd = [sys.executable, "-m", "puyu.cli", "serve", args.model, "--replicas", str(replicas), "--routing", routing,
           "--replica-threads", str(threads), "--server-port", str(port), "--log-level", "warning", *ENGINE]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with ServerProcess(cmd, port, work / f"serve-{replicas}-{routing}.log", "/health", env=env) as server:
        server.wait_ready(600)
        while httpx.get(server.base_url + "/health", timeout=10).json()["replicas"]["up"] < replicas:
            time.sleep(0.5)
        out = work / f"{replicas}-{routing}"
        bench = [sys.executable, "-m", "puyu.cli", "bench", "serve", "--base-url", server.base_url,
                 "--model", "puyu-tiny" if args.model == "puyu-tiny" else Path(args.model).name,
                 "--tokenizer", args.model, "--dataset", "shared-prefix", "--num-prompts", str(args.num_prompts),
                 "--num-groups", str(args.num_groups), "--prefix-len", str(args.prefix_len),
                 "--output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
                 "--result-dir", str(out), "--label", "run", "--no-plots"]
        subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "run.json").read_text())
        time.sleep(1.5)  # the replicas post their counters twice a second
        queries = scrape(server.base_url, "puyu_prefix_cache_queries_total")
        hits = scrape(server.base_url, "puyu_prefix_cache_hits_total")
    return {"setup": label, "replicas": replicas, "routing": routing, "threads_per_replica": threads,
            "output_tok_s": round(summary["output_throughput"], 1), "mean_ttft_ms": round(summary["mean_ttft_ms"], 1),
            "p90_ttft_ms": round(summary["p90_ttft_ms"], 1), "completed": summary["completed"],
            "prefix_cache_hit_rate": round(hits / queries, 3) if queries else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="puyu-tiny")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split between the replicas)")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replicas.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, replicas, routing in SETUPS:
            rows.append(run_setup(label, replicas, routing, args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"workload": {k: v for k, v in vars(args).items() if k != "out"}, "cpu_count": os.cpu_count(),
                                    "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
