"""The three attention paths of a step agree with a plain reference, and whole-block reads equal slot reads.

Reference: for each sequence, its keys/values read slot by slot from the cache, GQA heads repeated, softmax
attention computed directly (no SDPA), causal over positions.
"""
from __future__ import annotations

import pytest
import torch

from puyu.engine import cpu_kernels
from puyu.engine.attention import AttentionBatch, DecodeBatch, PrefillChunk, PrefillGroup, paged_attention
from puyu.engine.kv_cache import KVCacheStorage, slots_for

HQ, HKV, D, BS = 6, 2, 8, 4


def _cache(quant_policy: int = 0) -> KVCacheStorage:
    cache = KVCacheStorage(1, 16, BS, HKV, D, torch.float32, "cpu", quant_policy)
    gen = torch.Generator().manual_seed(0)
    slots = torch.arange(cache.num_slots)
    k, v = (torch.randn(cache.num_slots, HKV, D, generator=gen) for _ in range(2))
    cache.write(0, k, v, slots)
    return cache


def _reference(q: torch.Tensor, cache: KVCacheStorage, ctx: torch.Tensor, start: int) -> torch.Tensor:
    """q `[n, Hq, D]` at positions start.. over context slots `ctx`."""
    k, v = cache.read(0, ctx)
    k, v = (t.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1) for t in (k, v))  # [Hq, L, D]
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / D ** 0.5  # [Hq, n, L]
    q_pos = start + torch.arange(q.shape[0])
    scores = scores.masked_fill(torch.arange(k.shape[1])[None, :] > q_pos[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_read_blocks_equals_slot_reads(quant_policy):
    cache = _cache(quant_policy)
    table = torch.tensor([[3, 7], [12, 0]])
    k, v = cache.read_blocks(0, table)
    for b, blocks in enumerate(table.tolist()):
        ks, vs = cache.read(0, slots_for(blocks, 0, 2 * BS, BS))
        assert torch.equal(k[b], ks) and torch.equal(v[b], vs)


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_mixed_step_matches_reference(kernels):
    """Two fresh prompts of length 5 (one group), a continued chunk, and two decodes of different lengths; the
    decodes through SDPA over gathered blocks (torch) and through puyu's cpu kernel on the block table (auto)."""
    if kernels == "auto" and not cpu_kernels.available():
        pytest.skip("no C compiler / AVX2 for puyu's cpu kernels")
    cache = _cache()
    tables = {"f0": [0, 1], "f1": [2, 3], "c": [4, 5, 6], "d0": [7, 8], "d1": [9, 10, 11]}
    # (name, start, n): rows follow in this order
    items = [("d0", 6, 1), ("f0", 0, 5), ("c", 3, 6), ("d1", 10, 1), ("f1", 0, 5)]
    rows, row = {}, 0
    for name, _, n in items:
        rows[name] = list(range(row, row + n))
        row += n
    q = torch.randn(row, HQ, D, generator=torch.Generator().manual_seed(1))
    slots = {name: slots_for(tables[name], 0, start + n, BS) for name, start, n in items}
    fresh_rows = rows["f0"] + rows["f1"]
    lens = torch.tensor([7, 11])
    batch = AttentionBatch(
        write_slots=torch.zeros(row, dtype=torch.int64),
        groups=[PrefillGroup(torch.tensor(fresh_rows), torch.cat([slots["f0"], slots["f1"]]), 2, 5)],
        prefills=[PrefillChunk(rows["c"][0], 6, 3, slots["c"])],
        decode=DecodeBatch(rows=torch.tensor(rows["d0"] + rows["d1"]),
                           block_table=torch.tensor([[7, 8, 0], [9, 10, 11]]),
                           mask=(torch.arange(3 * BS)[None, :] < lens[:, None])[:, None, None, :], lens=lens))
    out = paged_attention(0, q, cache, batch, kernels)
    for name, start, _ in items:
        r = torch.tensor(rows[name])
        expect = _reference(q[r], cache, slots[name], start)
        torch.testing.assert_close(out[r], expect, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
