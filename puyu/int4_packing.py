"""4-bit integers packed 8 to an int32 word along the last axis (../shared/spec/turbomind-format.md), shared by the
converter (AWQ checkpoints, workspaces) and the engine (4-bit linears, KV int4):
- AutoAWQ gemm: nibble i of word w holds column `8w + AWQ_ORDER[i]`;
- TurboMind workspace and KV cache: nibble i holds column `8w + i` (low nibble first, natural order).
"""
from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # the packings read an int32 word as 4 little-endian bytes
    raise ImportError("puyu's int4 packing assumes a little-endian machine")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NATURAL_ORDER = tuple(range(8))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for nibble, column in enumerate(order):
        inv[column] = nibble
    return tuple(inv)


def unpack_int4(packed: torch.Tensor, order: tuple[int, ...] = NATURAL_ORDER) -> torch.Tensor:
    """int32 `[..., n/8]` -> uint8 `[..., n]`; `order[i]` is the column held by nibble i."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 tensor must be int32, got {packed.dtype}")
    raw = packed.contiguous().view(torch.uint8)  # little-endian: byte j holds nibbles 2j (low) and 2j+1 (high)
    nibbles = torch.stack([raw & 15, raw >> 4], dim=-1).reshape(*packed.shape, 8)
    if order != NATURAL_ORDER:
        nibbles = nibbles[..., list(_inverse(order))]
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_int4(values: torch.Tensor, order: tuple[int, ...] = NATURAL_ORDER) -> torch.Tensor:
    """uint8 (or any integer) `[..., n]` with values 0..15 -> int32 `[..., n/8]`."""
    if values.shape[-1] % 8:
        raise ValueError(f"int4 packing needs a last dim that is a multiple of 8, got {values.shape[-1]}")
    nibbles = (values.to(torch.uint8) & 15).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    if order != NATURAL_ORDER:
        nibbles = nibbles[..., list(order)]  # nibble i holds column order[i]
    raw = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return raw.contiguous().view(torch.int32).reshape(*values.shape[:-1], values.shape[-1] // 8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    return unpack_int4(packed, AWQ_ORDER)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    return pack_int4(values, AWQ_ORDER)
