"""4-bit weights: AutoAWQ "gemm" packing, TurboMind workspace packing, and round-to-nearest group quantisation.

Two packings of 4-bit integers along the last axis, 8 values per int32 word (../shared/spec/turbomind-format.md):
- AutoAWQ gemm: nibble i of word w holds column `8w + AWQ_ORDER[i]`;
- TurboMind workspace: nibble i holds column `8w + i` (low nibble first, natural order).
A quantised linear `W[in, out]` is `(q - z) * s` with q, z in 0..15 and s per group of `g` input rows.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

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


@dataclass
class QuantizedLinear:
    """One linear in `[in, out]` orientation: q uint8 `[in, out]`, scales fp16 and zeros uint8 `[in/g, out]`."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size, dtype)

    def to_awq(self) -> dict[str, torch.Tensor]:
        """AutoAWQ gemm tensors: qweight `[in, out/8]`, qzeros `[in/g, out/8]`, scales `[in/g, out]`."""
        return {"qweight": pack_awq(self.q), "qzeros": pack_awq(self.zeros), "scales": self.scales.half()}


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(q - z) * s` with z and s shared by each group of `group_size` input rows: `[in, out]`."""
    n_in, n_out = q.shape
    grouped = q.to(dtype).view(n_in // group_size, group_size, n_out)
    return ((grouped - zeros.to(dtype)[:, None]) * scales.to(dtype)[:, None]).view(n_in, n_out)


def _group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, as stored) and integer zero point of each group: `w` is `[groups, g, out]`."""
    w_max = w.amax(dim=1).clamp(min=0)
    w_min = w.amin(dim=1).clamp(max=0)
    scales = ((w_max - w_min) / 15).clamp(min=1e-5).half().float()
    zeros = torch.clamp(torch.round(-w_min / scales), 0, 15)
    return scales, zeros


def quantize_rtn(weight: torch.Tensor, group_size: int) -> QuantizedLinear:
    """Asymmetric round-to-nearest 4-bit quantisation of `weight [in, out]` per group of input rows.

    Scale and zero point are chosen from each group's min/max (zero point an integer in 0..15), as AutoAWQ does
    before its clipping search; quantising against the fp16-rounded scale makes dequantisation exact.
    """
    n_in, n_out = weight.shape
    if n_in % group_size:
        raise ValueError(f"input features {n_in} are not a multiple of the group size {group_size}")
    w = weight.float().reshape(n_in // group_size, group_size, n_out)
    scales, zeros = _group_params(w)
    q = torch.clamp(torch.round(w / scales[:, None, :]) + zeros[:, None, :], 0, 15)
    return QuantizedLinear(q.reshape(n_in, n_out).to(torch.uint8), scales.half(), zeros.to(torch.uint8), group_size)


def fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`quantize_rtn(weight).dequantize()` in float, without the integer tensors (for searches)."""
    n_in, n_out = weight.shape
    w = weight.float().reshape(n_in // group_size, group_size, n_out)
    scales, zeros = _group_params(w)
    s, z = scales[:, None, :], zeros[:, None, :]
    return ((torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s).reshape(n_in, n_out)
