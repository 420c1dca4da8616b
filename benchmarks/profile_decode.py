"""Where one engine step spends its time: the default model (or MODEL), B requests decoding together.

Runs the engine in-process (`LLMEngine.step`, no server), admits B requests of `--input-len` random tokens, lets
them prefill, then times `--steps` decode steps and splits each into scheduler, model runner (tensor building +
forward), sampler and output bookkeeping. `--profile` adds a `torch.profiler` table of one decode step.

    .venv/bin/python benchmarks/profile_decode.py --batch 1,8,32 --dtype bfloat16
    .venv/bin/python benchmarks/profile_decode.py --batch 1 --profile            # packed Q4_1 weights (the default)
Writes benchmarks/results/profile_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def _engine(model: Optional[str], dtype: str, batch: int, threads: int) -> Any:
    from puyu.config import EngineConfig
    from puyu.engine.llm_engine import LLMEngine

    config = EngineConfig(dtype=dtype, max_batch_size=batch, cache_max_entry_count=max(4 * batch, 16),
                          num_threads=threads, enable_prefix_caching=False, session_len=512)
    return LLMEngine(model, config)


def _add_requests(engine: Any, batch: int, input_len: int, output_len: int, tag: str) -> None:
    from puyu.config import GenerationConfig

    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(100, engine.spec.vocab_size - 100, (input_len,), generator=gen).tolist()
        engine.add_request(f"{tag}-{i}", ids, GenerationConfig(max_new_tokens=output_len, ignore_eos=True))


def _timed_step(engine: Any) -> dict[str, float]:
    """One `LLMEngine.step`, its phases timed by wrapping the runner and the sampler for the call."""
    import puyu.engine.llm_engine as le

    times: dict[str, float] = {"runner": 0.0, "sample": 0.0}
    run, sample = engine.runner.run, le.sample

    def timed(name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times[name] += time.perf_counter() - t
        return call

    engine.runner.run, le.sample = timed("runner", run), timed("sample", sample)
    try:
        t0 = time.perf_counter()
        engine.step()
        times["step"] = time.perf_counter() - t0
    finally:
        engine.runner.run, le.sample = run, sample
    times["other"] = times["step"] - times["runner"] - times["sample"]
    return times


def measure(engine: Any, batch: int, input_len: int, steps: int, profile: bool) -> dict[str, Any]:
    _add_requests(engine, batch, input_len, steps + 8, f"b{batch}")
    while any(r.seq.num_computed < len(r.seq.prompt_ids) for r in engine.requests.values()):
        engine.step()
    for _ in range(3):  # warm-up decode steps
        engine.step()
    rows = [_timed_step(engine) for _ in range(steps)]
    table = None
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        print(table)
    while engine.has_work():
        engine.step()
    mean = {k: sum(r[k] for r in rows) / len(rows) * 1e3 for k in rows[0]}
    return {"batch": batch, "ms": mean, "tok_per_s": batch / (mean["step"] / 1e3), "profile": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_decode.json"))
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    engine = _engine(args.model, args.dtype, max(batches), args.threads)
    results = [measure(engine, b, args.input_len, args.steps, args.profile) for b in batches]
    print(f"model {engine.model_name} dtype {engine.dtype} load {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} {'step ms':>8} {'runner':>8} {'sample':>8} {'other':>8} {'tok/s':>8}")
    for r in results:
        m = r["ms"]
        print(f"{r['batch']:>5} {m['step']:8.2f} {m['runner']:8.2f} {m['sample']:8.2f} {m['other']:8.2f} "
              f"{r['tok_per_s']:8.1f}")
    out = {"model": engine.model_name, "dtype": str(engine.dtype), "loadavg": os.getloadavg(), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
