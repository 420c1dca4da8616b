"""Tensor-parallel splits and merges of TurboMind-layout tensors (../shared/spec/turbomind-format.md).

`TPPlan.split(name, t)` turns one tp=1 tensor (names and shapes as `iter_turbomind_tensors` yields them) into the
per-rank files of the workspace: vocab rows and FFN width padded with zeros, KV heads duplicated when tp exceeds
their number, fused QKV merged per rank. `TPPlan.merge(name, parts)` undoes all of it, so that reading a workspace
gives back the tp=1 tensors exactly. Packed int4 weights are unpacked, split or merged, and packed again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..int4_packing import pack_int4, unpack_int4
from .spec import CheckpointError, ModelSpec

TP_SIZES = (1, 2, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)

# How each tensor is laid out across ranks, by its name without the rank.
_RULES = (
    # LoRA pairs: a linear split by its output splits B and copies A; one split by its input splits A and copies B
    (re.compile(r"^layers\.\d+\.(attention\.w_qkv|feed_forward\.w[13])\.lora_a\.weight$"), "copy"),
    (re.compile(r"^layers\.\d+\.(attention\.wo|feed_forward\.w2)\.lora_b\.weight$"), "copy"),
    (re.compile(r"^layers\.\d+\.attention\.w_qkv\.lora_b\.weight$"), "qkv"),
    (re.compile(r"^layers\.\d+\.attention\.wo\.lora_a\.weight$"), "rows"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w[13]\.lora_b\.weight$"), "ffn_cols"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w2\.lora_a\.weight$"), "ffn_rows"),
    (re.compile(r"^tok_embeddings\.weight$"), "embedding"),
    (re.compile(r"^output\.weight$"), "lm_head"),
    (re.compile(r"^(norm|layers\.\d+\.(attention_norm|ffn_norm))\.weight$"), "replicated"),
    (re.compile(r"^layers\.\d+\.attention\.w_qkv\.\w+$"), "qkv"),
    (re.compile(r"^layers\.\d+\.attention\.wo\.bias$"), "copy"),
    (re.compile(r"^layers\.\d+\.attention\.wo\.\w+$"), "rows"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w[13]\.\w+$"), "ffn_cols"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w2\.\w+$"), "ffn_rows"),
)


def rule_of(name: str) -> str:
    for pattern, rule in _RULES:
        if pattern.match(name):
            return rule
    raise CheckpointError(f"tensor {name!r} has no tensor-parallel rule (unknown TurboMind weight)")


def rank_file(name: str, rank: int) -> str:
    """`layers.0.attention.wo.weight`, 1 -> `layers.0.attention.wo.1.weight` (the rank goes before the kind;
    `...wo.lora_a.weight` -> `...wo.lora_a.1.weight`)."""
    base, kind = name.rsplit(".", 1)
    return f"{base}.{rank}.{kind}"


def padded_inter_size(inter_size: int, group_size: int, tp: int) -> int:
    g = max(1, group_size)
    return math.ceil(math.ceil(inter_size / g) / tp) * g * tp


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    return math.ceil(vocab_size / tp) * tp


@dataclass(frozen=True)
class TPPlan:
    """The split of one model over `tp` ranks. Sizes are the original (unpadded, undup) ones of the model."""

    tp: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    inter_size: int
    group_size: int = 0  # 0: float weights

    @classmethod
    def for_spec(cls, spec: ModelSpec, tp: int, group_size: int = 0) -> "TPPlan":
        plan = cls(tp, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.vocab_size,
                   spec.intermediate_size, group_size)
        plan.validate()
        return plan

    def validate(self) -> None:
        if self.tp not in TP_SIZES:
            raise CheckpointError(f"tp must be one of {TP_SIZES}, got {self.tp}")
        if self.num_heads % self.tp:
            raise CheckpointError(f"tp {self.tp} does not divide the {self.num_heads} attention heads")
        if self.num_kv_heads % self.tp and self.tp % self.num_kv_heads:
            raise CheckpointError(f"tp {self.tp} does not divide the {self.num_kv_heads} KV heads "
                                  f"(nor is it a multiple of them)")
        if self.group_size:
            self._validate_int4()

    def _validate_int4(self) -> None:
        g = self.group_size
        if g not in SUPPORTED_GROUP_SIZES:
            supported = ", ".join(map(str, SUPPORTED_GROUP_SIZES))
            raise CheckpointError(f"unsupported group size {g}; supported: {supported}")
        if self.hidden_size % g:
            raise CheckpointError(f"group size {g} does not divide hidden_size {self.hidden_size}")
        if (self.num_heads * self.head_dim // self.tp) % g:
            raise CheckpointError(f"group size {g} does not divide the attention output rows per rank "
                                  f"({self.num_heads} heads x {self.head_dim} / tp {self.tp})")
        if (self.num_heads // self.tp * self.head_dim) % 8 or (self.kv_heads_per_rank * self.head_dim) % 8:
            raise CheckpointError(f"head_dim {self.head_dim} with tp {self.tp} gives a per-rank QKV width that is "
                                  "not a multiple of 8 (int4 packing)")

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def kv_repeat(self) -> int:
        return self.tp // self.num_kv_heads if self.tp > self.num_kv_heads else 1

    @property
    def kv_heads_stored(self) -> int:
        return self.num_kv_heads * self.kv_repeat

    @property
    def kv_heads_per_rank(self) -> int:
        return self.kv_heads_stored // self.tp

    @property
    def vocab_pad(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tp)

    @property
    def inter_pad(self) -> int:
        return padded_inter_size(self.inter_size, self.group_size, self.tp)

    def _ffn_len(self, kind: str) -> tuple[int, int]:
        """(unpadded, padded) length of the FFN axis for a tensor kind (scales/zeros count groups)."""
        if kind in ("scales", "zeros"):
            return self.inter_size // self.group_size, self.inter_pad // self.group_size
        return self.inter_size, self.inter_pad

    # ---- split ---------------------------------------------------------------------------------------------------
    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(file name, tensor) per rank for one tp=1 tensor; replicated tensors get one file without a rank."""
        rule = rule_of(name)
        if rule == "replicated":
            return [(name, t)]
        kind = name.rsplit(".", 1)[1]
        packed = kind == "qweight"
        x = unpack_int4(t) if packed else t
        parts = getattr(self, f"_split_{rule}")(x, kind)
        if packed:
            parts = [pack_int4(p) for p in parts]
        return [(rank_file(name, r), p.contiguous()) for r, p in enumerate(parts)]

    def _split_embedding(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return list(_pad(t, 0, self.vocab_pad).chunk(self.tp, dim=1))

    def _split_lm_head(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return list(_pad(t, 0, self.vocab_pad).chunk(self.tp, dim=0))

    def _split_copy(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return [t] * self.tp

    def _split_rows(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return list(t.chunk(self.tp, dim=0))

    def _split_ffn_cols(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        return list(_pad(t, t.dim() - 1, self.inter_pad).chunk(self.tp, dim=-1))

    def _split_ffn_rows(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        if t.dim() == 1:  # a w2 bias: the output is not split
            return [t] * self.tp
        return list(_pad(t, 0, self._ffn_len(kind)[1]).chunk(self.tp, dim=0))

    def _split_qkv(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        q, k, v = self._qkv_heads(t, self.num_heads, self.num_kv_heads)
        if self.kv_repeat > 1:
            k, v = (x.repeat_interleave(self.kv_repeat, dim=-2) for x in (k, v))
        per_rank = zip(q.chunk(self.tp, dim=-2), k.chunk(self.tp, dim=-2), v.chunk(self.tp, dim=-2))
        return [torch.cat([a.flatten(-2), b.flatten(-2), c.flatten(-2)], dim=-1) for a, b, c in per_rank]

    def _qkv_heads(self, t: torch.Tensor, hq: int, hkv: int) -> tuple[torch.Tensor, ...]:
        """Split the last axis of a fused QKV tensor into q, k, v viewed as `[..., heads, D]`."""
        d = self.head_dim
        if t.shape[-1] != (hq + 2 * hkv) * d:
            raise CheckpointError(f"fused QKV has {t.shape[-1]} output columns, expected ({hq} + 2 x {hkv}) x {d}")
        q, k, v = t.split([hq * d, hkv * d, hkv * d], dim=-1)
        return tuple(x.unflatten(-1, (-1, d)) for x in (q, k, v))

    # ---- merge ---------------------------------------------------------------------------------------------------
    def merge(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The tp=1 unpadded tensor from its per-rank parts (one part for replicated tensors)."""
        rule = rule_of(name)
        if rule == "replicated":
            return parts[0]
        if len(parts) != self.tp:
            raise CheckpointError(f"{name}: {len(parts)} rank files for tp {self.tp}")
        if self.tp == 1 and (rule in ("qkv", "rows", "copy") or
                             (rule.startswith("ffn") and self.inter_pad == self.inter_size)):
            return parts[0]  # nothing to undo: keep the file's own (memory-mapped) tensor
        kind = name.rsplit(".", 1)[1]
        packed = kind == "qweight"
        xs = [unpack_int4(p) for p in parts] if packed else parts
        merged = getattr(self, f"_merge_{rule}")(xs, kind)
        return pack_int4(merged) if packed else merged

    def _merge_embedding(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return _cat(parts, 1)[: self.vocab_size]

    def _merge_lm_head(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return _cat(parts, 0)[: self.vocab_size]

    def _merge_copy(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return parts[0]

    def _merge_rows(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return _cat(parts, 0)

    def _merge_ffn_cols(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return _cat(parts, -1)[..., : self.inter_size]

    def _merge_ffn_rows(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        if parts[0].dim() == 1:
            return parts[0]
        return _cat(parts, 0)[: self._ffn_len(kind)[0]]

    def _merge_qkv(self, parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        hq, hkv = self.num_heads // self.tp, self.kv_heads_per_rank
        split = [self._qkv_heads(p, hq, hkv) for p in parts]
        q, k, v = (torch.cat([s[i] for s in split], dim=-2) for i in range(3))
        if self.kv_repeat > 1:  # the copies are adjacent: keep the first of each run
            k, v = k[..., :: self.kv_repeat, :], v[..., :: self.kv_repeat, :]
        return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Append zeros along `dim` up to `size`."""
    extra = size - t.shape[dim]
    if extra < 0:
        raise CheckpointError(f"tensor of shape {tuple(t.shape)} is larger than {size} along axis {dim}")
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=dim)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
