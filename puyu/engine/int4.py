"""`Int4Linear`: a linear layer over 4-bit group-quantised weights in TurboMind workspace packing.

Weights `W [in, out] = (q - z) * s`: `qweight` int32 `[in, out/8]` (8 consecutive output columns per word, low
nibble first), `scales` and `zeros` fp16 `[in/g, out]` (the zero point an integer stored as a float).
`y = lin(x)` computes `x @ W (+ bias)`. Where torch has a fused int4 matmul for the device (`aten._weight_int4pack_mm`
on CUDA, `_weight_int4pack_mm_for_cpu` on CPU) the weights are repacked once for it; otherwise the weights are
dequantised group-wise for each call (nothing dense is kept in memory).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..int4_packing import unpack_int4

_FUSED_GROUP_SIZES = (32, 64, 128, 256)


class Int4Linear:
    """`Int4Linear(qweight, scales, zeros, group_size, bias=None)`; call it on `x [..., in]` for `[..., out]`.

    `fused=None` uses a fused int4 kernel when torch has one for the device (checked on first use), `False`
    always dequantises, `True` requires the kernel.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: Optional[torch.Tensor] = None, fused: Optional[bool] = None):
        _check(qweight, scales, zeros, group_size)
        self.qweight, self.scales, self.zeros, self.bias = qweight, scales, zeros, bias
        self.group_size = group_size
        self.in_features, self.out_features = qweight.shape[0], qweight.shape[1] * 8
        self.fused = fused
        self._packed: dict[tuple, Any] = {}  # per device/dtype: the kernel's packing, and its check

    def __repr__(self) -> str:
        return (f"Int4Linear(in={self.in_features}, out={self.out_features}, group_size={self.group_size}, "
                f"fused={self.fused})")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense `[in, out]` weight."""
        groups = self.in_features // self.group_size
        q = unpack_int4(self.qweight).to(dtype).view(groups, self.group_size, self.out_features)
        s = self.scales.to(q.device, dtype).unsqueeze(1)
        z = self.zeros.to(q.device, dtype).unsqueeze(1)
        return ((q - z) * s).view(self.in_features, self.out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        y = self._fused(x) if self._use_fused(x) else x @ self.dequantize(x.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    # ---- fused kernels ---------------------------------------------------------------------------------------------
    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.fused is False:
            return False
        ok = self._fused_available(x) and self._fused_agrees(x)
        if self.fused and not ok:
            raise RuntimeError(f"no fused int4 matmul for {x.device.type} / {x.dtype} / group size {self.group_size}")
        return ok

    def _fused_agrees(self, x: torch.Tensor) -> bool:
        """Once per device/dtype: the kernel must reproduce the dequantised product (its packing conventions have
        changed across torch releases); otherwise this layer keeps dequantising."""
        key = ("checked", x.device, x.dtype)
        if key not in self._packed:
            probe = torch.randn(4, self.in_features, generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
            try:
                got = self._fused(probe).float()
            except RuntimeError:
                got = None
            want = probe.float() @ self.dequantize(torch.float32).to(x.device)
            good = got is not None and bool((got - want).norm() <= 0.02 * want.norm() + 1e-3)
            self._packed[key] = good
        return bool(self._packed[key])

    def _fused_available(self, x: torch.Tensor) -> bool:
        if self.group_size not in _FUSED_GROUP_SIZES or self.out_features % 8:
            return False
        if x.device.type == "cuda":
            return (x.dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
                    and self.in_features % 256 == 0)  # 16 x inner_k_tiles (8)
        if x.device.type == "cpu":
            # fp32 through this kernel is slower than dequantising; bf16 is many times faster
            return x.dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        return False

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = self._pack_for(x)
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, packed, self.group_size, scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _pack_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's int4 packing (`[out, in]` values) and `[in/g, out, 2]` scale/offset, built once per device/dtype.

        torch dequantises as `(q - 8) * s + m`; ours is `(q - z) * s`, so `m = (8 - z) * s`.
        """
        key = (x.device, x.dtype)
        if key not in self._packed:
            q = unpack_int4(self.qweight.to(x.device)).t().contiguous().to(torch.int32)  # [out, in]
            if x.device.type == "cuda":
                pairs = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
                packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            s = self.scales.to(x.device, torch.float32)
            z = self.zeros.to(x.device, torch.float32)
            scales_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(x.dtype).contiguous()
            self._packed[key] = (packed, scales_zeros)
        return self._packed[key]


def _check(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"Int4Linear: qweight must be a 2-D int32 tensor [in, out/8], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    if group_size <= 0 or n_in % group_size:
        raise ValueError(f"Int4Linear: group_size {group_size} does not divide the {n_in} input features")
    expected = (n_in // group_size, n_out)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected:
            raise ValueError(f"Int4Linear: {name} has shape {tuple(t.shape)}, expected {expected}")
