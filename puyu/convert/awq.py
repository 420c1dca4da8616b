"""4-bit weights: AutoAWQ "gemm" packing, TurboMind workspace packing, and round-to-nearest group quantisation.

Two packings of 4-bit integers along the last axis, 8 values per int32 word (../shared/spec/turbomind-format.md):
- AutoAWQ gemm: nibble i of word w holds column `8w + AWQ_ORDER[i]`;
- TurboMind workspace: nibble i holds column `8w + i` (low nibble first, natural order).
A quantised linear `W[in, out]` is `(q - z) * s` with q, z in 0..15 and s per group of `g` input rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    nibbles = [((packed >> (4 * i)) & 15).to(torch.uint8) for i in range(8)]
    columns = [nibbles[i] for i in _inverse(order)]
    return torch.stack(columns, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_int4(values: torch.Tensor, order: tuple[int, ...] = NATURAL_ORDER) -> torch.Tensor:
    """uint8 (or any integer) `[..., n]` with values 0..15 -> int32 `[..., n/8]`."""
    if values.shape[-1] % 8:
        raise ValueError(f"cannot pack {values.shape[-1]} columns into int32 words of 8 nibbles")
    groups = values.to(torch.int32).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    word = torch.zeros(groups.shape[:-1], dtype=torch.int32, device=values.device)
    for nibble, column in enumerate(order):
        word |= (groups[..., column] & 15) << (4 * nibble)
    return word


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

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> "QuantizedLinear":
        q, z = unpack_awq(qweight), unpack_awq(qzeros)
        groups = scales.shape[0]
        if q.shape[0] % max(groups, 1) or z.shape != scales.shape or q.shape[1] != scales.shape[1]:
            raise ValueError(f"inconsistent AWQ shapes: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                             f"scales {tuple(scales.shape)}")
        return cls(q, scales.half(), z, q.shape[0] // groups)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(q - z) * s` with z and s repeated over each group of `group_size` input rows: `[in, out]`."""
    s = scales.to(dtype).repeat_interleave(group_size, dim=0)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=0)
    return (q.to(dtype) - z) * s


def quantize_rtn(weight: torch.Tensor, group_size: int) -> QuantizedLinear:
    """Asymmetric round-to-nearest 4-bit quantisation of `weight [in, out]` per group of input rows.

    Scale and zero point are chosen from each group's min/max (zero point an integer in 0..15), as AutoAWQ does
    before its clipping search.
    """
    n_in, n_out = weight.shape
    if n_in % group_size:
        raise ValueError(f"input features {n_in} are not a multiple of the group size {group_size}")
    w = weight.float().reshape(n_in // group_size, group_size, n_out)
    w_max = w.amax(dim=1).clamp(min=0)
    w_min = w.amin(dim=1).clamp(max=0)
    scales = ((w_max - w_min) / 15).clamp(min=1e-5)
    # the scales are stored in fp16: quantise against the rounded value so that dequantisation is exact
    scales = scales.half().float()
    zeros = torch.clamp(torch.round(-w_min / scales), 0, 15)
    q = torch.clamp(torch.round(w / scales[:, None, :]) + zeros[:, None, :], 0, 15)
    return QuantizedLinear(q.reshape(n_in, n_out).to(torch.uint8), scales.half(), zeros.to(torch.uint8), group_size)
