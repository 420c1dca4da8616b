"""Rotary position embedding on interleaved pairs, as TurboMind lays q/k out.

The converter permutes q/k rows so that pair j of a head is (x[2j], x[2j+1]), rotated by the angle
pos * theta^(-2j/D) (HF pairs x[j] with x[j + D/2] instead; the permutation makes the two equal).
Scaling as transformers/InternLM2 do it: `linear` divides the position by the factor; `dynamic` (NTK) enlarges the
base once a sequence is longer than the original context: base * (f * L / L0 - (f - 1)) ^ (D / (D - 2)), where L is the
sequence's length after this step (transformers uses max(position) + 1 of the forward). As in transformers, keys
already in the cache keep the rotation they were written with; a prompt prefilled in chunks (or revived from the
prefix cache) therefore sees, beyond the original context, slightly different keys than one prefilled at once.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..convert.spec import CheckpointError, ModelSpec

SUPPORTED_SCALING = ("", "linear", "dynamic")


class InterleavedRotary:
    def __init__(self, spec: ModelSpec, device: torch.device):
        if spec.rope_scaling_type not in SUPPORTED_SCALING:
            raise CheckpointError(f"config.json: rope_scaling type {spec.rope_scaling_type!r} is not supported by the "
                                  f"native engine (supported: none, linear, dynamic)")
        self.dim = spec.head_dim
        self.base = spec.rope_theta
        self.kind = spec.rope_scaling_type
        self.factor = spec.rope_scaling_factor if spec.rope_scaling_factor > 0 else 1.0
        self.original_len = spec.original_max_position_embeddings or spec.max_position_embeddings
        self.device = device
        self.inv_freq = self._inv_freq(self.base)

    def _inv_freq(self, base: float) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=self.device).float() / self.dim
        return 1.0 / (base ** exponents)

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        if seq_len <= self.original_len:
            return self.inv_freq
        base = self.base * ((self.factor * seq_len / self.original_len) - (self.factor - 1)) ** (
            self.dim / (self.dim - 2))
        return self._inv_freq(base)

    def cos_sin(self, positions: torch.Tensor, seq_lens: Optional[list[tuple[int, int]]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, D/2]` (float32) for positions `[T]`.

        `seq_lens`: (number of tokens, sequence length after this step) per sequence, in token order; only the
        dynamic scaling needs it.
        """
        pos = positions.to(torch.float32)
        if self.kind == "linear":
            pos = pos / self.factor
        if self.kind == "dynamic" and seq_lens:
            inv = torch.cat([self._dynamic_inv_freq(length).expand(n, -1) for n, length in seq_lens])
        else:
            inv = self.inv_freq.expand(len(pos), -1)
        angles = pos[:, None] * inv
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x `[T, H, D]` pairwise: (a, b) -> (a cos - b sin, b cos + a sin).

    cos/sin: `[T, D/2]` (cast to x's dtype here) or already `[T, 1, D/2]` in x's dtype (the model prepares them
    once per step instead of once per layer).
    """
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c = (cos if cos.dim() == 3 else cos[:, None, :]).to(x.dtype)
    s = (sin if sin.dim() == 3 else sin[:, None, :]).to(x.dtype)
    return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
