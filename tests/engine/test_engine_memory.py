"""Cache sizing (absolute block counts, fractions of free memory), compute dtypes, and the pipeline's stream API."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import greedy, make_prompts
from puyu.config import EngineConfig
from puyu.convert.spec import read_model_spec
from puyu.engine.kv_cache import KVCacheStorage
from puyu.engine.memory import CPU_CACHE_CAP_BYTES, available_bytes, num_cache_blocks


def test_absolute_block_count_and_session_clamp(internlm2_checkpoint, make_pipeline):
    pipe = make_pipeline(internlm2_checkpoint, cache_max_entry_count=5, cache_block_seq_len=16)
    stats = pipe.stats()
    assert stats["blocks_total"] == 5 and stats["blocks_free"] == 5
    assert pipe.engine.session_len == 80  # 5 blocks of 16 tokens bound the session


def test_fraction_of_free_memory(internlm2_checkpoint):
    spec = read_model_spec(internlm2_checkpoint)
    cfg = EngineConfig(cache_max_entry_count=0.001, cache_block_seq_len=16, max_batch_size=10 ** 6)
    blocks = num_cache_blocks(cfg, spec, torch.float32, torch.device("cpu"), 2048)
    per_block = KVCacheStorage.bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                               torch.float32, 0)
    expect = min(available_bytes(torch.device("cpu")) * 0.001, CPU_CACHE_CAP_BYTES) // per_block
    assert blocks >= 1 and abs(blocks - expect) <= max(2, 0.2 * expect)  # free memory moves a little meanwhile
    # a fraction never asks for more than max_batch_size full sessions
    small = EngineConfig(cache_max_entry_count=0.5, cache_block_seq_len=16, max_batch_size=2)
    assert num_cache_blocks(small, spec, torch.float32, torch.device("cpu"), 2048) == 2 * 2048 // 16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_on_cpu(dtype, internlm2_checkpoint, make_pipeline):
    full = make_pipeline(internlm2_checkpoint)
    half = make_pipeline(internlm2_checkpoint, dtype=dtype)
    assert half.stats()["dtype"] == dtype
    prompts = make_prompts(full.engine.spec.vocab_size, (12, 30, 50), seed=4)
    ref = full(prompts, greedy(1, logprobs=20))
    got = half(prompts, greedy(1))
    for r, h in zip(ref, got):
        lp = r.logprobs[0]  # fp32 log-probabilities of the 20 best first tokens
        # half precision picks the fp32 best token, or one within rounding distance of it (a near tie)
        assert h.token_ids[0] in lp and lp[h.token_ids[0]] >= max(lp.values()) - 0.05


def test_stream_infer_deltas(internlm2_checkpoint, make_pipeline):
    pipe = make_pipeline(internlm2_checkpoint)
    prompts = make_prompts(pipe.engine.spec.vocab_size, (5, 9), seed=8)
    whole = pipe(prompts, greedy(6))
    got: dict[int, list[int]] = {0: [], 1: []}
    finished = []
    for delta in pipe.stream_infer(prompts, greedy(6)):
        got[delta.index].extend(delta.token_ids)
        if delta.finish_reason:
            finished.append(delta.index)
    assert sorted(finished) == [0, 1]
    assert [got[0], got[1]] == [r.token_ids for r in whole]


def test_dropped_async_stream_is_aborted(internlm2_checkpoint, make_pipeline):
    """Leaving `async for` without aclose(): the generator's finaliser aborts the request."""
    pipe = make_pipeline(internlm2_checkpoint)
    engine = pipe.engine

    async def run():
        n = 0
        async for _ in engine.generate([5, 6, 7], greedy(300)):
            n += 1
            if n == 2:
                break
        await asyncio.sleep(0)  # let the loop run the finaliser's aclose()

    asyncio.run(run())
    pipe([5, 6], greedy(2))  # commands run in order: the abort is done once this returns
    stats = pipe.stats()
    assert stats["running"] == 0 and stats["blocks_used"] == 0
