"""Paged attention over the KV cache for one flattened step (prefill chunks and decode tokens together).

The step's tokens are flattened into one `[T, ...]` batch for the matmuls; attention is per sequence: a prefill chunk
attends causally over its cached context plus itself, and all single-token (decode) sequences run as one padded
batch. K/V are always read back from the cache (dequantised), so every path sees what the cache stores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVCacheStorage


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the flattened step
    q_len: int
    start_pos: int  # position of the chunk's first token (= tokens already in the cache)
    ctx_slots: torch.Tensor  # int64 [start_pos + q_len]: slots of the whole context


@dataclass
class DecodeBatch:
    rows: torch.Tensor  # int64 [B]: rows of the decode tokens in the flattened step
    ctx_slots: torch.Tensor  # int64 [B * L]: padded context slots (padding points at slot 0)
    mask: torch.Tensor  # bool [B, 1, 1, L]: True where a key is real
    max_len: int


@dataclass
class AttentionBatch:
    write_slots: torch.Tensor  # int64 [T]: where the step's k/v go
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode: Optional[DecodeBatch] = None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          causal: bool) -> torch.Tensor:
    """q `[..., Hq, n, D]`, k/v `[..., Hkv, L, D]`; GQA maps q head h onto kv head h // (Hq / Hkv)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def paged_attention(layer: int, q: torch.Tensor, cache: KVCacheStorage, batch: AttentionBatch) -> torch.Tensor:
    """Attention output `[T, Hq, D]` for q `[T, Hq, D]`; the step's k/v must already be written to `cache`."""
    out = torch.empty_like(q)
    for chunk in batch.prefills:
        k, v = cache.read(layer, chunk.ctx_slots)  # [L, Hkv, D]
        qc = q[chunk.q_start:chunk.q_start + chunk.q_len].transpose(0, 1)  # [Hq, n, D]
        mask = None
        if chunk.start_pos:
            key_pos = torch.arange(k.shape[0], device=q.device)
            q_pos = chunk.start_pos + torch.arange(chunk.q_len, device=q.device)
            mask = key_pos[None, :] <= q_pos[:, None]
        o = _sdpa(qc, k.transpose(0, 1), v.transpose(0, 1), mask, causal=not chunk.start_pos)
        out[chunk.q_start:chunk.q_start + chunk.q_len] = o.transpose(0, 1)
    d = batch.decode
    if d is not None:
        k, v = cache.read(layer, d.ctx_slots)
        b = d.rows.numel()
        k = k.view(b, d.max_len, *k.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
        v = v.view(b, d.max_len, *v.shape[1:]).transpose(1, 2)
        qd = q.index_select(0, d.rows).unsqueeze(2)  # [B, Hq, 1, D]
        o = _sdpa(qd, k, v, d.mask, causal=False)
        out.index_copy_(0, d.rows, o.squeeze(2))
    return out
