"""What puyu needs to know about one architecture's Hugging Face checkpoint: its tensor names, and how its q/k/v
come apart. One `HFLayout` per file in this folder; `puyu.convert.archs.layout(key)` finds it.

Everything that reads, writes, quantises or maps HF tensors (readers.py, quantize.py, awq_scale.py, reference.py,
tiny.py) asks the layout instead of spelling names out, so a new architecture is one file here plus a fixture.
Names are relative to `model.layers.N.` for per-layer tensors and end before `.weight`/`.bias`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:  # no torch at import: spec.py (and so every CLI argument check) imports this registry
    import torch

TensorGetter = Callable[[str], "torch.Tensor"]


class HeadShape(Protocol):
    """The attention shape the q/k/v surgery needs (a ModelSpec is one; so is `Heads`)."""

    @property
    def num_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


@dataclass(frozen=True)
class Heads:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class HFLayout:
    key: str  # ModelSpec.arch
    hf_architectures: tuple[str, ...]  # config.json `architectures[0]` values served with this layout
    embed: str
    lm_head: str
    attn_norm: str
    ffn_norm: str
    qkv: tuple[str, ...]  # one name: a fused, grouped [kv_head: q.., k, v] projection (InternLM2); else q, k, v
    o: str
    gate: str
    up: str
    down: str
    final_norm: str = "model.norm.weight"

    @property
    def linears(self) -> tuple[str, ...]:
        """The per-layer linears, in checkpoint order."""
        return (*self.qkv, self.o, self.gate, self.up, self.down)

    def qkv_parts(self, get: TensorGetter, prefix: str, spec: HeadShape, kind: str) -> list[torch.Tensor]:
        """q, k, v weights (kind 'weight') or biases ('bias') of one layer, each with its output rows first."""
        if len(self.qkv) == 1:
            return list(split_grouped_qkv(get(f"{prefix}{self.qkv[0]}.{kind}"), spec))
        return [get(f"{prefix}{name}.{kind}") for name in self.qkv]

    def join_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HeadShape) -> dict[str, torch.Tensor]:
        """The checkpoint tensors (relative names, without the kind) holding q, k, v: the inverse of `qkv_parts`."""
        if len(self.qkv) == 1:
            return {self.qkv[0]: group_qkv(q, k, v, spec)}
        return dict(zip(self.qkv, (q, k, v)))


def split_grouped_qkv(t: torch.Tensor, spec: HeadShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A grouped projection `[kv_heads, q_per_kv + 2, D, ...]` (each KV head's q heads, then its k and v) -> q, k, v."""
    g, d = spec.num_heads // spec.num_kv_heads, spec.head_dim
    grouped = t.reshape(spec.num_kv_heads, g + 2, d, *t.shape[1:])
    q = grouped[:, :g].reshape(spec.num_heads * d, *t.shape[1:])
    k = grouped[:, g].reshape(spec.num_kv_heads * d, *t.shape[1:])
    v = grouped[:, g + 1].reshape(spec.num_kv_heads * d, *t.shape[1:])
    return q, k, v


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HeadShape) -> torch.Tensor:
    """The inverse of `split_grouped_qkv`."""
    import torch

    g, d, hkv = spec.num_heads // spec.num_kv_heads, spec.head_dim, spec.num_kv_heads
    rest = q.shape[1:]
    parts = [q.reshape(hkv, g, d, *rest), k.reshape(hkv, 1, d, *rest), v.reshape(hkv, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)
