"""4-bit weights: round-to-nearest group quantisation (the packings are puyu/int4_packing.py, which the engine
shares). A quantised linear `W[in, out]` is `(q - z) * s` with q, z in 0..15 and s per group of `g` input rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..int4_packing import pack_awq


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
