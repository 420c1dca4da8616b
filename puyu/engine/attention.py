"""Paged attention over the KV cache for one flattened step (prefill chunks and decode tokens together).

The step's tokens are flattened into one `[T, ...]` batch for the matmuls; attention runs in three groups, each
described once per step by the model runner (index tensors are built per step, never per layer):
- fresh prompts (nothing cached yet) of equal length: one causal batch;
- other prefill chunks (continuing a cached context): one call each, with a position mask;
- single-token (decode) sequences: one padded batch, gathered from the cache by whole blocks.
K/V are always read back from the cache (dequantised), so every path sees what the cache stores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCacheStorage


@dataclass
class PrefillGroup:
    """`num_seqs` fresh prompts (start position 0) of `q_len` tokens each, attended as one causal batch."""

    rows: torch.Tensor  # int64 [num_seqs * q_len]: their rows in the flattened step, sequence by sequence
    ctx_slots: torch.Tensor  # int64 [num_seqs * q_len]: their cache slots, in the same order
    num_seqs: int
    q_len: int


@dataclass
class PrefillChunk:
    """A chunk that continues a context already in the cache (chunked prefill, prefix-cache hit, recompute)."""

    q_start: int  # first row of this chunk in the flattened step
    q_len: int
    start_pos: int  # position of the chunk's first token (= tokens already in the cache)
    ctx_slots: torch.Tensor  # int64 [start_pos + q_len]: slots of the whole context


@dataclass
class DecodeBatch:
    rows: torch.Tensor  # int64 [B]: rows of the decode tokens in the flattened step
    block_table: torch.Tensor  # int64 [B, nb]: the blocks of each context (padding points at block 0)
    mask: torch.Tensor  # bool [B, 1, 1, nb * block_size]: True where a key is real
    lens: torch.Tensor  # int64 [B]: keys of each context (the step's own token included)


@dataclass
class AttentionBatch:
    write_slots: torch.Tensor  # int64 [T]: where the step's k/v go
    groups: list[PrefillGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode: Optional[DecodeBatch] = None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          causal: bool) -> torch.Tensor:
    """q `[..., Hq, n, D]`, k/v `[..., Hkv, L, D]`; GQA maps q head h onto kv head h // (Hq / Hkv)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def _fresh_groups(layer: int, q: torch.Tensor, out: torch.Tensor, cache: KVCacheStorage,
                  groups: list[PrefillGroup]) -> None:
    for g in groups:
        k, v = cache.read(layer, g.ctx_slots)  # [n * L, Hkv, D]
        shape = (g.num_seqs, g.q_len)
        qg = q.index_select(0, g.rows).unflatten(0, shape).transpose(1, 2)  # [n, Hq, L, D]
        o = _sdpa(qg, k.unflatten(0, shape).transpose(1, 2), v.unflatten(0, shape).transpose(1, 2), None, True)
        out.index_copy_(0, g.rows, o.transpose(1, 2).flatten(0, 1))


def _continued_chunks(layer: int, q: torch.Tensor, out: torch.Tensor, cache: KVCacheStorage,
                      chunks: list[PrefillChunk]) -> None:
    for chunk in chunks:
        k, v = cache.read(layer, chunk.ctx_slots)  # [L, Hkv, D]
        qc = q[chunk.q_start:chunk.q_start + chunk.q_len].transpose(0, 1)  # [Hq, n, D]
        key_pos = torch.arange(k.shape[0], device=q.device)
        q_pos = chunk.start_pos + torch.arange(chunk.q_len, device=q.device)
        mask = key_pos[None, :] <= q_pos[:, None]
        o = _sdpa(qc, k.transpose(0, 1), v.transpose(0, 1), mask, causal=False)
        out[chunk.q_start:chunk.q_start + chunk.q_len] = o.transpose(0, 1)


def _decode_native(layer: int, q: torch.Tensor, out: torch.Tensor, cache: KVCacheStorage, d: DecodeBatch) -> bool:
    """puyu's cpu kernel reading the block table in place; False when it does not take this cache."""
    from . import cpu_kernels

    if cache.quant_policy or not cpu_kernels.decode_attention_supports(q, cache.k_data):
        return False
    every_row = d.rows.numel() == q.shape[0]  # a pure decode step: rows are 0..T-1 in order (model_runner)
    o = cpu_kernels.decode_attention(q if every_row else q.index_select(0, d.rows), cache.k_data[layer],
                                     cache.v_data[layer], d.block_table, d.lens)
    if every_row:
        out.copy_(o)
    else:
        out.index_copy_(0, d.rows, o)
    return True


def _decode(layer: int, q: torch.Tensor, out: torch.Tensor, cache: KVCacheStorage, d: DecodeBatch) -> None:
    """One query per sequence: the query heads sharing a kv head become that head's query rows, so GQA needs no
    copy of k/v (all rows of a sequence see the same keys, there is no causal order among them)."""
    k, v = cache.read_blocks(layer, d.block_table)  # [B, L, Hkv, D]
    b, hkv = k.shape[0], k.shape[2]
    qd = q.index_select(0, d.rows).unflatten(1, (hkv, -1))  # [B, Hkv, Hq / Hkv, D]
    o = F.scaled_dot_product_attention(qd, k.transpose(1, 2), v.transpose(1, 2), attn_mask=d.mask)
    out.index_copy_(0, d.rows, o.reshape(b, -1, o.shape[-1]))


def paged_attention(layer: int, q: torch.Tensor, cache: KVCacheStorage, batch: AttentionBatch,
                    kernels: str = "torch") -> torch.Tensor:
    """Attention output `[T, Hq, D]` for q `[T, Hq, D]`; the step's k/v must already be written to `cache`.
    `kernels="auto"`: decode tokens go to puyu's cpu kernel where it applies (SDPA over gathered blocks is the
    reference)."""
    out = torch.empty_like(q)
    _fresh_groups(layer, q, out, cache, batch.groups)
    _continued_chunks(layer, q, out, cache, batch.prefills)
    d = batch.decode
    if d is not None and not (kernels == "auto" and _decode_native(layer, q, out, cache, d)):
        _decode(layer, q, out, cache, d)
    return out
