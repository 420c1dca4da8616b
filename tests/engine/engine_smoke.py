"""A quick throughput figure for the engine alone: `python tests/engine/engine_smoke.py [device] [requests]`.

puyu-tiny (or --model), N requests of 128 random prompt tokens, 128 new tokens each (greedy, ignore_eos), all at
once through `puyu.pipeline`; prints output tokens/s and the engine stats. Not a test (no `test_` prefix): the full
comparison with transformers is benchmarks/engine_throughput.py.
"""
from __future__ import annotations

import sys
import time

import torch


def main(device: str = "cpu", requests: int = 64, quant_policy: int = 0) -> None:
    import puyu
    from puyu.config import GenerationConfig

    pipe = puyu.pipeline(None, device=device, quant_policy=quant_policy, cache_max_entry_count=0.5)
    vocab = pipe.engine.spec.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab - 8, (128,), generator=gen).tolist() for _ in range(requests)]
    cfg = GenerationConfig(max_new_tokens=128, ignore_eos=True)
    pipe(prompts[:2], GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    out = pipe(prompts, cfg)
    elapsed = time.perf_counter() - start
    tokens = sum(r.generate_token_len for r in out)
    print(f"device={device} quant_policy={quant_policy} requests={requests}: {tokens} tokens in {elapsed:.2f} s "
          f"= {tokens / elapsed:.1f} out tok/s; stats={pipe.stats()}")
    pipe.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "cpu", int(args[1]) if len(args) > 1 else 64, int(args[2]) if len(args) > 2 else 0)
