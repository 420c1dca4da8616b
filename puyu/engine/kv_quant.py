"""KV-cache quantisation with TurboMind's formulas (../shared/spec/kv-quant.md).

Per token and per KV head, over the `head_dim` values x of that head (asymmetric):

    zero  = min(x)
    scale = (max(x) - min(x)) / (2^b - 1)          b = 8 (int8) or 4 (int4)
    q     = clamp(round_half_to_even((x - zero) / scale), 0, 2^b - 1)
    x_hat = q * scale + zero

`scale` and `zero` are stored in the compute dtype. They are computed in float32 and rounded to the compute dtype
*before* `q` is computed, so that the dequantisation uses exactly the parameters the integers were made with (as
TurboMind does: it quantises with the 16-bit parameters it stores).
A constant vector (max == min) gives scale 0: we divide by 1 instead (LMDeploy has no guard), so q = 0 and
x_hat = zero = x exactly.

int4 packing (our own, CPU-friendly; TurboMind orders nibbles 0,2,4,6,1,3,5,7 for its GPU kernels): 8 values per
int32 word, value j of a group of 8 in bits [4j, 4j+4) ("low nibble first", the same order as puyu's 4-bit
weights). `head_dim` must be a multiple of 8.
"""
from __future__ import annotations

import torch

# one int4 packing for 4-bit weights and the KV cache (natural order, low nibble first)
from ..int4_packing import pack_int4, unpack_int4  # noqa: F401  (re-exported)

SUPPORTED_BITS = (8, 4)
NIBBLES_PER_WORD = 8


def qmax(bits: int) -> int:
    """The largest quantised value, 2^b - 1."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return (1 << bits) - 1


def quant_params(x: torch.Tensor, bits: int, param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) over the last dim of `x`, in `param_dtype`; shapes `x.shape[:-1]`."""
    xf = x.float()
    lo, hi = xf.amin(dim=-1), xf.amax(dim=-1)  # (torch.aminmax was much slower on small cpu tensors)
    scale = (hi - lo) / qmax(bits)
    return scale.to(param_dtype), lo.to(param_dtype)


def quantize(x: torch.Tensor, bits: int, param_dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise over the last dim. Returns (q uint8 of `x.shape`, scale, zero) with scale/zero in `param_dtype`
    (default: `x.dtype`)."""
    scale, zero = quant_params(x, bits, param_dtype or x.dtype)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # the constant-vector guard
    q = torch.sub(x.float(), zero.float().unsqueeze(-1)).div_(safe).round_()  # round_: half to even
    q = q.clamp_(0, qmax(bits)).masked_fill_(s == 0, 0)
    return q.to(torch.uint8), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = q * scale + zero (computed in float32, returned in `dtype`); scale/zero broadcast over the last dim."""
    x_hat = torch.addcmul(zero.float().unsqueeze(-1), q.float(), scale.float().unsqueeze(-1))
    return x_hat.to(dtype)


