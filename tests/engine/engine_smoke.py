"""A quick throughput figure for the engine alone: `python tests/engine/engine_smoke.py [device] [requests] [qp]`.

puyu-tiny, N requests of 128 random prompt tokens, 128 new tokens each (greedy, ignore_eos), all at once through
`puyu.pipeline`; prints output tokens/s and the engine stats. With PUYU_PROFILE=1 it drives `LLMEngine` in this
thread under torch.profiler instead and prints the top operators. Not a test (no `test_` prefix): the full comparison
with transformers is benchmarks/engine_throughput.py.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from puyu.config import EngineConfig, GenerationConfig


def _prompts(vocab: int, n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab - 8, (128,), generator=gen).tolist() for _ in range(n)]


def throughput(device: str, requests: int, quant_policy: int) -> None:
    import puyu

    pipe = puyu.pipeline(None, device=device, quant_policy=quant_policy, cache_max_entry_count=0.5)
    prompts = _prompts(pipe.engine.spec.vocab_size, requests)
    pipe(prompts[:2], GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    out = pipe(prompts, GenerationConfig(max_new_tokens=128, ignore_eos=True))
    elapsed = time.perf_counter() - start
    tokens = sum(r.generate_token_len for r in out)
    print(f"device={device} quant_policy={quant_policy} requests={requests}: {tokens} tokens in {elapsed:.2f} s "
          f"= {tokens / elapsed:.1f} out tok/s; stats={pipe.stats()}")
    pipe.close()


def profile_steps(device: str, requests: int, quant_policy: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from puyu.engine.llm_engine import LLMEngine

    engine = LLMEngine(None, EngineConfig(device=device, quant_policy=quant_policy, cache_max_entry_count=0.5))
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    for i, p in enumerate(_prompts(engine.spec.vocab_size, requests)):
        engine.add_request(str(i), p, cfg)
    while engine.scheduler.waiting:  # prefill outside the profile
        engine.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    start, steps = time.perf_counter(), 0
    with profile(activities=acts) as prof:
        while engine.has_work():
            engine.step()
            steps += 1
    print(f"{steps} decode steps, {(time.perf_counter() - start) / steps * 1000:.1f} ms per step (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    args = sys.argv[1:]
    run = profile_steps if os.environ.get("PUYU_PROFILE") else throughput
    run(args[0] if args else "cpu", int(args[1]) if len(args) > 1 else 64, int(args[2]) if len(args) > 2 else 0)
